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
    from baselines.heterofl import HeteroFL, reference_full_groups
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
