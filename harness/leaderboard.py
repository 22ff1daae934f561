"""The leaderboard: one row per (setting, method) over seeds, best first, from the Parquet results;
paired differences against a baseline method and the claims table (results/README.md, "Leaderboard
columns", names and defines every column).

Statistics over seeds: every std is the sample std (ddof=1); a 95 % confidence interval is Student's t
interval of the mean, mean +- t(0.975, n-1) * std / sqrt(n), NaN with fewer than 2 values. Paired
differences are taken seed by seed over the seeds both methods have (the same seed gives every method
the same partition, tier draws and client sampling), then summarised the same way. A verdict is
`better` when the interval lies above 0, `worse` when below, `inconclusive` when it holds 0 (with a
few seeds such an interval says nothing about equality), and `n/a` when there is no interval (fewer
than 2 paired seeds). The claims table adds each comparison's paired t-test p-value (two-sided; below
0.05 exactly when the interval excludes 0) and Holm's adjustment of it over all the comparisons of
the table, with the verdict that survives that adjustment.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.columns import TEST_SET_SUFFIX, TEST_SETS, accuracy_column
from harness.columns import VIEWS as VIEW_NAMES
from harness.errors import UserError

log = logging.getLogger(__name__)

MODEL_TITLES = {"cnn": "CNN", "vgg11": "VGG-11", "vgg13": "VGG-13", "resnet18": "ResNet-18"}
LAST = 10  # the headline accuracy: the mean of a run's last 10 evaluated rounds
TIME_CLAIM_PCT = 68.8  # the FedLPS paper: "reduces running time by more than 68.80 %"

# Evaluation views: (name tag, rounds column). The tag goes after the statistic's stem
# (last10_acc_global_mean, delta_global_mean, verdict_global).
VIEWS = (("", accuracy_column("clients")), ("_global", accuracy_column("global_clients")))
# Test-set constructions: (suffix of the rounds column and of every statistic, name in the claims table).
TESTS = tuple((TEST_SET_SUFFIX[kind], kind) for kind in TEST_SETS)
# Like for like first: the FedLPS paper's numbers come from the authors' test-set construction, so the
# claims, the README's tables and the report show it before the mirrored sets.
PAPER_TESTS_FIRST = tuple(sorted(TESTS, key=lambda t: t[1] != "authors"))


SUMMARY_NEEDS = {"experiment", "setting", "method_label", "seed", "status", "final_acc", "best_acc", "sim_total_s"}
ROUNDS_NEEDS = {"experiment", "round", "acc_clients_mean", "sim_total_s"}
USABLE = ("completed", "degraded")  # `failed` runs are left out; `degraded` ones are counted and flagged


def load_runs(root: str | Path, say: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every usable experiment under `root`: (its summaries, its rounds). A run that failed, or an
    experiment folder whose files cannot be read or are not fedbench's, is left out and named (one
    line each through the log when `say`); degraded runs are kept and named. Raises UserError when
    nothing is left, saying why."""
    from harness import storage

    location = storage.resolve(root)
    summaries, rounds, left_out, failed, degraded = [], [], [], [], []
    for file in location.find("summary.parquet"):
        folder = file.parent
        name = folder.path[len(location.path):].strip("/") or folder.name
        try:
            summary = _read(file, SUMMARY_NEEDS)
            if not summary["status"].isin(USABLE).all():
                why = summary["status_note"].iloc[0] if "status_note" in summary else None
                failed.append(f"{name}" + (f" ({why})" if isinstance(why, str) and why else ""))
                continue
            runs = _read(folder / "rounds.parquet", ROUNDS_NEEDS)
        except ValueError as e:
            left_out.append(f"{name} ({e})")
            continue
        if (summary["status"] == "degraded").any():
            degraded.append(name)
        summaries.append(summary)
        rounds.append(runs)
    notes = []
    if failed:
        notes.append(f"left out {len(failed)} failed run{'s' if len(failed) > 1 else ''}: {'; '.join(failed)}")
    if left_out:
        notes.append(f"left out {len(left_out)} damaged or foreign experiment folder{'s' if len(left_out) > 1 else ''}: "
                     f"{'; '.join(left_out)}")
    if degraded:
        notes.append(f"{len(degraded)} degraded run{'s' if len(degraded) > 1 else ''} (some clients failed; "
                     f"column degraded_runs): {', '.join(degraded)}")
    if not summaries:
        why = "; ".join(notes) if notes else "no summary.parquet below it"
        raise UserError(str(root), f"no completed experiment here: {why}")
    if say:
        for note in notes:
            log.warning("%s", note)
    summary = pd.concat(summaries, ignore_index=True)
    if "status_note" not in summary:
        summary["status_note"] = None
    return summary, pd.concat(rounds, ignore_index=True)


