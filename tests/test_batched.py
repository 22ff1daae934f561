"""Batched client execution (harness/batched/): the same updates as training the clients one by
one, per method and option; results in task order; faults isolated; the engine switch; CUDA only
where there is CUDA."""
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

import harness.batched.groups as groups_module
import harness.batched.program as program_module
from baselines.fedavg import FedAvg, FedAvgClient
from harness.batched import GraphCache
from harness.batched.schedule import schedule
from harness.engine import batching_enabled, cuda_graphs_enabled
from harness.errors import ConfigError
from harness.experiment import Experiment
from harness.state import MemoryStore
from harness.strategy import MethodParams
from conftest import client_of, local_update, local_update_batch, round_tasks, started, write_tiny_rgb

SERIAL = {"engine.backend": "serial"}
UNEVEN = {"data.split.kind": "dirichlet", "data.split.alpha": 1.0}  # different sizes: steps and last batches differ
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Precision:
    tol: float
    settings: dict  # config overrides


@pytest.fixture(params=["float32", "float64"])
def precision(request, monkeypatch):
    """Compare exactly in float64 (1e-9) and loosely in float32 (1e-3). The two paths sum in
    different orders (vmapped kernels; AVX2 or AVX-512 by CPU), and local SGD amplifies such rounding
    differences step after step: over ~50 steps at lr 0.1 and momentum 0.9 two float32 runs of one
    client part by 0.3, and BN over minibatches of 4 images grows a 1e-7 difference to 1e-4 within
    five steps on an AVX-512 CPU. So float64, where the paths agree to ~1e-13 even over long runs, is
    the check that their semantics are the same; float32 (few steps: 100 clients of 20-50 samples for
    the CNN) checks that nothing differs by a step: a missing mask or a wrong update moves weights by
    about lr x gradient, 1e-2 or more."""
    if request.param == "float32":
        yield Precision(1e-3, {"clients.total": 100})
        return
    from harness.data import Dataset

    real = Dataset.normalize
    monkeypatch.setattr(Dataset, "normalize", lambda self, x: real(self, x).to(torch.get_default_dtype()))
    torch.set_default_dtype(torch.float64)
    try:
        yield Precision(1e-9, {})
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.fixture
def groups(monkeypatch):
    """Records the size of every group that train_group trains."""
    sizes = []
    real = groups_module.train_group

    def spy(jobs, *args, **kw):
        sizes.append(len(jobs))
        return real(jobs, *args, **kw)

    monkeypatch.setattr(groups_module, "train_group", spy)
    return sizes


@pytest.fixture
def tiny_rgb(tmp_path):
    return write_tiny_rgb(tmp_path / "tiny.npz", 80)


def tensors(payload):
    """The tensors of a payload, flattened to name -> tensor."""
    if hasattr(payload, "state"):
        payload = payload.state
    out = {}
    for k, v in payload.items():
        if isinstance(v, dict):
            out.update({f"{k}.{n}": t for n, t in tensors(v).items()})
        elif torch.is_tensor(v):
            out[k] = v
    return out


def assert_same(alone, together, atol=1e-5, rtol=None):
    rtol = atol if rtol is None else rtol
    assert [(r.client_id, r.round) for r in together] == [(r.client_id, r.round) for r in alone]
    for a, b in zip(alone, together):
        assert a.ok and b.ok, (a.error, b.error)
        assert (a.num_samples, a.flops, a.bytes_up, a.bytes_down, a.keep_ratio) == \
               (b.num_samples, b.flops, b.bytes_up, b.bytes_down, b.keep_ratio)
        assert b.train_loss == pytest.approx(a.train_loss, rel=rtol, abs=atol)
        assert b.train_acc == pytest.approx(a.train_acc, abs=1e-12)
        ta, tb = tensors(a.payload), tensors(b.payload)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert ta[k].shape == tb[k].shape, k
            assert torch.allclose(ta[k], tb[k], atol=atol, rtol=rtol), (k, (ta[k] - tb[k]).abs().max())
        if isinstance(a.payload, dict) and "dense_importance" in a.payload:
            assert b.payload["dense_importance"] == pytest.approx(a.payload["dense_importance"], rel=rtol)


