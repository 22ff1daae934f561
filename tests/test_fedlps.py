"""FedLPS: P-UCBV by hand, masks and scores, personalised evaluation, resuming, end to end."""
import copy
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import client_of, local_update, make_config
from fedlps.masks import fixed_masks, keep_count, keep_widths, score_masks, straight_through, topk_mask
from fedlps.pucbv import PUCBV, Arm, utility
from fedlps.strategy import FedLPS, FedLPSParams
from harness.cost import client_time
from harness.experiment import Experiment
from harness.state import dumps, loads
from harness.records import ClientResult, ClientSlot, ClientTask
from harness.state import MemoryStore
from harness.submodel import unit_l1_norms
from harness.training import threads, train_alone
from harness.workbench import Workbench

# ---------------------------------------------------------------------------------------------------
# P-UCBV


class Scripted(random.Random):
    """A generator whose random() is scripted (to force exploitation), everything else seeded."""

    def __init__(self, value):
        super().__init__(0)
        self.value = value

    def random(self):
        return self.value


def test_pucbv_indices_by_hand():
    b = PUCBV.new(seed=1, horizon=10.0)
    assert [a.low for a in b.arms] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert [a.high for a in b.arms] == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0])
    assert all(a.rewards == [0.0] and a.n == 1 for a in b.arms)
    # m = 0, K = 5, T = 10: psi = 10 / 25, ln(psi * T * 2^0) = ln 4; mean 0, var 0, n 1
    assert b.indices() == pytest.approx([math.sqrt(0.5 * 2 * math.log(4) / 4)] * 5)
    b.arms[2] = Arm(0.7, 0.8, [0.0, 1.0, 2.0], 3)  # mean 1, population variance 2/3
    b.decisions = 1  # ln(4 * 2^-1) = ln 2
    assert b.indices()[2] == pytest.approx(1.0 + math.sqrt(0.5 * (2 / 3 + 2) * math.log(2) / (4 * 3)))
    assert b.indices()[0] == pytest.approx(math.sqrt(0.5 * 2 * math.log(2) / 4))
    b.decisions = 3  # ln(4 / 8) < 0: no bonus, the index is the mean
    assert b.indices() == pytest.approx([0.0, 0.0, 1.0, 0.0, 0.0])
    b.arms.append(Arm(1.0, 1.0))  # K = 6: psi * T = 100 / 36
    b.decisions = 0
    assert b.exploration_log() == pytest.approx(math.log(100 / 36))
    b.decisions = 2000  # 2^-2000 is 0 in floating point: the bonus must vanish, not raise
    assert b.exploration_log() == 0.0 and b.indices()[2] == pytest.approx(1.0)
    b = PUCBV.new(seed=1, horizon=10.0)
    for _ in range(1200):  # a client that decides for ever
        b.observe(b.decide().ratio, 0.5, 1.0)


def test_pucbv_split_and_exploitation():
    b = PUCBV.new(seed=3, horizon=10.0)
    d = b.decide()  # m = 0: explores
    assert d.explored and d.low <= d.ratio < d.high and b.decisions == 1
    j = d.arm
    assert len(b.arms) == 6
    assert (b.arms[j].low, b.arms[j].high) == (d.low, d.ratio)
    assert (b.arms[j + 1].low, b.arms[j + 1].high) == (d.ratio, d.high)
    assert all(b.arms[i].high == b.arms[i + 1].low for i in range(5))
    b.arms[j].rewards.append(5.0)  # the halves own separate copies
    assert b.arms[j + 1].rewards == [0.0]

    # m = 2: exploration with probability 1/2; a scripted draw of 0.9 exploits the best index
    b = PUCBV.new(seed=3, horizon=10.0)
    b.decisions = 2
    b.arms[3] = Arm(0.8, 0.9, [0.0, 3.0], 2)
    b.rng = Scripted(0.9)
    d = b.decide()
    assert not d.explored and d.arm == 3 and (d.low, d.high) == pytest.approx((0.8, 0.9))
    assert b.arms[3].rewards == b.arms[4].rewards == [0.0, 3.0] and b.arms[3].n == b.arms[4].n == 2