def _read(file, needs: set[str]) -> pd.DataFrame:
    """One Parquet file of fedbench's, or ValueError naming the file and what is wrong with it."""
    from harness import storage

    try:
        frame = storage.read_parquet(file)
    except FileNotFoundError:
        raise ValueError(f"no {file.name}") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{file.name} is damaged: {first}") from None
    missing = needs - set(frame.columns)
    if missing:
        raise ValueError(f"{file.name} is not fedbench's (lacks {', '.join(sorted(missing))})")
    if not len(frame):
        raise ValueError(f"{file.name} is empty")
    return frame


# -- statistics ----------------------------------------------------------------------------------

def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (t975(2) = 4.302653)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_ci(values) -> tuple[float, float, float, float, int]:
    """(mean, std ddof=1, ci95 low, ci95 high, n) over the finite values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan, n
    std = float(x.std(ddof=1))
    half = t975(n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half, n


def paired_p(differences) -> float:
    """Two-sided p-value of the paired t-test that the mean of the finite `differences` is 0 (NaN
    with fewer than 2; below 0.05 exactly when the 95 % interval of mean_ci excludes 0)."""
    x = np.asarray(differences, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return math.nan
    mean, std = float(x.mean()), float(x.std(ddof=1))
    if std == 0:
        return 0.0 if mean != 0 else 1.0
    from scipy.stats import t

    return float(2 * t.sf(abs(mean) / (std / math.sqrt(len(x))), len(x) - 1))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment: the i-th smallest of m p-values becomes the running maximum of
    min(1, (m - j + 1) p_(j)) over j <= i. NaN stays NaN and is not counted in m."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    running = 0.0
    for i, j in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (len(finite) - i) * p[j]))
        adjusted[j] = running
    return adjusted


def verdict(low: float, high: float, lower_is_better: bool = False) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return "n/a"
    if low > 0:
        return "worse" if lower_is_better else "better"
    if high < 0:
        return "better" if lower_is_better else "worse"
    return "inconclusive"


def paired(method: pd.Series, baseline: pd.Series) -> pd.DataFrame:
    """Per seed (the index), the method's and the baseline's values, over the seeds both have (a
    seed that appears twice is averaged first)."""
    both = pd.concat([method.groupby(level=0).mean(), baseline.groupby(level=0).mean()], axis=1, join="inner")
    both.columns = ["m", "b"]
    return both.dropna()


# -- per run -------------------------------------------------------------------------------------

def view_columns() -> list[tuple[str, str, str]]:
    """(tag, tests suffix, rounds column) of the four views, the headline one first."""
    return [(tag, suffix, column + suffix) for suffix, _ in TESTS for tag, column in VIEWS]


def p10_column(mean_column: str) -> str:
    """The rounds column of the 10th percentile over clients beside a mean column of the same view
    and test sets (acc_clients_mean_authors_tests -> acc_clients_p10_authors_tests)."""
    for view in VIEW_NAMES:
        for kind in TEST_SETS:
            if mean_column == accuracy_column(view, "mean", kind):
                return accuracy_column(view, "p10", kind)
    raise KeyError(mean_column)


def _runs(root: str | Path, say: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The usable runs (one row each, with `last10<tag><suffix>` per view) and their rounds."""
    summary, rounds = load_runs(root, say)
    rounds = rounds[rounds["experiment"].isin(summary["experiment"])].sort_values(["experiment", "round"])
    tail = rounds.groupby("experiment").tail(LAST).groupby("experiment")
    for tag, suffix, column in view_columns():
        # the mean over clients, and their 10th percentile (the worst-off clients), each averaged
        # over the run's last rounds
        for name, source in ((f"last10{tag}{suffix}", column), (f"last10_p10{tag}{suffix}", p10_column(column))):
            if source in rounds:
                means = tail[source].agg(lambda s: s.mean(skipna=False))
                summary[name] = summary["experiment"].map(means).astype(float)
            else:
                summary[name] = math.nan
    for col, fallback in (("method_title", "method_label"), ("setting_title", "setting")):
        summary[col] = summary[col].fillna(summary[fallback]) if col in summary else summary[fallback]
    return summary, rounds


