"""The shape of the code: no import cycle among the harness modules, and a method written in one
module (here, in this test) adds its own column on either engine."""
import ast
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from baselines.fedavg import FedAvg
from harness.experiment import Experiment

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


class CountingFedAvg(FedAvg):
    """A third-party method: FedAvg that records, per client, how many minibatch steps it took, and
    per round how many clients it averaged."""

    client_columns = {"local_steps": pa.int64()}
    round_columns = {"averaged": pa.int64()}

    def local_result(self, global_state, task, job):
        result = super().local_result(global_state, task, job)
        result.metrics["local_steps"] = job.stats.steps
        return result

    def aggregate(self, rnd, kept, dropped):
        return {**super().aggregate(rnd, kept, dropped), "averaged": len(kept)}


@pytest.mark.parametrize("backend", ["serial", "ray"])
def test_a_method_defined_outside_the_harness_adds_its_columns(ray_session, config, backend):
    cfg = config(name=f"counting-{backend}", **{"method.name": "tests.test_architecture:CountingFedAvg",
                                                "engine.backend": backend, "engine.executors": 1})
    Experiment(cfg).run()
    clients = pd.read_parquet(f"{cfg.out}/{cfg.name}/clients.parquet")
    rounds = pd.read_parquet(f"{cfg.out}/{cfg.name}/rounds.parquet")
    steps = [-(-n // cfg.train.batch_size) * cfg.train.epochs for n in clients["num_samples"]]
    assert clients["local_steps"].tolist() == steps
    assert rounds["averaged"].tolist() == [cfg.clients.per_round] * cfg.rounds
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
