"""The shape of the code: no import cycle among the harness modules, and a method written in one
module (here, in this test) adds its own column on either engine."""
import ast
import inspect
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from baselines.fedavg import FedAvg
from harness.cost import training_flops
from harness.experiment import Experiment
from harness.records import ClientResult
from harness.strategy import Client, MethodParams, Strategy
from harness.submodel import Contribution, aggregate, state_bytes
from harness.training import LocalRule

HARNESS = Path(__file__).resolve().parents[1] / "harness"


def harness_imports() -> dict[str, set[str]]:
    """Every harness module's imports of other harness modules, at any depth of its code (inside
    functions and `if TYPE_CHECKING:` blocks included)."""
    modules = {".".join(p.relative_to(HARNESS.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in HARNESS.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_the_harness_has_no_import_cycle():
    graph = harness_imports()
    assert len(graph) > 15 and graph["harness.experiment"] >= {"harness.engine", "harness.workbench"}
    assert graph["harness.schema"] == set()  # the config schema imports nothing of the harness
    assert graph["harness.records"] == {"harness.schema"}  # the records nothing but the schema
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


# -- the README's "Writing a method", verbatim --------------------------------------------------------
class PairedBatches(LocalRule):               # the local rule: pure tensor code over one client's
    batches_per_step = 2                      # parameters; the engine vmaps it when it batches clients

    def step(self, ops, params, batches):     # one local step from two minibatches
        g0, g1 = (ops.grad(params, b) for b in batches)
        return ops.sgd(params, {n: (g0[n] + g1[n]) / 2 for n in g0})


class StepsAvgClient(Client):                 # client half: every engine builds it from (bench, params)
    def local_job(self, global_state, task):  # what to train, as data
        return self.bench.job(task, global_state, clip_grad_norm=self.params.clip_grad_norm,
                              rule=PairedBatches())

    def local_result(self, global_state, task, job):   # the trained job -> the upload
        trained = {k: v.cpu() for k, v in job.trained.items() if k in global_state}
        return ClientResult(task.client_id, task.round, payload=trained, num_samples=len(job.y),
                            train_loss=job.stats.loss, train_acc=job.stats.accuracy,
                            flops=training_flops(self.bench.flops.forward(), job.stats.samples),
                            bytes_up=state_bytes(trained), bytes_down=state_bytes(trained),
                            metrics={"local_steps": job.stats.steps})


class StepsAvg(Strategy):                     # server half: the only holder of server state
    Client = StepsAvgClient
    title = "StepsAvg"
    class Params(MethodParams):               # validated from the config's `method:` entry
        pass
    client_columns = {"local_steps": pa.int64()}   # extra Parquet columns, with their Arrow types

    def setup(self, store):                   # initial state
        super().setup(store)
        self.global_state = self.bench.init_global_state()

    def configure(self, rnd, clients):        # the broadcast and one instruction per client
        return self.global_state, [None] * len(clients)

    def aggregate(self, rnd, kept, dropped):  # kept results in client order; dropped with reasons
        self.global_state = aggregate(self.global_state, self.bench.layout,
                                      [Contribution(r.payload, weight=r.num_samples) for r in kept])
        return {}                             # values of `round_columns`, if any

    def evaluate(self, rnd):
        return self.bench.evaluate_global(self.global_state)

    def state_dict(self):                     # checkpoints: tensors and plain data
        return {"global_state": self.global_state}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]


class StepsAvgPerRound(StepsAvg):
    round_columns = {"averaged": pa.int64()}

    def aggregate(self, rnd, kept, dropped):
        return {**super().aggregate(rnd, kept, dropped), "averaged": len(kept)}


def test_loading_the_schema_loads_neither_torch_nor_the_harness():
    import subprocess
    import sys

    code = "import sys, harness.schema; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('harness')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['harness', 'harness.schema']"


def test_the_readme_shows_this_method():
    readme = (HARNESS.parent / "README.md").read_text()
    for cls in (PairedBatches, StepsAvgClient, StepsAvg):
        assert inspect.getsource(cls) in readme, cls.__name__


@pytest.fixture(scope="module")
def steps_avg_runs(ray_session, tmp_path_factory):
    """StepsAvgPerRound on the serial engine one by one and batched, and on Ray."""
    from conftest import make_config

    out = tmp_path_factory.mktemp("steps")
    runs = {}
    for backend, batch in (("serial", False), ("serial", True), ("ray", False)):
        cfg = make_config(out, name=f"steps-{backend}-{batch}",
                          **{"method.name": "tests.test_architecture:StepsAvgPerRound", "engine.backend": backend,
                             "engine.executors": 1, "engine.batch_clients": batch})
        Experiment(cfg).run()
        runs[backend, batch] = (cfg, pd.read_parquet(f"{cfg.out}/{cfg.name}/clients.parquet"),
                                pd.read_parquet(f"{cfg.out}/{cfg.name}/rounds.parquet"))
    return runs


@pytest.mark.parametrize("run", [("serial", False), ("serial", True), ("ray", False)])
def test_a_method_defined_outside_the_harness_adds_its_columns(steps_avg_runs, run):
    cfg, clients, rounds = steps_avg_runs[run]
    steps = [-(-n // cfg.train.batch_size) * cfg.train.epochs // 2 for n in clients["num_samples"]]
    assert clients["local_steps"].tolist() == steps
    assert rounds["averaged"].tolist() == [cfg.clients.per_round] * cfg.rounds
    assert rounds["method_title"].iloc[0] == "StepsAvg"
    # the columns of the registered methods are there too (null for this one)
    assert {"density", "acc_personal"} <= set(clients.columns) and clients["density"].isna().all()


def test_its_rule_gives_the_same_numbers_one_by_one_batched_and_on_ray(steps_avg_runs):
    _, serial, serial_rounds = steps_avg_runs["serial", False]
    for run in (("serial", True), ("ray", False)):
        _, other, other_rounds = steps_avg_runs[run]
        assert (other["flops"] == serial["flops"]).all()
        assert other["train_loss"].to_numpy() == pytest.approx(serial["train_loss"].to_numpy(), rel=1e-4)
        assert other_rounds["acc_clients_mean"].to_numpy() == pytest.approx(
            serial_rounds["acc_clients_mean"].to_numpy(), abs=0.02)


class PeekingClient(StepsAvgClient):
    def local_job(self, global_state, task):
        return self.bench.job(task, self.global_state)  # server state: not the client's to read


class Peeking(StepsAvg):
    Client = PeekingClient


@pytest.mark.parametrize("backend", ["serial", "ray"])
def test_client_code_that_reads_server_state_fails_alike_on_every_engine(ray_session, config, backend):
    cfg = config(name=f"peek-{backend}", rounds=1, **{"method.name": "tests.test_architecture:Peeking",
                                                      "engine.backend": backend, "engine.executors": 1})
    try:
        Experiment(cfg).run()
        errors = set(pd.read_parquet(f"{cfg.out}/{cfg.name}/clients.parquet")["error"])
    except Exception as e:  # noqa: BLE001 - an engine may stop the experiment at the first such error
        errors = {str(e)}
    assert errors and all("'PeekingClient' object has no attribute 'global_state'" in e for e in errors), errors


class Undeclared(FedAvg):
    def aggregate(self, rnd, kept, dropped):
        super().aggregate(rnd, kept, dropped)
        return {"surprise": 1.0}


def test_an_undeclared_column_is_refused(config):
    cfg = config(**{"method.name": "tests.test_architecture:Undeclared"})
    with pytest.raises(ValueError, match="surprise"):
        Experiment(cfg).run()
