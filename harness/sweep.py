"""`fedbench sweep`: a grid of experiments as Ray Tune trials, resumable.

One trial per experiment. A trial reserves `tune.PlacementGroupFactory([driver bundle] +
[executor bundle] * k)`; its Ray engine puts its k executors into those bundles. Every evaluated
round is reported to Tune. `<out>` is a local folder or a URI (harness/storage.py); each experiment
writes its Parquet files to `<out>/<experiment>/` as `fedbench run` does, and the sweep keeps its own
state in `<out>/_tune/<sweep name>/`:

    sweep.json                 who made the sweep, where, and every experiment's resolved config
    checkpoints/<exp>.pt       the latest checkpoint of each unfinished experiment (every
                               `checkpoint_every` rounds: all federated state, tensors and plain data
                               only, read with torch.load(weights_only=True))
    run-1/, run-2/, ...        Tune's storage (storage_path) of each invocation: its loggers' output

Every invocation starts a fresh Tune run of the experiments that are not finished; each trial
continues from its checkpoint when there is one (after a driver was interrupted, or inside one run
when Tune retries a trial whose node died). So a rerun keeps the finished experiments, continues the
unfinished ones and runs new ones; an experiment whose config changed stops it (exit 2). Tune's own
pickled experiment state is never loaded. A sweep folder made by another user, on another machine or
at another location (a copy) is resumed only with --resume.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from harness import storage
from harness.config import ExperimentConfig, SweepFile
from harness.errors import UserError
from harness.spec import resolve

log = logging.getLogger(__name__)

MANIFEST = "sweep.json"
# Passed from the sweep's driver to its trials on every node (no secrets: credentials come from
# each node's own environment or instance role).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
REPORTED = ("round", "acc_clients_mean", "acc_global", "train_loss", "sim_total_s", "flops_total",
            "bytes_up_total", "bytes_down_total", "wall_total_s", "keep_ratio_mean")  # and the method's own round columns


def trial_engine(cfg: ExperimentConfig, sweep: SweepFile) -> ExperimentConfig:
    """The experiment as a trial runs it: the Ray engine with the sweep's executors and quota (and
    the experiment's own per-tier executor groups, if any)."""
    t = sweep.tune
    engine = cfg.engine.model_copy(update=dict(backend="ray", executors=t.executors_per_trial,
                                               cpus_per_executor=t.cpus_per_executor,
                                               gpus_per_executor=t.gpus_per_executor))
    return cfg.model_copy(update=dict(engine=engine))


def trial_resources(cfg: ExperimentConfig, driver_cpus: float) -> list[dict[str, float]]:
    """[driver bundle] + one bundle per executor of every pool of the trial's engine."""
    from harness.ray_engine import plan_pools

    bundles = [{"CPU": driver_cpus}]
    for pool in plan_pools(cfg.engine, [t.name for t in cfg.devices.tiers], math.inf, math.inf):
        bundle = {"CPU": pool.cpus, **({"GPU": pool.gpus} if pool.gpus else {})}
        bundles += [dict(bundle) for _ in range(pool.executors)]
    return bundles


def check_fits(bundles: list[dict[str, float]]) -> None:
    """Fail at once, instead of leaving trials pending forever, when a trial cannot fit the cluster."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    need = {r: sum(b.get(r, 0) for b in bundles) for r in ("CPU", "GPU")}
    for r, amount in need.items():
        if amount > total.get(r, 0) + 1e-9:
            raise UserError("tune", f"one trial asks for {amount:g} {r}s ({len(bundles) - 1} executors: "
                                    f"{sum(b.get(r, 0) for b in bundles[1:]):g}, driver: {bundles[0].get(r, 0):g}), "
                                    f"but the cluster has {total.get(r, 0):g}")
    for b in bundles:
        if not any(all(node.get(r, 0) + 1e-9 >= v for r, v in b.items()) for node in nodes):
            raise UserError("tune", f"no node of the cluster can hold a bundle of {b}")


def _metrics(row: dict[str, Any], method_columns) -> dict[str, Any]:
    """What a trial reports to Tune each round: the headline columns and the method's own."""
    return {k: row[k] for k in (*REPORTED, *method_columns)
            if isinstance(row.get(k), (int, float)) and not (isinstance(row[k], float) and math.isnan(row[k]))}


