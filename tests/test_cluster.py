"""A real Ray cluster on loopback: `ray start` of a head and a second node, each in a temporary folder
of its own, `ray job submit` of a sweep with token authentication on, a node killed while it runs."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from ports import free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class Node:
    """`ray start --block` of one node in a temporary folder of its own, on a loopback address."""

    def __init__(self, ip: str, args: list[str], env: dict):
        self.ip = ip
        self.temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.log = open(Path(self.temp) / "node.log", "w")
        flags = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", f"--node-ip-address={ip}", f"--temp-dir={self.temp}",
             *[f"{flag}={port}" for flag, port in zip(flags, free_ports(len(flags)))], *args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def raylet(self):
        import psutil

        return next(p for p in psutil.Process(self.proc.pid).children(recursive=True) if p.name() == "raylet")

    def stop(self) -> list[str]:
        if self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops the processes it started
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()
        deadline = time.monotonic() + 30
        while True:  # processes of this node (their command lines name its folder) that still run
            left = subprocess.run(["pgrep", "-f", self.temp], capture_output=True, text=True).stdout.split()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(1)
        self.output = (Path(self.temp) / "node.log").read_text()[-3000:]
        shutil.rmtree(self.temp, ignore_errors=True)
        return left if not left else left + [self.output]


def start_head(env: dict, num_cpus: int) -> tuple["Node", str, int]:
    """A head on 127.0.0.2 (Ray replaces 127.0.0.1 by the machine's outward address; the rest of loopback
    it keeps) with its dashboard on 127.0.0.1: the node, the dashboard's address and the GCS port. A head
    that exits before its dashboard answers is started again on other ports, twice at most."""
    for attempt in range(3):
        port, dashboard, client = free_ports(3)
        head = Node("127.0.0.2", ["--head", f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
                                  "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                  f"--ray-client-server-port={client}"], env)
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 90
        while head.proc.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                return head, address, port
            except urllib.error.HTTPError:  # answering, if only to ask for the token
                return head, address, port
            except OSError:
                time.sleep(1)
        head.stop()
        assert attempt < 2, f"the Ray head did not start, three times; the last one's log: {head.output}"


TWO_NODES = """\
name: tw
rounds: 8
checkpoint_every: 1
data: {{dataset: mnist-5k, split: {{kind: shards, shards_per_client: 2, shard_size: 20}}}}
clients: {{total: 20, per_round: 4}}
model: {{name: cnn}}
method: {{name: "tests.faulty:SlowFedAvg", round_s: 3, until: "{killed}"}}
grid: {{seed: [1, 2]}}
tune: {{max_concurrent_trials: 2, executors_per_trial: 1, cpus_per_executor: 0.5, driver_cpus: 0.25, verbose: 0}}
"""


@pytest.mark.slow
def test_a_node_killed_mid_sweep_its_trial_continues_elsewhere_with_the_same_rows(tmp_path):
    """Two nodes on loopback (127.0.0.2 and .3), each with its own temp folder and no shared output
    folder: results, Tune's storage and checkpoints in an S3-compatible store on 127.0.0.1. The second
    node's raylet is SIGKILLed while both trials run; its trial continues from its checkpoint in the
    bucket on the head and every row equals a serial run's (wall-clock columns aside)."""
    import pyarrow.fs as pafs

    from harness.config import load
    from harness.experiment import Experiment
    from harness.results import load as load_rows
    from s3server import s3_server

    if not (BIN / "ray").exists():
        pytest.skip("the ray command is not installed next to this Python")
    sweep = tmp_path / "tw.yaml"
    killed = tmp_path / "killed"  # from then on the trials' rounds take no extra time
    sweep.write_text(TWO_NODES.format(killed=killed))
    with s3_server() as (aws, fs):
        env = dict(os.environ, **aws, PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        head, address, port = start_head(env, num_cpus=1)
        nodes = [head]
        try:
            nodes.append(Node("127.0.0.3", [f"--address=127.0.0.2:{port}", "--num-cpus=1"], env))
            time.sleep(5)
            job_log = open(tmp_path / "job.log", "w")
            job = subprocess.Popen(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                 "python", "-m", "harness.cli", "sweep", str(sweep), "--out", "s3://bucket/tw"],
                env=env, stdout=job_log, stderr=subprocess.STDOUT)
            checkpoints = [f"bucket/tw/_tune/tw/checkpoints/tw_seed{s}.pt" for s in (1, 2)]
            deadline = time.monotonic() + 240
            while not all(fs.get_file_info(c).type == pafs.FileType.File for c in checkpoints):
                assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
                time.sleep(0.5)
            nodes[1].raylet().kill()  # SIGKILL while both trials run, each past a checkpoint
            killed.touch()
            assert job.wait(timeout=400) == 0, (tmp_path / "job.log").read_text()[-4000:]
            job_log.close()
            output = (tmp_path / "job.log").read_text()
            for key, value in aws.items():
                os.environ[key] = value
            try:
                fs_rows = {t: load_rows("s3://bucket/tw", t) for t in ("rounds", "clients")}
            finally:
                for key in aws:
                    os.environ.pop(key, None)
        finally:
            left = [n.stop() for n in reversed(nodes)]
        assert not any(left), f"processes of the test's nodes still run: {left}"
    # The trial on the second node failed there and continued from its checkpoint on the head.
    assert re.search(r"trial tw_seed[12] failed on node 127\.0\.0\.3 and is retried from its last checkpoint", output)
    resumed = re.findall(r"(tw_seed[12]) continues from its checkpoint at round (\d+) on node 127\.0\.0\.2", output)
    assert len(resumed) == 1 and int(resumed[0][1]) >= 1, output[-3000:]
    assert "succeeded" in output
    experiments, _ = load(str(sweep))
    for cfg in experiments:  # the same experiments, serially in this process (without the pause)
        serial = cfg.model_copy(update={"out": str(tmp_path / "serial"),
                                        "engine": cfg.engine.model_copy(update={"backend": "serial"}),
                                        "method": cfg.method.model_copy(update={"round_s": 0.0})})
        Experiment(serial).run()
    for table, keys in (("rounds", ["experiment", "round"]), ("clients", ["experiment", "round", "client_id"])):
        labels = set(fs_rows[table]["method_label"])
        assert len(labels) == 1 and labels.pop().startswith("tests.faulty:SlowFedAvg-round_s-3-until-")
        wall = [c for c in ("wall_s", "wall_total_s", "method_label", "method_title") if c in fs_rows[table]]
        a = fs_rows[table].drop(columns=wall).sort_values(keys).reset_index(drop=True)
        b = load_rows(tmp_path / "serial", table).drop(columns=wall).sort_values(keys).reset_index(drop=True)
        assert len(a) == (2 * 8 if table == "rounds" else 2 * 8 * 4)
        pd.testing.assert_frame_equal(a, b)
