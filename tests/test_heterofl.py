"""HeteroFL and FedRolex: the FedAvg invariant, rolling windows by hand, what clients record, the
switches, and runs on the CNN, VGG-11 and ResNet-18."""
import numpy as np
import pandas as pd
import pytest
import torch

from harness.errors import ConfigError
from harness.records import ClientSlot, ClientTask
from harness.submodel import prefix_index_sets, rolling_index_sets
from harness.workbench import Workbench
from conftest import client_of, local_update, run_serial as run, started, tier, write_tiny_rgb

pytestmark = pytest.mark.usefixtures("one_thread")

DENSE_CNN_FLOPS = 961_000  # forward FLOPs of one sample (tests/test_models.py)
DENSE_CNN_BYTES = 4 * (10 * 25 + 10 + 20 * 10 * 25 + 20 + 50 * 320 + 50 + 10 * 50 + 10)
SERIAL = {"engine.backend": "serial"}
ALL_OFF = {"method.scaler": False, "method.static_bn": False, "method.masked_ce": False,
           "method.label_split": False, "method.clip_grad_norm": None}


def one_round(strategy, rnd, clients, cap):
    bench = strategy.bench
    slots = [ClientSlot(c, tier(cap), bench.clients[c].num_samples) for c in clients]
    broadcast, instructions = strategy.configure(rnd, slots)
    assert broadcast is strategy.global_state and instructions == [None] * len(slots)
    results = [local_update(strategy, broadcast, ClientTask(s.client_id, rnd, s.tier, i))
               for s, i in zip(slots, instructions)]
    strategy.aggregate(rnd, results, [])
    return results


def write_trace(path, tier_names):
    pd.DataFrame({"client_id": range(len(tier_names)), "tier": tier_names}).to_csv(path, index=False)
    return str(path)


# -- the FedAvg invariant ----------------------------------------------------------------------------
def test_full_width_heterofl_without_switches_is_fedavg(config):
    one_tier = [{"name": "a", "cap": 1.0, "compute_mflops": 744448}]
    states, initial = {}, Workbench(config()).init_global_state()
    for method in ("fedavg", "heterofl"):
        extra = ALL_OFF if method == "heterofl" else {}
        bench, strategy = started(config(**{"method.name": method, "devices.tiers": one_tier}, **extra))
        assert len({c.num_samples for c in bench.clients}) == 1  # equal counts: sample weights are moot
        for rnd, clients in enumerate(([0, 3, 5, 8, 13], [1, 3, 7, 11, 19])):
            one_round(strategy, rnd, clients, cap=1.0)
        states[method] = strategy.global_state
    assert states["heterofl"].keys() == states["fedavg"].keys()
    for k, v in states["fedavg"].items():
        assert torch.allclose(states["heterofl"][k], v, atol=1e-6), k
        assert not torch.equal(v, initial[k]), "training changed nothing"


# -- FedRolex windows --------------------------------------------------------------------------------
def test_rolling_windows_by_hand():
    full = {"g": 10}
    window = lambda start, width: rolling_index_sets(full, {"g": width}, start)["g"].tolist()  # noqa: E731
    assert window(0, 4) == [0, 1, 2, 3]  # round 0 is HeteroFL's prefix
    assert window(3, 4) == [3, 4, 5, 6]
    assert window(8, 4) == [0, 1, 8, 9]  # wraps around
    assert window(12, 4) == [2, 3, 4, 5]  # the start is reduced mod the units
    assert window(7, 10) == list(range(10))


