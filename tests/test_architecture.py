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
from harness.strategy import MethodParams, Strategy
from harness.submodel import Contribution, aggregate, state_bytes

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
    assert graph["harness.records"] == set()  # the records import nothing of the harness
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
class StepsAvg(Strategy):
    title = "StepsAvg"
    class Params(MethodParams):               # validated from the config's `method:` entry
        pass
    client_columns = {"local_steps": pa.int64()}   # extra Parquet columns, with their Arrow types

    def setup(self, store):                   # server: initial state
        super().setup(store)
        self.global_state = self.bench.init_global_state()

    def configure(self, rnd, clients):        # server: the broadcast and one instruction per client
        return self.global_state, [None] * len(clients)

    def local_job(self, global_state, task):  # client: what to train, as data
        return self.bench.job(task, global_state, clip_grad_norm=self.params.clip_grad_norm)

    def local_result(self, global_state, task, job):   # client: the trained job -> the upload
        trained = {k: v.cpu() for k, v in job.trained.items() if k in global_state}
        return ClientResult(task.client_id, task.round, payload=trained, num_samples=len(job.y),
                            train_loss=job.stats.loss, train_acc=job.stats.accuracy,
                            flops=training_flops(self.bench.flops.forward(), job.stats.samples),
                            bytes_up=state_bytes(trained), bytes_down=state_bytes(trained),
                            metrics={"local_steps": job.stats.steps})

    def aggregate(self, rnd, kept, dropped):  # server: kept results in client order; dropped with reasons
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


def test_the_readme_shows_this_method():
    readme = (HARNESS.parent / "README.md").read_text()
    assert inspect.getsource(StepsAvg) in readme


@pytest.mark.parametrize("backend", ["serial", "ray"])
def test_a_method_defined_outside_the_harness_adds_its_columns(ray_session, config, backend):
    cfg = config(name=f"steps-{backend}", **{"method.name": "tests.test_architecture:StepsAvgPerRound",
                                             "engine.backend": backend, "engine.executors": 1})
    Experiment(cfg).run()
    clients = pd.read_parquet(f"{cfg.out}/{cfg.name}/clients.parquet")
    rounds = pd.read_parquet(f"{cfg.out}/{cfg.name}/rounds.parquet")
    steps = [-(-n // cfg.train.batch_size) * cfg.train.epochs for n in clients["num_samples"]]
    assert clients["local_steps"].tolist() == steps
    assert rounds["averaged"].tolist() == [cfg.clients.per_round] * cfg.rounds
    assert rounds["method_title"].iloc[0] == "StepsAvg"
    # the columns of the registered methods are there too (null for this one)
    assert {"density", "acc_personal"} <= set(clients.columns) and clients["density"].isna().all()


class Undeclared(FedAvg):
    def aggregate(self, rnd, kept, dropped):
        super().aggregate(rnd, kept, dropped)
        return {"surprise": 1.0}


def test_an_undeclared_column_is_refused(config):
    cfg = config(**{"method.name": "tests.test_architecture:Undeclared"})
    with pytest.raises(ValueError, match="surprise"):
        Experiment(cfg).run()
