"""`fedbench sweep`: a grid of experiments as Ray Tune trials, resumable.

One trial per experiment. A trial reserves `tune.PlacementGroupFactory([driver bundle] +
[executor bundle] * k)`; its Ray engine puts its k executors into those bundles. Every evaluated
round is reported to Tune; every `checkpoint_every` rounds the report carries a checkpoint with all
federated state, from which an interrupted trial continues. Tune's own state lives in
`<out>/_tune/<sweep name>`; each experiment writes its Parquet files to `<out>/<experiment>/` as
`fedbench run` does. Running the same sweep again on the same output folder resumes it: finished
trials are kept, unfinished ones continue from their last checkpoint, and grid points it has not
run yet (a seed added with `--set 'seed=[...]'`) run.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from harness.config import ExperimentConfig, SweepFile
from harness.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "experiment_state.pt"
REPORTED = ("round", "acc_clients_mean", "acc_global", "train_loss", "sim_total_s", "flops_total",
            "bytes_up_total", "bytes_down_total", "wall_total_s", "density", "keep_ratio_mean")


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


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in REPORTED if row.get(k) is not None and not (isinstance(row[k], float) and math.isnan(row[k]))}


def run_trial(config: dict[str, Any], experiments: dict[str, dict[str, Any]]) -> None:
    """The Tune trainable: the federated experiment named by the trial's `experiment` parameter."""
    import torch
    from ray import tune

    from harness.experiment import Experiment

    cfg = ExperimentConfig.model_validate(experiments[config["experiment"]])
    experiment = Experiment(cfg)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            experiment.restore(torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False))

    def on_round(row, state):
        if state is None:
            tune.report(_metrics(row))
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state(), Path(folder) / CHECKPOINT_FILE)
            tune.report(_metrics(row), checkpoint=tune.Checkpoint.from_directory(folder))

    experiment.on_round = on_round
    experiment.run()


def run_sweep(experiments: list[ExperimentConfig], sweep: SweepFile, out: Path, name: str,
              resume: bool | None = None) -> Path:
    """Run (or resume) the sweep; returns the results folder."""
    from ray import tune

    from harness.ray_engine import connect

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    connect()
    out = out.expanduser().resolve()
    t = sweep.tune
    trials, bundles = {}, {}
    for cfg in experiments:
        cfg = trial_engine(cfg, sweep).model_copy(update=dict(out=str(out)))
        bundles[cfg.name] = trial_resources(cfg, t.driver_cpus)
        check_fits(bundles[cfg.name])
        trials[cfg.name] = cfg.model_dump(mode="json")
    trainable = tune.with_resources(tune.with_parameters(run_trial, experiments=trials),
                                    lambda config: tune.PlacementGroupFactory(bundles[config["experiment"]]))
    storage = out / "_tune"
    experiment_dir = storage / name
    if resume is None:
        resume = tune.Tuner.can_restore(str(experiment_dir))
    if resume and not tune.Tuner.can_restore(str(experiment_dir)):
        raise UserError("--resume", f"nothing to resume in {experiment_dir}")
    grid, names = [], list(trials)
    if resume:
        log.warning("resuming sweep %s from %s", name, experiment_dir)
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        known = {r.config["experiment"] for r in tuner.get_results()}
        grid += list(tuner.fit())
        # Tune cannot add trials to a restored sweep: grid points it has not seen (a new seed) and
        # that are not finished run as a Tune experiment of their own, named after them, which the
        # same command resumes in turn
        names = [n for n in trials if n not in known and not (out / n / "summary.parquet").exists()]
        name = f"{name}-{hashlib.sha1(' '.join(names).encode()).hexdigest()[:8]}"
    if names and resume and tune.Tuner.can_restore(str(storage / name)):
        grid += list(tune.Tuner.restore(str(storage / name), trainable=trainable, resume_unfinished=True,
                                        resume_errored=True).fit())
    elif names:
        grid += list(tune.Tuner(
            trainable,
            param_space={"experiment": tune.grid_search(names)},
            tune_config=tune.TuneConfig(max_concurrent_trials=t.max_concurrent_trials,
                                        trial_name_creator=lambda trial: trial.config["experiment"],
                                        trial_dirname_creator=lambda trial: trial.config["experiment"]),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=t.verbose,
                                      failure_config=tune.FailureConfig(max_failures=t.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        ).fit())
    failed = [r for r in grid if r.error is not None]
    for r in failed:
        log.error("trial %s failed: %s", r.config["experiment"], r.error)
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(grid)} trials failed (the others' results are kept)")
    unfinished = [n for n in trials if not (out / n / "summary.parquet").exists()]
    if unfinished:
        raise SweepInterrupted(f"interrupted with {len(unfinished)} of {len(trials)} trials unfinished; "
                               f"run the same command again (or add --resume) to continue")
    return out


class SweepFailed(Exception):
    pass


class SweepInterrupted(Exception):
    pass