def run_trial(config: dict[str, Any], experiments: dict[str, Any], checkpoints: str,
              env: dict[str, str], threads: int) -> None:
    """The Tune trainable: the federated experiment named by the trial's `experiment` parameter,
    continued from its checkpoint under `checkpoints` when there is one. Its torch work (evaluation,
    aggregation) runs on `threads`, those of its driver bundle: with torch's default of one thread
    per core it competed with the executors of the trials beside it (evaluating 1000 synthetic
    clients' own models took 6x longer)."""
    import torch
    from ray import tune

    from harness.state import dumps

    for key, value in env.items():
        os.environ.setdefault(key, value)
    torch.set_num_threads(threads)
    spec = experiments[config["experiment"]]  # an ExperimentSpec, resolved by the sweep's driver
    cfg = spec.config
    checkpoint = storage.resolve(checkpoints) / f"{cfg.name}.pt"
    previous = storage.resolve(checkpoints) / f"{cfg.name}.prev.pt"
    experiment = resume_experiment(spec, [checkpoint, previous])
    resumed_from = experiment.next_round

    def on_round(row, state):
        if state is not None:  # the last two checkpoints are kept: a damaged one falls back to the other
            blob = dumps(state(), f"checkpoint of {cfg.name}")
            if checkpoint.exists():
                checkpoint.fs.move(checkpoint.path, previous.path)
            checkpoint.write_bytes(blob)
        tune.report({**_metrics(row, experiment.round_columns), "resumed_from_round": resumed_from})

    experiment.on_round = on_round
    experiment.run()
    checkpoint.delete()  # the summary is written: the experiment is finished
    previous.delete()


def resume_experiment(spec, checkpoints: list[storage.Location]):
    """The experiment of `spec` (an ExperimentSpec or ExperimentConfig), continued from the newest of `checkpoints` that is whole and whose client parts
    are whole; from round 0 when none is (each damaged file named in the log). A checkpoint that holds
    more than plain data is refused, never loaded nor passed over."""
    from harness.experiment import CLIENT_PARTS, Experiment
    from harness.spec import ExperimentSpec, resolve
    from harness.state import RefusedState, loads

    spec = spec if isinstance(spec, ExperimentSpec) else resolve(spec)
    cfg = spec.config
    for checkpoint in checkpoints:
        if not checkpoint.exists():
            continue
        experiment = Experiment(spec)
        try:
            state = loads(checkpoint.read_bytes(), str(checkpoint))
            parts = [experiment.out_dir / CLIENT_PARTS / f"part-{k:06d}.parquet" for k in range(state["client_parts"])]
            for part in parts:
                try:
                    storage.read_parquet(part)
                except Exception as e:  # noqa: BLE001 - any kind of damage
                    raise ValueError(f"its client rows {part} are damaged or missing ({type(e).__name__})") from None
        except RefusedState:
            raise
        except Exception as e:  # noqa: BLE001 - truncated or otherwise damaged: the previous one, or round 0
            log.warning("experiment %s: checkpoint %s is not usable (%s: %s)", cfg.name, checkpoint,
                        type(e).__name__, str(e)[:200])
            continue
        experiment.restore(state)
        log.warning("experiment %s continues from its checkpoint at round %d", cfg.name, experiment.next_round)
        return experiment
    if any(c.exists() for c in checkpoints):
        log.warning("experiment %s: no usable checkpoint; it starts again from round 0", cfg.name)
    return Experiment(spec)


def _me() -> dict[str, str]:
    return {"user": getpass.getuser(), "host": socket.gethostname()}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "out"}


