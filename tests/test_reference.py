"""The reference variants (the FedLPS authors' ports, sunnyxuejj/FedLPS at 35fafba) and the authors'
test sets, each quirk checked against numbers worked out by hand."""
import numpy as np
import pytest
import torch

from baselines.prunefl import flipped, magnitude_masks, percentile_mask
from conftest import client_of, local_update, started, tier
from harness.data import authors_test_set
from harness.errors import ConfigError
from harness.records import ClientResult, ClientSlot, ClientTask
from harness.submodel import extract

pytestmark = pytest.mark.usefixtures("one_thread")
REFERENCE = {"method.variant": "reference"}


# -- the authors' test sets -------------------------------------------------------------------------
def test_authors_test_blocks_spill_into_the_neighbouring_labels():
    # 12 test images of 3 classes, 4 per class "block", but class 1 has only 3 images and class 2 five
    y = np.array([0, 1, 2, 0, 2, 1, 0, 2, 0, 2, 1, 2])
    order = np.argsort(y, kind="stable")  # positions 0-3: label 0, 4-6: label 1, 7-11: label 2
    assert y[order].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    gen = np.random.default_rng(0)
    # label 1 -> positions 4..7 = three images of label 1 and the first of label 2 (index 2)
    picked = authors_test_set(order, 4, [1], [4], gen)
    assert sorted(y[picked].tolist()) == [1, 1, 1, 2] and set(picked) == set(order[4:8])
    # per label `per_label` of the block, without replacement, whatever the client's count
    picked = authors_test_set(order, 4, [0, 2], [2, 3], np.random.default_rng(1))
    assert len(picked) == 5 and len(set(picked)) == 5
    assert set(picked) <= set(order[0:4]) | set(order[8:12])


def test_every_run_evaluates_on_both_test_set_constructions(config):
    bench, strategy = started(config())
    for c in bench.clients:
        labels = set(np.unique(bench.dataset.y_train.numpy()[np.concatenate([c.train, c.val])]))
        assert len(c.tests["authors"]) == 20 * len(labels)  # the shard size per label the client holds
        assert set(np.unique(bench.dataset.y_test.numpy()[c.tests["mirrored"]])) <= labels
    ev = strategy.evaluate(0)
    assert set(ev.clients) == {"mirrored", "authors"} and ev.global_clients is None


# -- HeteroFL reference ---------------------------------------------------------------------------------
def test_heterofl_reference_narrows_as_the_authors_models():
    from baselines.heterofl import reference_full_groups
    from harness.models import build_model

    assert reference_full_groups(build_model("cnn", 10, (1, 28, 28))) == {"fc1"}
    assert reference_full_groups(build_model("vgg11", 10, (3, 32, 32))) == {"conv0", "conv7"}


def test_heterofl_reference_widths_loss_and_mean(config):
    bench, strategy = started(config(**{"method.name": "heterofl", "train.weight_decay": 0.0, **REFERENCE}))
    # floor, at least one unit; fc1 never narrows: r = 1/4 -> conv1 int(2.5) = 2, conv2 5, fc1 50
    assert client_of(strategy).widths(0.25) == {"conv1": 2, "conv2": 5, "fc1": 50}
    assert client_of(strategy).widths(1 / 16) == {"conv1": 1, "conv2": 1, "fc1": 50}
    job = client_of(strategy).local_job(strategy.global_state, ClientTask(4, 0, tier(0.25)))
    assert job.spec.rate == 1.0 and job.class_mask is None and job.train.momentum == 0
    assert job.start["fc1.weight"].shape == (50, 5 * 16)  # fc1's inputs follow conv2's 5 channels
    # plain mean over the clients that held a coordinate, all classifier rows included
    before = {k: v.clone() for k, v in strategy.global_state.items()}
    results = [local_update(strategy, strategy.global_state, ClientTask(c, 0, tier(r))) for c, r in ((4, 0.25), (5, 0.5))]
    strategy.aggregate(0, results, [])
    g = strategy.global_state
    a, b = (r.payload.state for r in results)
    assert torch.allclose(g["conv2.weight"][:5, :2], (a["conv2.weight"] + b["conv2.weight"][:5, :2]) / 2)
    assert torch.equal(g["conv2.weight"][5:10, :2], b["conv2.weight"][5:10, :2])  # held by one client
    assert torch.equal(g["conv2.weight"][10:], before["conv2.weight"][10:])  # by none
    assert torch.allclose(g["fc2.bias"], (a["fc2.bias"] + b["fc2.bias"]) / 2)  # no label split


