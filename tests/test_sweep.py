"""Sweeps on Ray Tune, checkpoints, the leaderboard and plots."""
import pandas as pd
import pytest

from harness import leaderboard
from harness.config import expand
from harness.errors import UserError
from harness.plots import plot
from harness.results import ROUNDS, SUMMARY, write_table
from harness.sweep import run_sweep



def sweep_raw(tmp_path, **tune):
    return {
        "name": "sw", "rounds": 4, "checkpoint_every": 1,
        "data": {"dataset": "mnist-5k", "split": {"kind": "shards", "shards_per_client": 2, "shard_size": 20}},
        "clients": {"total": 20, "per_round": 4}, "model": {"name": "cnn"}, "train": {"epochs": 1},
        "method": {"name": "tests.faulty:CrashOnceFedAvg", "crash_at_round": 2, "marker": str(tmp_path / "crashed")},
        "grid": {"seed": [1, 2]},
        "tune": {"max_concurrent_trials": 2, "executors_per_trial": 1, "cpus_per_executor": 1.0,
                 "driver_cpus": 0.5, "max_failures": 1, "verbose": 0, **tune},
    }


def test_a_sweep_too_large_for_the_cluster_fails_at_once(ray_session, tmp_path):
    experiments, sweep = expand(sweep_raw(tmp_path, executors_per_trial=8))
    with pytest.raises(UserError, match="one trial asks for 8.5 CPUs .* but the cluster has 4"):
        run_sweep(experiments, sweep, tmp_path / "big", "big")


def fake_results(root):
    """Two methods x two seeds with known numbers."""
    ident = dict(setting="s", dataset="d", model="m")
    table = {("a", 1): [0.5, 0.7, 0.8], ("a", 2): [0.6, 0.6, 0.9], ("b", 1): [0.4, 0.5, 0.6], ("b", 2): [0.3, 0.6, 0.5]}
    for (method, seed), accs in table.items():
        exp = f"{method}{seed}"
        rows = [dict(ident, experiment=exp, method=method, method_label=method, seed=seed, round=r,
                     acc_clients_mean=a, sim_total_s=10.0 * (r + 1) * (1 if method == "a" else 2)) for r, a in enumerate(accs)]
        write_table(root / exp / "rounds.parquet", rows, ROUNDS)
        write_table(root / exp / "summary.parquet", [dict(
            ident, experiment=exp, method=method, method_label=method, seed=seed, rounds=3, status="completed",
            final_acc=accs[-1], best_acc=max(accs), sim_total_s=rows[-1]["sim_total_s"], flops_total=2e12,
            bytes_up_total=3_000_000, bytes_down_total=4_000_000, wall_total_s=5.0)], SUMMARY)


def test_leaderboard_by_hand(tmp_path):
    fake_results(tmp_path)
    board = leaderboard.build(tmp_path)
    assert board["method"].tolist() == ["a", "b"]  # best first
    a, b = board.iloc[0], board.iloc[1]
    assert (a["seeds"], a["final_acc_mean"], a["final_acc_std"]) == (2, pytest.approx(0.85), pytest.approx(0.05 * 2 ** 0.5))
    # fewer than 10 rounds: last10 is the mean of all 3; seed 1: 2/3, seed 2: 0.7
    assert a["last10_acc_mean"] == pytest.approx((2 / 3 + 0.7) / 2)
    assert a["last10_acc_ci95_high"] == pytest.approx((2 / 3 + 0.7) / 2 + 12.706205 * (0.7 - 2 / 3) / 2, rel=1e-6)
    assert pd.isna(a["last10_acc_global_mean"])  # runs without acc_global_clients_mean
    assert (b["best_acc_mean"], b["best_acc_std"]) == (pytest.approx(0.6), pytest.approx(0.0))
    # default target: the lowest best accuracy of any run (0.6): a reaches it at 20 s (seed 1) and 10 s (seed 2)
    assert a["target_acc"] == pytest.approx(0.6) and a["time_to_target_s"] == pytest.approx(15.0)
    assert b["time_to_target_s"] == pytest.approx((60.0 + 40.0) / 2)
    assert a["tflops_total"] == pytest.approx(2.0) and a["mb_up"] == pytest.approx(3.0)
    high = leaderboard.build(tmp_path, target_acc=0.85)
    assert high.iloc[0]["seeds_reaching_target"] == 1 and pd.isna(high.iloc[0]["time_to_target_s"])
    csv = leaderboard.write(board, tmp_path / "lb.csv")
    assert pd.read_csv(csv)["method"].tolist() == ["a", "b"]
    assert "not reached (1/2)" in leaderboard.format_table(high)