def alone_and_batched(strategy, broadcast, tasks):
    alone = [local_update(strategy, broadcast, t) for t in tasks]
    return alone, local_update_batch(strategy, broadcast, tasks)


# -- the same updates ---------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {},
    {"train.momentum": 0.9, "train.weight_decay": 1e-3},
    {"method.clip_grad_norm": 0.5},
])
def test_fedavg_clients_of_different_sizes(config, groups, precision, options):
    cfg = config(**UNEVEN, **{"train.epochs": 2}, **options, **precision.settings)
    bench, strategy = started(cfg)
    clients = [0, 1, 2, 3, 4, 5]
    sizes = [bench.clients[c].num_samples for c in clients]
    assert len(set(sizes)) > 1 and any(n % cfg.train.batch_size for n in sizes)
    alone, together = alone_and_batched(strategy, *round_tasks(bench, strategy, 0, clients))
    assert groups == [6]
    assert_same(alone, together, atol=precision.tol)
    assert not torch.equal(tensors(together[0].payload)["fc1.weight"], strategy.global_state["fc1.weight"])


def test_heterofl_scaler_masked_ce_clipping_two_widths_on_the_cnn(config, groups, precision):
    cfg = config(**UNEVEN, **{"method.name": "heterofl", "train.momentum": 0.5}, **precision.settings)
    bench, strategy = started(cfg)
    broadcast, tasks = round_tasks(bench, strategy, 0, [0, 1, 2, 3, 4], caps=[0.25, 0.5, 0.25, 0.5, 0.25])
    alone, together = alone_and_batched(strategy, broadcast, tasks)
    assert sorted(groups) == [2, 3]
    assert_same(alone, together, atol=precision.tol)


def test_heterofl_two_widths_static_bn_on_vgg(config, groups, tiny_rgb, precision):
    cfg = config(**UNEVEN, **{"method.name": "heterofl", "model.name": "vgg11", "data.dataset": tiny_rgb,
                              "clients.total": 5, "clients.per_round": 5, "train.batch_size": 4})
    bench, strategy = started(cfg)
    assert bench.build(device="meta").norm0.track_running_stats  # the config's norm; HeteroFL uses sBN
    broadcast, tasks = round_tasks(bench, strategy, 0, [0, 1, 2, 3, 4], caps=[1 / 16, 1 / 8, 1 / 16, 1 / 8, 1 / 16])
    alone, together = alone_and_batched(strategy, broadcast, tasks)
    assert sorted(groups) == [2, 3]  # grouped by submodel width
    assert_same(alone, together, atol=precision.tol)


def test_fedrolex_with_running_statistics_on_vgg(config, groups, tiny_rgb, precision):
    cfg = config(**UNEVEN, **{"method.name": "fedrolex", "method.static_bn": False, "model.name": "vgg11",
                              "data.dataset": tiny_rgb, "clients.total": 5, "clients.per_round": 5,
                              "train.batch_size": 8})
    bench, strategy = started(cfg)
    broadcast, tasks = round_tasks(bench, strategy, 3, [0, 1, 2], caps=[1 / 16] * 3)
    alone, together = alone_and_batched(strategy, broadcast, tasks)
    assert groups == [3]
    assert_same(alone, together, atol=precision.tol)
    state = together[0].payload.state
    assert "norm0.running_var" in state and not torch.equal(state["norm0.running_var"], torch.ones(4))