def test_reference_needs_the_authors_models(config):
    with pytest.raises(ConfigError, match="method.variant"):
        from harness.validation import validate

        validate(config(**{"method.name": "heterofl", "model.name": "resnet18", **REFERENCE}))


# -- FedRolex reference ---------------------------------------------------------------------------------
def test_fedrolex_reference_window_follows_the_clients_own_selections(config):
    bench, strategy = started(config(**{"method.name": "fedrolex", **REFERENCE}))
    slots = [ClientSlot(3, tier(0.5), 10), ClientSlot(7, tier(0.5), 10)]
    _, first = strategy.configure(0, slots)
    _, second = strategy.configure(1, slots[:1])
    assert first == [{"shift": 0}, {"shift": 0}] and second == [{"shift": 1}]
    widths = client_of(strategy).widths(0.5)  # conv1 5 of 10, conv2 10 of 20, fc1 50 of 50
    task = ClientTask(3, 5, tier(0.5), {"shift": 3})
    index_sets, axis_index = client_of(strategy).index_sets(task, widths)
    # backwards, wrapping: {(K - 3 + i) mod K : i < k}
    assert index_sets["conv1"].tolist() == [0, 1, 7, 8, 9]
    assert index_sets["conv2"].tolist() == [0, 1, 2, 3, 4, 5, 6, 17, 18, 19]
    assert index_sets["fc1"].tolist() == list(range(50))
    # fc1's 320 input columns roll by 3 columns, not by 3 x 16: {(320 - 3 + i) mod 320 : i < 160}
    assert axis_index[("fc1.weight", 1)].tolist() == list(range(157)) + [317, 318, 319]
    sub = extract(strategy.global_state, bench.layout, index_sets, axis_index)
    assert torch.equal(sub["fc1.weight"], strategy.global_state["fc1.weight"][:, list(range(157)) + [317, 318, 319]])


def test_fedrolex_reference_weights_1d_tensors_by_live_counters(config):
    bench, strategy = started(config(**{"method.name": "fedrolex", **REFERENCE}))
    full = {g: torch.arange(n) for g, n in bench.full_widths.items()}
    strategy.counters["fc2.bias"] = torch.tensor([5.0] + [1.0] * 9)

    def result(cid, value):
        state = {k: torch.full_like(v, value) for k, v in strategy.global_state.items()}
        from baselines.heterofl import SubmodelUpload

        return ClientResult(cid, 0, payload=SubmodelUpload(state, full, {}))

    strategy.aggregate(0, [result(1, 1.0), result(2, 3.0)], [])
    bias = strategy.global_state["fc2.bias"]
    # the authors' combine by hand: client 1 weighs 5 (then 1), client 2 reads the counter client 1 raised
    assert bias[0].item() == pytest.approx((5 * 1 + 6 * 3) / 11) and bias[1].item() == pytest.approx((1 + 2 * 3) / 3)
    assert strategy.counters["fc2.bias"][:2].tolist() == [7.0, 3.0]
    assert torch.equal(strategy.global_state["fc2.weight"], torch.full((10, 50), 2.0))  # >1-D: plain mean


# -- PruneFL reference ----------------------------------------------------------------------------------
def test_percentile_rule_by_hand():
    g = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # g^2 / 4 = 0, 0.25, 1, 2.25; the median 0.625
    assert percentile_mask(g, 0.5).tolist() == [[False, False], [True, True]]
    assert percentile_mask(g, 0.3).tolist() == [[False, True], [True, True]]  # 30th percentile 0.075
    # at least a fraction p of exact zeros: the threshold is 0 and the layer becomes dense
    assert percentile_mask(torch.tensor([0.0, 0.0, 0.0, 1.0]), 0.5).all()
    before, after = {"w": torch.tensor([True, True, False, False])}, {"w": torch.tensor([True, False, True, False])}
    assert flipped(before, after) == 0.5


def test_magnitude_start_keeps_the_larger_half():
    w = {"a.weight": torch.tensor([[0.1, -0.5, 0.3], [0.05, 0.9, -0.2], [0.0, 0.4, 0.6]])}
    masks = magnitude_masks(w, {"a.weight": torch.ones(3, 3, dtype=torch.bool)}, 0.5)
    assert masks["a.weight"].sum() == 4  # floor(9 / 2)
    assert masks["a.weight"].flatten().nonzero().flatten().tolist() == [1, 4, 7, 8]  # |w| 0.5, 0.9, 0.4, 0.6