def input_digests(cfg: dict[str, Any]) -> dict[str, str]:
    """The SHA-256 of every file an experiment reads (an npz data set, the traces), by setting: a
    changed file stops a rerun as a changed setting does."""
    files = {}
    dataset = str(cfg.get("data", {}).get("dataset", ""))
    if dataset.startswith("npz:"):
        files["data.dataset"] = dataset[4:]
    for key in ("trace", "availability_trace"):
        if cfg.get("devices", {}).get(key):
            files[f"devices.{key}"] = cfg["devices"][key]
    digests = {}
    for key, path in files.items():
        h = hashlib.sha256()
        try:
            with open(Path(path).expanduser(), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:
            raise UserError(key, f"cannot read {path}: {e.strerror or e}") from None
        digests[key] = h.hexdigest()
    return digests


def _read_manifest(manifest_file: storage.Location) -> dict[str, Any] | None:
    try:
        data = manifest_file.read_bytes()
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(data)
        if not all(k in manifest for k in ("created_by", "out", "runs", "experiments")):
            raise ValueError("it lacks keys")
        return manifest
    except (ValueError, TypeError) as e:
        raise DamagedManifest(str(manifest_file), f"is damaged ({str(e)[:120]}); add --resume to rebuild it from the "
                                                  f"experiments' own config.yaml") from None


class DamagedManifest(UserError):
    pass


def plan(home: storage.Location, out: storage.Location, name: str, trials: dict[str, dict[str, Any]],
         resume: bool, schema: type[ExperimentConfig] = ExperimentConfig) -> tuple[list[str], dict[str, Any]]:
    """Which experiments to run, and the manifest to write; raises UserError (nothing written) when
    the folder is not this sweep's to resume without --resume, when a config or an input file changed,
    or when an experiment's folder holds someone else's results. Configs are compared key by key under
    today's `schema`: an option added to fedbench since (at its default) changes nothing."""
    from harness.experiment import config_changes

    rebuilt = False
    try:
        manifest = _read_manifest(home / MANIFEST)
    except DamagedManifest as e:
        if not resume:
            raise
        log.warning("%s; rebuilding it from the experiments' config.yaml", e)
        manifest, rebuilt, resume = None, True, False
    digests = {n: input_digests(c) for n, c in trials.items()}
    if manifest is None:
        if resume:
            raise UserError("--resume", f"nothing to resume: {home} holds no sweep {name}")
        manifest = {"sweep": name, "out": str(out), "created_by": _me(), "runs": 0, "experiments": {}, "inputs": {}}
    else:
        made = manifest["created_by"]
        if not resume and (made != _me() or manifest["out"] != str(out)):
            raise UserError("--resume", f"{home} was made by {made['user']} on {made['host']} at {manifest['out']}; "
                                        f"resuming loads its saved state (checkpoints): add --resume if you trust it")
        changed = {n: config_changes(manifest["experiments"][n], _comparable(c), schema) for n, c in trials.items()
                   if n in manifest["experiments"]}
        changed = {n: why for n, why in changed.items() if why}
        if changed:
            first = next(iter(changed))
            raise UserError(f"sweep {name}", f"the config of {', '.join(changed)} changed since {out} was made "
                                             f"({first}: {changed[first]}; rerun the sweep file that made it, or "
                                             f"use another --out or --name)")
        stored = manifest.get("inputs", {})
        moved = [(n, k) for n in trials if n in stored for k in digests[n] if stored[n].get(k) != digests[n][k]]
        if moved:
            n, k = moved[0]
            raise UserError(k, f"the contents of this file changed since experiment {n} of {out} was made (its "
                               f"SHA-256 differs); restore the file, or use another --out or --name")
    for n in trials:
        if rebuilt and (out / n / "config.yaml").exists() and _finished(out / n, trials[n], schema) != "foreign":
            manifest["experiments"][n] = _comparable(trials[n])  # the sweep's own, by its config.yaml
        if n not in manifest["experiments"] and (out / n).exists():
            raise UserError(str(out / n), "holds results that this sweep did not make (another sweep or `fedbench "
                                          "run` wrote them); use another --out")
    finished, foreign = [], []
    for n in trials:
        if n in manifest["experiments"]:
            state = _finished(out / n, trials[n], schema)
            if state == "foreign":
                foreign.append(n)
            elif state:
                finished.append(n)
    if foreign:
        raise UserError(str(out / foreign[0]), "holds results of another config than this sweep's (a `fedbench run "
                                               "--overwrite` replaced them?); move them aside or use another --out")
    for n in finished:
        (home / "checkpoints" / f"{n}.pt").delete()
        (home / "checkpoints" / f"{n}.prev.pt").delete()
    manifest = dict(manifest, out=str(out), runs=manifest["runs"] + 1,
                    experiments={**manifest["experiments"], **{n: _comparable(c) for n, c in trials.items()}},
                    inputs={**manifest.get("inputs", {}), **digests})
    return [n for n in trials if n not in finished], manifest


def _finished(folder: storage.Location, trial: dict[str, Any], schema=ExperimentConfig) -> bool | str:
    """Whether the experiment in `folder` has ended (completed, degraded or failed): "foreign" when its
    config.yaml is not the trial's (another command wrote there). A damaged summary is not an end: the
    experiment runs again (from its checkpoint, or from round 0), saying so."""
    from harness.config import portable

    summary = folder / "summary.parquet"
    if not summary.exists():
        return False
    try:
        import yaml

        written = yaml.safe_load((folder / "config.yaml").read_bytes())
        ended = storage.read_parquet(summary)["status"].isin(ENDED).all()
    except Exception as e:  # noqa: BLE001 - a damaged file of any kind
        log.warning("%s is damaged (%s: %s); the experiment runs again", folder, type(e).__name__, str(e)[:120])
        return False
    from harness.experiment import config_changes

    if not isinstance(written, dict) or config_changes(written, portable(schema.model_validate(trial)), schema):
        return "foreign"
    return bool(ended)


ENDED = ("completed", "degraded", "failed")


def _completed(folder: storage.Location) -> bool:
    summary = folder / "summary.parquet"
    try:
        return summary.exists() and storage.read_parquet(summary)["status"].isin(ENDED).all()
    except Exception:  # noqa: BLE001 - damaged: not finished
        return False


def _failed(folder: storage.Location) -> str | None:
    try:
        row = storage.read_parquet(folder / "summary.parquet").iloc[0]
    except Exception:  # noqa: BLE001
        return None
    return (row.get("status_note") or "failed") if row["status"] == "failed" else None


def run_sweep(experiments: list[ExperimentConfig], sweep: SweepFile, out: str | Path | storage.Location, name: str,
              resume: bool = False, progress: bool = True) -> storage.Location:
    """Run the sweep's unfinished and new experiments; returns the results location."""
    out = storage.resolve(out)
    with storage.Lease(out, " ".join(["fedbench", *sys.argv[1:]])[:200] if sys.argv[1:] else f"sweep {name}"):
        return _run_sweep(experiments, sweep, out, name, resume, progress)


def _run_sweep(experiments, sweep, out, name, resume, progress) -> storage.Location:
    from ray import tune

    from harness.ray_engine import connect

    home = out / "_tune" / name
    t = sweep.tune
    trials, configs = {}, {}
    for cfg in experiments:
        configs[cfg.name] = trial_engine(cfg, sweep).model_copy(update=dict(out=str(out)))
        trials[cfg.name] = configs[cfg.name].model_dump(mode="json")
    todo, manifest = plan(home, out, name, trials, resume, type(experiments[0]) if experiments else ExperimentConfig)
    if not todo:
        print(f"sweep {name}: all {len(trials)} experiments are finished in {out}", file=sys.stderr)
        return out
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    connect()
    bundles = {}
    for n in todo:
        bundles[n] = trial_resources(configs[n], t.driver_cpus)
        check_fits(bundles[n])
    (home / MANIFEST).write_bytes(json.dumps(manifest, indent=1).encode())
    if len(todo) < len(trials):
        log.warning("sweep %s: %d of %d experiments are finished; running %s", name, len(trials) - len(todo),
                    len(trials), ", ".join(todo))
    env = {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}
    from harness.training import torch_threads

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, experiments={n: resolve(configs[n]) for n in todo},
                             checkpoints=str(home / "checkpoints"), env=env, threads=torch_threads(t.driver_cpus)),
        lambda config: tune.PlacementGroupFactory(bundles[config["experiment"]]))
    storage_path, storage_fs = storage.tune_storage(home)
    done_before = {n: configs[n].rounds for n in trials if n not in todo}
    callbacks = [SweepProgress(name, {n: configs[n].rounds for n in todo}, done_before, out)] if progress else []
    tuner = tune.Tuner(
        trainable,
        param_space={"experiment": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(max_concurrent_trials=t.max_concurrent_trials,
                                    trial_name_creator=lambda trial: trial.config["experiment"],
                                    trial_dirname_creator=lambda trial: trial.config["experiment"]),
        run_config=tune.RunConfig(name=f"run-{manifest['runs']}", storage_path=storage_path,
                                  storage_filesystem=storage_fs, verbose=t.verbose, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=t.max_failures)),
    )
    grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    for r in failed:
        log.error("trial %s failed: %s", r.config["experiment"], r.error)
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(grid)} trials failed (the others' results are kept; run the "
                          f"same command again to retry them from their checkpoints)")
    unfinished = [n for n in todo if not _completed(out / n)]
    if unfinished:
        raise SweepInterrupted(f"interrupted with {len(unfinished)} of {len(trials)} experiments unfinished; "
                               f"run the same command again to continue")
    ended_failed = {n: why for n in trials if (why := _failed(out / n))}
    if ended_failed:
        first = next(iter(ended_failed))
        raise SweepFailed(f"{len(ended_failed)} of {len(trials)} experiments failed ({first}: {ended_failed[first]}); "
                          f"the leaderboard leaves them out")
    return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _Progress:
    """The state of a sweep as one line: trials done, running, stopped by an interrupt, pending and failed
    (a trial that raised or an experiment that ended `failed`); rounds done of all rounds; the best accuracy
    so far; elapsed time and an estimate of the rest."""

    def __init__(self, name: str, rounds: dict[str, int], done_before: dict[str, int], stream=None,
                 interval: float | None = None):
        self.name, self.rounds, self.done_before = name, rounds, done_before
        self._stream = stream  # None: sys.stderr when printing (Tune pickles its callbacks)
        self._interval = interval
        self.start = time.monotonic()
        self.last_print = -math.inf
        self.first: dict[str, int] = {}  # round each trial started from in this run
        self.reached: dict[str, int] = {}  # rounds done per trial
        self.best: tuple[float, str] | None = None
        self.failures = 0
        self.ended_failed: set[str] = set()  # experiments whose run ended `failed` (summary.status)

    @property
    def stream(self):
        return self._stream or sys.stderr

    @property
    def interval(self) -> float:
        return self._interval if self._interval is not None else (2.0 if self.stream.isatty() else 15.0)

    def result(self, experiment: str, result: dict[str, Any]) -> None:
        if "round" not in result:
            return
        done = int(result["round"]) + 1
        self.first.setdefault(experiment, int(result.get("resumed_from_round", 0)))
        self.reached[experiment] = done
        acc = result.get("acc_clients_mean")
        if acc is not None and (self.best is None or acc > self.best[0]):
            self.best = (float(acc), experiment)

    def line(self, status: dict[str, str]) -> str:
        # A trial that Tune reports TERMINATED has finished only if it played all its rounds (or its run
        # ended `failed`); one stopped by an interrupt is TERMINATED too.
        ended = [n for n, s in status.items() if s == "TERMINATED"]
        finished = {n for n in ended if self.reached.get(n, 0) >= self.rounds[n] or n in self.ended_failed}
        counts = {k: sum(1 for s in status.values() if s == k) for k in ("RUNNING", "ERROR")}
        stopped = len(ended) - len(finished)
        pending = len(self.rounds) - len(ended) - sum(counts.values())
        total = sum(self.rounds.values()) + sum(self.done_before.values())
        done = sum(self.done_before.values()) + sum(
            self.rounds[n] if n in finished else self.reached.get(n, 0) for n in self.rounds)
        elapsed = time.monotonic() - self.start
        progressed = sum(self.reached[n] - self.first[n] for n in self.reached)
        left = total - done
        eta = f", ~{_duration(elapsed / progressed * left)} left" if progressed and left else ""
        best = f" | best acc {self.best[0]:.3f} ({self.best[1]})" if self.best else ""
        return (f"sweep {self.name}: {len(finished) + len(self.done_before)}/{len(self.rounds) + len(self.done_before)} "
                f"done, {counts['RUNNING']} running{f', {stopped} stopped' if stopped else ''}, {pending} pending, "
                f"{counts['ERROR'] + len(self.ended_failed)} failed"
                f"{f' ({self.failures} retried)' if self.failures else ''} | rounds {done}/{total}{best} | "
                f"{_duration(elapsed)} elapsed{eta}")

    def show(self, status: dict[str, str], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_print < self.interval:
            return
        self.last_print = now
        text = self.line(status)
        if self.stream.isatty():
            self.stream.write("\r\x1b[2K" + text + ("\n" if force else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _status(trials) -> dict[str, str]:
    return {t.config["experiment"]: t.status for t in trials}


try:
    from ray.tune import Callback as _Callback
except ImportError:  # pragma: no cover - Tune is a dependency
    _Callback = object


class SweepProgress(_Callback):
    """Tune callback on the sweep's driver printing `_Progress` every few seconds (refreshed in place
    on a terminal, one line at a time in job logs)."""

    def __init__(self, name: str, rounds: dict[str, int], done_before: dict[str, int], out: storage.Location):
        self.progress = _Progress(name, rounds, done_before)
        self.progress.ended_failed = {n for n in done_before if _failed(out / n)}  # from an earlier run
        self.out = out
        self.node: dict[str, str] = {}  # where each trial reported from last

    def on_step_end(self, iteration, trials, **info):
        self.progress.show(_status(trials))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        name = trial.config["experiment"]
        if name not in self.progress.first and result.get("resumed_from_round"):
            self._say(f"{name} continues from its checkpoint at round {result['resumed_from_round']} on node "
                      f"{result.get('node_ip', '?')}")
        self.progress.result(name, result)
        self.node[name] = result.get("node_ip", "?")

    def on_trial_complete(self, iteration, trials, trial, **info):
        name = trial.config["experiment"]
        if why := _failed(self.out / name):
            self.progress.ended_failed.add(name)
            self._say(f"{name} ended failed: {why}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        name = trial.config["experiment"]
        self.progress.failures += 1
        self.progress.reached.pop(name, None)
        self.progress.first.pop(name, None)
        self._say(f"trial {name} failed on node {self.node.get(name, '?')} and is retried from its last "
                  f"checkpoint: {_last_error(trial)}")

    def _say(self, text: str) -> None:
        stream = self.progress.stream
        stream.write(("\n" if stream.isatty() else "") + f"sweep {self.progress.name}: {text}\n")
        stream.flush()

    def on_experiment_end(self, trials, **info):
        self.progress.show(_status(trials), force=True)


def _last_error(trial) -> str:
    """The last line of a trial's last error (Tune writes it as text beside the trial)."""
    try:
        lines = [line for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
        return lines[-1].strip()[:300]
    except (OSError, TypeError, IndexError):
        return "see Tune's output"


class SweepFailed(Exception):
    pass


class SweepInterrupted(Exception):
    pass