def test_prunefl_weight_masks_and_importance(config, groups, precision):
    bench, strategy = started(config(**UNEVEN, **{"method.name": "prunefl", "method.initial_pruning": False,
                                                  "train.momentum": 0.9}, **precision.settings))
    gen = torch.Generator().manual_seed(0)
    strategy.masks = {n: torch.rand(m.shape, generator=gen) < 0.6 for n, m in strategy.masks.items()}
    alone, together = alone_and_batched(strategy, *round_tasks(bench, strategy, 0, [0, 1, 2, 3]))
    assert groups == [4]
    assert_same(alone, together, atol=precision.tol)
    for r in together:  # pruned weights come back zero
        assert all((r.payload["state"][n][~m] == 0).all() for n, m in strategy.masks.items())


def test_fedlps_fixed_masks_batch_and_learnable_masks_train_alone(config, groups, precision):
    fixed = config(**UNEVEN, **{"method.name": "fedlps", "method.keep_ratio_policy": "fixed", "method.mask": "random"},
                   **precision.settings)
    bench, strategy = started(fixed)
    alone, together = alone_and_batched(strategy, *round_tasks(bench, strategy, 0, [0, 1, 2]))
    assert groups == [3]  # one group, each client with its own random unit mask
    assert_same(alone, together, atol=precision.tol)
    kept = [tensors(r.payload)["conv2.bias"] != 0 for r in together]
    assert not torch.equal(kept[0], kept[1])

    groups.clear()
    bench, strategy = started(config(**UNEVEN, **{"method.name": "fedlps"}, **precision.settings))
    broadcast, tasks = round_tasks(bench, strategy, 0, [0, 1, 2])
    alone, together = alone_and_batched(strategy, broadcast, tasks)
    assert groups == []  # scores move the mask every minibatch: the one-by-one path, bit for bit
    assert_same(alone, together, atol=0, rtol=0)
    assert all(torch.equal(a.state[g], b.state[g]) for a, b in zip(alone, together) for g in a.state)


# -- order and faults ---------------------------------------------------------------------------------
class BrokenParams(MethodParams):
    broken: list[int] = []


class BrokenClient(FedAvgClient):
    def local_job(self, global_state, task):
        if task.client_id in self.params.broken:
            raise RuntimeError(f"client {task.client_id} broke on purpose")
        return super().local_job(global_state, task)


class BrokenFedAvg(FedAvg):
    """FedAvg whose listed clients raise while their job is prepared (before any training)."""

    Client = BrokenClient
    Params = BrokenParams


def test_results_in_task_order_and_a_raising_client_is_isolated(config):
    cfg = config(**UNEVEN)
    bench, _ = started(cfg)
    strategy = BrokenFedAvg(bench, BrokenParams(broken=[4]))
    strategy.setup(MemoryStore())
    broadcast, tasks = round_tasks(bench, strategy, 0, [0, 1, 2, 3, 4])
    tasks = [tasks[i] for i in (3, 0, 4, 2, 1)]  # not sorted by client id
    together = local_update_batch(strategy, broadcast, tasks)
    assert [r.client_id for r in together] == [3, 0, 4, 2, 1]
    failed = together[2]
    assert not failed.ok and "broke on purpose" in failed.error
    ok = [t for t in tasks if t.client_id != 4]
    assert_same([local_update(strategy, broadcast, t) for t in ok], [r for r in together if r.ok])


def test_a_failing_batched_program_falls_back_to_clients_one_by_one(config, monkeypatch):
    bench, strategy = started(config(**UNEVEN))
    broadcast, tasks = round_tasks(bench, strategy, 0, [0, 1, 2, 3])
    alone = [local_update(strategy, broadcast, t) for t in tasks]

    def boom(jobs, *args, **kw):
        schedule(jobs, torch.float32)  # draws the data orders, then fails
        raise RuntimeError("device trouble")

    monkeypatch.setattr(groups_module, "train_group", boom)
    assert_same(alone, local_update_batch(strategy, broadcast, tasks), atol=0, rtol=0)  # same draws, same numbers