def test_prunefl_reference_rounds(config):
    cfg = config(**{"method.name": "prunefl", **REFERENCE}, rounds=2)
    bench, strategy = started(cfg)
    assert strategy.interval == 5 and strategy.half_life == 1.0
    assert abs(sum(int(m.sum()) for m in strategy.masks.values()) / sum(m.numel() for m in strategy.masks.values())
               - 0.5) < 0.01
    broadcast, instructions = strategy.configure(0, [ClientSlot(c, tier(1.0), 10) for c in (1, 2)])
    assert len(strategy.initial_densities) >= 5 or len(strategy.initial_densities) == 10  # the start ran
    assert instructions == [{"mask_changed": True}] * 2
    results = [local_update(strategy, broadcast, ClientTask(c, 1, tier(1.0), ins)) for c, ins in zip((1, 2), instructions)]
    assert set(results[0].payload["last_grads"]) == set(strategy.prunable)
    masks_before = {n: m.clone() for n, m in strategy.masks.items()}
    strategy.aggregate(1, results, [])  # round 1 rebuilds the mask, from the mean last gradients, p = 0.15
    g = strategy.global_state
    a, b = (r.payload["state"] for r in results)
    assert torch.allclose(g["conv1.weight"], (a["conv1.weight"] + b["conv1.weight"]) / 2)  # unweighted mean
    assert (g["conv1.weight"][~masks_before["conv1.weight"]] == 0).all()  # pruned coordinates are 0
    mean = (results[0].payload["last_grads"]["conv2.weight"] + results[1].payload["last_grads"]["conv2.weight"]) / 2
    assert torch.equal(strategy.masks["conv2.weight"], percentile_mask(mean, 0.3 * 0.5))
    assert strategy.reconfigurations == 1
    # the code counts dense FLOPs, and the mask bits on top of the values
    assert results[0].flops == 3 * bench.flops.forward() * results[0].num_samples
    assert results[0].bytes_up - results[0].bytes_down == 0  # the mask was new to them: sent both ways


def test_the_global_view_is_the_client_view_for_global_methods_and_not_for_fedlps(config):
    from conftest import run_serial

    rounds, _ = run_serial(config(name="avg", rounds=2))
    assert rounds["acc_global_clients_mean"].tolist() == rounds["acc_clients_mean"].tolist()
    assert rounds["acc_global_clients_mean_authors_tests"].tolist() == rounds["acc_clients_mean_authors_tests"].tolist()
    lps, _ = run_serial(config(name="lps", rounds=2, **{"method.name": "fedlps"}))
    assert lps["acc_global_clients_mean"].notna().all() and lps["acc_global"].isna().all()
    assert (lps["acc_global_clients_mean"] != lps["acc_clients_mean"]).any()


# -- FedLPS reference -------------------------------------------------------------------------------
class Exploit:
    """A bandit generator whose random() never explores; its other draws are seeded."""

    def __init__(self):
        import random

        self.rng = random.Random(0)

    def random(self):
        return 0.99

    def __getattr__(self, name):
        return getattr(self.rng, name)


