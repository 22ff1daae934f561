"""`fedbench plot`: accuracy against simulated time and against round (a line per method: the mean over
seeds, and a band: the 95 % t-interval of that mean), the running time of each method, and last-10
accuracy against total simulated time with the Pareto front, one set of PNGs per setting. Where the runs recorded the global model on each client's test set
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
from harness.leaderboard import MODEL_TITLES, load_runs, mean_ci, t975

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


def stem(setting: str) -> str:
    """The setting as the start of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", setting)


def pareto_front(times, accuracies) -> np.ndarray:
    """Which points no other point dominates: none is at least as fast and at least as accurate and
    strictly better in one of the two (a point with a NaN is on no front)."""
    t, a = np.asarray(times, float), np.asarray(accuracies, float)
    ok = np.isfinite(t) & np.isfinite(a)
    return np.array([ok[i] and not np.any(ok & (t <= t[i]) & (a >= a[i]) & ((t < t[i]) | (a > a[i])))
                     for i in range(len(t))], dtype=bool)


def pareto_figure(board, colors: dict | None = None):
    """Last-10 accuracy (error bars: its 95 % interval over seeds) against total simulated time (log
    scale), one point per method variant of one setting's leaderboard rows `board`, the Pareto front
    filled and joined; a second panel for the FedLPS authors' test sets where recorded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from harness.leaderboard import TESTS, TESTS_TITLES, seeds_note

    panels = [(suffix, tests) for suffix, tests in TESTS if board[f"last10_acc_mean{suffix}"].notna().any()]
    colors = colors or {m: plt.cm.tab10(i % 10) for i, m in enumerate(sorted(board["method"]))}
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), sharey=True, squeeze=False)
    time = board["sim_total_s"].to_numpy(float)
    for ax, (suffix, tests) in zip(axes[0], panels):
        acc = 100 * board[f"last10_acc_mean{suffix}"].to_numpy(float)
        # accuracies lie in [0, 100]: the interval of a mean over few seeds may reach past them
        low = np.nan_to_num(acc - np.clip(100 * board[f"last10_acc_ci95_low{suffix}"].to_numpy(float), 0, 100))
        high = np.nan_to_num(np.clip(100 * board[f"last10_acc_ci95_high{suffix}"].to_numpy(float), 0, 100) - acc)
        front = pareto_front(time, acc)
        order = np.argsort(time[front])
        ax.step(time[front][order], acc[front][order], where="post", color="0.45", linestyle="--", linewidth=1,
                label="Pareto front", zorder=1)
        for i, (method, title) in enumerate(zip(board["method"], board["method_title"])):
            color = colors[method]
            ax.errorbar(time[i], acc[i], yerr=[[low[i]], [high[i]]], color=color, capsize=3, linewidth=1, zorder=2)
            ax.plot(time[i], acc[i], "o", markersize=7, zorder=3, color=color,
                    markerfacecolor=color if front[i] else "white")
            ax.annotate(title, (time[i], acc[i]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("total simulated time (s), log scale")
        ax.set_title(f"test sets: {TESTS_TITLES[tests]}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_ylabel("last-10 accuracy (%)")
    model = board["model"].iloc[0]
    fig.suptitle(f"Accuracy against running time, {board['setting_title'].iloc[0]}, {MODEL_TITLES.get(model, model)}"
                 f"\nerror bars: 95 % confidence interval over {seeds_note(board['seeds'])}; filled: on the Pareto "
                 f"front (no other method is both faster and more accurate)", fontsize=10)
    fig.tight_layout()
    return fig


def figures(root, say: bool = True):
    """Yields (file name, matplotlib Figure) for every figure of the results under `root` (a folder or
    a URI); the caller closes each figure."""
    for _, name, fig in figures_by_setting(root, say):
        yield name, fig


def figures_by_setting(root, say: bool = True):
    """Yields (setting, file name, matplotlib Figure): per setting, accuracy against simulated time
    and against round, running time, and accuracy against running time with its Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness.leaderboard import build

    boards = build(root, say=False)
    summary, rounds = load_runs(root, say)
    rounds = rounds[rounds["experiment"].isin(summary["experiment"])].sort_values(["experiment", "round"])
    method_titles = _titles(summary, "method_title", "method_label")
    degraded = summary[summary["status"] == "degraded"].groupby("method_label").size().to_dict()
    setting_titles = _titles(summary, "setting_title", "setting")
    for setting, runs in rounds.groupby("setting"):
        name = stem(setting)
        methods = sorted(runs["method_label"].unique())
        colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
        model = runs["model"].iloc[0]
        title = f"{setting_titles.get(setting, setting)}, {MODEL_TITLES.get(model, model)}"
        seeds = {m: runs.loc[runs["method_label"] == m, "experiment"].nunique() for m in methods}
        same_seeds = len(set(seeds.values())) == 1
        n = next(iter(seeds.values()))
        note = (f"mean of {n} seeds; band: 95 % confidence interval of the mean" if same_seeds and n > 1
                else "one seed" if same_seeds else "mean over seeds; band: 95 % confidence interval of the mean")
        panels = [p for p in PANELS if p[0] in runs and runs[p[0]].notna().any()]
        for x_col, x_label, kind in (("sim_total_s", "simulated time (s)", "acc_vs_time"),
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
            yield setting, f"{name}_{kind}.png", fig
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
        yield setting, f"{name}_running_time.png", fig
        yield setting, f"{name}_pareto.png", pareto_figure(boards[boards["setting"] == setting], colors)


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