def test_plots_are_written(tmp_path):
    fake_results(tmp_path)
    files = plot(tmp_path)
    assert {f.name for f in files} == {"s_acc_vs_time.png", "s_acc_vs_round.png", "s_running_time.png", "s_pareto.png"}
    assert all(f.stat().st_size > 10_000 for f in files)


def test_trial_bundles_follow_the_engine_pools(tmp_path):
    from harness.sweep import trial_engine, trial_resources

    raw = sweep_raw(tmp_path, executors_per_trial=2, cpus_per_executor=0.5, driver_cpus=0.25)
    experiments, sweep = expand(raw)
    cfg = trial_engine(experiments[0], sweep)
    assert trial_resources(cfg, 0.25) == [{"CPU": 0.25}, {"CPU": 0.5}, {"CPU": 0.5}]
    raw["engine"] = {"groups": [{"tiers": ["e"], "executors": 1, "cpus_per_executor": 0.25, "gpus_per_executor": 0.1}]}
    experiments, sweep = expand(raw)
    cfg = trial_engine(experiments[0], sweep)
    assert trial_resources(cfg, 0.25) == [{"CPU": 0.25}, {"CPU": 0.25, "GPU": 0.1}, {"CPU": 0.5}, {"CPU": 0.5}]


def test_leaderboard_and_plot_commands(tmp_path, capsys):
    from harness.cli import main

    fake_results(tmp_path / "res")
    assert main(["leaderboard", str(tmp_path / "res"), "-o", str(tmp_path / "lb.csv"), "--target-acc", "0.6"]) == 0
    assert pd.read_csv(tmp_path / "lb.csv")["method"].tolist() == ["a", "b"]
    assert main(["plot", str(tmp_path / "res")]) == 0
    assert len(list((tmp_path / "res" / "plots").glob("*.png"))) == 4
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert main(["leaderboard", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no completed experiment here" in err
    assert main(["leaderboard", str(tmp_path / "res"), "--target-acc", "75"]) == 2
    assert "--target-acc: must be a fraction" in capsys.readouterr().err


RERUN = """\
name: sw
rounds: 2
checkpoint_every: 1
data: {{dataset: mnist-5k, split: {{kind: shards, shards_per_client: 2, shard_size: 20}}}}
clients: {{total: 10, per_round: 2}}
model: {{name: cnn}}
grid: {{seed: {seeds}, train.lr: [{lr}]}}
tune: {{max_concurrent_trials: 2, executors_per_trial: 1, cpus_per_executor: 1, driver_cpus: 0.5, verbose: 0}}
"""


def experiment_files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("sw_*/*")) if p.is_file()}