def test_pucbv_reward_crediting():
    b = PUCBV.new(seed=1, horizon=10.0)
    b.arms[1:2] = [Arm(0.6, 0.65), Arm(0.65, 0.7)]  # as after a split at a = 0.65
    # the drawn ratio itself belongs to the upper half; 1.0 to the last arm
    assert b.arm_of(0.65) == 2 and b.arm_of(0.6499) == 1 and b.arm_of(1.0) == 5 and b.arm_of(0.5) == 0
    r, j = b.observe(ratio=0.65, acc=0.8, seconds=2.0)  # first reward: against U(0) = 0
    assert utility(0.0) == 0.0
    assert r == pytest.approx((10 - 20 / (1 + math.exp(0.35 * 0.8))) / 2.0) and j == 2
    assert b.arms[2].rewards == [0.0, pytest.approx(r)] and b.arms[2].n == 2
    assert b.best_acc == 0.8
    # a tier cap of 1/16 pushed the ratio below every arm: no arm is credited, the accuracy counts
    before = copy.deepcopy(b.arms)
    r2, j2 = b.observe(ratio=0.0625, acc=0.9, seconds=0.5)
    assert j2 is None and b.arms == before and b.best_acc == 0.9
    assert r2 == pytest.approx((utility(0.9) - utility(0.8)) / 0.5)
    # a capped ratio still inside the arms (cap 1/2 -> 0.5) credits the arm holding it; a worse
    # accuracy gives a negative reward against the best earlier one
    r3, j3 = b.observe(ratio=0.5, acc=0.7, seconds=1.0)
    assert j3 == 0 and r3 == pytest.approx(utility(0.7) - utility(0.9)) and r3 < 0
    assert b.best_acc == 0.9


def test_pucbv_is_reproducible_and_checkpointable():
    def play(b, n):
        out = []
        for i in range(n):
            d = b.decide()
            b.observe(d.ratio, acc=0.1 * (i % 7), seconds=1.0 + i)
            out.append((d.ratio, d.arm))
        return out

    a, b = PUCBV.new(seed=7, horizon=10.0), PUCBV.new(seed=7, horizon=10.0)
    assert play(a, 12) == play(b, 12)
    assert play(PUCBV.new(seed=8, horizon=10.0), 12) != play(PUCBV.new(seed=7, horizon=10.0), 12)
    state = loads(dumps(a.to_dict()))  # through the state store: plain data
    resumed = PUCBV.from_dict(state)
    assert resumed.to_dict() == a.to_dict()
    assert play(resumed, 8) == play(a, 8)


# ---------------------------------------------------------------------------------------------------
# Masks


def test_topk_masks_per_layer():
    assert [keep_count(n, r) for n, r in [(10, 1 / 16), (20, 1 / 8), (50, 0.25), (10, 0.3), (50, 0.99), (20, 1)]] \
        == [1, 2, 12, 3, 49, 20]
    assert keep_widths({"conv1": 10, "conv2": 20, "fc1": 50}, 0.5) == {"conv1": 5, "conv2": 10, "fc1": 25}
    # ties go to the lower unit index, whatever the sort would do otherwise
    assert topk_mask(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), 2).tolist() == [0, 1, 1, 0, 0]
    assert topk_mask(torch.zeros(6), 4).tolist() == [1, 1, 1, 1, 0, 0]
    scores = {"a": torch.tensor([0.3, -1.0, 5.0, 0.3]), "b": torch.tensor([50.0, 60.0, 70.0])}
    # sigmoid saturates 50, 60, 70 to 1.0 in float32: a tie, broken by index
    assert {g: m.tolist() for g, m in score_masks(scores, {"a": 2, "b": 1}).items()} == \
        {"a": [1, 0, 1, 0], "b": [1, 0, 0]}
    s = torch.tensor([0.5, -0.5], requires_grad=True)
    m = straight_through(torch.tensor([1.0, 0.0]), s)
    assert m.tolist() == [1.0, 0.0]  # forward: exactly the hard mask
    m.sum().backward()
    assert s.grad.tolist() == pytest.approx((torch.sigmoid(s) * (1 - torch.sigmoid(s))).tolist())


def test_fixed_mask_strategies():
    full = {"g": 6}
    norms = {"g": torch.tensor([1.0, 5.0, 3.0, 5.0, 0.0, 2.0])}
    assert fixed_masks("magnitude", {"g": 3}, full, norms=norms)["g"].tolist() == [0, 1, 1, 1, 0, 0]
    assert fixed_masks("ordered", {"g": 2}, full)["g"].tolist() == [1, 1, 0, 0, 0, 0]
    r1 = fixed_masks("random", {"g": 3}, full, torch.Generator().manual_seed(1))["g"]
    r2 = fixed_masks("random", {"g": 3}, full, torch.Generator().manual_seed(1))["g"]
    assert torch.equal(r1, r2) and r1.sum() == 3