def test_fedrolex_rolls_with_the_global_round(config):
    bench, rolex = started(config(**{"method.name": "fedrolex"}))
    widths = client_of(rolex).widths(0.4)
    assert widths == {"conv1": 4, "conv2": 8, "fc1": 20}
    at8, axis_index = client_of(rolex).index_sets(ClientTask(0, 8, tier(0.4)), widths)
    assert axis_index is None
    assert at8["conv1"].tolist() == [0, 1, 8, 9]
    assert at8["conv2"].tolist() == list(range(8, 16))
    assert at8["fc1"].tolist() == list(range(8, 28))
    prefix = prefix_index_sets(bench.full_widths, widths)
    assert all(torch.equal(client_of(rolex).index_sets(ClientTask(0, 0, tier(0.4)), widths)[0][g], prefix[g]) for g in prefix)

    # round 0 trains exactly what HeteroFL trains
    _, hetero = started(config(**{"method.name": "heterofl"}))
    task = ClientTask(2, 0, tier(0.4))
    a = local_update(hetero, hetero.global_state, task).payload
    b = local_update(rolex, rolex.global_state, task).payload
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)

    # in round 8 the update lands in the window: conv1 units 0, 1, 8, 9 change, 2..7 keep their values
    before = {k: v.clone() for k, v in rolex.global_state.items()}
    one_round(rolex, 8, [2], cap=0.4)
    changed = (rolex.global_state["conv1.weight"] != before["conv1.weight"]).flatten(1).any(1)
    assert changed.nonzero().flatten().tolist() == [0, 1, 8, 9]
    cols = (rolex.global_state["fc2.weight"] != before["fc2.weight"]).any(0)
    assert cols.nonzero().flatten().tolist() == list(range(8, 28))


