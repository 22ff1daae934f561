"""The `fedbench` command line."""
from __future__ import annotations

import argparse
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
    p.add_argument("--out", help="output folder (default: the config's `out`, results/runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedbench", description="Benchmark harness for heterogeneous federated learning: "
                     "FedLPS, HeteroFL, FedRolex, PruneFL and FedAvg on many simulated clients, on Ray.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_run(sub)
    b = sub.add_parser(
        "bench", help="seconds per round: serial loop vs. a process pool (the hardware limit) vs. the Ray engine",
        description="Run one fixed workload (the paper's MNIST CNN on mnist-5k, FedAvg, batch 10, 1 local epoch) "
                    "on the serial engine, on a multiprocessing pool doing exactly the same training (the hardware "
                    "limit) and on the Ray engine, and report median seconds per round after a warm-up round and "
                    "the peak resident memory of the whole process tree.")
    b.add_argument("--clients-per-round", type=int, default=10, help="clients sampled per round (default 10)")
    b.add_argument("--rounds", type=int, default=10, help="timed rounds per execution (default 10)")
    b.add_argument("--clients", type=int, default=100, help="clients in total (default 100)")
    b.add_argument("--executors", type=int, default=2, help="Ray executors and pool processes (default 2)")
    b.add_argument("--cpus-per-executor", type=float, default=1.0, help="CPU quota per executor (default 1)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("methods", help="list the available methods and their parameters")
    return parser


def cmd_run(args) -> int:
    from harness import config
    from harness.experiment import Experiment
    from harness.report import print_summary
    from harness.workbench import Workbench

    experiments, _ = config.load(args.config, args.overrides, args.out)
    for cfg in experiments:  # every input error surfaces before anything is written
        Workbench(cfg)
    summaries, failed = [], 0
    for cfg in experiments:
        try:
            summaries.append(Experiment(cfg, progress=not args.quiet).run())
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - one failed experiment must not lose the others
            failed += 1
            log.error("experiment %s failed: %s: %s", cfg.name, type(e).__name__, e, exc_info=log.isEnabledFor(logging.INFO))
            print(f"fedbench: experiment {cfg.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
    if summaries:
        print_summary(summaries, Path(experiments[0].out))
    return 1 if failed else 0


def cmd_methods(args) -> int:
    from harness.strategy import available_methods, method_class

    for name in available_methods():
        cls = method_class(name)
        params = ", ".join(f"{k}={f.default!r}" for k, f in cls.Params.model_fields.items()) or "no parameters"
        print(f"{name:10s} {params}")
    return 0


def cmd_bench(args) -> int:
    from harness.bench import print_bench, run_bench

    for flag in ("clients_per_round", "rounds", "clients", "executors"):
        if getattr(args, flag) <= 0:
            raise UserError("--" + flag.replace("_", "-"), "must be a positive integer")
    if args.clients_per_round > args.clients:
        raise UserError("--clients-per-round", f"{args.clients_per_round} exceeds --clients {args.clients}")
    if args.clients > 2000:
        raise UserError("--clients", "the embedded 4000 training images allow at most 2000 clients of 2 images")
    result = run_bench(args.clients_per_round, args.rounds, args.clients, args.executors, args.cpus_per_executor)
    print_bench(result, args.json)
    return 0


COMMANDS = {"run": cmd_run, "bench": cmd_bench, "methods": cmd_methods}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"fedbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