@pytest.mark.slow
def test_a_sweep_rerun_keeps_finished_runs_new_and_stops_on_a_changed_config(ray_session, tmp_path, capsys):
    import json
    import shutil

    import torch

    from harness.cli import main
    from tests.faulty import Hostile

    sweep_file, out = tmp_path / "sw.yaml", tmp_path / "out"
    sweep_file.write_text(RERUN.format(seeds=[1, 2], lr=0.1))
    assert main(["sweep", str(sweep_file), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "sweep sw: 2/2 done, 0 running, 0 pending, 0 failed | rounds 4/4 | best acc" in err  # the live line
    first = experiment_files(out)
    assert {k.split("/")[0] for k in first} == {"sw_seed1", "sw_seed2"}
    assert "95 % intervals over 2 seeds" in (out / "report.html").read_text()  # the sweep ends with its report

    assert main(["sweep", str(sweep_file), "--out", str(out)]) == 0  # nothing left to do
    assert "all 2 experiments are finished" in capsys.readouterr().err
    assert experiment_files(out) == first

    sweep_file.write_text(RERUN.format(seeds=[1, 2, 3], lr=0.1))  # a seed added to the grid
    assert main(["sweep", str(sweep_file), "--out", str(out)]) == 0
    assert "sweep sw: 3/3 done, 0 running, 0 pending, 0 failed | rounds 6/6" in capsys.readouterr().err
    now = experiment_files(out)
    assert {k: v for k, v in now.items() if not k.startswith("sw_seed3/")} == first  # finished ones kept as they were
    assert (out / "sw_seed3" / "summary.parquet").exists()
    assert sorted(json.loads((out / "_tune" / "sw" / "sweep.json").read_text())["experiments"]) == ["sw_seed1", "sw_seed2", "sw_seed3"]
    assert leaderboard.build(out)["seeds"].tolist() == [3]
    assert "95 % intervals over 3 seeds" in (out / "report.html").read_text()  # refreshed by the resumed sweep

    sweep_file.write_text(RERUN.format(seeds=[1, 2, 3], lr=0.05))  # one grid value changed
    everything = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["sweep", str(sweep_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the config of sw_seed1, sw_seed2, sw_seed3 changed" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == everything  # nothing written

    other = tmp_path / "other.yaml"  # another sweep file whose experiments have the same names
    other.write_text(RERUN.format(seeds=[1, 2], lr=0.1))
    assert main(["sweep", str(other), "--out", str(out)]) == 2
    assert "sw_seed1: holds results that this sweep did not make" in capsys.readouterr().err

    sweep_file.write_text(RERUN.format(seeds=[1, 2, 3], lr=0.1))
    copy = tmp_path / "copy"  # a folder made elsewhere: resumed only with --resume
    shutil.copytree(out, copy)
    assert main(["sweep", str(sweep_file), "--out", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "loads its saved state" in err
    marker = tmp_path / "unpickled"
    (copy / "sw_seed3" / "summary.parquet").unlink()  # sw_seed3 unfinished, with a checkpoint that is not plain data
    with open(copy / "_tune" / "sw" / "checkpoints" / "sw_seed3.pt", "wb") as f:
        torch.save({"next_round": 1, "x": Hostile(str(marker))}, f)
    assert main(["sweep", str(sweep_file), "--out", str(copy), "--resume", "--set", "tune.max_failures=0"]) == 1
    assert not marker.exists()  # refused, never unpickled
    assert "refused, it holds more than tensors and plain data" in (
        "".join(p.read_text() for p in (copy / "_tune" / "sw").rglob("error.txt")))


def test_the_progress_line_counts_trials_and_rounds_and_estimates_the_rest(monkeypatch):
    import io

    import harness.sweep as sweep

    now = [100.0]
    monkeypatch.setattr(sweep.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    progress = sweep._Progress("qs", {"a": 10, "b": 10, "c": 10}, {"done": 10}, stream=out, interval=5)
    progress.result("a", {"round": 3, "acc_clients_mean": 0.5, "resumed_from_round": 0})
    progress.result("b", {"round": 5, "acc_clients_mean": 0.7, "resumed_from_round": 2})
    now[0] += 60
    status = {"a": "RUNNING", "b": "RUNNING", "c": "PENDING"}
    assert progress.line(status) == ("sweep qs: 1/4 done, 2 running, 1 pending, 0 failed | rounds 20/40 | "
                                     "best acc 0.700 (b) | 1m00s elapsed, ~2m30s left")  # 8 rounds played in a minute
    progress.show(status)
    progress.show(status)  # within the interval: not printed again
    now[0] += 5
    progress.result("a", {"round": 9, "acc_clients_mean": 0.6, "resumed_from_round": 0})
    progress.show({"a": "TERMINATED", "b": "RUNNING", "c": "ERROR"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("sweep qs: 2/4 done, 1 running, 0 pending, 1 failed")
    # an interrupt stops b after 6 of its 10 rounds, and Tune calls it TERMINATED too
    assert progress.line({"a": "TERMINATED", "b": "TERMINATED", "c": "PENDING"}).startswith(
        "sweep qs: 2/4 done, 0 running, 1 stopped, 1 pending, 0 failed | rounds 26/40")
    progress.ended_failed.add("a")  # its trial finished, its run ended `failed`: a failure too
    assert progress.line({"a": "TERMINATED", "b": "RUNNING", "c": "ERROR"}).startswith(
        "sweep qs: 2/4 done, 1 running, 0 pending, 2 failed")


def test_the_progress_line_counts_experiments_that_ended_failed_in_an_earlier_run(tmp_path):
    from harness import storage
    from harness.sweep import SweepProgress

    for name, status in (("old_ok", "completed"), ("old_failed", "failed")):
        write_table(tmp_path / name / "summary.parquet", [dict(
            experiment=name, setting="s", dataset="d", model="m", method="a", method_label="a", seed=1, rounds=3,
            status=status, final_acc=0.5, best_acc=0.5, sim_total_s=1.0, flops_total=1.0, bytes_up_total=1,
            bytes_down_total=1, wall_total_s=1.0)], SUMMARY)
    callback = SweepProgress("qs", {"new": 3}, {"old_ok": 3, "old_failed": 3}, storage.resolve(tmp_path))
    assert callback.progress.line({"new": "PENDING"}).startswith("sweep qs: 2/3 done, 0 running, 1 pending, 1 failed")