def test_unit_l1_norms_sum_incoming_weights():
    from harness.models import CLASSES, Dim

    layout = {"a.weight": (Dim("h"), Dim(None)), "a.bias": (Dim("h"),), "b.weight": (Dim("h"), Dim("h")),
              "out.weight": (Dim(CLASSES), Dim("h"))}
    state = {"a.weight": torch.tensor([[1.0, -2.0], [0.5, 0.0]]), "a.bias": torch.tensor([9.0, 9.0]),
             "b.weight": torch.tensor([[-1.0, 1.0], [0.0, 3.0]]), "out.weight": torch.ones(3, 2)}
    assert unit_l1_norms(state, layout)["h"].tolist() == [5.0, 3.5]  # coupled: a and b summed


# ---------------------------------------------------------------------------------------------------
# Local training


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with threads(1):  # as the serial engine runs client tasks; tiny models gain nothing from more
        yield


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("fedlps"), **{"method.name": "fedlps", "engine.backend": "serial"})
    return Workbench(cfg)


def strategy(bench, **params):
    s = FedLPS(bench, FedLPSParams(**params))
    s.setup(MemoryStore())
    return s


def task(bench, cid, ratio=0.5, state=None, rnd=0):
    return ClientTask(cid, rnd, bench.cfg.devices.tiers[-1], {"keep_ratio": ratio}, state)


def recorded_update(s, broadcast, task, log):
    """local_update, recording the scores before and after training and checking, before every
    minibatch, that the previous step left every masked coordinate exactly as it was."""
    job = client_of(s).local_job(broadcast, task)
    model = s.bench.loaded(job)
    hooks = job.hooks(model)
    log.update(checked=0, mask_changes=0, scores_before=[p.detach().clone() for p in hooks.extra_params])
    prepare, snap = hooks.before_batch, {}

    def check_then_prepare():
        params = dict(model.named_parameters())
        if snap:
            for name, mask in snap["masks"].items():
                frozen = mask == 0
                assert torch.equal(params[name].detach()[frozen], snap["params"][name][frozen])
                log["checked"] += int(frozen.any())
        prepare()
        masks = hooks.update_masks()
        if snap and any(not torch.equal(masks[k], snap["masks"][k]) for k in masks):
            log["mask_changes"] += 1
        snap["params"] = {n: p.detach().clone() for n, p in params.items()}
        snap["masks"] = {k: v.clone() for k, v in masks.items()}

    hooks.before_batch = check_then_prepare
    job.hooks = lambda _model: hooks
    train_alone(job, model)
    log["scores_after"] = [p.detach().clone() for p in hooks.extra_params]
    return client_of(s).local_result(broadcast, task, job)


def test_masked_units_receive_no_weight_update(bench):
    # paper variant: the mask is recomputed before every minibatch; a large score lr makes it move
    s, log = strategy(bench, score_lr=50.0), {}
    result = recorded_update(s, s.global_state, task(bench, 3, ratio=0.25), log)
    assert log["checked"] > 0 and log["mask_changes"] > 0
    # the upload is zero outside the final mask's coordinates and the personal model keeps them
    widths = keep_widths(bench.full_widths, 0.25)
    assert result.flops == 3 * bench.flops.forward(widths) * result.num_samples
    w = result.payload["conv1.weight"]
    kept_rows = (w.flatten(1).abs().sum(1) > 0).sum()
    assert 0 < kept_rows <= widths["conv1"]
    assert result.bytes_down == sum(v.numel() * 4 for v in s.global_state.values())
    assert result.bytes_up < result.bytes_down / 2


def test_fixed_mask_keeps_masked_units_at_global_values(bench):
    s = strategy(bench, keep_ratio_policy="fixed", keep_ratio=0.5, mask="ordered")
    result = local_update(s, s.global_state, task(bench, 4))
    d = result.payload
    assert d["conv2.weight"][10:].abs().sum() == 0 and d["conv2.bias"][10:].abs().sum() == 0
    assert d["conv2.weight"][:10, :5].abs().sum() > 0
    assert d["conv2.weight"][:, 5:].abs().sum() == 0  # inputs from masked conv1 units
    assert d["fc1.weight"][:, 10 * 16:].abs().sum() == 0  # flattened inputs of masked conv2 units
    assert d["fc2.weight"][:, :25].abs().sum() > 0 and d["fc2.weight"][:, 25:].abs().sum() == 0