def time_to_target(rounds: pd.DataFrame, target: float) -> float:
    """Simulated seconds until the first evaluated round at or above `target` (NaN if never)."""
    hit = rounds[rounds["acc_clients_mean"] >= target]
    return float(hit["sim_total_s"].iloc[0]) if len(hit) else float("nan")


def resolve(runs: pd.DataFrame, label: str, flag: str, single: bool) -> list[str]:
    """The method labels that `label` names: a method_label, a method_title or a method name (exact,
    else ignoring case). With `single`, it must name exactly one."""
    table = runs[["method_label", "method_title", "method"]].drop_duplicates()
    for fold in (str, str.casefold):
        for col in ("method_label", "method_title", "method"):
            hit = sorted(table.loc[table[col].map(fold) == fold(label), "method_label"].unique())
            if hit and (len(hit) == 1 or not single):
                return hit
            if hit:
                raise UserError(flag, f"{label!r} names {len(hit)} methods ({', '.join(hit)}); give one of them")
    available = ", ".join(f"{r.method_label} ({r.method_title})" if r.method_title != r.method_label else r.method_label
                          for r in table.drop_duplicates("method_label").sort_values("method_label").itertuples())
    raise UserError(flag, f"unknown method {label!r}; available: {available}")


# -- the leaderboard -----------------------------------------------------------------------------

def _summary_stats(runs: pd.DataFrame) -> dict:
    row = {}
    for tag, suffix, _ in view_columns():
        for stem, run_column in (("last10_acc", f"last10{tag}{suffix}"), ("last10_p10", f"last10_p10{tag}{suffix}")):
            mean, std, low, high, _ = mean_ci(runs[run_column])
            row.update({f"{stem}{tag}_mean{suffix}": mean, f"{stem}{tag}_std{suffix}": std,
                        f"{stem}{tag}_ci95_low{suffix}": low, f"{stem}{tag}_ci95_high{suffix}": high})
    for col in ("final_acc", "best_acc"):
        mean, std, *_ = mean_ci(runs[col])
        row.update({f"{col}_mean": mean, f"{col}_std": std})
    return row


