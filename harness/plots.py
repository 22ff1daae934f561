"""`fedbench plot`: accuracy against simulated time and against round (a line per method, a band
over seeds) and the running time of each method, one set of PNGs per setting."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from harness import storage
from harness.leaderboard import _load


def _band(curves: list[tuple[np.ndarray, np.ndarray]], points: int = 200):
    """Mean and min/max over seeds on a common x grid (up to where every seed has data)."""
    end = min(x[-1] for x, _ in curves)
    start = max(x[0] for x, _ in curves)
    grid = np.linspace(start, end, points) if end > start else np.array([start])
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def _save(fig, where: storage.Location) -> Path | str:
    """The figure as PNG at a local path or a URI, written whole."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    where.write_bytes(buf.getvalue())
    return Path(where.path) if where.local else str(where)


def plot(root: str | Path, out: str | Path | None = None) -> list[Path | str]:
    """Figures of the results under `root` (a folder or a URI), into `out` (default: root/plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = storage.resolve(out) if out else storage.resolve(root) / "plots"
    summary = _load(root, "summary")
    rounds = _load(root, "rounds")
    rounds = rounds[rounds["experiment"].isin(summary["experiment"])].sort_values(["experiment", "round"])
    written = []
    for setting, runs in rounds.groupby("setting"):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", setting)
        methods = sorted(runs["method_label"].unique())
        colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
        title = f"{setting}, model {runs['model'].iloc[0]}"
        for x_col, x_label, name in (("sim_total_s", "simulated time (s)", "acc_vs_time"),
                                     ("round", "round", "acc_vs_round")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for m in methods:
                curves = [(g[x_col].to_numpy(float), 100 * g["acc_clients_mean"].to_numpy(float))
                          for _, g in runs[runs["method_label"] == m].groupby("experiment")]
                grid, mean, low, high = _band(curves)
                ax.plot(grid, mean, color=colors[m], label=f"{m} ({len(curves)} seed{'s' * (len(curves) > 1)})")
                if len(curves) > 1:
                    ax.fill_between(grid, low, high, color=colors[m], alpha=0.2, linewidth=0)
            ax.set_xlabel(x_label)
            ax.set_ylabel("mean client test accuracy (%)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            written.append(_save(fig, out / f"{stem}_{name}.png"))
            plt.close(fig)
        totals = summary[summary["setting"] == setting].groupby("method_label")
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, col, label in ((axes[0], "sim_total_s", "simulated running time (s)"),
                               (axes[1], "wall_total_s", "wall-clock time of the run (s)")):
            mean, std = totals[col].mean().reindex(methods), totals[col].std(ddof=0).reindex(methods).fillna(0)
            ax.bar(range(len(methods)), mean, yerr=std, color=[colors[m] for m in methods], capsize=3)
            ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"running time, {title}", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / f"{stem}_running_time.png"))
        plt.close(fig)
    return written