def test_fedlps_reference_bandit_indexes_scores_by_insertion_and_arms_by_interval():
    import math

    from fedlps.pucbv import PUCBV, Arm, ReferencePUCBV

    b = ReferencePUCBV.new(seed=1, horizon=10.0)
    edges = np.linspace(0.5, 1, 6).tolist()  # the code's arms, to the last bit
    assert b.arms == [[edges[i], edges[i + 1]] for i in range(5)]
    assert [k for k, _ in b.rewards] == edges[:5] and b.pulls == [1.0] * 5
    d = b.decide()  # the first decision explores; the split's upper half gets a pull at once
    j, a = d.arm, d.ratio
    assert b.arms[j] == [d.low, a] and b.arms[j + 1] == [a, d.high] and len(b.arms) == 6
    assert b.pulls[j:j + 2] == [1.0, 2.0] and sum(b.pulls) == 7.0
    assert [k for k, _ in b.rewards][-1] == a  # the new key goes to the end of the dict

    # By hand: the split of [0.5, 0.6] at 0.55. Dict order 0.5, 0.6, 0.7, 0.8, 0.9, 0.55; pulls in
    # interval order [1, 2, 1, 1, 1, 1]. Arm [0.55, 0.6] earned 10.
    b = ReferencePUCBV.new(seed=1, horizon=10.0)
    b.arms = [[0.5, 0.55], [0.55, 0.6], [0.6, 0.7], [0.7, 0.8], [0.8, 0.9], [0.9, 1.0]]
    b.rewards = [[0.5, [0.0]], [0.6, [0.0]], [0.7, [0.0]], [0.8, [0.0]], [0.9, [0.0]], [0.55, [0.0, 10.0]]]
    b.pulls = [1.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    b.decisions = 0  # bonus ln(psi T) = ln(100 / 36), psi = T / K^2 with K = 6
    c = math.sqrt(0.5 * 2 * math.log(100 / 36) / 4)
    assert b.indices()[:5] == pytest.approx([c, c / math.sqrt(2), c, c, c])  # the 0.6 arm's rewards, 2 pulls
    assert b.indices()[5] == pytest.approx(5.0 + math.sqrt(0.5 * 27 * math.log(100 / 36) / 4))  # var 25
    b.decisions, b.rng = 3, Exploit()  # ln(100 / 36 / 8) < 0: scores are the means [0, 0, 0, 0, 0, 5]
    d = b.decide()
    # the best score is at position 5, which picks the sixth arm in interval order, [0.9, 1]
    assert not d.explored and d.arm == 5 and (d.low, d.high) == (0.9, 1.0)
    # the clean bandit picks the arm that earned the reward
    clean = PUCBV.new(seed=1, horizon=10.0)
    clean.arms[0:1] = [Arm(0.5, 0.55), Arm(0.55, 0.6, [0.0, 10.0], 2)]
    clean.decisions, clean.rng = 3, Exploit()
    assert clean.decide().arm == 1


def test_fedlps_reference_bandit_credits_as_the_code():
    from fedlps.pucbv import PUCBV, ReferencePUCBV, utility

    b = ReferencePUCBV.new(seed=1, horizon=10.0)
    b.arms = [[0.5, 0.55], [0.55, 0.6], [0.6, 0.7], [0.7, 0.8], [0.8, 0.9], [0.9, 1.0]]
    b.rewards = [[0.5, [0.0]], [0.6, [0.0]], [0.7, [0.0]], [0.8, [0.0]], [0.9, [0.0]], [0.55, [0.0]]]
    b.pulls = [1.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    # the arm before the first whose lower end exceeds the ratio; the drawn ratio credits its upper half
    assert [b.arm_of(r) for r in (0.5, 0.55, 0.57, 0.6, 0.85)] == [0, 1, 1, 2, 4]
    assert b.arm_of(0.95) == 0 and b.arm_of(1.0) == 0  # in the last arm: arm 0
    assert b.arm_of(0.0625) == 5  # capped below every arm: index -1, the last arm
    assert PUCBV.new(1, 10.0).arm_of(0.95) == 4 and PUCBV.new(1, 10.0).arm_of(0.0625) is None
    r, j = b.observe(0.95, acc=0.8, seconds=2.0)
    assert j == 0 and r == pytest.approx(utility(0.8) / 2.0)
    assert b.rewards[0] == [0.5, [0.0, pytest.approx(r)]] and b.pulls == [1.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    r2, j2 = b.observe(0.0625, acc=0.6, seconds=1.0)  # a worse accuracy, against the best earlier 0.8
    assert j2 == 5 and b.rewards[4] == [0.9, [0.0, pytest.approx(utility(0.6) - utility(0.8))]]
    assert b.best_acc == 0.8
    from harness.state import dumps, loads

    resumed = ReferencePUCBV.from_dict(loads(dumps(b.to_dict())))
    assert resumed.to_dict() == b.to_dict()
    assert [resumed.decide().ratio for _ in range(3)] == [b.decide().ratio for _ in range(3)]


def test_fedlps_reference_keeps_k_minus_one_units():
    from fedlps.masks import reference_score_masks, threshold_mask

    assert threshold_mask(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2).tolist() == [0, 1, 0, 0]  # above 0.7 only
    assert threshold_mask(torch.tensor([0.1, 0.9, 0.5, 0.7]), 1).sum() == 0  # k = 1: none
    assert threshold_mask(torch.tensor([0.5, 0.9, 0.5, 0.9]), 2).sum() == 0  # a tie at the threshold
    scores = {"conv1": torch.randn(10), "conv2": torch.randn(20), "fc1": torch.randn(50), "wide": torch.randn(100)}
    kept = lambda rho: {g: int(m.sum()) for g, m in reference_score_masks(scores, rho).items()}
    assert kept(0.5) == {"conv1": 4, "conv2": 9, "fc1": 24, "wide": 49}
    # 1/16: conv1 int(0.625) -> k = 1 -> none; conv2 int(1.25) = 1 -> none; fc1 int(3.125) = 3 -> 2
    assert kept(1 / 16) == {"conv1": 0, "conv2": 0, "fc1": 2, "wide": 5}
    # k truncates: 0.29 x 100 = 28.999999999999996 -> 28 -> 27 kept (the paper variant keeps 29)
    assert kept(0.29)["wide"] == 27
    top = reference_score_masks(scores, 0.5)["fc1"].bool()
    assert torch.sigmoid(scores["fc1"])[top].min() > torch.sigmoid(scores["fc1"])[~top].max()


def test_fedlps_reference_masks_weight_rows_only():
    from fedlps.masks import weight_row_masks
    from harness.models import CLASSES, Dim

    layout = {"a.weight": (Dim("h"), Dim(None)), "a.bias": (Dim("h"),), "b.weight": (Dim(CLASSES), Dim("h", 2))}
    shapes = {"a.weight": torch.Size([3, 2]), "a.bias": torch.Size([3]), "b.weight": torch.Size([4, 6])}
    masks = weight_row_masks(layout, shapes, {"h": torch.tensor([1.0, 0.0, 1.0])})
    assert set(masks) == {"a.weight"}  # the bias and the next layer's columns are not masked
    assert masks["a.weight"].tolist() == [[1, 1], [0, 0], [1, 1]]


def test_fedlps_reference_masked_units_keep_training_their_bias_and_outputs(config):
    bench, strategy = started(config(**{"method.name": "fedlps", **REFERENCE, "method.keep_ratio_policy": "rcr"}))
    g = strategy.global_state
    r = local_update(strategy, g, ClientTask(3, 0, tier(0.5), {"keep_ratio": 0.5}))
    d = r.payload
    rows = d["conv1.weight"].flatten(1).abs().sum(1) > 0
    assert rows.sum() == 4  # k - 1 = 4 of the 10 conv1 units (the paper variant: 5)
    masked = ~rows
    assert (d["conv1.bias"][masked] != 0).all()  # a masked unit's bias trains and is uploaded
    assert (d["conv2.weight"][:, masked] != 0).any()  # so do the next layer's weights reading it
    fc1_rows = d["fc1.weight"].abs().sum(1) > 0
    assert fc1_rows.sum() == 24 and (d["fc2.weight"][:, ~fc1_rows] != 0).any()
    # bytes up: the kept rows of conv1, conv2 and fc1, every other value, one bit per unit
    kept_weights = 4 * 25 + 9 * 250 + 24 * 320
    assert r.bytes_up == 4 * (kept_weights + 590) + (80 + 7) // 8
    # the personalised model: the trained weights with the masked rows zero (the code's cur_params),
    # no unit mask: a masked conv1 unit outputs relu(maxpool(bias))
    personal = {k: g[k] + d[k] for k in g}
    for name, keep in (("conv1.weight", rows), ("conv2.weight", d["conv2.weight"].flatten(1).abs().sum(1) > 0),
                       ("fc1.weight", fc1_rows)):
        personal[name][~keep] = 0
    model = bench.load(bench.build(), personal)
    assert bench.accuracy_on_client(model, 3)["mirrored"] == r.metrics["acc_personal"]


def test_fedlps_reference_scores_decay_with_the_weights_optimizer(config):
    from harness.batched.groups import train_single

    cfg = config(**{"method.name": "fedlps", **REFERENCE, "method.lam": 0.0, "method.keep_ratio_policy": "rcr",
                    "train.weight_decay": 0.01, "train.lr": 0.5})
    bench, strategy = started(cfg)
    job = client_of(strategy).local_job(strategy.global_state, ClientTask(2, 0, tier(0.5), {"keep_ratio": 0.5}))
    before = {gr: s.detach().clone() for gr, s in job.context["scores"].items()}
    train_single(job, bench)
    # no task gradient and no regulariser: each step s <- s - lr x (0 + weight_decay x s), every score
    for gr, s in job.context["scores"].items():
        expected = before[gr].clone()
        for _ in range(job.stats.steps):
            expected = expected - 0.5 * torch.add(torch.zeros_like(expected), expected, alpha=0.01)
        assert torch.allclose(s.detach(), expected, rtol=1e-6, atol=0)
        assert torch.allclose(s.detach(), before[gr] * 0.995 ** job.stats.steps, rtol=1e-5, atol=0)


def test_fedlps_reference_reward_time_from_the_authors_constants(config):
    from fedlps.pucbv import ReferencePUCBV, utility
    from fedlps.reference_cost import MNIST, ReferenceRewardCost

    bench, strategy = started(config(**{"method.name": "fedlps", **REFERENCE}))
    cost = ReferenceRewardCost(bench.build(device="meta"), bench.image_shape, bench.full_widths, 32, MNIST)
    full = dict(bench.full_widths)
    # one batch of 32, by hand: conv1 (2 x 250 + 10) x 24 x 24 x 32 + 10, conv2 (2 x 5000 + 20) x 8 x 8 x 32
    # + 20, fc1 32 x (2 x 16000 + 50) + 50, fc2 32 x (2 x 500 + 10) + 10
    assert cost.forward_flops(full) == 9_400_330 + 20_520_980 + 1_025_650 + 32_330
    half = {"conv1": 4, "conv2": 9, "fc1": 24}  # masked rows count no weights; biases all count
    assert cost.forward_flops(half) == (210 * 576 * 32 + 10) + (4520 * 64 * 32 + 20) + (32 * 15410 + 50) + 32_330
    assert cost.upload_bits(half) == 32 * (4 * 25 + 9 * 250 + 24 * 320 + 590)
    # 35 batches at cap 1/2: 3 x (35 x 3 x flops) / 1e6 / 2788.128 / 0.5 + bits / 8 / 2^20 (1 MiB/s)
    expected = 3 * 35 * 3 * 13_653_210 / 1e6 / 2788.128 / 0.5 + 32 * 10_620 / 8 / 2 ** 20
    assert cost.seconds(half, steps=35, cap=0.5) == pytest.approx(expected, rel=1e-12)

    # a client's round: its reward_s is that time for its trained rows, and the bandit divides by it
    slots = [ClientSlot(5, tier(0.5), 10)]
    broadcast, [instruction] = strategy.configure(0, slots)
    r = local_update(strategy, broadcast, ClientTask(5, 0, slots[0].tier, instruction))
    kept = {"conv1": int((r.payload["conv1.weight"].flatten(1).abs().sum(1) > 0).sum()),
            "conv2": int((r.payload["conv2.weight"].flatten(1).abs().sum(1) > 0).sum()),
            "fc1": int((r.payload["fc1.weight"].abs().sum(1) > 0).sum())}
    steps = bench.cfg.train.epochs * -(-r.num_samples // bench.cfg.train.batch_size)
    own = ReferenceRewardCost(bench.build(device="meta"), bench.image_shape, bench.full_widths,
                              bench.cfg.train.batch_size, MNIST)
    assert r.metrics["reward_s"] == pytest.approx(own.seconds(kept, steps, 0.5), rel=1e-12)
    r.sim_compute_s, r.sim_up_s, r.sim_down_s = 100.0, 100.0, 1.0  # the clock does not enter the reward
    strategy.aggregate(0, [r], [])
    bandit = ReferencePUCBV.from_dict(strategy.store.get(5, "bandit"))
    credited = [rw for _, rewards in bandit.rewards for rw in rewards if rw != 0.0]
    assert credited == [pytest.approx(utility(r.train_acc) / r.metrics["reward_s"])]


def test_fedavg_reference_adds_the_authors_noise(config):
    from baselines.fedavg import with_authors_noise

    results = {}
    for variant in ("official", "reference"):
        bench, strategy = started(config(**{"method.variant": variant}))
        g = strategy.global_state
        a = {k: torch.full_like(v, 1.0) for k, v in g.items()}
        b = {k: torch.full_like(v, 4.0) for k, v in g.items()}
        kept = [ClientResult(1, 3, payload=a, num_samples=20), ClientResult(2, 3, payload=b, num_samples=10)]
        strategy.aggregate(3, kept, [])
        results[variant] = strategy.global_state
    official, reference = results["official"], results["reference"]
    assert all(torch.allclose(v, torch.full_like(v, 2.0)) for v in official.values())  # (20 x 1 + 10 x 4) / 30
    noise = torch.cat([(reference[k] - official[k]).flatten() for k in official])
    assert 0.0009 < float(noise.std()) < 0.0011 and abs(float(noise.mean())) < 1e-4
    again = with_authors_noise(official, seed=1, method="fedavg", rnd=3)
    assert all(torch.equal(again[k], reference[k]) for k in official)  # a function of (seed, round)
    other_round = with_authors_noise(official, seed=1, method="fedavg", rnd=4)
    assert not torch.equal(other_round["fc1.weight"], reference["fc1.weight"])
