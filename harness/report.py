"""Tables for people: the summary printed after a run."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def summary_frame(summaries: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(summaries)
    return pd.DataFrame({
        "experiment": df["experiment"],
        "method": df["method_label"],
        "status": df["status"],
        "final acc %": (100 * pd.to_numeric(df["final_acc"])).round(2),
        "best acc %": (100 * pd.to_numeric(df["best_acc"])).round(2),
        "sim time s": df["sim_total_s"].round(1),
        "TFLOPs": (df["flops_total"] / 1e12).round(3),
        "MB up": (df["bytes_up_total"] / 1e6).round(1),
        "MB down": (df["bytes_down_total"] / 1e6).round(1),
        "wall s": df["wall_total_s"].round(1),
    })


def print_summary(summaries: list[dict], out: str | Path) -> None:
    print(summary_frame(summaries).to_string(index=False))
    print(f"\nresults: {out}/<experiment>/{{rounds,clients,summary}}.parquet")
