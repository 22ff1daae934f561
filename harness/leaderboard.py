"""The leaderboard: one row per (setting, method) over seeds, best first, from the Parquet results."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import UserError
from harness.results import load


def _load(root: Path, table: str) -> pd.DataFrame:
    try:
        return load(root, table)
    except FileNotFoundError:
        raise UserError(str(root), f"no finished experiment here (no {table}.parquet below it)") from None


def time_to_target(rounds: pd.DataFrame, target: float) -> float:
    """Simulated seconds until the first evaluated round at or above `target` (NaN if never)."""
    hit = rounds[rounds["acc_clients_mean"] >= target]
    return float(hit["sim_total_s"].iloc[0]) if len(hit) else float("nan")


def build(root: str | Path, target_acc: float | None = None) -> pd.DataFrame:
    """`target_acc` defaults, per setting, to the lowest best accuracy of any of its runs: the
    highest accuracy that every run reaches, so time-to-accuracy compares them all. `root` is a
    local folder or a URI."""
    summary = _load(root, "summary")
    summary = summary[summary["status"] == "completed"]
    rounds = _load(root, "rounds")
    rounds = rounds[rounds["experiment"].isin(summary["experiment"])].sort_values(["experiment", "round"])
    rows = []
    for setting, group in summary.groupby("setting", sort=True):
        by_method = group.groupby("method_label")
        target = target_acc if target_acc is not None else float(group["best_acc"].min())
        for label, runs in by_method:
            ttt = [time_to_target(rounds[rounds["experiment"] == e], target) for e in runs["experiment"]]
            reached = [t for t in ttt if not np.isnan(t)]
            rows.append({
                "setting": setting, "dataset": runs["dataset"].iloc[0], "model": runs["model"].iloc[0],
                "method": label, "seeds": len(runs),
                "final_acc_mean": runs["final_acc"].mean(), "final_acc_std": runs["final_acc"].std(ddof=0),
                "best_acc_mean": runs["best_acc"].mean(), "best_acc_std": runs["best_acc"].std(ddof=0),
                "target_acc": target, "seeds_reaching_target": len(reached),
                "time_to_target_s": float(np.mean(reached)) if len(reached) == len(ttt) else float("nan"),
                "sim_total_s": runs["sim_total_s"].mean(), "tflops_total": runs["flops_total"].mean() / 1e12,
                "mb_up": runs["bytes_up_total"].mean() / 1e6, "mb_down": runs["bytes_down_total"].mean() / 1e6,
                "wall_s": runs["wall_total_s"].mean(),
            })
    board = pd.DataFrame(rows).sort_values(["setting", "final_acc_mean"], ascending=[True, False])
    board.insert(1, "rank", board.groupby("setting").cumcount() + 1)
    return board.reset_index(drop=True)


def format_table(board: pd.DataFrame) -> str:
    shown = pd.DataFrame({
        "setting": board["setting"], "#": board["rank"], "method": board["method"], "seeds": board["seeds"],
        "final acc %": [f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in zip(board.final_acc_mean, board.final_acc_std)],
        "best acc %": [f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in zip(board.best_acc_mean, board.best_acc_std)],
        "time to target s": [f"{t:.2f}" if not np.isnan(t) else f"not reached ({n}/{k})"
                             for t, n, k in zip(board.time_to_target_s, board.seeds_reaching_target, board.seeds)],
        "target %": (100 * board["target_acc"]).round(2),
        "sim time s": board["sim_total_s"].round(2),
        "TFLOPs": board["tflops_total"].round(3),
        "MB up": board["mb_up"].round(1), "MB down": board["mb_down"].round(1),
        "wall s": board["wall_s"].round(1),
    })
    return shown.to_string(index=False)


def write(board: pd.DataFrame, path: str | Path) -> Path | str:
    """The board as CSV at a local path or a URI, written whole; returns where."""
    from harness import storage

    where = storage.resolve(path)
    where.write_bytes(board.to_csv(index=False, float_format="%.6g").encode())
    return Path(where.path) if where.local else str(where)
