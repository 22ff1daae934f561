"""`fedbench report`: one self-contained HTML page per results folder.

Per setting: the leaderboard (every method variant, its 95 % intervals, paired differences where a
baseline is given), the claims table, the figures (accuracy against round and against simulated
time, running time, accuracy against running time with its Pareto front) as inline SVG, the spread
of accuracy over clients, and where the results come from. Styles, script and figures are inline,
so the page opens from a local file or from object storage with nothing fetched. The tables are
plain HTML; sorting by a column and the filter box are added by the script, so the page reads the
same without it. Every string from the results is escaped.

A folder without Parquet files (one that keeps only its leaderboard CSV and PNG plots) gives a page
of what it holds: its leaderboards, claims, the Pareto figure drawn from the CSV and its PNG plots.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from harness import leaderboard, storage
from harness.columns import accuracy_column
from harness.errors import UserError
from harness.leaderboard import TESTS, TESTS_TITLES, _ci, _p, seeds_note

# Columns that runs may record about themselves; the page shows those present.
RUN_PROVENANCE = ("cpu_model", "torch_cpu_capability", "fedbench_version", "git_commit", "torch_version",
                  "ray_version", "python_version", "host", "started_at", "finished_at")


def e(value) -> str:
    """Any value as HTML text, escaped."""
    return html.escape(str(value), quote=True)


@dataclass
class Setting:
    setting: str
    board: pd.DataFrame  # its leaderboard rows
    claims: pd.DataFrame | None = None
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, inline SVG or <img>)
    spread: pd.DataFrame | None = None
    extra_boards: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # (file name, rows)


# -- gathering -----------------------------------------------------------------------------------

def _csv(location: storage.Location) -> pd.DataFrame | None:
    return leaderboard.read_saved(location) if location.exists() else None


def _svg(fig, prefix: str) -> str:
    """A matplotlib figure as inline SVG: text kept as text, ids made unique within the page."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fedbench"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}\1"', svg)
    svg = re.sub(r'url\(#([^)]+)\)', rf'url(#{prefix}\1)', svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}\1"', svg)
    return svg.replace("<svg ", '<svg role="img" ', 1)


CAPTIONS = {"acc_vs_round": "Accuracy against round", "acc_vs_time": "Accuracy against simulated time",
            "running_time": "Running time", "pareto": "Accuracy against running time, with the Pareto front"}


def _caption(name: str) -> str:
    return next((text for kind, text in CAPTIONS.items() if name.endswith(f"_{kind}.png")), name)


def _spread(root) -> pd.DataFrame:
    """Per (setting, method): the spread of accuracy over clients in the last 10 evaluated rounds,
    per run, then the mean over seeds: the mean over clients, their std and (where the runs record
    it) their 10th percentile, for each test-set construction."""
    summary, rounds = leaderboard.load_runs(root, say=False)
    rounds = rounds[rounds["experiment"].isin(summary["experiment"])].sort_values(["experiment", "round"])
    tail = rounds.groupby("experiment").tail(leaderboard.LAST)
    columns = [accuracy_column("clients", stat, kind) for _, kind in TESTS for stat in ("mean", "std", "p10")]
    columns = [c for c in columns if c in tail and tail[c].notna().any()]
    per_run = tail.groupby(["setting", "method_label", "experiment"])[columns].mean()
    spread = per_run.groupby(level=["setting", "method_label"]).mean()
    spread["seeds"] = per_run.groupby(level=["setting", "method_label"]).size()
    return spread.reset_index()


def _configs(root: storage.Location) -> list[tuple[str, str]]:
    return [(f.parent.name, f.read_bytes().decode(errors="replace")) for f in root.find("config.yaml")]


