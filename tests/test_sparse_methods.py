"""Hermes, FedSpa, FedMP and CS (baselines/): hand-checked cases of their rules, their cost columns,
and the same numbers one by one, batched and on Ray."""
import math
import random

import pandas as pd
import pytest
import torch

from baselines.cs import complement_masks
from baselines.fedmp import ReferenceEUCB
from baselines.fedspa import prune_and_regrow, readjust_fraction
from fedlps.pucbv import PUCBV, Arm
from harness.cost import training_flops
from harness.experiment import Experiment
from harness.records import ClientResult
from harness.sparsity import keep_counts, location_bytes, masked_bytes, masked_forward_flops
from harness.submodel import Contribution
from conftest import local_update, round_tasks, started
from test_batched import alone_and_batched, assert_same

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {f"{m}-{v}": {"method.name": m, "method.variant": v}
            for m in ("hermes", "fedspa", "fedmp", "cs") for v in ("official", "reference")}
# Clients prune at once (with `pruning`, every validation accuracy is above 0.0), so the masks are in use.
PRUNING = {"hermes": {"method.prune_start_acc": 0.0}, "fedspa": {"method.prune_start_acc": 0.0}}


def settings(name):
    return {**VARIANTS[name], **PRUNING.get(VARIANTS[name]["method.name"], {})}


@pytest.fixture
def pruning(monkeypatch):
    """Validation accuracies are 1 (a model at initialisation may score 0 on a client's images), in
    this process only."""
    import baselines.fedspa
    import baselines.hermes

    for module in (baselines.fedspa, baselines.hermes):
        monkeypatch.setattr(module, "validation_accuracy", lambda *a: 1.0)


# -- Hermes: overlap-only averaging ------------------------------------------------------------------
def test_hermes_averages_each_coordinate_over_the_clients_that_hold_it(config):
    bench, strategy = started(config(**{"method.name": "hermes"}))
    before = {k: v.clone() for k, v in strategy.global_state.items()}
    full = {g: torch.arange(n) for g, n in bench.full_widths.items()}
    units = [[0, 1, 2], [1, 2, 3], [2, 9]]  # conv1 units of the three clients; other groups whole
    from harness.submodel import extract
    results = []
    for k, kept in enumerate(units):
        index_sets = {**full, "conv1": torch.tensor(kept)}
        sub = {n: torch.full_like(t, float(k + 1)) for n, t in extract(before, bench.layout, index_sets).items()}
        results.append(ClientResult(k, 0, payload=Contribution(sub, index_sets), num_samples=10 * (k + 1)))
    strategy.aggregate(0, results, [])
    after = strategy.global_state
    # conv1 rows: unit 0 only client 1 (value 1), unit 1 clients 1, 2, unit 2 all three, 3 client 2, 9 client 3
    expected = {0: 1.0, 1: 1.5, 2: 2.0, 3: 2.0, 9: 3.0}
    for unit, value in expected.items():
        assert torch.all(after["conv1.weight"][unit] == value) and after["conv1.bias"][unit] == value
    for unit in (4, 5, 6, 7, 8):  # nobody held them: unchanged
        assert torch.equal(after["conv1.weight"][unit], before["conv1.weight"][unit])
    # conv2 reads conv1: input channel 9 only client 3, input channel 4 nobody; not sample-weighted
    assert torch.all(after["conv2.weight"][:, 9] == 3.0) and torch.all(after["conv2.weight"][:, 2] == 2.0)
    assert torch.equal(after["conv2.weight"][:, 4], before["conv2.weight"][:, 4])
    assert torch.all(after["fc2.weight"] == 2.0)  # held by all: the plain mean of 1, 2, 3


def test_hermes_clients_prune_units_and_train_physically_smaller_subnetworks(config, pruning):
    bench, strategy = started(config(**{"method.name": "hermes", "method.prune_start_acc": 0.0}))
    broadcast, tasks = round_tasks(bench, strategy, 0, [0, 1])
    result = local_update(strategy, broadcast, tasks[0])
    kept = result.state["index_sets"]
    assert {g: len(i) for g, i in kept.items()} == {"conv1": 9, "conv2": 18, "fc1": 45}  # 10 % of each group
    widths = {g: len(i) for g, i in kept.items()}
    assert result.payload.state["conv2.weight"].shape == (18, 9, 5, 5)
    assert result.flops == training_flops(bench.flops.forward(widths), len(bench.clients[0].train))


