"""A sweep whose results, Tune storage and checkpoints live on an S3-compatible store (moto on
127.0.0.1): a trial dies once and continues from its checkpoint in the bucket; the leaderboard read
back from the URI equals the same experiments' run uninterrupted in a local folder."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import pyarrow.fs as pafs

from s3server import s3_server

REPO = Path(__file__).resolve().parents[1]
SWEEP = """\
name: s3
rounds: 3
checkpoint_every: 1
data: {{dataset: mnist-5k, split: {{kind: shards, shards_per_client: 2, shard_size: 20}}}}
clients: {{total: 10, per_round: 2}}
model: {{name: cnn}}
method: {{name: "tests.faulty:CrashOnceFedAvg", crash_at_round: 2, marker: "{marker}"}}
grid: {{seed: [1, 2]}}
tune: {{max_concurrent_trials: 2, executors_per_trial: 1, cpus_per_executor: 0.5, driver_cpus: 0.25, verbose: 0}}
"""
WALL = ["wall_s", "wall_total_s"]


def keys(fs, root):
    return sorted(info.path[len(root) + 1:] for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                  if info.type == pafs.FileType.File)


@pytest.mark.slow
def test_a_sweep_to_s3_reads_back_like_a_local_one(tmp_path, monkeypatch, capsys):
    from harness import leaderboard
    from harness.cli import main
    from harness.config import load
    from harness.experiment import Experiment

    sweep = tmp_path / "s3.yaml"
    sweep.write_text(SWEEP.format(marker=tmp_path / "crashed"))
    with s3_server() as (env, fs):
        job = subprocess.run(  # its own Ray, as a user runs it, with the store's endpoint in its environment
            [sys.executable, "-m", "harness.cli", "sweep", str(sweep), "--out", "s3://bucket/prefix"],
            cwd=REPO, env=dict(os.environ, **env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=400)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert (tmp_path / "crashed").exists()  # a trial died at round 2 ...
        assert "failed on node" in job.stderr and "is retried from its last checkpoint" in job.stderr
        assert "continues from its checkpoint at round 2" in job.stderr  # ... and continued from the bucket
        stored = keys(fs, "bucket/prefix")
        for name in ("rounds.parquet", "clients.parquet", "summary.parquet", "config.yaml"):
            assert f"s3_seed1/{name}" in stored and f"s3_seed2/{name}" in stored
        assert "leaderboard.csv" in stored and "report.html" in stored and "_tune/s3/sweep.json" in stored
        assert any(k.startswith("plots/") and k.endswith(".png") for k in stored)
        assert any(k.startswith("_tune/s3/run-1/s3_seed1/") for k in stored)  # Tune's storage_path is in the bucket
        assert not any(k.startswith("_tune/s3/checkpoints/") for k in stored)  # finished: no checkpoint left
        dotted = [k for k in stored if any(p.startswith(".") for p in k.split("/"))
                  and not k.startswith("_tune/s3/run-")]  # (Tune keeps a marker of its own)
        assert not dotted, dotted  # no temporary object

        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert main(["leaderboard", "s3://bucket/prefix", "-o", str(tmp_path / "from_s3.csv")]) == 0
        assert main(["plot", "s3://bucket/prefix", "--plots-dir", str(tmp_path / "plots")]) == 0
        assert len(list((tmp_path / "plots").glob("*.png"))) == 4
        remote = leaderboard.build("s3://bucket/prefix")
        from harness.results import load as load_rows

        remote_rounds = load_rows("s3://bucket/prefix", "rounds")
        remote_clients = load_rows("s3://bucket/prefix", "clients")
    # The same experiments in a local folder, uninterrupted (the marker exists now) and serially here.
    experiments, _ = load(str(sweep))
    for cfg in experiments:
        Experiment(cfg.model_copy(update={"out": str(tmp_path / "local"), "engine": cfg.engine.model_copy(
            update={"backend": "serial"})})).run()
    local = leaderboard.build(tmp_path / "local")
    pd.testing.assert_frame_equal(remote.drop(columns=["wall_s"]), local.drop(columns=["wall_s"]))
    assert pd.read_csv(tmp_path / "from_s3.csv")["final_acc_mean"].tolist() == pytest.approx(
        local["final_acc_mean"].tolist(), rel=1e-5)

    def rows(frame):
        return frame.drop(columns=[c for c in WALL if c in frame]).sort_values(
            [c for c in ("experiment", "round", "client_id") if c in frame]).reset_index(drop=True)

    pd.testing.assert_frame_equal(rows(remote_rounds), rows(load_rows(tmp_path / "local", "rounds")))
    pd.testing.assert_frame_equal(rows(remote_clients), rows(load_rows(tmp_path / "local", "clients")))
    capsys.readouterr()