def _manifests(root: storage.Location) -> list[dict]:
    out = []
    for sweep in (root / "_tune").children():
        manifest = sweep / "sweep.json"
        if manifest.exists():
            try:
                data = json.loads(manifest.read_bytes())
            except ValueError:
                continue
            out.append({"sweep": data.get("sweep", sweep.name), "created_by": data.get("created_by", {}),
                        "runs": data.get("runs")})
    return out


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes" if dirty else "")


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def gather(root, baseline: str | None = None, claims: list[str] | None = None,
           target_acc: float | None = None) -> tuple[list[Setting], dict]:
    """The settings of the results under `root` and the page's provenance."""
    from harness import plots

    loc = storage.resolve(root)
    saved_board, saved_claims = _csv(loc / "leaderboard.csv"), _csv(loc / "claims.csv")
    claimed = sorted(saved_claims["method"].dropna().unique()) if saved_claims is not None else None
    info = {"source": str(root), "parquet": bool(loc.find("summary.parquet"))}
    if info["parquet"]:
        summary, _ = leaderboard.load_runs(loc, say=False)
        if baseline is None and saved_board is not None and "baseline" in saved_board:
            known = saved_board["baseline"].dropna()
            if len(known) and known.iloc[0] in set(summary["method_label"]):
                baseline = known.iloc[0]
        board = leaderboard.build(loc, target_acc, baseline)
        try:
            table = leaderboard.claims(loc, claims or claimed) if claims or claimed else None
        except UserError:
            if claims:
                raise
            table = None  # the saved claims name methods these results no longer hold
        spread = _spread(loc)
        figures: dict[str, list[tuple[str, str]]] = {}
        for i, (setting, name, fig) in enumerate(plots.figures_by_setting(loc)):
            figures.setdefault(setting, []).append((_caption(name), _svg(fig, f"f{i}-")))
        info.update(runs=summary, configs=_configs(loc), manifests=_manifests(loc))
        extra = []
    else:
        if saved_board is None:
            raise UserError(str(loc), "no finished experiment here (no summary.parquet below it) and no "
                                      "leaderboard.csv")
        board, table, spread = saved_board, saved_claims, None
        extra = [(f.name, _csv(f)) for f in loc.children()
                 if re.fullmatch(r"leaderboard.+\.csv", f.name) and f.name != "leaderboard.csv"]
        figures = {}
        pngs = [f for f in (loc / "plots").children() if f.name.endswith(".png")]
        for i, setting in enumerate(board["setting"].unique()):
            rows = board[board["setting"] == setting]
            shown = [(_caption(f.name), f'<img alt="{e(_caption(f.name))}" src="data:image/png;base64,'
                      f'{base64.b64encode(f.read_bytes()).decode()}">')
                     for f in pngs if f.name.startswith(plots.stem(setting) + "_")]
            figures[setting] = shown + [(CAPTIONS["pareto"], _svg(plots.pareto_figure(rows), f"f{i}-"))]
        info.update(runs=None, configs=[], manifests=[])
    settings = []
    for setting, rows in board.groupby("setting", sort=False):
        settings.append(Setting(
            setting, rows,
            claims=table[table["setting"] == setting] if table is not None else None,
            figures=figures.get(setting, []),
            spread=spread[spread["setting"] == setting] if spread is not None else None,
            extra_boards=[(name, b[b["setting"] == setting]) for name, b in extra]))
    if table is not None and "gain_p_value" in table:
        info["comparisons"] = leaderboard.comparisons(table)
    return settings, info


# -- rendering -----------------------------------------------------------------------------------

def _num(value, digits: int) -> str:
    """A numeric cell: the number as shown, its full value to sort by."""
    v = float(value) if value is not None and not isinstance(value, str) else math.nan
    shown = f"{v:.{digits}f}" if np.isfinite(v) else "-"
    return f'<td data-v="{v!r}">{shown}</td>'


def _interval_cell(mean, low, high) -> str:
    text = leaderboard._interval(mean, low, high)
    return f'<td data-v="{float(mean)!r}">{e(text)}</td>'


def _verdict_cell(text) -> str:
    text = "" if not isinstance(text, str) else text
    kind = {"better": "better", "worse": "worse", "holds": "better", "fails": "worse"}.get(text, "")
    return f'<td class="text {kind}">{e(text)}</td>'