def _delta_stats(runs: pd.DataFrame, base: pd.DataFrame) -> dict:
    """Paired differences of `runs` against the baseline's runs `base` of the same setting."""
    mine, theirs = runs.set_index("seed"), base.set_index("seed")
    row = {"paired_seeds": len(set(mine.index) & set(theirs.index))}
    for tag, suffix, _ in view_columns():
        col = f"last10{tag}{suffix}"
        pair = paired(mine[col], theirs[col])
        mean, _, low, high, _ = mean_ci(pair["m"] - pair["b"])
        rel, _, rel_low, rel_high, _ = mean_ci(100 * (pair["m"] / pair["b"] - 1))
        row.update({f"delta{tag}_mean{suffix}": mean, f"delta{tag}_ci95_low{suffix}": low,
                    f"delta{tag}_ci95_high{suffix}": high, f"verdict{tag}{suffix}": verdict(low, high),
                    f"delta_rel_pct{tag}_mean{suffix}": rel, f"delta_rel_pct{tag}_ci95_low{suffix}": rel_low,
                    f"delta_rel_pct{tag}_ci95_high{suffix}": rel_high})
    pair = paired(mine["sim_total_s"], theirs["sim_total_s"])
    mean, _, low, high, _ = mean_ci(100 * (pair["m"] / pair["b"] - 1))
    row.update({"time_delta_pct_mean": mean, "time_delta_pct_ci95_low": low, "time_delta_pct_ci95_high": high,
                "time_verdict": verdict(low, high, lower_is_better=True)})
    return row


def build(root: str | Path, target_acc: float | None = None, baseline: str | None = None,
          say: bool = True) -> pd.DataFrame:
    """`target_acc` defaults, per setting, to the lowest best accuracy of any of its runs: the
    highest accuracy that every run reaches, so time-to-accuracy compares them all. With `baseline`
    (a method label, title or name), every row also gets its paired differences against it. `root` is
    a local folder or a URI; `say`: name the runs left out (load_runs)."""
    summary, rounds = _runs(root, say)
    base_label = resolve(summary, baseline, "--baseline", single=True)[0] if baseline is not None else None
    rows = []
    for setting, group in summary.groupby("setting", sort=True):
        target = target_acc if target_acc is not None else float(group["best_acc"].min())
        base = group[group["method_label"] == base_label]  # empty where the setting lacks it: NaN, n/a
        for label, runs in group.groupby("method_label"):
            ttt = [time_to_target(rounds[rounds["experiment"] == e], target) for e in runs["experiment"]]
            reached = [t for t in ttt if not np.isnan(t)]
            row = {
                "setting": setting, "setting_title": runs["setting_title"].iloc[0], "method": label,
                "method_title": runs["method_title"].iloc[0], "dataset": runs["dataset"].iloc[0],
                "model": runs["model"].iloc[0], "seeds": len(runs), **_summary_stats(runs),
                "degraded_runs": int((runs["status"] == "degraded").sum()),
                "target_acc": target, "seeds_reaching_target": len(reached),
                "time_to_target_s": float(np.mean(reached)) if len(reached) == len(ttt) else float("nan"),
                "sim_total_s": runs["sim_total_s"].mean(), "tflops_total": runs["flops_total"].mean() / 1e12,
                "mb_up": runs["bytes_up_total"].mean() / 1e6, "mb_down": runs["bytes_down_total"].mean() / 1e6,
                "wall_s": runs["wall_total_s"].mean(),
            }
            if base_label is not None:
                row["baseline"] = base_label
                row.update(_delta_stats(runs, base))
                if label == base_label:
                    row.update({k: "baseline" for k in row if "verdict" in k})
            rows.append(row)
    board = pd.DataFrame(rows).sort_values(["setting", "last10_acc_mean", "final_acc_mean"],
                                           ascending=[True, False, False], na_position="last")
    board.insert(1, "rank", board.groupby("setting").cumcount() + 1)
    return board.reset_index(drop=True)


def _pm(mean: float, low: float, high: float, scale: float = 100.0) -> str:
    if not np.isfinite(mean):
        return "-"
    if not np.isfinite(low):
        return f"{scale * mean:.2f}"
    return f"{scale * mean:.2f} ± {scale * (high - low) / 2:.2f}"