@pytest.mark.parametrize("variant,lam,moves", [("paper", 0.0, True), ("reference", 0.0, False),
                                               ("reference", 1.0, True)])
def test_scores_move_by_the_task_gradient_only_in_the_paper_variant(bench, variant, lam, moves):
    s, log = strategy(bench, variant=variant, lam=lam), {}
    result = recorded_update(s, s.global_state, task(bench, 5), log)
    before, after = log["scores_before"], log["scores_after"]
    assert len(before) == 3 and [len(x) for x in before] == [10, 20, 50]
    # the reference's weight decay on the scores (1 - lr x 1.2e-6 per step, tests/test_reference.py)
    # moves them by far less than 1e-5 of their value in a few steps: that is not learning
    changed = any(not torch.allclose(a, b, rtol=1e-5, atol=0) for a, b in zip(before, after))
    assert changed == moves
    if variant == "paper":
        assert set(result.state) == set(bench.full_widths)
        assert all(torch.equal(result.state[g], a.cpu()) for g, a in zip(sorted(result.state), after))
    else:
        assert result.state is None  # scores are re-drawn every round: no personal state
        # a prefix mask at round start: sorted scores
        assert all(torch.equal(b, torch.sort(b, descending=True).values) for b in before)


def test_paper_scores_persist_per_client(bench):
    s = strategy(bench)
    first = local_update(s, s.global_state, task(bench, 6))
    again = local_update(s, s.global_state, task(bench, 6, state=first.state, rnd=1))
    fresh = local_update(s, s.global_state, task(bench, 6, rnd=1))
    assert not torch.equal(again.state["fc1"], fresh.state["fc1"])
    # initialised from sigmoid(||W_u||_1) plus small noise
    norms = unit_l1_norms(s.global_state, bench.layout)
    assert (first.state["conv1"] - torch.sigmoid(norms["conv1"])).abs().max() < 0.2