def _table(caption: str, header: list[tuple[str, bool]], rows: list[str], css: str) -> str:
    """A sortable, filterable table; `header`: (title, is text)."""
    head = "".join(f'<th scope="col"{" class=text" if text else ""}>{e(title)}</th>' for title, text in header)
    return (f'<div class="table-wrap"><table class="{css} sortable"><caption>{caption}</caption>'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _board_table(board: pd.DataFrame) -> str:
    views = leaderboard.shown_views(board)
    has_base = "baseline" in board and board["baseline"].notna().any()
    header = [("#", False), ("method", True), ("seeds", False)]
    header += [(f"last-10 acc %, {title}" if i == 0 else title, False) for i, (_, _, title) in enumerate(views)]
    if has_base:
        first_tag, first_suffix, first_name = views[0]
        header += [(f"Δ pts, {first_name} [95% CI]", False), ("verdict", True), ("time Δ % [95% CI]", False),
                   ("time verdict", True)]
    header += [("time to target s", False), ("simulated time s", False), ("TFLOPs", False), ("MB up", False),
               ("MB down", False), ("wall s", False)]
    rows = []
    for r in board.to_dict("records"):
        title = r["method_title"] if isinstance(r.get("method_title"), str) else r["method"]
        label = f' <span class="label">{e(r["method"])}</span>' if title != r["method"] else ""
        cells = [_num(r["rank"], 0), f'<td class="text" data-label="method">{e(title)}{label}</td>', _num(r["seeds"], 0)]
        cells += [_interval_cell(r[f"last10_acc{tag}_mean{suffix}"], r[f"last10_acc{tag}_ci95_low{suffix}"],
                                 r[f"last10_acc{tag}_ci95_high{suffix}"]) for tag, suffix, _ in views]
        if has_base:
            *delta, delta_verdict = leaderboard.delta_in_view(r, first_tag, first_suffix)
            cells += [f'<td data-v="{float(delta[0])!r}">{e(_ci(*delta))}</td>', _verdict_cell(delta_verdict),
                      f'<td data-v="{float(r["time_delta_pct_mean"])!r}">'
                      f'{e(_ci(r["time_delta_pct_mean"], r["time_delta_pct_ci95_low"], r["time_delta_pct_ci95_high"], 1.0))}'
                      f'</td>', _verdict_cell(r["time_verdict"])]
        reached = r["time_to_target_s"]
        cells.append(_num(reached, 2) if np.isfinite(reached) else
                     f'<td data-v="nan">not reached ({int(r["seeds_reaching_target"])}/{int(r["seeds"])})</td>')
        cells += [_num(r["sim_total_s"], 2), _num(r["tflops_total"], 3), _num(r["mb_up"], 1), _num(r["mb_down"], 1),
                  _num(r["wall_s"], 1)]
        rows.append(f'<tr data-method="{e(r["method"])}">{"".join(cells)}</tr>')
    seeds = seeds_note(board["seeds"])
    caption = (f"Leaderboard: last-10 accuracy (each run's mean over its last 10 evaluated rounds), mean over seeds "
               f"[95 % Student t interval over {e(seeds)}]; target accuracy "
               f"{100 * float(board['target_acc'].iloc[0]):.2f} %")
    if has_base:
        base = board.loc[board["verdict"] == "baseline", "method_title"]
        caption += f"; Δ: paired seed by seed against {e(base.iloc[0] if len(base) else board['baseline'].iloc[0])}"
    return _table(caption, header, rows, "board filterable")


def _delta_table(name: str, board: pd.DataFrame) -> str:
    """The paired differences of a saved leaderboard made against another baseline."""
    if "baseline" not in board or not board["baseline"].notna().any():
        return ""
    header = [("method", True), ("seeds", False), ("Δ pts, client models [95% CI]", False), ("verdict", True),
              ("time Δ % [95% CI]", False), ("time verdict", True)]
    rows = [f'<tr data-method="{e(r["method"])}"><td class="text">{e(r["method_title"])}</td>{_num(r["seeds"], 0)}'
            f'<td data-v="{float(r["delta_mean"])!r}">{e(_ci(r["delta_mean"], r["delta_ci95_low"], r["delta_ci95_high"]))}'
            f'</td>{_verdict_cell(r["verdict"])}<td data-v="{float(r["time_delta_pct_mean"])!r}">'
            f'{e(_ci(r["time_delta_pct_mean"], r["time_delta_pct_ci95_low"], r["time_delta_pct_ci95_high"], 1.0))}</td>'
            f'{_verdict_cell(r["time_verdict"])}</tr>' for r in board.to_dict("records")]
    base = board.loc[board["verdict"] == "baseline", "method_title"]
    return _table(f"Paired differences against {e(base.iloc[0] if len(base) else board['baseline'].iloc[0])} "
                  f"(<code>{e(name)}</code>)", header, rows, "deltas filterable")


def _claims_table(table: pd.DataFrame, comparisons: int | None) -> str:
    has_p = "gain_p_value" in table
    header = [("method", True), ("vs", True), ("view", True), ("test sets", True), ("seeds", False),
              ("gain pts [95% CI]", False), ("verdict", True)]
    if has_p:
        header += [("p", False), ("p Holm", False), ("after Holm", True)]
    header += [("gain % [95% CI]", False), ("time reduction % [95% CI]", False),
               (f"> {leaderboard.TIME_CLAIM_PCT:g} % less time", True)]
    rows = []
    for r in table.to_dict("records"):
        cells = [f'<td class="text">{e(r[c])}</td>' for c in ("method", "other", "view", "test_sets")]
        cells += [_num(r["seeds"], 0), f'<td data-v="{float(r["gain_pts_mean"])!r}">'
                  f'{e(_ci(r["gain_pts_mean"], r["gain_pts_ci95_low"], r["gain_pts_ci95_high"], 1.0))}</td>',
                  _verdict_cell(r["accuracy_verdict"])]
        if has_p:
            cells += [f'<td data-v="{float(r["gain_p_value"])!r}">{_p(r["gain_p_value"])}</td>',
                      f'<td data-v="{float(r["gain_p_holm"])!r}">{_p(r["gain_p_holm"])}</td>',
                      _verdict_cell(r["accuracy_verdict_holm"])]
        cells += [f'<td data-v="{float(r["gain_rel_pct_mean"])!r}">'
                  f'{e(_ci(r["gain_rel_pct_mean"], r["gain_rel_pct_ci95_low"], r["gain_rel_pct_ci95_high"], 1.0))}</td>',
                  f'<td data-v="{float(r["time_reduction_pct_mean"])!r}">'
                  f'{e(_ci(r["time_reduction_pct_mean"], r["time_reduction_pct_ci95_low"], r["time_reduction_pct_ci95_high"], 1.0))}'
                  f'</td>', _verdict_cell(r["time_claim"])]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    caption = ("Claims: the paper's claims checked pair by pair (paired over seeds; verdict from the 95 % interval "
               "of the gain in points")
    if has_p and comparisons:
        caption += (f"; p: two-sided paired t-test; Holm: adjusted over all {comparisons} comparisons of the "
                    f"claims table")
    return _table(caption + ")", header, rows, "claims filterable")


def _strip(mean: float, std: float, p10: float, low: float) -> str:
    """A small picture of the spread over clients: mean +- std as a bar, the mean as a dot, the 10th
    percentile as a tick, on an axis from `low` to 100 %."""
    def x(v):
        return 4 + 152 * (min(max(v, low), 100) - low) / (100 - low)

    parts = ['<line class="axis" x1="4" x2="156" y1="13" y2="13"/>']
    if np.isfinite(std):
        parts.append(f'<rect class="sd" x="{x(mean - std):.1f}" y="5" width="{x(mean + std) - x(mean - std):.1f}" '
                     f'height="8"/>')
    if np.isfinite(p10):
        parts.append(f'<line class="p10" x1="{x(p10):.1f}" x2="{x(p10):.1f}" y1="2" y2="16"/>')
    parts.append(f'<circle class="mean" cx="{x(mean):.1f}" cy="9" r="3"/>')
    label = f"mean {mean:.1f} %, std {std:.1f}" + (f", 10th percentile {p10:.1f} %" if np.isfinite(p10) else "")
    return f'<svg class="strip" viewBox="0 0 160 18" width="160" height="18" role="img" aria-label="{e(label)}">' \
           f'<title>{e(label)}</title>{"".join(parts)}</svg>'


def _spread_table(spread: pd.DataFrame, board: pd.DataFrame) -> str:
    titles = dict(zip(board["method"], board["method_title"]))
    order = {m: i for i, m in enumerate(board["method"])}
    spread = spread.assign(order=spread["method_label"].map(order)).sort_values("order")
    groups = [(suffix, tests) for suffix, tests in TESTS if f"acc_clients_mean{suffix}" in spread
              and (f"acc_clients_std{suffix}" in spread or f"acc_clients_p10{suffix}" in spread)]
    if not groups:
        return ""
    spread = spread.copy()
    for suffix, _ in groups:
        for stat in ("std", "p10"):
            if f"acc_clients_{stat}{suffix}" not in spread:
                spread[f"acc_clients_{stat}{suffix}"] = math.nan
    has_p10 = any(spread[f"acc_clients_p10{suffix}"].notna().any() for suffix, _ in groups)
    header = [("method", True), ("seeds", False)]
    for suffix, tests in groups:
        name = TESTS_TITLES[tests]
        header += [(f"mean %, {name}", False), (f"std over clients, {name}", False)]
        if has_p10:
            header.append((f"10th percentile %, {name}", False))
        header.append((f"spread, {name}", True))
    lowest = [100 * (spread[f"acc_clients_mean{suffix}"] - spread[f"acc_clients_std{suffix}"]).min()
              for suffix, _ in groups]
    lowest += [100 * spread[f"acc_clients_p10{suffix}"].min() for suffix, _ in groups]
    low = min(90.0, max(0.0, math.floor(np.nanmin(lowest) / 10) * 10))  # the axis starts at a multiple of 10
    rows = []
    for r in spread.to_dict("records"):
        cells = [f'<td class="text">{e(titles.get(r["method_label"], r["method_label"]))}</td>', _num(r["seeds"], 0)]
        for suffix, _ in groups:
            mean, std = 100 * r[f"acc_clients_mean{suffix}"], 100 * r[f"acc_clients_std{suffix}"]
            p10 = 100 * r[f"acc_clients_p10{suffix}"]
            cells += [_num(mean, 2), _num(std, 2)] + ([_num(p10, 2)] if has_p10 else [])
            cells.append(f'<td class="text">{_strip(mean, std, p10, low)}</td>')
        rows.append(f'<tr data-method="{e(r["method_label"])}">{"".join(cells)}</tr>')
    note = ("the 10th percentile is a tick" if has_p10 else
            "the 10th percentile is not recorded by these runs (the rounds files have no acc_clients_p10 column)")
    caption = (f"Spread over clients: the accuracy of each client's model on its own test set, in the last 10 "
               f"evaluated rounds, mean over seeds; the bar is mean ± std over clients ({e(note)}); axis "
               f"{low:g} to 100 %")
    return _table(caption, header, rows, "spread")


def _setting_section(i: int, s: Setting, comparisons: int | None) -> str:
    board = s.board
    model = board["model"].iloc[0]
    title = board["setting_title"].iloc[0] if isinstance(board["setting_title"].iloc[0], str) else s.setting
    parts = [f'<section id="setting-{i}"><h2>{e(title)}, {e(leaderboard.MODEL_TITLES.get(model, model))}</h2>',
             f'<p class="meta">setting <code>{e(s.setting)}</code>; data set <code>{e(board["dataset"].iloc[0])}'
             f'</code>; {len(board)} method variants; 95 % intervals over {e(seeds_note(board["seeds"]))}</p>',
             "<h3>Leaderboard</h3>", _board_table(board)]
    parts += [_delta_table(name, b) for name, b in s.extra_boards if len(b)]
    if s.figures:
        parts.append("<h3>Figures</h3>")
        parts += [f'<figure>{body}<figcaption>{e(caption)}</figcaption></figure>' for caption, body in s.figures]
    if s.claims is not None and len(s.claims):
        parts += ["<h3>Claims</h3>", _claims_table(s.claims, comparisons)]
    spread = _spread_table(s.spread, board) if s.spread is not None and len(s.spread) else ""
    if spread:
        parts += ["<h3>Spread over clients</h3>", spread]
    return "\n".join(parts) + "</section>"


def _provenance(info: dict, command: str | None) -> str:
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    items = [("source", info["source"]), ("this page", f"made {made} by {command or 'fedbench report'}"),
             ("fedbench", f"{_version('fedbench')}, commit {_git_commit()}"),
             ("Python, torch, Ray", f"{platform.python_version()}, {_version('torch')}, {_version('ray')}"),
             ("machine of this page", f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
                                      f"{platform.node()}")]
    runs = info.get("runs")
    if runs is not None:
        statuses = ", ".join(f"{n} {status}" for status, n in runs["status"].value_counts().sort_index().items())
        items.append(("runs", f"{len(runs)} ({statuses}); seeds {', '.join(map(str, sorted(runs['seed'].unique())))}"))
        recorded = [c for c in RUN_PROVENANCE if c in runs and runs[c].notna().any()]
        for c in recorded:
            items.append((c.replace("_", " "), ", ".join(sorted(map(str, runs[c].dropna().unique())))))
        if not any(c in recorded for c in ("started_at", "finished_at")):
            items.append(("dates of the runs", "not recorded in the results"))
    else:
        items.append(("runs", "no Parquet files in this folder: the page shows its saved CSV files and PNG plots; "
                              "curves, per-client spread and run configs need the Parquet files (rerun the sweep)"))
    for m in info.get("manifests", []):
        by = m["created_by"]
        items.append((f"sweep {m['sweep']}", f"made by {by.get('user', '?')} on {by.get('host', '?')}; "
                                             f"{m['runs']} invocation(s)"))
    rows = "".join(f"<tr><th scope=row>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in items)
    configs = "".join(f"<details><summary>{e(name)}</summary><pre>{e(text)}</pre></details>"
                      for name, text in info.get("configs", []))
    if configs:
        configs = (f'<details class="configs"><summary>Each run\'s configuration ({len(info["configs"])})</summary>'
                   f"{configs}</details>")
    return f'<section id="provenance"><h2>Where these results come from</h2><table class="prov">{rows}</table>' \
           f"{configs}</section>"


STYLE = """
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1c1e21; --muted: #5b616b; --line: #d5d9de;
  --head: #f1f3f5; --better: #1a7f37; --worse: #c4272f; --accent: #2f6fbf; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #111418; --fg: #e4e6ea; --muted: #9ba3ad; --line: #323a44; --head: #1a2028; --better: #4cc76a;
    --worse: #ff6b6b; --accent: #7fb0f0; }
  figure svg, figure img { filter: invert(0.92) hue-rotate(180deg); }
}
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1280px; padding: 1rem 1.25rem 3rem; background: var(--bg); color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 1.6rem; margin: .5rem 0; } h2 { font-size: 1.3rem; margin-top: 2.2rem;
  border-bottom: 1px solid var(--line); padding-bottom: .2rem; } h3 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
.meta, caption, figcaption, .label, .note { color: var(--muted); }
code { font-size: .9em; }
nav ul { padding-left: 1.2rem; }
a { color: var(--accent); }
.table-wrap { overflow-x: auto; margin: .3rem 0 1rem; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-size: 12.5px; padding: .2rem 0 .4rem; caption-side: top; max-width: 90ch; }
th, td { padding: .28rem .55rem; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap;
  vertical-align: middle; }
.text { text-align: left; }
thead th { background: var(--head); position: sticky; top: 0; font-weight: 600; }
th button { all: inherit; padding: 0; cursor: pointer; }
th button:focus-visible { outline: 2px solid var(--accent); }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
tbody tr:hover { background: var(--head); }
.label { font-size: 11px; margin-left: .3rem; }
.better { color: var(--better); font-weight: 600; } .worse { color: var(--worse); font-weight: 600; }
.filter { margin: .2rem 0; font-size: 13px; } .filter input { font: inherit; padding: .2rem .4rem; width: 18rem;
  max-width: 100%; background: var(--bg); color: var(--fg); border: 1px solid var(--line); border-radius: 4px; }
figure { margin: 1rem 0 1.6rem; } figure svg, figure img { max-width: 100%; height: auto; display: block;
  background: #fff; }
.strip .axis { stroke: var(--line); } .strip .sd { fill: var(--accent); opacity: .35; }
.strip .mean { fill: var(--accent); } .strip .p10 { stroke: var(--worse); stroke-width: 2; }
table.prov th { text-align: left; vertical-align: top; background: none; position: static; }
table.prov td { text-align: left; white-space: normal; }
details { margin: .3rem 0; } details pre { font-size: 12px; background: var(--head); padding: .5rem; overflow-x: auto; }
summary { cursor: pointer; }
@media print {
  :root { color-scheme: light; --bg: #fff; --fg: #000; --muted: #444; --line: #bbb; --head: #eee; }
  figure svg, figure img { filter: none; }
  body { max-width: none; padding: 0; font-size: 11pt; }
  .filter, nav { display: none; }
  thead th { position: static; }
  .table-wrap { overflow: visible; }
  table { font-size: 8pt; } th, td { padding: 1pt 3pt; }
  figure, tr { break-inside: avoid; } main > section + section > h2 { break-before: page; }
  th button::after { content: "" !important; }
}
"""

SCRIPT = """
(function () {
  "use strict";
  function key(row, col) {
    var cell = row.cells[col];
    if (!cell) return "";
    var v = cell.getAttribute("data-v");
    return v === null ? cell.textContent.trim().toLowerCase() : parseFloat(v);
  }
  function sortBy(table, th, col) {
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, col), y = key(b, col);
      var xn = typeof x === "number" && isNaN(x), yn = typeof y === "number" && isNaN(y);
      if (xn || yn) return xn - yn;  /* no value: last either way */
      return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var button = document.createElement("button");
      button.type = "button";
      while (th.firstChild) button.appendChild(th.firstChild);
      th.appendChild(button);
      button.title = "sort by this column";
      button.addEventListener("click", function () { sortBy(table, th, col); });
    });
    if (table.classList.contains("filterable")) {
      var label = document.createElement("label");
      label.className = "filter";
      label.textContent = "filter rows: ";
      var input = document.createElement("input");
      input.type = "search";
      input.placeholder = "e.g. FedLPS";
      label.appendChild(input);
      table.parentNode.parentNode.insertBefore(label, table.parentNode);
      input.addEventListener("input", function () {
        var q = input.value.trim().toLowerCase();
        Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
          r.hidden = q !== "" && r.textContent.toLowerCase().indexOf(q) < 0;
        });
      });
    }
  });
})();
"""


def render(settings: list[Setting], info: dict, command: str | None = None) -> str:
    """The page, as one HTML string."""
    name = Path(info["source"].rstrip("/")).name or info["source"]
    nav = "".join(f'<li><a href="#setting-{i}">{e(s.board["setting_title"].iloc[0])}</a></li>'
                  for i, s in enumerate(settings))
    body = "\n".join(_setting_section(i, s, info.get("comparisons")) for i, s in enumerate(settings))
    runs = info.get("runs")
    count = f"{len(runs)} runs, " if runs is not None else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="fedbench report">
<title>fedbench report: {e(name)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>fedbench report: {e(name)}</h1>
<p class="meta">{e(count)}{len(settings)} setting{'s' if len(settings) != 1 else ''}; results from
<code>{e(info['source'])}</code>. Accuracy: each run's mean over its last 10 evaluated rounds; intervals: 95 %
Student t over seeds. Columns sort when their header is clicked. <a href="#provenance">Where these results come
from</a>.</p>
<nav><ul>{nav}</ul></nav>
</header>
<main>
{body}
{_provenance(info, command)}
</main>
<script>{SCRIPT}</script>
</body>
</html>
"""


def write(root, output=None, baseline: str | None = None, claims: list[str] | None = None,
          target_acc: float | None = None, command: str | None = None) -> Path | str:
    """The report of the results under `root` as one HTML file at `output` (a path or URI; default
    root/report.html), written whole; returns where."""
    settings, info = gather(root, baseline, claims, target_acc)
    page = render(settings, info, command)
    where = storage.resolve(output) if output else storage.resolve(root) / "report.html"
    where.write_bytes(page.encode())
    return Path(where.path) if where.local else str(where)
