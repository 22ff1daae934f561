"""The leaderboard's statistics, paired differences and claims table on made-up runs whose numbers
are worked out by hand (3 seeds: t(0.975, 2) = 4.302653), and the plots' titles and legends."""
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import leaderboard
from harness.cli import main

T2 = 4.302653  # Student t, 97.5 % quantile, 2 degrees of freedom
SEEDS = (1, 2, 3)
BASE = np.array([0.80, 0.82, 0.84])  # the baseline's last-10 accuracy per seed
# method label -> (title, last-10 accuracy per seed, simulated time per seed, global-view accuracy per seed)
METHODS = {
    "base": ("Base (reference)", BASE, [100.0, 110.0, 120.0], BASE - 0.1),
    "up": ("Up (paper)", BASE + [0.05, 0.06, 0.07], [25.0, 22.0, 30.0], BASE - 0.1 - [0.04, 0.05, 0.06]),
    "down": ("Down", BASE - [0.10, 0.12, 0.14], [150.0, 165.0, 180.0], BASE - 0.1 - [0.10, 0.12, 0.14]),
    "same": ("Same", BASE + [0.02, -0.03, 0.01], [100.0, 121.0, 108.0], BASE - 0.1 + [0.02, -0.03, 0.01]),
}
WIGGLE = np.array([-0.01, 0.01] * 5)  # the last 10 rounds wiggle around the level; their mean is the level
SETTING_TITLE = "MNIST, 2 shards of 100 per client, 100 clients (10 per round)"


def write_runs(root, methods=METHODS, seeds=SEEDS, new_columns=True, setting="s"):
    """12 evaluated rounds per run: two early rounds at 0.1 (outside the last 10), then level + WIGGLE."""
    for label, (title, level, sim, glob) in methods.items():
        for i, seed in enumerate(seeds):
            exp = f"{setting}_{label}_seed{seed}"
            ident = dict(experiment=exp, setting=setting, method=label, method_label=label, dataset="mnist",
                         model="cnn", seed=seed)
            if new_columns:
                ident.update(method_title=title, setting_title=SETTING_TITLE)
            acc = np.r_[0.1, 0.1, level[i] + WIGGLE]
            views = {"acc_clients_mean": acc}
            if new_columns:
                views.update(acc_global_clients_mean=np.r_[0.1, 0.1, glob[i] + WIGGLE],
                             acc_clients_mean_authors_tests=acc - 0.05,
                             acc_global_clients_mean_authors_tests=np.r_[0.1, 0.1, glob[i] + WIGGLE] - 0.05,
                             acc_clients_p10=acc - 0.3)
            rounds = pd.DataFrame({**ident, "round": range(12), **views,
                                   "sim_total_s": np.linspace(sim[i] / 12, sim[i], 12)})
            (root / exp).mkdir(parents=True)
            rounds.to_parquet(root / exp / "rounds.parquet")
            pd.DataFrame([dict(ident, rounds=12, status="completed", final_acc=acc[-1], best_acc=acc.max(),
                               sim_total_s=sim[i], flops_total=1e12, bytes_up_total=10**6, bytes_down_total=10**6,
                               wall_total_s=3.0)]).to_parquet(root / exp / "summary.parquet")


def ci(values):
    """Mean and 95 % t-interval of 3 values, by hand."""
    x = np.asarray(values, float)
    mean = x.sum() / 3
    std = math.sqrt(((x - mean) ** 2).sum() / 2)
    return mean, std, mean - T2 * std / math.sqrt(3), mean + T2 * std / math.sqrt(3)


@pytest.fixture
def runs(tmp_path):
    write_runs(tmp_path)
    return tmp_path


def row(board, label):
    return board.set_index("method").loc[label]