# -- FedSpa: prune and regrow -------------------------------------------------------------------------
def test_prune_and_regrow_by_hand():
    w = {"a": torch.tensor([0.5, -0.1, 0.3, 0.0, 0.0, 0.0])}
    m = {"a": torch.tensor([True, True, True, False, False, False])}
    g = {"a": torch.tensor([0.0, 0.0, 0.0, 0.2, -0.9, 0.1])}
    # a third of the 3 active weights: drop |w| = 0.1 (index 1), grow |g| = 0.9 (index 4)
    assert prune_and_regrow(w, m, g, 1 / 3)["a"].tolist() == [True, False, True, False, True, False]
    # regrowth may take back a weight just dropped, if its gradient is the largest
    g2 = {"a": torch.tensor([0.0, 5.0, 0.0, 0.2, -0.9, 0.1])}
    assert prune_and_regrow(w, m, g2, 1 / 3)["a"].tolist() == m["a"].tolist()
    assert prune_and_regrow(w, m, g, 0.0)["a"].tolist() == m["a"].tolist()
    assert readjust_fraction(0, 0.3, 10) == pytest.approx(0.3) and readjust_fraction(5, 0.3, 10) == pytest.approx(0.15)
    assert readjust_fraction(10, 0.3, 10) == 0.0


def test_fedspa_masks_keep_their_density_exactly_over_rounds(config):
    bench, strategy = started(config(rounds=10, **{"method.name": "fedspa", "method.readjust_fraction": 0.5}))
    counts = strategy.counts
    assert sum(counts.values()) == pytest.approx(0.5 * sum(strategy.shapes[n].numel() for n in counts), abs=len(counts))
    state = None
    for rnd in range(3):
        broadcast, tasks = round_tasks(bench, strategy, rnd, [3])
        tasks[0].state = state
        result = local_update(strategy, broadcast, tasks[0])
        masks = result.state["masks"]
        assert {n: int(m.sum()) for n, m in masks.items()} == counts
        if state is not None:
            changed = sum(int((masks[n] ^ state["masks"][n]).sum()) for n in masks)
            assert changed > 0  # the mask evolves
            for n, m in state["masks"].items():  # the update lives on the mask it trained with
                assert (result.payload[n][~m] == 0).all()
        state = result.state


def test_erk_gives_small_layers_higher_density():
    shapes = {"conv1.weight": torch.Size([10, 1, 5, 5]), "fc1.weight": torch.Size([50, 320])}
    counts = keep_counts(shapes, 0.5, "erk")
    assert counts["conv1.weight"] / 250 > counts["fc1.weight"] / 16000
    assert sum(counts.values()) == pytest.approx(0.5 * 16250, abs=2)
    assert keep_counts(shapes, 0.5, "uniform") == {"conv1.weight": 125, "fc1.weight": 8000}


# -- FedMP: the bandit -------------------------------------------------------------------------------
def test_fedmp_official_bandit_picks_the_arm_with_the_best_rewards():
    bandit = PUCBV(horizon=10, arms=[Arm(0.2, 0.5, [0.0, 1.0]), Arm(0.5, 0.7, [4.0, 6.0]), Arm(0.7, 1.0, [1.0])],
                   decisions=200, rng=random.Random(0))  # past exploring: the index is the mean
    d = bandit.decide()
    assert (d.low, d.high) == (0.5, 0.7) and 0.5 <= d.ratio < 0.7 and not d.explored
    assert bandit.credit(d.ratio, 3.0) is not None and bandit.arms[bandit.arm_of(d.ratio)].rewards[-1] == 3.0


def test_fedmp_reference_bandit_reads_rewards_in_insertion_order():
    """The port's scores run over its reward dict (insertion order) against arms in interval order:
    the arm [0.5, 0.7] is chosen with the rewards of the arm [0.7, 1]."""
    bandit = ReferenceEUCB(horizon=10, arms=[[0.2, 0.5], [0.5, 0.7], [0.7, 1.0]],
                           rewards=[[0.2, [0.0]], [0.7, [5.0]], [0.5, [1.0]]], pulls=[1.0, 1.0, 1.0],
                           selected=3, es0=2 ** -20, m=1000, ep=0.0, rng=random.Random(0))
    ratio, upper = bandit.decide()
    assert 0.5 <= ratio < 0.7 and upper == 2
    assert bandit.arms == [[0.2, 0.5], [0.5, ratio], [ratio, 0.7], [0.7, 1.0]]
    assert bandit.pulls == [1.0, 1.0, 2.0, 1.0]
    bandit.credit(upper, -2.0)
    assert bandit.rewards[-1] == [ratio, [1.0, -2.0]]  # the split arm's rewards, copied, then credited
    again = ReferenceEUCB.from_dict(bandit.to_dict())
    assert again.to_dict() == bandit.to_dict() and again.decide() == bandit.decide()