def _ci(mean: float, low: float, high: float, scale: float = 100.0) -> str:
    def signed(v):
        v = scale * v
        if abs(v) >= 1e-6 and round(v, 2) == 0:  # next to 0 the sign shows (a verdict may hinge on it);
            # below 1e-6 it is rounding noise
            return f"{v:+.{1 - math.floor(math.log10(abs(v)))}f}"
        return f"{round(v, 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"

    if not np.isfinite(mean):
        return "-"
    if not np.isfinite(low):
        return signed(mean)
    return f"{signed(mean)} [{signed(low)}, {signed(high)}]"


def format_table(board: pd.DataFrame) -> str:
    """The headline columns, one block per setting: last-10 accuracy with its 95 % half-width, the
    paired difference and verdict against the baseline (if any), the simulated time and its change."""
    blocks = []
    for setting, b in board.groupby("setting", sort=False):
        has_global = b["last10_acc_global_mean"].notna().any()
        shown = {"#": b["rank"], "method": b["method_title"], "seeds": b["seeds"],
                 "last-10 acc % (± 95% CI)": [_pm(*v) for v in zip(b.last10_acc_mean, b.last10_acc_ci95_low,
                                                                   b.last10_acc_ci95_high)]}
        shown["p10 last-10 %"] = [_pm(*v) for v in zip(b.last10_p10_mean, b.last10_p10_ci95_low,
                                                      b.last10_p10_ci95_high)]
        if has_global:
            shown["global last-10 %"] = [_pm(*v) for v in zip(b.last10_acc_global_mean, b.last10_acc_global_ci95_low,
                                                            b.last10_acc_global_ci95_high)]
        if "baseline" in b:
            shown["Δ pts [95% CI]"] = [_ci(*v) for v in zip(b.delta_mean, b.delta_ci95_low, b.delta_ci95_high)]
            shown["verdict"] = b["verdict"]
            if has_global:
                shown["Δ global pts"] = [_ci(*v) for v in zip(b.delta_global_mean, b.delta_global_ci95_low,
                                                              b.delta_global_ci95_high)]
                shown["verdict global"] = b["verdict_global"]
        shown["sim time s"] = b["sim_total_s"].round(2)
        if "baseline" in b:
            shown["time Δ % [95% CI]"] = [_ci(*v, scale=1.0) for v in zip(
                b.time_delta_pct_mean, b.time_delta_pct_ci95_low, b.time_delta_pct_ci95_high)]
            shown["time verdict"] = b["time_verdict"]
        shown["time to target s"] = [f"{t:.2f}" if not np.isnan(t) else f"not reached ({n}/{k})"
                                     for t, n, k in zip(b.time_to_target_s, b.seeds_reaching_target, b.seeds)]
        shown.update({"TFLOPs": b["tflops_total"].round(3), "MB up": b["mb_up"].round(1),
                      "wall s": b["wall_s"].round(1)})
        title = b["setting_title"].iloc[0]
        head = f"{title} [{setting}]" if title != setting else setting
        head += (f"; 95 % intervals: Student t over {seeds_note(b['seeds'])}; target accuracy "
                 f"{100 * b['target_acc'].iloc[0]:.2f} %")
        if "baseline" in b:
            head += f"; baseline {b['baseline'].iloc[0]}"
        blocks.append(head + "\n" + pd.DataFrame(shown).to_string(index=False))
    return "\n\n".join(blocks)


# -- the claims table ----------------------------------------------------------------------------

