"""`fedbench plot`: accuracy against simulated time and against round (a line per method: the mean over
seeds, and a band: the 95 % t-interval of that mean) and the running time of each method, one set of
PNGs per setting. Where the runs recorded the global model on each client's test set
(`acc_global_clients_mean`), the accuracy figures get a second panel for it. Titles name the dataset,
split, clients and model (`setting_title` and the model), legends the methods (`method_title`), as a
paper's figure would; results without those columns fall back to the setting and method labels."""
from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np

from harness import storage
from harness.columns import VIEWS, accuracy_column
from harness.leaderboard import load_runs, mean_ci, t975

MODEL_NAMES = {"cnn": "CNN", "vgg11": "VGG-11", "vgg13": "VGG-13", "resnet18": "ResNet-18"}
PANELS = tuple((accuracy_column(view), title) for view, title in VIEWS.items())


def _band(curves: list[tuple[np.ndarray, np.ndarray]], points: int = 200):
    """Mean over seeds and its 95 % t-interval (None with one seed) on a common x grid, up to where
    every seed has data."""
    end = min(x[-1] for x, _ in curves)
    start = max(x[0] for x, _ in curves)
    grid = np.linspace(start, end, points) if end > start else np.array([start])
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    mean = ys.mean(0)
    if len(ys) < 2:
        return grid, mean, None, None
    half = t975(len(ys) - 1) * ys.std(0, ddof=1) / math.sqrt(len(ys))
    return grid, mean, mean - half, mean + half


def _titles(frame, column: str, fallback: str) -> dict[str, str]:
    """label -> title, from `column` where the results have it, else the label itself."""
    out = {k: k for k in frame[fallback].unique()}
    if column in frame:
        out.update({k: v for k, v in zip(frame[fallback], frame[column]) if isinstance(v, str) and v})
    return out


def figures(root, say: bool = True):
    """Yields (file name, matplotlib Figure) for every figure of the results under `root` (a folder or
    a URI); the caller closes each figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, rounds = load_runs(root, say)
    rounds = rounds[rounds["experiment"].isin(summary["experiment"])].sort_values(["experiment", "round"])
    method_titles = _titles(summary, "method_title", "method_label")
    degraded = summary[summary["status"] == "degraded"].groupby("method_label").size().to_dict()
    setting_titles = _titles(summary, "setting_title", "setting")
    for setting, runs in rounds.groupby("setting"):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", setting)
        methods = sorted(runs["method_label"].unique())
        colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
        model = runs["model"].iloc[0]
        title = f"{setting_titles.get(setting, setting)}, {MODEL_NAMES.get(model, model)}"
        seeds = {m: runs.loc[runs["method_label"] == m, "experiment"].nunique() for m in methods}
        same_seeds = len(set(seeds.values())) == 1
        n = next(iter(seeds.values()))
        note = (f"mean of {n} seeds; band: 95 % confidence interval of the mean" if same_seeds and n > 1
                else "one seed" if same_seeds else "mean over seeds; band: 95 % confidence interval of the mean")
        panels = [p for p in PANELS if p[0] in runs and runs[p[0]].notna().any()]
        for x_col, x_label, name in (("sim_total_s", "simulated time (s)", "acc_vs_time"),
                                     ("round", "round", "acc_vs_round")):
            fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), sharey=True, squeeze=False)
            for ax, (column, panel) in zip(axes[0], panels):
                for m in methods:
                    curves = [(g[x_col].to_numpy(float), 100 * g[column].to_numpy(float))
                              for _, g in runs[runs["method_label"] == m].groupby("experiment")
                              if g[column].notna().all()]
                    if not curves:
                        continue
                    grid, mean, low, high = _band(curves)
                    label = method_titles[m] if same_seeds else f"{method_titles[m]} ({len(curves)} seeds)"
                    if m in degraded:
                        label += f" ({degraded[m]} degraded)"
                    ax.plot(grid, mean, color=colors[m], label=label)
                    if low is not None:
                        # accuracies lie in [0, 100]: the interval of a mean over few seeds may reach past them
                        ax.fill_between(grid, np.clip(low, 0, 100), np.clip(high, 0, 100), color=colors[m], alpha=0.2,
                                        linewidth=0)
                ax.set_xlabel(x_label)
                ax.set_title(panel if len(panels) > 1 else note, fontsize=9)
                ax.grid(alpha=0.3)
            axes[0][0].set_ylabel("mean client test accuracy (%)")
            axes[0][0].legend(fontsize=8)
            fig.suptitle(title + (f"\n{note}" if len(panels) > 1 else ""), fontsize=10)
            fig.tight_layout()
            yield f"{stem}_{name}.png", fig
        totals = summary[summary["setting"] == setting]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        for ax, col, label in ((axes[0], "sim_total_s", "simulated running time (s)"),
                               (axes[1], "wall_total_s", "wall-clock time of the run (s)")):
            stats = [mean_ci(totals.loc[totals["method_label"] == m, col]) for m in methods]
            ax.bar(range(len(methods)), [s[0] for s in stats], yerr=np.nan_to_num([(s[3] - s[2]) / 2 for s in stats]),
                   color=[colors[m] for m in methods], capsize=3)
            ax.set_xticks(range(len(methods)), [method_titles[m] for m in methods], rotation=30, ha="right",
                          fontsize=8)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
        bars = "error bars: 95 % confidence interval of the mean" if max(seeds.values()) > 1 else "one seed"
        fig.suptitle(f"Running time, {title}\n{bars}", fontsize=10)
        fig.tight_layout()
        yield f"{stem}_running_time.png", fig


def plot(root, out=None, say: bool = True) -> list[Path | str]:
    """Every figure of the results under `root` as PNG into `out` (a folder or a URI; default
    root/plots), each written whole."""
    import matplotlib.pyplot as plt

    out = storage.resolve(out) if out else storage.resolve(root) / "plots"
    written = []
    for name, fig in figures(root, say):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        where = out / name
        where.write_bytes(buf.getvalue())
        written.append(Path(where.path) if where.local else str(where))
        plt.close(fig)
    return written