# -- the switch -----------------------------------------------------------------------------------------
def test_engine_settings(config):
    assert config().engine.batch_clients == "auto" and config().engine.cuda_graphs == "auto"
    for value in (True, False, "auto"):
        assert config(**{"engine.batch_clients": value, "engine.cuda_graphs": value}).engine.batch_clients == value
    with pytest.raises(ConfigError, match="engine.batch_clients"):
        config(**{"engine.batch_clients": "sometimes"})
    engine = config().engine
    assert not batching_enabled(engine, "cpu") and batching_enabled(engine, "cuda")
    assert batching_enabled(config(**{"engine.batch_clients": True}).engine, "cpu")
    assert not batching_enabled(config(**{"engine.batch_clients": False}).engine, "cuda")
    assert not cuda_graphs_enabled(config(**{"engine.cuda_graphs": True}).engine, "cpu")


def test_experiment_with_batched_clients_records_the_same_rounds(config):
    rows = {}
    for batch in (False, True):
        cfg = config(name=f"batch-{batch}", **SERIAL, **UNEVEN, rounds=2,
                     **{"clients.total": 100, "engine.batch_clients": batch})
        Experiment(cfg).run()
        out = f"{cfg.out}/{cfg.name}"
        rows[batch] = (pd.read_parquet(f"{out}/rounds.parquet"), pd.read_parquet(f"{out}/clients.parquet"))
    (r0, c0), (r1, c1) = rows[False], rows[True]
    assert len(r0) == len(r1) == 2
    for col in ("acc_clients_mean", "acc_global", "train_acc"):
        np.testing.assert_allclose(r1[col], r0[col], atol=1e-6)
    np.testing.assert_allclose(r1["train_loss"], r0["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(c1["train_loss"], c0["train_loss"], rtol=1e-5)
    assert (c1["flops"] == c0["flops"]).all() and (c1["status"] == "ok").all()


def test_the_ray_executor_dispatches_to_the_batched_path(config, groups):
    from harness.ray_engine import Executor

    cfg = config(**{"engine.batch_clients": True})
    executor = Executor(cfg, None, 1.0, use_cuda=False)  # in process, no Ray
    strategy = FedAvg(executor.bench, executor.bench.method_params)  # the server half, for the round's tasks
    strategy.setup(MemoryStore())
    broadcast, tasks = round_tasks(executor.bench, strategy, 0, [0, 1, 2])
    results = executor.run(broadcast, tasks)
    assert groups == [3] and all(r.ok for r in results)


def test_ray_executors_batch_their_share(ray_session, config):
    rows = {}
    for name, engine in (("serial", {"engine.backend": "serial"}),
                         ("ray", {"engine.backend": "ray", "engine.executors": 2, "engine.batch_clients": True})):
        cfg = config(name=name, rounds=2, **{"clients.per_round": 6}, **engine)
        Experiment(cfg).run()
        rows[name] = pd.read_parquet(f"{cfg.out}/{cfg.name}/clients.parquet")
    assert (rows["ray"]["status"] == "ok").all()
    np.testing.assert_allclose(rows["ray"]["train_loss"], rows["serial"]["train_loss"], rtol=1e-5)
    assert (rows["ray"]["flops"] == rows["serial"]["flops"]).all()


def test_bench_refuses_cuda_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from harness.cli import main

    assert main(["bench", "--device", "cuda", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err


# -- CUDA --------------------------------------------------------------------------------------------------
@pytest.fixture
def exact_cuda(monkeypatch):
    """No TF32 in convolutions (on by default for cuDNN): compare float32 with float32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def on_cuda(cfg, broadcast, tasks, calls=1):
    """`calls` batched calls of one CUDA executor (one ClientRunner: one graph cache); the runner too."""
    from harness.engine import ClientRunner

    bench, strategy = started(cfg, device="cuda")
    runner = ClientRunner(bench, cfg.engine.model_copy(update={"batch_clients": True}))
    return [runner.run(broadcast, tasks) for _ in range(calls)], runner


def test_the_graph_path_on_a_stand_in_for_cuda(config, monkeypatch):
    """The CUDA graph code path with torch.cuda replaced by stand-ins whose graph 'replay' runs the
    step eagerly. The warm-up and 'capture' steps really run here (every client inactive), so this
    checks that they leave the state alone, and that a cached program serves a later round."""
    from contextlib import contextmanager, nullcontext
    from types import SimpleNamespace

    capturing = []

    class Graph:  # 'captures' the step that runs inside `graph(...)`; replays it eagerly
        made = 0

        def __init__(self):
            Graph.made += 1

        def replay(self):
            self.state.step()

    @contextmanager
    def graph(g):
        capturing.append(g)
        yield
        capturing.pop()

    real_step = program_module.StackedClients.step

    def step(self):
        if capturing:
            capturing[-1].state = self
        real_step(self)

    monkeypatch.setattr(program_module.StackedClients, "step", step)
    stream = SimpleNamespace(wait_stream=lambda other: None)
    for name, stand_in in dict(is_available=lambda: True, Stream=lambda: stream, stream=lambda s: nullcontext(),
                               current_stream=lambda: stream, CUDAGraph=Graph, graph=graph).items():
        monkeypatch.setattr(torch.cuda, name, stand_in)
    graphs = GraphCache()
    bench, strategy = started(config(**UNEVEN, **{"method.name": "prunefl", "method.initial_pruning": False,
                                                  "train.momentum": 0.9, "clients.total": 100}))
    strategy.masks = {n: torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) < 0.5
                      for n, m in strategy.masks.items()}
    sizes = []
    for rnd, clients in enumerate(([0, 1, 2], [3, 4, 5])):
        broadcast, tasks = round_tasks(bench, strategy, rnd, clients)
        alone = [local_update(strategy, broadcast, t) for t in tasks]
        client = client_of(strategy)
        jobs = [client.local_job(broadcast, t) for t in tasks]
        sizes.append(sum(len(j.y) for j in jobs))
        groups_module.train_group(jobs, bench, graphs)
        assert len(graphs.programs) == 1 and not graphs.broken
        assert Graph.made == 1  # round 1 replays round 0's program, on other data
        assert_same(alone, [client.local_result(broadcast, t, j) for t, j in zip(tasks, jobs)])
    assert sizes[0] != sizes[1]


@cuda
@pytest.mark.parametrize("model", ["cnn", "vgg11"])
def test_cuda_batched_eager_and_graphed_match_the_cpu(config, exact_cuda, tiny_rgb, model):
    settings = {"method.name": "heterofl", "method.static_bn": model == "vgg11"}
    if model == "vgg11":
        settings.update({"model.name": "vgg11", "data.dataset": tiny_rgb, "clients.total": 5,
                         "clients.per_round": 5, "train.batch_size": 8})
    else:
        settings.update({"clients.total": 100, "train.momentum": 0.5})
    cfg = config(**UNEVEN, **settings)
    bench, strategy = started(cfg)
    broadcast, tasks = round_tasks(bench, strategy, 0, [0, 1, 2, 3], caps=[0.5, 0.5, 0.25, 0.25])
    alone = [local_update(strategy, broadcast, t) for t in tasks]

    [eager], _ = on_cuda(config(**UNEVEN, **settings, **{"engine.cuda_graphs": False}), broadcast, tasks)
    assert_same(alone, eager, atol=1e-4)
    (captured, replayed), runner = on_cuda(config(**UNEVEN, **settings, **{"engine.cuda_graphs": True}), broadcast,
                                           tasks, 2)
    assert not runner.graphs.broken and len(runner.graphs.programs) == 2  # one program per width, reused
    assert_same(eager, captured, atol=1e-5)
    assert_same(captured, replayed, atol=1e-6)