# -- what clients record -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["heterofl", "fedrolex"])
def test_clients_parquet_cost_shrinks_with_the_ratio(config, tmp_path, method):
    trace = write_trace(tmp_path / "tiers.csv", list("edcba") * 2)  # every paper tier, twice
    _, clients = run(config(**SERIAL, **{"method.name": method, "rounds": 1, "clients.total": 10,
                                         "clients.per_round": 10, "devices.trace": trace}))
    assert (clients["status"] == "ok").all() and len(clients) == 10
    assert (clients["keep_ratio"] == clients["cap"]).all()
    assert (clients["bytes_up"] == clients["bytes_down"]).all()
    clients = clients.assign(flops_per_sample=clients["flops"] / clients["num_samples"])  # 1 epoch
    by_cap = clients.groupby("cap")[["flops_per_sample", "bytes_up"]].agg(["min", "max"])
    assert (by_cap.xs("min", axis=1, level=1) == by_cap.xs("max", axis=1, level=1)).all().all()
    per_cap = by_cap.xs("min", axis=1, level=1).sort_index()
    assert list(per_cap.index) == [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    assert per_cap["flops_per_sample"].is_monotonic_increasing and per_cap["flops_per_sample"].is_unique
    assert per_cap["bytes_up"].is_monotonic_increasing and per_cap["bytes_up"].is_unique
    dense = clients[clients["cap"] == 1.0]
    assert (dense["flops"] == 3 * DENSE_CNN_FLOPS * dense["num_samples"]).all()
    assert (dense["bytes_up"] == DENSE_CNN_BYTES).all()
    smallest = clients[clients["cap"] == 1 / 16]
    assert (smallest["flops"] < 0.1 * 3 * DENSE_CNN_FLOPS * smallest["num_samples"]).all()
    assert (smallest["bytes_up"] < 0.1 * DENSE_CNN_BYTES).all()


# -- the switches ------------------------------------------------------------------------------------
@pytest.mark.parametrize("switches, norm, rate", [({}, "sbn", 0.25), (ALL_OFF, None, 1.0)])
def test_scaler_and_static_bn_switches_build_the_local_model(config, switches, norm, rate):
    bench, strategy = started(config(**{"method.name": "heterofl"}, **switches))
    job = client_of(strategy).local_job(strategy.global_state, ClientTask(0, 0, tier(0.25)))
    assert job.spec.norm == (norm or bench.cfg.model.norm) and job.spec.rate == rate
    model = bench.loaded(job)
    assert model.rate == rate and model.norm_kind == job.spec.norm


def test_masked_ce_and_label_split_leave_absent_classes_alone(config):
    bench, strategy = started(config(**{"method.name": "heterofl", "train.weight_decay": 0.0}))
    absent = ~bench.class_mask(4)
    assert absent.sum() >= 8  # two shards: at most two classes
    before = {k: v.clone() for k, v in strategy.global_state.items()}
    [result] = one_round(strategy, 0, [4], cap=0.5)
    sent = result.payload.state
    # masked CE: absent classes' logits are constant, so their classifier rows get no gradient
    assert torch.equal(sent["fc2.bias"][absent], before["fc2.bias"][absent])
    assert not torch.equal(sent["fc2.bias"][~absent], before["fc2.bias"][~absent])
    after = strategy.global_state
    assert torch.equal(after["fc2.weight"][absent], before["fc2.weight"][absent])

    _, plain = started(config(**{"method.name": "heterofl", "train.weight_decay": 0.0}, **ALL_OFF))
    one_round(plain, 0, [4], cap=0.5)
    assert not torch.equal(plain.global_state["fc2.bias"][absent], before["fc2.bias"][absent])


def test_count_normalised_mean_and_checkpoint(config):
    bench, strategy = started(config(**{"method.name": "heterofl", "method.label_split": False}))
    before = {k: v.clone() for k, v in strategy.global_state.items()}
    results = one_round(strategy, 0, [0, 1, 2], cap=0.5)
    # a coordinate held by all three clients is their plain mean; one held by nobody keeps its value
    expected = torch.stack([r.payload.state["conv2.weight"] for r in results]).mean(0)
    assert torch.allclose(strategy.global_state["conv2.weight"][:10, :5], expected, atol=1e-7)
    assert torch.equal(strategy.global_state["conv2.weight"][10:], before["conv2.weight"][10:])

    _, copy = started(bench.cfg)
    copy.load_state_dict(strategy.state_dict())
    assert np.array_equal(copy.evaluate(0).clients["mirrored"], strategy.evaluate(0).clients["mirrored"],
                          equal_nan=True)


def test_unknown_parameter_is_a_config_error(config):
    from harness.spec import resolve

    with pytest.raises(ConfigError, match="method.rolling: unknown key"):
        resolve(config(**{"method.name": "fedrolex", "method.rolling": True}))


# -- the three models --------------------------------------------------------------------------------
@pytest.fixture
def tiny_rgb(tmp_path):
    return write_tiny_rgb(tmp_path / "tiny.npz", 48)


@pytest.mark.parametrize("model", ["cnn", "vgg11", "resnet18"])
def test_one_round_on_every_model(config, tmp_path, tiny_rgb, model):
    tiers = [{"name": n, "cap": c, "compute_mflops": 1e5} for n, c in (("s", 1 / 16), ("m", 1 / 4), ("l", 1 / 2))]
    settings = {**SERIAL, "method.name": "heterofl", "rounds": 1, "model.name": model, "devices.tiers": tiers,
                "devices.trace": write_trace(tmp_path / "tiers.csv", ["s", "m", "l"])}
    if model != "cnn":
        settings.update({"data.dataset": tiny_rgb, "data.split.kind": "iid", "clients.total": 3,
                         "clients.per_round": 3, "train.batch_size": 8})
    cfg = config(**settings)
    rounds, clients = run(cfg)
    assert (clients["status"] == "ok").all()
    assert (clients["keep_ratio"] == clients["cap"]).all()
    ordered = clients.sort_values("cap")
    per_sample = ordered["flops"] / ordered["num_samples"]
    assert per_sample.is_monotonic_increasing and ordered["bytes_up"].is_monotonic_increasing
    assert rounds["acc_global"].between(0, 1).all()
    _, strategy = started(cfg)
    assert not any("running" in k for k in strategy.global_state)  # static BN keeps no statistics
    assert strategy.calibrate_bn == (model != "cnn")  # the CNN has no BN to calibrate


def test_fedrolex_without_static_bn_aggregates_running_statistics(config, tiny_rgb):
    cfg = config(**{"method.name": "fedrolex", "method.static_bn": False, "model.name": "vgg11",
                    "data.dataset": tiny_rgb, "data.split.kind": "iid", "clients.total": 2,
                    "clients.per_round": 2, "train.batch_size": 8})
    _, strategy = started(cfg)
    before = strategy.global_state["norm0.running_mean"].clone()
    [result, _] = one_round(strategy, 3, [0, 1], cap=1 / 16)
    assert result.payload.state["norm0.running_mean"].shape == (4,)  # ceil(64 / 16)
    changed = (strategy.global_state["norm0.running_mean"] != before).nonzero().flatten().tolist()
    assert changed == [3, 4, 5, 6]
