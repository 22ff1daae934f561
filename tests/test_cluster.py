"""A real Ray cluster on loopback: `ray start --head` in a temporary folder, `ray job submit` of a
tiny sweep with token authentication on, its Parquet output checked, and the head stopped."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = """\
name: job
rounds: 2
data: {dataset: mnist-5k, split: {kind: shards, shards_per_client: 2, shard_size: 20}}
clients: {total: 10, per_round: 2}
model: {name: cnn}
train: {epochs: 1}
grid: {seed: [1]}
tune: {max_concurrent_trials: 1, executors_per_trial: 1, cpus_per_executor: 0.5, driver_cpus: 0.25, verbose: 0}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    ray = BIN / "ray"
    if not ray.exists():
        pytest.skip("the ray command is not installed next to this Python")
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}", "--num-cpus=2", f"--temp-dir={temp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering, if only to ask for the token
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Ray head did not start: {(Path(temp) / 'head.log').read_text()[-2000:]}")
                time.sleep(1)
        yield address, env
    finally:
        head.terminate()  # `ray start --block` stops the processes of the cluster it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        log.close()
        left = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout.split()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test's head still run: {left}"


def test_a_sweep_submitted_as_a_job_to_a_real_head(ray_head, tmp_path):
    address, env = ray_head
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(TINY)
    out = tmp_path / "out"
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "fedbench", "sweep", str(sweep), "--out", str(out)],
        env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    rounds = pd.read_parquet(out / "job_seed1" / "rounds.parquet")
    assert rounds["round"].tolist() == [0, 1] and rounds["acc_clients_mean"].between(0, 1).all()
    assert (out / "leaderboard.csv").exists()