def claims(root: str | Path, label: str | list[str]) -> pd.DataFrame:
    """The paper's claims checked for the methods `label` names (one name or several) against every
    other method: one row per (setting, method, other method, evaluation view, test sets) with the
    paired accuracy gain in points and in percent, its verdict, its p-value and Holm-adjusted p-value
    over all rows, the running-time reduction in percent and whether "more than 68.80 % less running
    time" holds."""
    summary, _ = _runs(root, say=False)
    labels = [label] if isinstance(label, str) else list(label)
    mine = sorted({m for one in labels for m in resolve(summary, one, "--claims", single=False)})
    rows = []
    for setting, group in summary.groupby("setting", sort=True):
        by = {m: g.set_index("seed") for m, g in group.groupby("method_label")}
        for m in [x for x in mine if x in by]:
            for other in sorted(set(by) - set(mine)):
                time = paired(by[m]["sim_total_s"], by[other]["sim_total_s"])
                t_mean, _, t_low, t_high, _ = mean_ci(100 * (1 - time["m"] / time["b"]))
                time_claim = ("n/a" if not np.isfinite(t_low) else "holds" if t_low > TIME_CLAIM_PCT
                              else "fails" if t_high < TIME_CLAIM_PCT else "uncertain")
                for suffix, tests in PAPER_TESTS_FIRST:
                    for tag, _ in VIEWS:
                        col = f"last10{tag}{suffix}"
                        pair = paired(by[m][col], by[other][col])
                        if not len(pair):
                            continue  # the view was not recorded
                        gain = 100 * (pair["m"] - pair["b"])
                        g_mean, _, g_low, g_high, n = mean_ci(gain)
                        r_mean, _, r_low, r_high, _ = mean_ci(100 * (pair["m"] / pair["b"] - 1))
                        rows.append({
                            "setting": setting, "setting_title": group["setting_title"].iloc[0],
                            "method": by[m]["method_title"].iloc[0], "other": by[other]["method_title"].iloc[0],
                            "view": "global" if tag else "clients", "test_sets": tests, "seeds": n,
                            "gain_pts_mean": g_mean, "gain_pts_ci95_low": g_low, "gain_pts_ci95_high": g_high,
                            "gain_rel_pct_mean": r_mean, "gain_rel_pct_ci95_low": r_low,
                            "gain_rel_pct_ci95_high": r_high, "accuracy_verdict": verdict(g_low, g_high),
                            "gain_p_value": paired_p(gain),
                            "time_reduction_pct_mean": t_mean, "time_reduction_pct_ci95_low": t_low,
                            "time_reduction_pct_ci95_high": t_high, "time_claim": time_claim,
                        })
    if not rows:
        raise UserError("--claims", f"{label!r} has no other method to be compared with in {root}")
    table = pd.DataFrame(rows)
    at = table.columns.get_loc("gain_p_value") + 1
    table.insert(at, "gain_p_holm", holm(table["gain_p_value"]))
    table.insert(at + 1, "accuracy_verdict_holm", [
        "n/a" if not np.isfinite(p) else "inconclusive" if p >= 0.05 else "better" if g > 0 else "worse"
        for p, g in zip(table["gain_p_holm"], table["gain_pts_mean"])])
    return table


def comparisons(table: pd.DataFrame) -> int:
    """How many comparisons Holm's adjustment of the claims table counts."""
    return int(table["gain_p_value"].notna().sum())


def _p(p: float) -> str:
    return "-" if not np.isfinite(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def format_claims(table: pd.DataFrame) -> str:
    blocks = []
    for _, t in table.groupby("setting", sort=False):
        shown = pd.DataFrame({
            "method": t["method"], "vs": t["other"], "view": t["view"], "test sets": t["test_sets"],
            "seeds": t["seeds"],
            "gain pts [95% CI]": [_ci(*v, scale=1.0) for v in zip(t.gain_pts_mean, t.gain_pts_ci95_low,
                                                                  t.gain_pts_ci95_high)],
            "gain % [95% CI]": [_ci(*v, scale=1.0) for v in zip(t.gain_rel_pct_mean, t.gain_rel_pct_ci95_low,
                                                                t.gain_rel_pct_ci95_high)],
            "accuracy": t["accuracy_verdict"], "p": t["gain_p_value"].map(_p),
            "p Holm": t["gain_p_holm"].map(_p), "after Holm": t["accuracy_verdict_holm"],
            "time reduction % [95% CI]": [_ci(*v, scale=1.0) for v in zip(
                t.time_reduction_pct_mean, t.time_reduction_pct_ci95_low, t.time_reduction_pct_ci95_high)],
            f"> {TIME_CLAIM_PCT:g} % less time": t["time_claim"],
        })
        blocks.append(f"claims: {t['setting_title'].iloc[0]}\n" + shown.to_string(index=False))
    blocks.append(f"p: two-sided paired t-test over seeds; Holm: adjusted over the {comparisons(table)} comparisons "
                  f"of this table")
    return "\n\n".join(blocks)


# -- Markdown: the README's tables ---------------------------------------------------------------

VIEW_TITLES = {"": "client models", "_global": "global model"}
TESTS_TITLES = {"mirrored": "mirrored", "authors": "authors' tests"}


def seeds_note(seeds) -> str:
    """'3 seeds' or '2 to 3 seeds': what the intervals of a table rest on."""
    low, high = int(min(seeds)), int(max(seeds))
    return f"{high} seed{'s' if high != 1 else ''}" if low == high else f"{low} to {high} seeds"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(_cell, r)) + " |" for r in rows])


