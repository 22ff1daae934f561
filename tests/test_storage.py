"""Results are never lost, mixed or silently overwritten: storage, file modes, reruns, safe state."""
import io
import os
import pickle
import signal
import sqlite3
import stat
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from harness.cli import main
from harness.results import CLIENTS, ROUNDS, write_table

REPO = Path(__file__).resolve().parents[1]
WALL = [c for c in ROUNDS.names if c.startswith("wall")]
TINY = """\
name: tiny
rounds: 2
data: {dataset: mnist-5k, split: {kind: shards, shards_per_client: 2, shard_size: 20}}
clients: {total: 10, per_round: 2}
model: {name: cnn}
engine: {backend: serial}
"""


def tiny(tmp_path, text=TINY, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- fedbench run and its folders ------------------------------------------------------------------


def test_run_refuses_an_existing_experiment_folder_unless_overwrite(tmp_path, capsys):
    cfg, out = tiny(tmp_path), tmp_path / "out"
    assert main(["run", cfg, "--out", str(out), "--quiet"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["run", cfg, "--out", str(out), "--quiet", "--set", "rounds=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / 'tiny_seed1'}: exists already" in err and "--overwrite" in err
    assert snapshot(out) == before  # nothing touched
    (out / "tiny_seed1" / "stale.txt").write_text("left by the first run")
    assert main(["run", cfg, "--out", str(out), "--quiet", "--set", "rounds=1", "--overwrite"]) == 0
    assert not (out / "tiny_seed1" / "stale.txt").exists()  # the folder was cleared first
    assert pd.read_parquet(out / "tiny_seed1" / "rounds.parquet")["round"].tolist() == [0]


def test_a_failed_overwrite_leaves_no_finished_experiment_behind(tmp_path, capsys):
    from harness import leaderboard

    cfg, out = tiny(tmp_path), tmp_path / "out"
    assert main(["run", cfg, "--out", str(out), "--quiet"]) == 0
    assert leaderboard.build(out)["seeds"].tolist() == [1]
    crash = ["--set", "method.name=tests.faulty:CrashOnceFedAvg", "--set", "method.crash_at_round=1",
             "--set", f"method.marker={tmp_path / 'crashed'}"]
    assert main(["run", cfg, "--out", str(out), "--quiet", "--overwrite", *crash]) == 1
    assert (tmp_path / "crashed").exists()
    assert not (out / "tiny_seed1" / "summary.parquet").exists()  # the old summary went before the new rows came
    with pytest.raises(Exception, match="no completed experiment"):
        leaderboard.build(out)


@pytest.mark.parametrize("name", ["..", ".", "_tune", ".hidden"])
def test_reserved_experiment_names_are_rejected(tmp_path, capsys, name):
    out = tmp_path / "out"
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet", "--set", f"name={name}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedbench: error: name:") and "reserved" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_result_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["run", tiny(tmp_path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
        os.umask(0o027)
        write_table(tmp_path / "strict" / "rounds.parquet", [], ROUNDS)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"rounds.parquet", "clients.parquet", "summary.parquet", "config.yaml"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}  # colleagues can read a shared --out
    assert stat.S_IMODE((tmp_path / "strict" / "rounds.parquet").stat().st_mode) == 0o640


def test_writes_fsync_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", os.stat(a).st_ino)), real_replace(a, b))[1])
    write_table(tmp_path / "rounds.parquet", [], ROUNDS)
    replaced = [i for i, (what, _) in enumerate(calls) if what == "replace"]
    assert len(replaced) == 1
    inode = calls[replaced[0]][1]
    assert ("fsync", inode) in calls[:replaced[0]]  # the file's data reached the disk before its name did
    assert pd.read_parquet(tmp_path / "rounds.parquet").columns.tolist() == ROUNDS.names
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.parquet"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from harness import storage

    target = storage.resolve(tmp_path / "a.bin")
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        target.write_bytes(b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_locations_from_paths_and_uris(tmp_path, monkeypatch):
    from harness import storage

    assert storage.resolve(tmp_path).path == tmp_path.as_posix()
    assert storage.resolve(f"file://{tmp_path}/x").path == f"{tmp_path}/x"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert storage.s3_options() == {"region": "eu-west-3", "endpoint_override": "127.0.0.1:9", "scheme": "http"}
    s3 = storage.resolve("s3://bucket/some/prefix/")
    assert type(s3.fs).__name__ == "S3FileSystem" and s3.path == "bucket/some/prefix"
    assert str(s3 / "exp" / "rounds.parquet") == "s3://bucket/some/prefix/exp/rounds.parquet"
    options = s3.fs.__reduce__()[1][0]  # what the file system was made with
    assert (options["endpoint_override"], options["scheme"], options["region"]) == ("127.0.0.1:9", "http", "eu-west-3")
    with pytest.raises(Exception, match="nope://x: cannot open"):
        storage.resolve("nope://x")


def test_the_incremental_clients_file_of_a_long_run(tmp_path, monkeypatch):
    """1000 rounds of 100 clients: the client rows go out in parts, each row once, instead of the
    whole growing file every 10 s (here the clock says 10 s pass every 10 rounds)."""
    import harness.experiment
    from harness.experiment import Experiment

    from conftest import make_config

    class Clock:  # monotonic() advances a second per call; perf_counter stays real (wall columns)
        now = 0.0
        perf_counter = staticmethod(time.perf_counter)

        def monotonic(self):
            self.now += 1.0
            return self.now

    written: dict[tuple[int, int], int] = {}
    calls = []
    real = harness.experiment.write_table

    def spy(path, rows, schema):
        if schema.names[:len(CLIENTS.names)] == CLIENTS.names:
            calls.append(len(rows))
            for r in rows:
                key = (r["round"], r["client_id"])
                assert key not in written, f"client row {key} written again (a growing file rewritten)"
                written[key] = len(calls)
        return real(path, rows, schema)

    monkeypatch.setattr(harness.experiment, "time", Clock())
    monkeypatch.setattr(harness.experiment, "write_table", spy)
    cfg = make_config(tmp_path, name="long", rounds=1000, **{"method.name": "tests.faulty:Instant",
                                                             "clients.total": 100, "clients.per_round": 100})
    started = time.perf_counter()
    Experiment(cfg).run()
    took = time.perf_counter() - started
    assert len(calls) >= 90 and max(calls) <= 1100  # a part every ~10 rounds, never the whole history
    clients = pd.read_parquet(tmp_path / "long_seed1" / "clients.parquet")
    assert len(clients) == 100_000 and clients["round"].is_monotonic_increasing
    assert list(clients.columns)[:len(CLIENTS.names)] == CLIENTS.names
    assert not (tmp_path / "long_seed1" / "_clients").exists()
    assert took < 60, f"{took:.1f} s"


# -- data -------------------------------------------------------------------------------------------


def test_an_impossible_dirichlet_split_fails_within_a_second(tmp_path, capsys):
    def too_slow(*_):
        raise TimeoutError("the Dirichlet split took more than 2 s to fail")

    before = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(2)
    try:
        started = time.perf_counter()
        code = main(["run", tiny(tmp_path), "--out", str(tmp_path / "out"), "--quiet", "--set", "data.split.kind=dirichlet",
                     "--set", "clients.total=100000", "--set", "clients.per_round=10"])
        took = time.perf_counter() - started
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    assert code == 2 and took < 1.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clients.total" in err and "at most 2000 clients" in err
    assert not (tmp_path / "out").exists()


# -- state that is read back ------------------------------------------------------------------------


def test_state_is_plain_data_and_anything_else_is_refused(tmp_path):
    from harness.state import dumps, loads
    from tests.faulty import Hostile

    value = {"w": torch.ones(3), "arms": [(0.1, 2), (0.5, 3)], "name": "x", "raw": b"\x00", "n": None}
    blob = dumps(value)
    assert torch.load(io.BytesIO(blob), weights_only=True)["arms"] == [(0.1, 2), (0.5, 3)]
    assert loads(blob)["name"] == "x"
    with pytest.raises(TypeError, match=r"state.extra\[1\] is a numpy.ndarray"):
        dumps({"extra": [1, np.zeros(2)]})
    with pytest.raises(TypeError, match="tests.faulty.Hostile"):
        dumps({"x": Hostile("/nonexistent")})
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"x": Hostile(str(marker))}, buf)
    with pytest.raises(ValueError, match="checkpoint: refused"):
        loads(buf.getvalue(), "checkpoint")
    assert not marker.exists()  # the pickle's code never ran
    # Python's own types alone (a bandit's state) are a plain pickle, read by an unpickler without globals
    plain = {"arms": [{"low": 0.2, "rewards": [1.5, -0.25]}], "rng": [3, b"\x01\x02", None], "n": 7}
    assert loads(dumps(plain)) == plain and dumps(plain)[:2] != b"PK"
    with pytest.raises(ValueError, match="client 3: refused"):
        loads(pickle.dumps({"x": Hostile(str(marker))}), "client 3")
    assert not marker.exists()


@pytest.mark.parametrize("method", ["fedavg", "heterofl", "prunefl", "fedlps"])
def test_every_method_checkpoints_plain_data(tmp_path, method):
    from conftest import make_config
    from harness.experiment import Experiment
    from harness.state import dumps

    states = []
    cfg = make_config(tmp_path, name=method, rounds=2, checkpoint_every=2, **{"method.name": method})
    Experiment(cfg, on_round=lambda row, state: state and states.append(dumps(state()))).run()
    restored = torch.load(io.BytesIO(states[-1]), weights_only=True)
    assert restored["next_round"] == 2 and restored["config"]["method"]["name"] == method


def test_a_disk_store_left_by_an_earlier_run_is_not_read(tmp_path):
    """Where the old disk store lived (the experiment folder), a hostile client_state.sqlite: a
    rerun starts empty, never unpickles it, and gives a fresh run's numbers."""
    from conftest import make_config
    from harness.experiment import Experiment
    from tests.faulty import Hostile

    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save(Hostile(str(marker)), buf)
    folder = tmp_path / "run" / "fl_seed1"
    folder.mkdir(parents=True)
    db = sqlite3.connect(folder / "client_state.sqlite")
    db.execute("CREATE TABLE state (ns TEXT, cid INTEGER, blob BLOB, PRIMARY KEY (ns, cid))")
    db.executemany("INSERT INTO state VALUES (?, ?, ?)", [(ns, c, buf.getvalue()) for ns in ("client", "bandit")
                                                           for c in range(20)])
    db.commit()
    db.close()
    kw = {"method.name": "fedlps", "rounds": 2}
    Experiment(make_config(tmp_path / "run", name="fl", **kw, **{"engine.state_store": "disk"})).run()
    Experiment(make_config(tmp_path / "fresh", name="fl", **kw)).run()
    assert not marker.exists()
    a = pd.read_parquet(tmp_path / "run" / "fl_seed1" / "rounds.parquet").drop(columns=WALL)
    b = pd.read_parquet(tmp_path / "fresh" / "fl_seed1" / "rounds.parquet").drop(columns=WALL)
    pd.testing.assert_frame_equal(a, b)


# -- methods, pins, the module entry point -----------------------------------------------------------


def test_builtin_methods_are_found_without_package_metadata(monkeypatch):
    """As on a worker that got the code through `ray job submit --working-dir .`: no entry points."""
    from harness import registry

    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    registry._registered.cache_clear()
    registry.method_class.cache_clear()
    try:
        assert registry.available_methods() == sorted(registry.BUILT_IN)
        assert {"cs", "ditto", "fedavg", "fedlps", "fedmp", "fedprox", "fedrep", "fedrolex", "fedspa", "hermes",
                "heterofl", "perfedavg", "prunefl"} <= set(registry.available_methods())
        assert registry.method_class("fedlps").__name__ == "FedLPS"
    finally:
        registry._registered.cache_clear()
        registry.method_class.cache_clear()


def test_python_dash_m_harness_cli_works_like_the_console_script(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "harness.cli", "methods"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    from harness.registry import BUILT_IN

    assert [line.split()[0] for line in done.stdout.splitlines()] == sorted(BUILT_IN)


def test_dependency_pins():
    from packaging.requirements import Requirement

    deps = {Requirement(d).name: Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())
            ["project"]["dependencies"]}
    assert "14.0.0" not in deps["pyarrow"].specifier  # CVE-2023-47248
    assert deps["pyarrow"].specifier.contains("14.0.1")
    assert not deps["ray"].specifier.contains("2.51.0")  # no token authentication before 2.52
    assert not deps["ray"].specifier.contains("2.58.0")  # a local Ray without it by default before 2.59
    assert deps["ray"].specifier.contains("2.60.0")


def test_tests_keep_the_ray_token_in_a_temporary_folder():
    import tempfile

    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert os.environ["RAY_AUTH_MODE"] == "token" and token.is_file() and len(token.read_text()) >= 32
    assert token.is_relative_to(tempfile.gettempdir()) and not token.is_relative_to(Path.home())


def test_a_node_death_is_retried_by_default():
    from harness.config import TuneConfig

    assert TuneConfig().max_failures >= 1


@pytest.mark.slow
def test_a_local_ray_starts_with_token_auth_and_without_the_notice(tmp_path):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    code = ("import ray; from harness.ray_engine import connect; connect(); "
            "from ray._raylet import get_authentication_mode, AuthenticationMode; "
            "print('token' if get_authentication_mode() == AuthenticationMode.TOKEN else 'off'); ray.shutdown()")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env=dict(env, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "token"  # authentication on ...
    assert "Token authentication is" not in done.stderr  # ... without a warning on every run
