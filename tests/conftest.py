import os
import secrets
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's token authentication on, with the suite's own token in a temporary folder (not ~/.ray):
# every Ray process the tests start (ray.init, `ray start`, `ray job submit`) inherits these.
_TOKEN_DIR = tempfile.mkdtemp(prefix="fedbench-ray-token-")
TOKEN_FILE = Path(_TOKEN_DIR) / "auth_token"
TOKEN_FILE.write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(TOKEN_FILE)
os.environ.pop("RAY_AUTH_TOKEN", None)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_TOKEN_DIR, ignore_errors=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter else 0
    if exitstatus == 0 and passed == 0:
        reporter.write_line("FAILED: no test passed (everything skipped or deselected)", red=True)
        session.exitstatus = 1


@pytest.fixture
def shared_npz():
    def get(name):
        path = SHARED_DATA / f"{name}.npz"
        if not path.exists():
            pytest.skip(f"{path} is missing (real MNIST/CIFAR-10 npz files of this workplace)")
        return path
    return get


def make_config(tmp_path=None, **overrides):
    """A small, fast experiment on the embedded MNIST-5k data; overrides are dotted keys."""
    from harness.config import expand

    raw = {
        "name": "t", "seed": 1, "rounds": 2,
        "data": {"dataset": "mnist-5k", "split": {"kind": "shards", "shards_per_client": 2, "shard_size": 20}},
        "clients": {"total": 20, "per_round": 5},
        "model": {"name": "cnn"},
        "train": {"epochs": 1, "batch_size": 10},
        "engine": {"backend": "serial"},
        "out": str(tmp_path or "/tmp/fedbench-tests"),
    }
    experiments, _ = expand(raw, list(overrides.items()))
    assert len(experiments) == 1
    return experiments[0]


def write_tiny_rgb(path, n_train: int, n_test: int = 20) -> str:
    """A tiny CIFAR-shaped npz data set (uint8 32x32x3 noise, labels cycling 0..9)."""
    import numpy as np

    gen = np.random.default_rng(0)
    np.savez(path, x_train=gen.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(n_train, dtype=np.uint8) % 10,
             x_test=gen.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(n_test, dtype=np.uint8) % 10)
    return f"npz:{path}"


@pytest.fixture
def config(tmp_path):
    return lambda **kw: make_config(tmp_path, **kw)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray session for the whole test run: 4 logical CPUs and 1 logical GPU."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


# -- helpers shared by the test modules -------------------------------------------------------------
def tier(cap: float, compute_mflops: float = 744448):
    from harness.records import Tier

    return Tier(name=f"cap{cap:g}", cap=cap, compute_mflops=compute_mflops)


def started(cfg, device: str = "cpu"):
    """(Workbench, strategy) of `cfg`, the strategy set up as the round loop sets it up."""
    from harness.registry import method_class
    from harness.state import MemoryStore
    from harness.workbench import Workbench

    bench = Workbench(cfg, device=device)
    strategy = method_class(cfg.method.name)(bench, bench.method_params)
    strategy.setup(MemoryStore())
    return bench, strategy


def client_of(strategy):
    """The method's client half, built as every engine builds it."""
    return type(strategy).client(strategy.bench, strategy.params)


def local_update(strategy, broadcast, task):
    """One client's work in this process, one by one; exceptions propagate."""
    from harness.batched.groups import train_single

    work = client_of(strategy).work(broadcast, task)
    try:
        jobs = next(work)
        while True:
            for job in jobs if isinstance(jobs, list) else [jobs]:
                train_single(job, strategy.bench)
            jobs = work.send(None)
    except StopIteration as done:
        return done.value


def local_update_batch(strategy, broadcast, tasks, **engine):
    """The tasks as an executor with `engine.batch_clients` on runs them (engine: EngineConfig fields)."""
    from harness.config import EngineConfig
    from harness.engine import ClientRunner

    runner = ClientRunner(strategy.bench, EngineConfig(batch_clients=True, **engine), client_of(strategy))
    return runner.run(broadcast, tasks)


def round_tasks(bench, strategy, rnd, clients, caps=None):
    """configure() for `clients` (with tier caps `caps`, default the first tier) and the round's tasks."""
    from harness.records import ClientSlot, ClientTask

    tiers = [bench.cfg.devices.tiers[0]] * len(clients) if caps is None else [tier(c, 1e5) for c in caps]
    slots = [ClientSlot(c, t, bench.clients[c].num_samples) for c, t in zip(clients, tiers)]
    broadcast, instructions = strategy.configure(rnd, slots)
    return broadcast, [ClientTask(s.client_id, rnd, s.tier, i) for s, i in zip(slots, instructions)]


def run_serial(cfg):
    """Run `cfg` in process; its rounds and clients tables."""
    import pandas as pd

    from harness.experiment import Experiment

    assert cfg.engine.backend == "serial"  # in process: no Ray start-up in these small runs
    Experiment(cfg).run()
    out = f"{cfg.out}/{cfg.name}"
    return pd.read_parquet(f"{out}/rounds.parquet"), pd.read_parquet(f"{out}/clients.parquet")


@pytest.fixture
def one_thread():
    """Direct strategy calls train with one thread, as a serial engine's executor does (faster on a
    busy machine, and the numbers depend on the thread count)."""
    from harness.training import threads

    with threads(1):
        yield