def test_fedmp_reference_draws_twice_per_round_and_ignores_the_tier(config):
    bench, strategy = started(config(**{"method.name": "fedmp", "method.variant": "reference"}))
    broadcast, tasks = round_tasks(bench, strategy, 0, [0, 1, 2], caps=[1 / 16] * 3)
    assert any(t.instruction["keep_ratio"] > 1 / 16 for t in tasks)  # the tier does not cap it
    results = [local_update(strategy, broadcast, t) for t in tasks]
    for r, c in zip(results, (1e-3, 2e-3, 3e-3)):
        r.sim_compute_s = c
    strategy.aggregate(0, results, [])
    bandits = [ReferenceEUCB.from_dict(strategy.store.get(c, "bandit")) for c in (0, 1, 2)]
    assert all(b.m == 2 and len(b.arms) == 3 for b in bandits)  # two decisions, two splits
    credited = [sum(len(r) for _, r in b.rewards) for b in bandits]
    assert credited == [4, 3, 4]  # 1 + 1 + (1 + reward); the client at the mean time gets none


# -- CS: complementary masks ---------------------------------------------------------------------------
def test_cs_server_and_clients_send_complementary_models_that_cover_the_model(config):
    bench, strategy = started(config(**{"method.name": "cs"}))
    broadcast, tasks = round_tasks(bench, strategy, 0, [0, 1, 2])
    strategy.aggregate(0, [local_update(strategy, broadcast, t) for t in tasks], [])
    masks = strategy.masks
    assert set(masks) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}  # the classifier too
    broadcast, tasks = round_tasks(bench, strategy, 1, [0, 1, 2])
    sparse = broadcast["state"]
    results = [local_update(strategy, broadcast, t) for t in tasks]
    for n, m in masks.items():
        assert int(m.sum()) == round(m.numel() / 2)
        assert (sparse[n][~m] == 0).all()  # the server's model: the kept weights only
        sent = [r.payload[n] != 0 for r in results]
        assert all(not (s & m).any() for s in sent)  # clients: the complement only
        # and they send every weight the server pruned (bytes_up below: 4 per weight outside m),
        # so server and clients together cover the model
    total = sum(r.num_samples for r in results)
    merged = {n: sparse[n] + 1.5 * sum(r.num_samples * r.payload[n] for r in results) / total for n in masks}
    strategy.aggregate(1, results, [])
    new = complement_masks(merged, list(masks), 0.5)
    for n in masks:
        assert torch.allclose(strategy.global_state[n], merged[n] * new[n], atol=1e-6)
    bias = sum(r.num_samples * r.payload["fc1.bias"] for r in results) / total
    assert torch.allclose(strategy.global_state["fc1.bias"], bias, atol=1e-6)
    r = results[0]
    assert r.bytes_up == sum(4 * int((~m).sum()) for m in masks.values()) + 4 * (10 + 20 + 50 + 10)
    assert r.flops == training_flops(bench.flops.forward(), r.num_samples * bench.cfg.train.epochs)