def test_personalised_evaluation_uses_each_clients_own_model(bench):
    s = strategy(bench, keep_ratio_policy="fixed", keep_ratio=0.5, mask="ordered")
    g = s.global_state
    results = [local_update(s, g, task(bench, c)) for c in (1, 2)]
    for r in results:
        r.sim_compute_s, r.sim_up_s, r.sim_down_s = 1.0, 1.0, 1.0
        # the personal model = global + masked update, with the prefix mask
        model = bench.load(bench.build(), {k: g[k] + r.payload[k] for k in g})
        model.unit_masks = {grp: (torch.arange(n) < n // 2).float() for grp, n in bench.full_widths.items()}
        assert bench.accuracy_on_client(model, r.client_id)["mirrored"] == r.metrics["acc_personal"]
    s.aggregate(0, results, [])
    ev = s.evaluate(0)
    global_acc = bench.evaluate_global(s.global_state).clients["mirrored"]
    assert ev.acc_global is None
    acc = ev.clients["mirrored"]
    assert [acc[1], acc[2]] == [r.metrics["acc_personal"] for r in results]
    others = np.setdiff1d(np.arange(len(bench.clients)), [1, 2])
    assert np.array_equal(acc[others], global_acc[others])
    assert np.array_equal(ev.global_clients["mirrored"], global_acc, equal_nan=True)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_reference_quirks_in_aggregation(bench, variant):
    s = strategy(bench, variant=variant, keep_ratio_policy="rcr")
    zeros = {k: torch.zeros_like(v) for k, v in s.global_state.items()}

    def result(cid, ratio, acc):
        return ClientResult(cid, 0, payload=zeros, keep_ratio=ratio, train_acc=0.5, metrics={"acc_personal": acc},
                            sim_compute_s=1.0, sim_up_s=1.0, sim_down_s=1.0)

    before = copy.deepcopy(s.global_state)
    s.aggregate(0, [result(7, 0.25, 0.9), result(8, 0.5, 0.7)], [])
    diff = torch.cat([(s.global_state[k] - before[k]).flatten() for k in before])
    personal = s.personal_acc["mirrored"]
    assert personal[8] == 0.7
    if variant == "paper":
        assert personal[7] == 0.9 and diff.abs().max() == 0
    else:  # a training at 1/4 does not replace the personal model; noise of std 0.001 on the aggregate
        assert np.isnan(personal[7])
        assert 0.0008 < float(diff.std()) < 0.0012


# ---------------------------------------------------------------------------------------------------
# Resuming and end to end


def play_round(bench, s, store, rnd, clients):
    tiers = bench.devices.tiers_for_round(rnd)
    slots = [ClientSlot(c, bench.cfg.devices.tiers[tiers[c]], bench.clients[c].num_samples) for c in clients]
    broadcast, instructions = s.configure(rnd, slots)
    results = []
    for slot, ins in zip(slots, instructions):
        r = local_update(s, broadcast, ClientTask(slot.client_id, rnd, slot.tier, ins, store.get(slot.client_id)))
        t = client_time(slot.tier, bench.cfg.devices, r.flops, r.bytes_down, r.bytes_up)
        r.sim_down_s, r.sim_compute_s, r.sim_up_s = t.down_s, t.compute_s, t.up_s
        if r.state is not None:
            store.put(r.client_id, r.state)
        results.append(r)
    s.aggregate(rnd, results, [])
    return results, s.evaluate(rnd).clients["mirrored"]


def test_state_dict_and_store_resume_the_same_numbers(bench):
    store = MemoryStore()
    s = FedLPS(bench, FedLPSParams())
    s.setup(store)
    play_round(bench, s, store, 0, [0, 1])
    play_round(bench, s, store, 1, [1, 2])
    saved, rows = copy.deepcopy(s.state_dict()), store.export()
    results, acc = play_round(bench, s, store, 2, [1, 2])

    store2 = MemoryStore()
    s2 = FedLPS(bench, FedLPSParams())
    s2.setup(store2)
    s2.load_state_dict(saved)
    store2.restore(rows)
    results2, acc2 = play_round(bench, s2, store2, 2, [1, 2])
    assert [r.keep_ratio for r in results] == [r.keep_ratio for r in results2]
    assert np.array_equal(acc, acc2, equal_nan=True)
    assert all(torch.equal(s.global_state[k], s2.global_state[k]) for k in s.global_state)
    assert store.get(2, "bandit") == store2.get(2, "bandit")
    assert PUCBV.from_dict(store.get(1, "bandit")).decisions == 3


E2E = {
    "paper": {},
    "reference": {"method.variant": "reference"},
    "rcr": {"method.keep_ratio_policy": "rcr"},
    "random": {"method.keep_ratio_policy": "fixed", "method.mask": "random", "method.keep_ratio": 0.3},
    "magnitude": {"method.keep_ratio_policy": "fixed", "method.mask": "magnitude", "method.keep_ratio": 0.3},
    "ordered": {"method.keep_ratio_policy": "fixed", "method.mask": "ordered", "method.keep_ratio": 0.3},
    "magnitude-bandit": {"method.mask": "magnitude"},
}


@pytest.mark.parametrize("case", list(E2E))
def test_end_to_end(config, case):
    cfg = config(**{"method.name": "fedlps", "engine.backend": "serial", "name": case}, **E2E[case])
    Experiment(cfg).run()
    clients = pd.read_parquet(f"{cfg.out}/{cfg.name}/clients.parquet")
    rounds = pd.read_parquet(f"{cfg.out}/{cfg.name}/rounds.parquet")
    assert (clients["status"] == "ok").all() and len(clients) == 2 * 5
    assert rounds["acc_clients_mean"].between(0, 1).all() and rounds["acc_global"].isna().all()
    assert clients["acc_personal"].between(0, 1).all()
    policy = cfg.method.params().get("keep_ratio_policy", "bandit")
    if policy == "fixed":
        assert (clients["keep_ratio"] == 0.3).all()  # the ablation's ratio, for every tier
        assert clients[["arm_low", "arm_high"]].isna().all().all()
    else:
        assert (clients["keep_ratio"] <= clients["cap"]).all()
    if policy == "rcr":
        assert (clients["keep_ratio"] == clients["cap"]).all()
        assert clients[["arm_low", "arm_high"]].isna().all().all()
    if policy == "bandit":
        assert clients["arm_low"].notna().all() and (clients["arm_low"] >= 0.5).all()
        assert (clients["arm_high"] <= 1.0).all() and (clients["arm_low"] < clients["arm_high"]).all()
        uncapped = clients["keep_ratio"] < clients["cap"]
        assert clients.loc[uncapped, "keep_ratio"].between(clients.loc[uncapped, "arm_low"],
                                                           clients.loc[uncapped, "arm_high"]).all()