def _interval(mean: float, low: float, high: float) -> str:
    if not np.isfinite(mean):
        return "-"
    if not np.isfinite(low):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} [{100 * low:.2f}, {100 * high:.2f}]"


def view_title(tag: str, tests: str) -> str:
    """"authors' tests, client models": a view's name in the tables."""
    return f"{TESTS_TITLES[tests]}, {VIEW_TITLES[tag]}"


def shown_views(board: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(tag, suffix, title) of the evaluation views the board records, the paper's protocol first: the
    first is the one its tables sort by and compare with the baseline."""
    return [(tag, suffix, view_title(tag, tests)) for suffix, tests in PAPER_TESTS_FIRST for tag, _ in VIEWS
            if f"last10_acc{tag}_mean{suffix}" in board and board[f"last10_acc{tag}_mean{suffix}"].notna().any()]


def delta_in_view(row, tag: str, suffix: str) -> tuple[float, float, float, str]:
    """A board row's paired difference against the baseline in one view: mean, 95 % interval, verdict."""
    return (*(row[f"delta{tag}_{stat}{suffix}"] for stat in ("mean", "ci95_low", "ci95_high")),
            row[f"verdict{tag}{suffix}"])


def markdown(board: pd.DataFrame, table: pd.DataFrame | None = None) -> str:
    """The leaderboard (and the claims table) as the README's Markdown tables: per setting, every
    method's last-10 accuracy [95 % CI] in each recorded view, the paper's protocol first and sorted by
    it, then, with a baseline, its paired difference in that view; per claimed method, its gain over
    each other method in every view."""
    blocks = []
    for setting, b in board.groupby("setting", sort=False):
        views = shown_views(b)
        first_tag, first_suffix, first_name = views[0]
        b = b.sort_values(f"last10_acc{first_tag}_mean{first_suffix}", ascending=False, kind="stable")
        header = ["method", "seeds"] + [f"last-10 acc %, {name}" if i == 0 else name for i, (_, _, name) in enumerate(views)]
        has_base = "baseline" in b and b["baseline"].notna().any()
        if has_base:
            header += [f"Δ pts, {first_name} [95% CI]", "time Δ % [95% CI]"]
        header += ["simulated time s", "TFLOPs", "MB up"]
        rows = []
        for r in b.itertuples(index=False):
            r = r._asdict()
            row = [r["method_title"], r["seeds"]] + [
                _interval(r[f"last10_acc{tag}_mean{suffix}"], r[f"last10_acc{tag}_ci95_low{suffix}"],
                          r[f"last10_acc{tag}_ci95_high{suffix}"]) for tag, suffix, _ in views]
            if has_base:
                *delta, delta_verdict = delta_in_view(r, first_tag, first_suffix)
                row += ["baseline" if r["verdict"] == "baseline" else f"{_ci(*delta)} {delta_verdict}",
                        "baseline" if r["verdict"] == "baseline" else
                        f"{_ci(r['time_delta_pct_mean'], r['time_delta_pct_ci95_low'], r['time_delta_pct_ci95_high'], 1.0)}"
                        f" {r['time_verdict']}"]
            row += [f"{r['sim_total_s']:.2f}", f"{r['tflops_total']:.3f}", f"{r['mb_up']:.1f}"]
            rows.append(row)
        model = b["model"].iloc[0]
        caption = (f"**{b['setting_title'].iloc[0]}**, {MODEL_TITLES.get(model, model)}: last-10 accuracy % "
                   f"[95 % CI, Student t over {seeds_note(b['seeds'])}]; simulated time, TFLOPs and MB up: "
                   f"means over seeds")
        if has_base:
            base = b.loc[b["verdict"] == "baseline", "method_title"]
            caption += f"; Δ: paired seed by seed against {base.iloc[0] if len(base) else b['baseline'].iloc[0]}"
        blocks.append(caption + "\n\n" + _md(header, rows))
    if table is not None:
        for (setting, method), t in table.groupby(["setting", "method"], sort=False):
            cols = [(view, tests) for _, tests in PAPER_TESTS_FIRST for view in ("clients", "global")
                    if ((t["view"] == view) & (t["test_sets"] == tests)).any()]
            header = (["vs"] + [view_title("" if v == "clients" else "_global", s) for v, s in cols]
                      + ["time reduction %"])
            rows = []
            for other, o in t.groupby("other", sort=False):
                cells = {(r.view, r.test_sets): r for r in o.itertuples(index=False)}
                row = [other]
                for key in cols:
                    r = cells.get(key)
                    if r is None:
                        row.append("-")
                        continue
                    p = f" (p {_p(r.gain_p_value)}, Holm {_p(r.gain_p_holm)})" if hasattr(r, "gain_p_holm") else ""
                    row.append(f"{_ci(r.gain_pts_mean, r.gain_pts_ci95_low, r.gain_pts_ci95_high, 1.0)} "
                               f"{r.accuracy_verdict}{p}; {r.gain_rel_pct_mean:+.1f} %")
                first = o.iloc[0]
                row.append(f"{first.time_reduction_pct_mean:.1f} [{first.time_reduction_pct_ci95_low:.1f}, "
                           f"{first.time_reduction_pct_ci95_high:.1f}] {first.time_claim}")
                rows.append(row)
            blocks.append(f"**{method}** against each other method, {t['setting_title'].iloc[0]}: gain in points "
                          f"[95 % CI] and verdict; relative gain in %; time reduction in % [95 % CI] (claim: more "
                          f"than {TIME_CLAIM_PCT:g} %)\n\n" + _md(header, rows))
        if "gain_p_holm" in table:
            blocks.append(f"p: two-sided paired t-test over seeds; Holm: adjusted over the {comparisons(table)} "
                          f"comparisons of this claims table.")
    return "\n\n".join(blocks) + "\n"


def read_saved(where) -> pd.DataFrame:
    """A leaderboard or claims CSV that `write` wrote (a path or URI). The verdict `tie` of files
    written before it became `inconclusive` reads as `inconclusive`."""
    import io

    from harness import storage

    data = pd.read_csv(io.BytesIO(storage.resolve(where).read_bytes()))
    verdicts = [c for c in data if "verdict" in c]
    data[verdicts] = data[verdicts].replace("tie", "inconclusive")
    return data


def write(board: pd.DataFrame, path: str | Path) -> Path | str:
    """The board as CSV at a local path or a URI, written whole; returns where."""
    from harness import storage

    where = storage.resolve(path)
    # 10 significant digits: a number rounded from the CSV rounds as from the Parquet files
    where.write_bytes(board.to_csv(index=False, float_format="%.10g").encode())
    return Path(where.path) if where.local else str(where)