# -- costs of a known sparse model ---------------------------------------------------------------------
def test_cost_columns_of_a_known_sparse_model(config):
    bench, strategy = started(config(**{"method.name": "fedspa"}))
    per_weight = bench.flops.per_weight()
    assert per_weight == {"conv1.weight": 288000, "conv2.weight": 640000, "fc1.weight": 32000, "fc2.weight": 1000}
    forward = masked_forward_flops(bench.flops, {"conv1.weight": 0.5, "conv2.weight": 0.25, "fc1.weight": 1.0})
    assert forward == 961000 - 0.5 * 288000 - 0.75 * 640000
    state = {"w": torch.ones(10, 100), "b": torch.ones(10)}
    mask = {"w": torch.zeros(10, 100, dtype=torch.bool)}
    mask["w"][:, :30] = True  # 300 of 1000 kept: a bitmap (125 bytes) is cheaper than indices (1200)
    assert masked_bytes(state, mask) == 300 * 4 + 125 + 40
    assert masked_bytes(state, mask, locations=False) == 300 * 4 + 40
    mask["w"][:] = False
    mask["w"][0, :5] = True  # 5 kept: 20 bytes of indices beat the bitmap
    assert location_bytes(mask) == 20
    # a FedSpa client's row: density-rule FLOPs of its mask plus one dense pass on its regrowth batch
    broadcast, tasks = round_tasks(bench, strategy, 0, [0])
    result = local_update(strategy, broadcast, tasks[0])
    masks = strategy.initial_masks(0)
    densities = {n: float(m.float().mean()) for n, m in masks.items()}
    samples = len(bench.clients[0].train) * bench.cfg.train.epochs
    batch = min(bench.cfg.train.batch_size, len(bench.clients[0].train))
    assert result.flops == pytest.approx(3 * masked_forward_flops(bench.flops, densities) * samples
                                         + 3 * 961000 * batch)
    kept = sum(int(m.sum()) for m in masks.values())
    dense_rest = 4 * (10 + 20 + 50 + 10 * 50 + 10)
    assert result.bytes_down == 4 * kept + dense_rest
    assert result.bytes_up == 4 * kept + location_bytes(result.state["masks"]) + dense_rest
    assert result.keep_ratio == pytest.approx(kept / sum(m.numel() for m in masks.values()))


# -- one by one == batched == Ray ----------------------------------------------------------------------
@pytest.fixture
def float64(monkeypatch):
    """Batched and one by one in float64: thresholds on values (percentiles, top-k by magnitude) then
    see the same order (in float32 rounding differences of ~1e-7 can swap two neighbours)."""
    from harness.data import Dataset

    real = Dataset.normalize
    monkeypatch.setattr(Dataset, "normalize", lambda self, x: real(self, x).to(torch.float64))
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_one_by_one_equals_batched(config, float64, pruning, name):
    cfg = config(**{"data.split.kind": "dirichlet", "data.split.alpha": 1.0, "clients.total": 100},
                 **settings(name))
    bench, strategy = started(cfg)
    broadcast, tasks = round_tasks(bench, strategy, 0, [0, 1, 2, 3])
    first = [local_update(strategy, broadcast, t) for t in tasks]
    strategy.aggregate(0, first, [])  # round 1 trains with the masks and bandits of round 0
    for r in first:
        if r.state is not None:
            strategy.store.put(r.client_id, r.state)
    broadcast, tasks = round_tasks(bench, strategy, 1, [0, 1, 2, 3])
    for t in tasks:
        t.state = strategy.store.get(t.client_id)
    alone, together = alone_and_batched(strategy, broadcast, tasks)
    assert_same(alone, together, atol=1e-9)
    assert all(math.isfinite(r.train_loss) for r in together)


def _rows(cfg):
    folder = f"{cfg.out}/{cfg.name}"
    rounds = pd.read_parquet(f"{folder}/rounds.parquet")
    clients = pd.read_parquet(f"{folder}/clients.parquet")
    return (rounds.drop(columns=[c for c in rounds.columns if c.startswith("wall")] + ["experiment"]),
            clients.drop(columns=["experiment"]))


# On Ray, each method once, and the variant whose own random draws (FedMP's port's bandit) must not
# depend on the process; one by one == batched covers every variant (above).
ON_RAY = ["hermes-official", "fedspa-official", "fedmp-official", "fedmp-reference", "cs-official"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ON_RAY)
def test_serial_equals_ray(ray_session, config, name):
    """The executors run the methods' code unpatched: clients prune where their real validation
    accuracy is above 0."""
    base = {"rounds": 3, "clients.per_round": 6, "engine.start_timeout_s": 300, **settings(name)}
    serial = config(name=f"{name}-serial", **base, **{"engine.backend": "serial"})
    Experiment(serial).run()
    ray = config(name=f"{name}-ray", **base, **{"engine.backend": "ray", "engine.executors": 2})
    Experiment(ray).run()
    for a, b in zip(_rows(serial), _rows(ray)):
        pd.testing.assert_frame_equal(a, b)