def test_last10_p10_is_summarised_like_the_mean(runs):
    base = row(leaderboard.build(runs), "base")
    mean, std, low, high = ci(BASE - 0.3)
    assert base["last10_p10_mean"] == pytest.approx(mean)
    assert base["last10_p10_std"] == pytest.approx(std)
    assert (base["last10_p10_ci95_low"], base["last10_p10_ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    assert np.isnan(base["last10_p10_global_mean"])  # not recorded in these runs
    assert "p10 last-10 %" in leaderboard.format_table(leaderboard.build(runs))


def test_last10_statistics_over_seeds(runs):
    board = leaderboard.build(runs)
    assert board["method"].tolist()[::3] == ["up", "down"]  # by last-10 accuracy (same and base tie at 0.82)
    base = row(board, "base")
    assert base["last10_acc_mean"] == pytest.approx(0.82)
    assert base["last10_acc_std"] == pytest.approx(0.02)  # ddof=1
    half = T2 * 0.02 / math.sqrt(3)  # 0.049682
    assert (base["last10_acc_ci95_low"], base["last10_acc_ci95_high"]) == (
        pytest.approx(0.82 - half, rel=1e-6), pytest.approx(0.82 + half, rel=1e-6))
    assert base["final_acc_mean"] == pytest.approx(0.83) and base["final_acc_std"] == pytest.approx(0.02)
    assert base["best_acc_std"] == pytest.approx(0.02)
    assert base["last10_acc_global_mean"] == pytest.approx(0.72)
    assert base["last10_acc_mean_authors_tests"] == pytest.approx(0.77)
    assert base["last10_acc_global_ci95_high_authors_tests"] == pytest.approx(0.67 + half, rel=1e-6)
    assert "baseline" not in board and "delta_mean" not in board


def test_paired_differences_against_a_baseline(runs):
    board = leaderboard.build(runs, baseline="base")
    up, down, same, base = (row(board, m) for m in ("up", "down", "same", "base"))
    assert (up["baseline"], up["paired_seeds"]) == ("base", 3)
    # up: +0.05, +0.06, +0.07 -> mean 0.06, std 0.01
    mean, _, low, high = ci([0.05, 0.06, 0.07])
    assert (up["delta_mean"], up["delta_ci95_low"], up["delta_ci95_high"]) == (
        pytest.approx(0.06), pytest.approx(0.06 - T2 * 0.01 / math.sqrt(3), rel=1e-6), pytest.approx(high, rel=1e-6))
    assert low == pytest.approx(0.035159, abs=1e-6) and up["verdict"] == "better"
    rel = ci(100 * (METHODS["up"][1] / BASE - 1))  # 6.25 %, 7.3171 %, 8.3333 %
    assert (up["delta_rel_pct_mean"], up["delta_rel_pct_ci95_low"], up["delta_rel_pct_ci95_high"]) == (
        pytest.approx(rel[0]), pytest.approx(rel[2], rel=1e-6), pytest.approx(rel[3], rel=1e-6))
    # down: -0.10, -0.12, -0.14; same: +0.02, -0.03, +0.01 (std sqrt(0.0007))
    assert down["delta_mean"] == pytest.approx(-0.12) and down["verdict"] == "worse"
    assert down["delta_ci95_high"] == pytest.approx(-0.12 + T2 * 0.02 / math.sqrt(3), rel=1e-6)
    half = T2 * math.sqrt(0.0007) / math.sqrt(3)  # 0.065726
    assert (same["delta_ci95_low"], same["delta_ci95_high"]) == (pytest.approx(-half, rel=1e-6),
                                                                 pytest.approx(half, rel=1e-6))
    assert same["delta_mean"] == pytest.approx(0.0, abs=1e-12) and same["verdict"] == "inconclusive"
    # the global view: up is worse there (-0.04, -0.05, -0.06)
    assert up["delta_global_mean"] == pytest.approx(-0.05) and up["verdict_global"] == "worse"
    assert up["delta_global_ci95_high"] == pytest.approx(-0.05 + T2 * 0.01 / math.sqrt(3), rel=1e-6)
    assert up["delta_global_mean_authors_tests"] == pytest.approx(-0.05) and up["verdict_authors_tests"] == "better"
    assert up["verdict_global_authors_tests"] == "worse"
    # time: up -75, -80, -75 %; down +50 % every seed (a zero-width interval); same 0, +10, -10 %
    t = ci([-75.0, -80.0, -75.0])
    assert (up["time_delta_pct_mean"], up["time_delta_pct_ci95_low"], up["time_delta_pct_ci95_high"]) == (
        pytest.approx(t[0]), pytest.approx(t[2], rel=1e-6), pytest.approx(t[3], rel=1e-6))
    assert t[3] == pytest.approx(-69.4956, abs=1e-4) and up["time_verdict"] == "better"
    assert (down["time_delta_pct_ci95_low"], down["time_verdict"]) == (pytest.approx(50.0), "worse")
    assert (same["time_delta_pct_mean"], same["time_verdict"]) == (pytest.approx(0.0, abs=1e-9), "inconclusive")
    assert base["verdict"] == "baseline" and base["delta_mean"] == 0.0
    # the CSV holds every column; the printed table the headline ones
    csv = pd.read_csv(leaderboard.write(board, runs / "lb.csv"))
    assert {"delta_rel_pct_global_ci95_high_authors_tests", "time_verdict", "last10_acc_std"} <= set(csv.columns)
    text = leaderboard.format_table(board)
    assert "Up (paper)" in text and "better" in text and "Δ pts [95% CI]" in text and SETTING_TITLE in text
    assert "+6.00 [+3.52, +8.48]" in text and "88.00 ± 7.45" in text and "-0.00" not in text


def test_the_baseline_by_title_or_unknown(runs, capsys):
    assert leaderboard.build(runs, baseline="Base (reference)")["baseline"].unique().tolist() == ["base"]
    assert main(["leaderboard", str(runs), "--baseline", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedbench: error: --baseline: unknown method 'nope'")
    assert "base (Base (reference))" in err and "up (Up (paper))" in err


def test_one_seed_has_no_interval_and_no_verdict(tmp_path):
    write_runs(tmp_path, seeds=(1,))
    board = leaderboard.build(tmp_path, baseline="base")
    up = row(board, "up")
    assert up["last10_acc_mean"] == pytest.approx(0.85) and np.isnan(up["last10_acc_std"])
    assert np.isnan(up["last10_acc_ci95_low"]) and up["delta_mean"] == pytest.approx(0.05)
    assert np.isnan(up["delta_ci95_low"]) and up["verdict"] == "n/a" and up["time_verdict"] == "n/a"


def test_only_seeds_both_methods_have_are_paired(tmp_path):
    write_runs(tmp_path, {"base": METHODS["base"]}, seeds=(1, 2))  # the baseline lacks seed 3
    write_runs(tmp_path, {"up": METHODS["up"]})
    write_runs(tmp_path, {"up": METHODS["up"]}, setting="t")  # a setting without the baseline
    board = leaderboard.build(tmp_path, baseline="base")
    up = board[board["setting"] == "s"].set_index("method").loc["up"]
    assert up["paired_seeds"] == 2 and up["delta_mean"] == pytest.approx(0.055)
    # two differences 0.05, 0.06: std 0.0070711, t(0.975, 1) = 12.706205
    assert up["delta_ci95_high"] == pytest.approx(0.055 + 12.706205 * 0.005, rel=1e-6)
    alone = board[board["setting"] == "t"].iloc[0]
    assert alone["paired_seeds"] == 0 and np.isnan(alone["delta_mean"]) and alone["verdict"] == "n/a"


def test_a_method_name_covers_its_variants():
    runs = pd.DataFrame({"method_label": ["fedlps-variant-paper", "fedlps-variant-reference", "fedavg"],
                         "method_title": ["FedLPS (paper)", "FedLPS (reference)", "FedAvg"],
                         "method": ["fedlps", "fedlps", "fedavg"]})
    assert leaderboard.resolve(runs, "FedLPS", "--claims", single=False) == [
        "fedlps-variant-paper", "fedlps-variant-reference"]
    assert leaderboard.resolve(runs, "fedlps (paper)", "--baseline", single=True) == ["fedlps-variant-paper"]
    assert leaderboard.resolve(runs, "fedavg", "--baseline", single=True) == ["fedavg"]
    with pytest.raises(leaderboard.UserError, match="--baseline: 'fedlps' names 2 methods"):
        leaderboard.resolve(runs, "fedlps", "--baseline", single=True)


def test_runs_without_the_new_columns(tmp_path):
    write_runs(tmp_path, new_columns=False)
    board = leaderboard.build(tmp_path, baseline="base")
    up = row(board, "up")
    assert up["delta_mean"] == pytest.approx(0.06) and up["method_title"] == "up"
    assert np.isnan(up["last10_acc_global_mean"]) and up["verdict_global"] == "n/a"
    assert "global last-10 %" not in leaderboard.format_table(board)
    table = leaderboard.claims(tmp_path, "up")
    assert set(table["view"]) == {"clients"} and set(table["test_sets"]) == {"mirrored"}


def test_claims_table(runs, capsys):
    assert main(["leaderboard", str(runs), "--claims", "Up (paper)"]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(runs / "claims.csv")
    assert len(table) == 3 * 2 * 2  # 3 other methods x 2 views x 2 test-set constructions
    assert set(table["method"]) == {"Up (paper)"} and set(table["other"]) == {"Base (reference)", "Down", "Same"}
    vs = table.set_index(["other", "view", "test_sets"])
    base = vs.loc[("Base (reference)", "clients", "mirrored")]
    gain = ci([5.0, 6.0, 7.0])  # points
    assert (base["gain_pts_mean"], base["gain_pts_ci95_low"], base["gain_pts_ci95_high"]) == (
        pytest.approx(6.0), pytest.approx(gain[2], rel=1e-5), pytest.approx(gain[3], rel=1e-5))
    rel = ci(100 * (METHODS["up"][1] / BASE - 1))
    assert base["gain_rel_pct_mean"] == pytest.approx(rel[0], rel=1e-5) and base["accuracy_verdict"] == "better"
    assert vs.loc[("Base (reference)", "global", "authors"), "accuracy_verdict"] == "worse"
    assert vs.loc[("Same", "clients", "mirrored"), "accuracy_verdict"] == "inconclusive"  # +3, +9, +6 points
    # time reduction 100 (1 - T_up / T_other): vs base 75, 80, 75 -> [69.50, 83.84], above 68.8: holds
    t = ci([75.0, 80.0, 75.0])
    assert (base["time_reduction_pct_mean"], base["time_reduction_pct_ci95_low"]) == (
        pytest.approx(t[0], rel=1e-5), pytest.approx(t[2], rel=1e-5))
    assert base["time_claim"] == "holds"
    same = vs.loc[("Same", "clients", "mirrored")]  # 75, 81.82, 72.22 -> [64.1, 88.6]: uncertain
    assert same["time_reduction_pct_ci95_low"] < 68.8 < same["time_reduction_pct_ci95_high"]
    assert same["time_claim"] == "uncertain"
    assert "claims: " + SETTING_TITLE in printed and "holds" in printed
    fails = leaderboard.claims(runs, "same").set_index(["other", "view", "test_sets"])
    assert fails.loc[("Base (reference)", "clients", "mirrored"), "time_claim"] == "fails"  # 0, -10, +10 %


def test_plots_read_as_a_papers_figures(runs):
    import matplotlib.pyplot as plt

    from harness.plots import _band, figures, plot

    seen = {}
    for name, fig in figures(runs):
        seen[name] = (fig._suptitle.get_text(), [ax for ax in fig.axes])
        if name == "s_pareto.png":
            left, right = fig.axes
            assert left.get_xscale() == "log" and right.get_title() == "test sets: authors' tests"
            assert sorted(t.get_text() for t in left.texts) == ["Base (reference)", "Down", "Same", "Up (paper)"]
            # up is faster and more accurate than every other: the front is up alone
            filled = [line.get_markerfacecolor() != "white" for line in left.lines if line.get_marker() == "o"]
            assert sum(filled) == 1
        elif name != "s_running_time.png":
            left, right = fig.axes
            assert [t.get_text() for t in left.get_legend().get_texts()] == [
                "Base (reference)", "Down", "Same", "Up (paper)"]
            assert right.get_title() == "the global model, on each client's test set"
            assert len(left.collections) == 4  # a band per method
        else:
            assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["Base (reference)", "Down", "Same",
                                                                            "Up (paper)"]
        plt.close(fig)
    assert set(seen) == {"s_acc_vs_time.png", "s_acc_vs_round.png", "s_running_time.png", "s_pareto.png"}
    assert seen["s_pareto.png"][0].startswith(f"Accuracy against running time, {SETTING_TITLE}, CNN\nerror bars: 95 % "
                                              f"confidence interval over 3 seeds")
    title = seen["s_acc_vs_round.png"][0]
    assert title.startswith(SETTING_TITLE + ", CNN\nmean of 3 seeds; band: 95 % confidence interval of the mean")
    assert seen["s_running_time.png"][0].startswith(f"Running time, {SETTING_TITLE}, CNN")
    files = plot(runs)
    assert sorted(f.name for f in files) == sorted(seen) and all(f.stat().st_size > 10_000 for f in files)
    # the band is the 95 % t-interval of the mean over seeds, not their range
    x = np.arange(3.0)
    grid, mean, low, high = _band([(x, np.full(3, v)) for v in (80.0, 82.0, 84.0)])
    assert mean == pytest.approx(np.full(len(grid), 82.0))
    assert high - mean == pytest.approx(np.full(len(grid), T2 * 2.0 / math.sqrt(3)), rel=1e-6)
    assert _band([(x, np.ones(3))])[2] is None


def test_the_pareto_front():
    from harness.plots import pareto_front

    # (time, accuracy): a is fastest; b is slower and more accurate; c is dominated by b; d ties b's
    # accuracy but is slower; e is the most accurate; f has no accuracy
    time = [1.0, 2.0, 3.0, 4.0, 5.0, 0.5]
    acc = [80.0, 90.0, 85.0, 90.0, 95.0, math.nan]
    assert pareto_front(time, acc).tolist() == [True, True, False, False, True, False]
    assert pareto_front([1.0, 1.0], [90.0, 90.0]).tolist() == [True, True]  # equal points dominate neither


def test_plots_without_titles_or_the_global_view(tmp_path):
    import matplotlib.pyplot as plt

    from harness.plots import figures

    write_runs(tmp_path, seeds=(1,), new_columns=False)
    for name, fig in figures(tmp_path):
        if name == "s_acc_vs_time.png":
            assert len(fig.axes) == 1 and fig._suptitle.get_text() == "s, CNN"
            assert fig.axes[0].get_title() == "one seed" and not fig.axes[0].collections
            assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["base", "down", "same", "up"]
        plt.close(fig)


def test_p_values_and_holms_adjustment():
    # Student t with 2 degrees of freedom: P(|T| > t) = 1 - t / sqrt(t^2 + 2)
    t = 6.0 / (1.0 / math.sqrt(3))  # differences 5, 6, 7: mean 6, std 1
    assert leaderboard.paired_p([5.0, 6.0, 7.0]) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert math.isnan(leaderboard.paired_p([1.0])) and leaderboard.paired_p([2.0, 2.0]) == 0.0
    assert leaderboard.paired_p([0.0, 0.0, 0.0]) == 1.0
    # m = 4 (NaN not counted): sorted 0.005 0.01 0.03 0.04 -> 4x, 3x, 2x, 1x, then the running maximum
    adjusted = leaderboard.holm([0.01, 0.04, 0.03, math.nan, 0.005, ])
    assert adjusted[[0, 1, 2, 4]] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adjusted[3])
    assert leaderboard.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_claims_carry_p_values_over_the_whole_table(runs, capsys):
    assert main(["leaderboard", str(runs), "--claims", "up"]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(runs / "claims.csv")
    assert "Holm: adjusted over the 12 comparisons of this table" in printed
    base = table.set_index(["other", "view", "test_sets"]).loc[("Base (reference)", "clients", "mirrored")]
    t = 6.0 * math.sqrt(3)  # gains 5, 6, 7 points
    assert base["gain_p_value"] == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-5)
    assert table["gain_p_holm"].to_numpy() == pytest.approx(leaderboard.holm(table["gain_p_value"]), rel=1e-5)
    assert (table["gain_p_holm"] >= table["gain_p_value"] - 1e-12).all()
    # the interval excludes 0 exactly when p < 0.05; after Holm, only what survives the adjustment
    assert ((table["gain_p_value"] < 0.05) == table["accuracy_verdict"].isin(["better", "worse"])).all()
    survives = table["gain_p_holm"] < 0.05
    assert (table.loc[~survives, "accuracy_verdict_holm"] == "inconclusive").all()
    assert (table.loc[survives, "accuracy_verdict_holm"] == table.loc[survives, "accuracy_verdict"]).all()


def test_the_printed_table_says_how_many_seeds(tmp_path):
    write_runs(tmp_path, seeds=(1, 2, 3))
    write_runs(tmp_path, {"late": ("Late", BASE, [100.0, 100.0], BASE)}, seeds=(1, 2))
    text = leaderboard.format_table(leaderboard.build(tmp_path))
    assert "95 % intervals: Student t over 2 to 3 seeds" in text


def test_markdown_tables(runs, capsys):
    assert main(["leaderboard", str(runs), "--baseline", "base", "--claims", "up", "--markdown"]) == 0
    out, err = capsys.readouterr()
    board = leaderboard.build(runs, baseline="base")
    assert out == leaderboard.markdown(board, leaderboard.claims(runs, "up")) and "written: " in err
    lines = out.splitlines()
    assert lines[0] == (f"**{SETTING_TITLE}**, CNN: last-10 accuracy % [95 % CI, Student t over 3 seeds]; simulated "
                        f"time, TFLOPs and MB up: means over seeds; Δ: paired seed by seed against Base (reference)")
    # like for like first: the authors' test sets (the paper's protocol), then the mirrored ones
    assert lines[2] == ("| method | seeds | last-10 acc %, authors' tests, client models | authors' tests, global model "
                        "| mirrored, client models | mirrored, global model | Δ pts, authors' tests, client models "
                        "[95% CI] | time Δ % [95% CI] | simulated time s | TFLOPs | MB up |")
    # up: 0.85, 0.88, 0.91 (std 0.03); paired +5, +6, +7 points; time -75, -80, -75 %
    up = next(line for line in lines if line.startswith("| Up (paper) | 3 |"))
    # global view 0.66, 0.67, 0.68; the authors' test sets 5 points lower
    assert up == ("| Up (paper) | 3 | 83.00 [75.55, 90.45] | 62.00 [59.52, 64.48] | 88.00 [80.55, 95.45] | "
                  "67.00 [64.52, 69.48] | +6.00 [+3.52, +8.48] better | -76.67 [-83.84, -69.50] better | 25.67 | "
                  "1.000 | 1.0 |")
    assert "| baseline | baseline |" in next(line for line in lines if line.startswith("| Base (reference) |"))
    row = next(line for line in lines if line.startswith("| Base (reference) | +6.00"))
    t = 6.0 * math.sqrt(3)
    assert f"better (p {1 - t / math.sqrt(t * t + 2):.3f}, Holm " in row and row.endswith("| 76.7 [69.5, 83.8] holds |")
    assert lines[-1] == "p: two-sided paired t-test over seeds; Holm: adjusted over the 12 comparisons of this claims table."
    # a label with a pipe stays in its cell
    assert leaderboard._md(["a"], [["x|y"]]).splitlines()[-1] == "| x\\|y |"
    assert main(["leaderboard", str(runs), "--markdown", str(runs / "tables.md")]) == 0
    assert (runs / "tables.md").read_text() == leaderboard.markdown(leaderboard.build(runs))
    assert "written: " in capsys.readouterr().out


README = Path(__file__).resolve().parents[1] / "README.md"
MARKED = re.compile(r"<!-- table: (fedbench leaderboard [^>]*?) -->\n(.*?)<!-- /table -->", re.S)


def readme_tables():
    return [pytest.param(cmd, text, id=cmd.split()[2]) for cmd, text in MARKED.findall(README.read_text())]


def _args(cmd):
    from harness.cli import build_parser

    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert args.markdown is not None, f"{cmd}: a README table is made with --markdown"
    return args, README.parent / args.dir


def test_the_readme_marks_its_tables():
    assert {p.values[0].split()[2] for p in readme_tables()} >= {
        "results/paper_mnist", "results/fedlps_ablation", "results/deadlines", "results/quickstart"}


@pytest.mark.parametrize("cmd, text", readme_tables())
def test_readme_tables_equal_the_committed_parquet_files(cmd, text):
    args, folder = _args(cmd)
    if not list(folder.glob("*/summary.parquet")):
        pytest.skip(f"{args.dir} holds no Parquet files (results/.gitignore keeps only its CSVs and plots); "
                    f"its README table is checked against its committed CSVs instead")
    board = leaderboard.build(folder, args.target_acc, args.baseline)
    table = leaderboard.claims(folder, args.claims) if args.claims else None
    assert text == leaderboard.markdown(board, table), f"README table of `{cmd}` differs: rerun it and paste"


@pytest.mark.parametrize("cmd, text", readme_tables())
def test_readme_tables_equal_the_committed_csv_files(cmd, text):
    args, folder = _args(cmd)
    if list(folder.glob("*/summary.parquet")):
        pytest.skip(f"{args.dir} holds its Parquet files: its README table is checked against those")
    board = leaderboard.read_saved(folder / Path(args.output or "leaderboard.csv").name)
    base = board[board["verdict"] == "baseline"] if "verdict" in board else board.iloc[:0]
    if args.baseline is None:
        assert "baseline" not in board, f"{cmd}: the committed leaderboard has a baseline; name it in the command"
    else:
        assert len(base) == 1 and args.baseline in (base["method"].iloc[0], base["method_title"].iloc[0])
    table = leaderboard.read_saved(folder / "claims.csv") if args.claims else None
    assert text == leaderboard.markdown(board, table), f"README table of `{cmd}` differs from {folder}'s CSVs"
