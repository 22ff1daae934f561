"""The `fedbench` command line."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from harness.errors import UserError

log = logging.getLogger("fedbench")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, like every other input error
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_run(sub):
    p = sub.add_parser(
        "run", help="run an experiment (or each point of its grid) locally, one after another",
        description="Run the experiment in CONFIG; a config with a `grid` runs every grid point in turn. "
                    "Writes one folder per experiment under the output folder, each holding rounds.parquet, "
                    "clients.parquet, summary.parquet and config.yaml, then prints a summary table.")
    p.add_argument("config", help="YAML experiment or sweep file (e.g. sweeps/quickstart.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted (e.g. --set method.name=heterofl --set rounds=5); "
                        "on a key that the grid varies it replaces that axis by the one value")
    p.add_argument("--out", help="output folder or URI such as s3://bucket/prefix (default: the config's `out`, "
                                 "results/runs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace experiment folders that exist already (their files are removed first)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedbench", description="Benchmark harness for heterogeneous federated learning: "
                     "FedLPS, HeteroFL, FedRolex, PruneFL and FedAvg on many simulated clients, on Ray.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_run(sub)
    b = sub.add_parser(
        "bench", help="seconds per round: serial loop vs. batched clients vs. a process pool (the hardware limit) "
                      "vs. the Ray engine",
        description="Run one fixed workload (mnist: the paper's MNIST CNN on mnist-5k, FedAvg, batch 10; cifar: "
                    "VGG-11 with static BN on CIFAR-10, or on a synthetic CIFAR-shaped data set when CIFAR-10 is not "
                    "under ~/.cache/fedbench/data, FedAvg, batch 20; 1 local epoch unless --epochs) on the serial "
                    "engine, on the serial engine with batched clients (one vmapped program per model shape), on a "
                    "multiprocessing pool doing exactly the same training (the hardware limit) and on the Ray engine, "
                    "and report median seconds per round after a warm-up round and the peak resident memory of the "
                    "whole process tree.")
    b.add_argument("--workload", choices=["mnist", "cifar", "synthetic"], default="mnist",
                   help="what to train (default mnist); synthetic: the cross-device scale benchmark instead: one "
                        "experiment on Synthetic(0.5, 0.5) clients generated on demand (any --clients), FedProx's "
                        "logistic regression, on the Ray engine, reporting start-up time, peak PSS of the process "
                        "tree and the round's time outside client training")
    b.add_argument("--method", choices=["fedavg", "fedprox", "fedlps"], default="fedavg",
                   help="the method (default fedavg); fedprox (mnist, cifar): FedProx, mu 0.01, whose proximal "
                        "term takes the path of the methods with their own local rule (the plain loop adds it "
                        "too); fedlps (synthetic): the paper variant")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where to train (default cpu); with cuda the Ray executors share one GPU in equal parts")
    b.add_argument("--epochs", type=int, default=1, help="local epochs per client and round (default 1)")
    b.add_argument("--clients-per-round", type=int, default=10, help="clients sampled per round (default 10)")
    b.add_argument("--rounds", type=int, default=20, help="timed rounds per execution (default 20)")
    b.add_argument("--clients", type=int, default=100, help="clients in total (default 100)")
    b.add_argument("--executors", type=int, default=2, help="Ray executors and pool processes (default 2)")
    b.add_argument("--cpus-per-executor", type=float, default=1.0, help="CPU quota per executor (default 1)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    sw = sub.add_parser(
        "sweep", help="run a config's grid as Ray Tune trials (resumable), then its leaderboard and plots",
        description="Run every grid point of FILE as one Ray Tune trial; each trial reserves a placement group "
                    "of [driver bundle] + [executor bundle] x tune.executors_per_trial. Running it again on the same "
                    "output folder (or with --resume) continues an interrupted sweep: finished trials are kept, "
                    "unfinished ones continue from their last checkpoint, new grid points run, and a changed "
                    "experiment config stops it (exit 2). Ends with the leaderboard (CSV) and plots.")
    sw.add_argument("config", help="YAML sweep file (base experiment + grid + tune settings)")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the base experiment or replace a grid axis, as for `run`")
    sw.add_argument("--out", help="output folder or URI such as s3://bucket/prefix or gs://bucket/prefix "
                                  "(default: results/<sweep name>)")
    sw.add_argument("--name", help="sweep name (default: the file's name without .yaml)")
    sw.add_argument("--resume", action="store_true",
                    help="resume an earlier run of this sweep; required for a folder made by another user, on "
                         "another machine or at another location (resuming loads its saved state)")
    sw.add_argument("--plots-dir", help="local folder for the plots (default: <out>/plots)")
    sw.add_argument("--target-acc", type=float, help="target accuracy for the leaderboard's time-to-accuracy")
    lb = sub.add_parser("leaderboard", help="one row per (setting, method) over seeds, best first",
                        description="Read every finished experiment under DIR and print one row per (setting, "
                                    "method): seeds, the mean accuracy of the last 10 evaluated rounds (mean, std "
                                    "and 95% t-interval over seeds; also for the global model and the authors' test "
                                    "sets where recorded), final and best accuracy, simulated time to the target "
                                    "accuracy, total simulated time, FLOPs, MB up and down, wall time. The CSV holds "
                                    "every column (results/README.md).")
    lb.add_argument("dir", help="results folder or URI (of `fedbench run` or `fedbench sweep`)")
    lb.add_argument("-o", "--output", help="write the leaderboard as CSV here (default: DIR/leaderboard.csv)")
    lb.add_argument("--target-acc", type=float,
                    help="accuracy (fraction) for time-to-target; default: per setting, the lowest best accuracy "
                         "of its runs, the highest level every run reaches")
    lb.add_argument("--baseline", metavar="LABEL",
                    help="add paired differences, seed by seed, against this method (a method label such as "
                         "fedlps-variant-paper, or its title): accuracy in points and percent, total simulated time "
                         "in percent, each with a 95%% interval and a verdict")
    lb.add_argument("--claims", metavar="LABEL",
                    help="check the paper's claims for this method (label, title or name, e.g. fedlps) against "
                         "every other method: write DIR/claims.csv and print it")
    lb.add_argument("--markdown", nargs="?", const="-", metavar="FILE",
                    help="also write the tables as Markdown (the README's verdict tables) to FILE, or print them "
                         "instead of the plain tables when FILE is left out")
    rp = sub.add_parser("report", help="one self-contained HTML page: leaderboards, claims, figures, provenance",
                        description="Write one HTML file (styles, scripts and figures inline; nothing is fetched "
                                    "when it is opened) with, per setting, the leaderboard (sortable, with a filter "
                                    "box), the claims table, the figures as SVG, the per-client spread and where the "
                                    "results come from. Reads the Parquet files under DIR; a folder that holds only "
                                    "a leaderboard CSV (and plots) gives a page of what it holds.")
    rp.add_argument("dir", help="results folder or URI")
    rp.add_argument("-o", "--output", help="the HTML file, a path or URI (default: DIR/report.html)")
    rp.add_argument("--baseline", metavar="LABEL",
                    help="paired differences against this method (default: the baseline of DIR/leaderboard.csv, "
                         "if it has one)")
    rp.add_argument("--claims", metavar="LABEL", action="append",
                    help="the claims table for this method (repeatable; default: the methods of DIR/claims.csv, "
                         "if there is one)")
    rp.add_argument("--target-acc", type=float, help="accuracy (fraction) for time-to-target")
    pl = sub.add_parser("plot", help="PNG figures: accuracy vs simulated time and vs round, running time, accuracy "
                                     "vs running time with its Pareto front",
                        description="Write, per setting, accuracy against simulated time and against round (a line "
                                    "per method, a band over seeds), a bar chart of running time and last-10 accuracy "
                                    "(95 % interval) against total simulated time (log scale), one point per method, "
                                    "the Pareto front marked.")
    pl.add_argument("dir", help="results folder or URI")
    pl.add_argument("-o", "--output", "--plots-dir", dest="output",
                    help="folder (or URI) for the PNG files (default: DIR/plots)")
    sub.add_parser("methods", help="list the available methods and their parameters")
    d = sub.add_parser("data", help="data set tools: leaf2npz converts LEAF's JSON into an npz with client ids")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="TOOL", parser_class=_Parser)
    leaf = dsub.add_parser(
        "leaf2npz", help="LEAF JSON (DIR/train/*.json, DIR/test/*.json) -> npz for data.split kind natural",
        description="Convert LEAF's output for an image data set (FEMNIST, CelebA-style pixel arrays) into an npz "
                    "file holding x_train, y_train, x_test, y_test (uint8 images), client_train and client_test "
                    "(each sample's client id) and users; use it with data.dataset=npz:OUT and data.split.kind=natural.")
    leaf.add_argument("dir", help="LEAF data folder holding train/ and test/")
    leaf.add_argument("out", help="the npz file to write")
    leaf.add_argument("--shape", help="image shape HxW or HxWxC (default: square, 1 or 3 channels)")
    return parser


def cmd_run(args) -> int:
    from harness import config, storage
    from harness.validation import validate

    experiments, _ = config.load(args.config, args.overrides, args.out)
    experiments = [config.with_absolute_paths(cfg) for cfg in experiments]
    specs = {cfg.name: validate(cfg) for cfg in experiments}  # every input error surfaces before anything is written
    outs = {cfg.out: storage.resolve(cfg.out) for cfg in experiments}
    with contextlib.ExitStack() as held:
        for out in outs.values():  # one writer per output folder, checked before anything is touched
            held.enter_context(storage.Lease(out, _command_line()))
        return _run_experiments(experiments, specs, outs, args)


def _command_line() -> str:
    return " ".join(["fedbench", *sys.argv[1:]])[:200]


def _run_experiments(experiments, specs, outs, args) -> int:
    from harness.experiment import ClientCodeError, Experiment
    from harness.report import print_summary

    folders = {cfg.name: outs[cfg.out] / cfg.name for cfg in experiments}
    existing = [str(f) for f in folders.values() if f.exists()]
    if existing and not args.overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(existing[0], f"exists already{more}; pass --overwrite to replace, or use another --out")
    summaries, failed = [], 0
    for cfg in experiments:
        # --overwrite: the old files go first, the summary before the rest, so a failed rerun never
        # leaves new rows beside an old summary and no half-removed folder counts as finished
        (folders[cfg.name] / "summary.parquet").delete()
        folders[cfg.name].delete()
        try:
            summary = Experiment(specs[cfg.name], progress=not args.quiet).run()
        except UserError:
            raise
        except ClientCodeError as e:  # the method's bug, with the client's traceback
            failed += 1
            print(f"fedbench: {e}", file=sys.stderr)
            continue
        except Exception as e:  # noqa: BLE001 - one failed experiment must not lose the others
            failed += 1
            if log.isEnabledFor(logging.INFO):
                log.exception("experiment %s failed", cfg.name)
            print(f"fedbench: experiment {cfg.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        summaries.append(summary)
        if summary["status"] == "failed":
            failed += 1
            print(f"fedbench: experiment {cfg.name} failed: {summary['status_note']}", file=sys.stderr)
        elif summary["status"] == "degraded":
            print(f"fedbench: experiment {cfg.name} degraded: {summary['status_note']}", file=sys.stderr)
    if summaries:
        print_summary(summaries, experiments[0].out)
    return 1 if failed else 0


def cmd_data(args) -> int:
    from harness.leaf import leaf_to_npz

    counts = leaf_to_npz(args.dir, args.out, args.shape)
    print(f"{args.out}: {counts['users']} clients, {counts['train']} training and {counts['test']} test samples")
    return 0


def cmd_methods(args) -> int:
    from harness.registry import available_methods, method_class

    for name in available_methods():
        cls = method_class(name)
        params = ", ".join(f"{k}={f.get_default(call_default_factory=True)!r}"
                           for k, f in cls.Params.model_fields.items()) or "no parameters"
        print(f"{name:10s} {params}")
    return 0


def cmd_bench(args) -> int:
    from harness.bench import SYNTHETIC_CIFAR, print_bench, print_scale, require_device, run_bench, run_scale_bench

    for flag in ("clients_per_round", "rounds", "clients", "executors", "epochs"):
        if getattr(args, flag) <= 0:
            raise UserError("--" + flag.replace("_", "-"), "must be a positive integer")
    if args.clients_per_round > args.clients:
        raise UserError("--clients-per-round", f"{args.clients_per_round} exceeds --clients {args.clients}")
    if args.workload == "mnist" and args.clients > 2000:
        raise UserError("--clients", "the embedded 4000 training images allow at most 2000 clients of 2 images")
    if args.workload == "cifar" and args.clients > SYNTHETIC_CIFAR["train"] // 2:
        raise UserError("--clients", f"the cifar workload allows at most {SYNTHETIC_CIFAR['train'] // 2} clients")
    offered = ("fedavg", "fedlps") if args.workload == "synthetic" else ("fedavg", "fedprox")
    if args.method not in offered:
        raise UserError("--method", f"{args.method} is not offered with --workload {args.workload}")
    if args.workload == "synthetic":
        if args.rounds < 2:
            raise UserError("--rounds", "the synthetic workload times the rounds after round 0: give at least 2")
        if args.device != "cpu":
            raise UserError("--device", "the synthetic workload runs on the CPU")
        result = run_scale_bench(args.clients, args.clients_per_round, args.rounds, args.method, args.executors,
                                 args.cpus_per_executor)
        print_scale(result, args.json)
        return 0
    require_device(args.device)
    result = run_bench(args.clients_per_round, args.rounds, args.clients, args.executors, args.cpus_per_executor,
                       args.workload, args.device, args.epochs, args.method)
    print_bench(result, args.json)
    return 0


def _target(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise UserError("--target-acc", f"must be a fraction in (0, 1], got {value}")
    return value


def _command(args) -> str:
    """The command line that is running, as a shell would take it."""
    import shlex

    return shlex.join(["fedbench", *args.argv])


def _report(folder, output: str | None, target: float | None, plots_dir: str | None = None,
            command: str | None = None) -> None:
    from harness import html_report, leaderboard
    from harness.plots import plot

    board = leaderboard.build(folder, target)
    print(leaderboard.format_table(board))
    csv = leaderboard.write(board, output or folder / "leaderboard.csv")
    figures = plot(folder, plots_dir, say=False)
    page = html_report.write(folder, target_acc=target, command=command)
    print(f"\nleaderboard: {csv}\nplots: {', '.join(str(f) for f in figures)}\nreport: {page}")


def cmd_sweep(args) -> int:
    from harness import config, storage
    from harness.sweep import SweepFailed, SweepInterrupted, run_sweep
    from harness.validation import validate

    target = _target(args.target_acc)
    experiments, sweep = config.load(args.config, args.overrides)
    experiments = [config.with_absolute_paths(cfg) for cfg in experiments]
    for cfg in experiments:
        validate(cfg)
    name = args.name or Path(args.config).stem
    try:
        config.check_name(name)
    except ValueError as e:
        raise UserError("--name" if args.name else str(args.config), f"sweep name {name!r}: {e}") from None
    out = storage.resolve(args.out or Path("results") / name)
    failed = None
    with storage.Lease(out, _command_line()):
        try:
            run_sweep(experiments, sweep, out, name, resume=args.resume)
        except SweepFailed as e:
            failed = e
            print(f"fedbench: {e}", file=sys.stderr)
        except SweepInterrupted as e:
            print(f"fedbench: {e}", file=sys.stderr)
            return 130
        try:
            _report(out, None, target, args.plots_dir, _command(args))
        except UserError as e:
            if failed is None:
                raise
            print(f"fedbench: {e}", file=sys.stderr)  # nothing to report: every experiment failed
    return 1 if failed else 0


def cmd_leaderboard(args) -> int:
    from harness import leaderboard, storage

    board = leaderboard.build(args.dir, _target(args.target_acc), args.baseline)
    table = leaderboard.claims(args.dir, args.claims) if args.claims is not None else None
    root = storage.resolve(args.dir)
    if args.output is not None and storage.resolve(args.output).is_dir():
        raise UserError("-o", f"{args.output} is a folder; give the CSV file's name (e.g. {args.output}/leaderboard.csv)")
    text = leaderboard.markdown(board, table) if args.markdown is not None else None
    if args.markdown == "-":
        print(text, end="")
    else:
        print(leaderboard.format_table(board))
        if table is not None:
            print("\n" + leaderboard.format_claims(table))
    written = [leaderboard.write(board, args.output or root / "leaderboard.csv")]
    if table is not None:
        written.append(leaderboard.write(table, root / "claims.csv"))
    if args.markdown not in (None, "-"):
        where = storage.resolve(args.markdown)
        where.write_bytes(text.encode())
        written.append(where)
    print(f"\nwritten: {', '.join(map(str, written))}", file=sys.stderr if args.markdown == "-" else sys.stdout)
    return 0


def cmd_report(args) -> int:
    from harness import html_report

    print(html_report.write(args.dir, args.output, baseline=args.baseline, claims=args.claims,
                            target_acc=_target(args.target_acc), command=_command(args)))
    return 0


def cmd_plot(args) -> int:
    from harness.plots import plot

    for path in plot(args.dir, args.output):
        print(path)
    return 0


COMMANDS = {"run": cmd_run, "bench": cmd_bench, "sweep": cmd_sweep, "leaderboard": cmd_leaderboard,
            "plot": cmd_plot, "report": cmd_report, "methods": cmd_methods, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"fedbench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written (read-only, full, a file in the way)
        where = e.filename or "fedbench"
        print(f"fedbench: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
