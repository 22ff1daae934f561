"""The Ray engine: a pool of long-lived executor actors runs the round's client tasks.

Clients are records, not actors: an executor that imported torch costs ~400 MB, so a pool of a few
executors (each with a fractional CPU/GPU quota) serves hundreds to thousands of clients. Each executor
builds the experiment's Workbench once (datasets, partition, model templates), receives the round's
broadcast through the object store once per round, and trains lists of clients per call; the driver
keeps a few calls in flight per executor so that no executor idles between calls. Results come back
in task order, so aggregation order never depends on timing.

The pool lands in the current placement group when there is one (a Ray Tune trial reserves
[driver bundle] + [executor bundle] * k), otherwise on the cluster at RAY_ADDRESS, otherwise on a local
Ray started on demand. Executors are restarted by Ray if their process dies, and their unfinished
calls are retried (the calls are pure functions of their inputs, so the results do not change).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

from harness.config import EngineConfig, ExperimentConfig
from harness.engine import execute, torch_threads
from harness.errors import UserError
from harness.strategy import ClientResult, ClientTask

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # per executor; a process that keeps dying is a bug to report, not to retry forever


class Executor:
    """One pool member. Ray instantiates it in its own process with its quota."""

    def __init__(self, cfg_json: str, cpus: float, use_cuda: bool):
        import torch

        torch.set_num_threads(torch_threads(cpus))
        device = "cuda" if use_cuda and torch.cuda.is_available() else "cpu"
        from harness.workbench import Workbench

        self.bench = Workbench(ExperimentConfig.model_validate_json(cfg_json), device=device)
        self.round_key = None
        self.broadcast = None

    def ready(self) -> dict:
        import torch

        return {"pid": os.getpid(), "device": str(self.bench.device), "threads": torch.get_num_threads()}

    def run(self, round_key: int, broadcast_ref: list, tasks: list[ClientTask]) -> list[ClientResult]:
        import ray

        if round_key != self.round_key:  # fetch the round's broadcast once, not once per call
            self.broadcast = ray.get(broadcast_ref[0])
            self.round_key = round_key
        return [execute(self.bench.strategy, self.broadcast, t) for t in tasks]


@dataclass
class _Pool:
    actors: list
    cpus: float
    gpus: float


def connect(include_dashboard: bool = False) -> None:
    """Join the current Ray session, the cluster at RAY_ADDRESS, or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = dict(log_to_driver=False, logging_level=logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        ray.init(include_dashboard=include_dashboard, dashboard_host="127.0.0.1", **kwargs)


def _capacity() -> tuple[float, float, str]:
    """(CPUs, GPUs) the pool may use and a phrase saying where they come from."""
    import ray
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    if pg is not None:
        bundles = pg.bundle_specs[1:]  # bundle 0 holds the trial's driver
        cpus = sum(b.get("CPU", 0) for b in bundles)
        gpus = sum(b.get("GPU", 0) for b in bundles)
        return cpus, gpus, f"the trial's placement group has {len(bundles)} executor bundle(s) with {cpus:g} CPUs, {gpus:g} GPUs"
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    return cpus, gpus, f"the cluster has {cpus:g} CPUs, {gpus:g} GPUs"


def pool_size(cfg: EngineConfig, cpus: float, gpus: float) -> int:
    if cfg.executors != "auto":
        return int(cfg.executors)
    fits = math.floor(cpus / cfg.cpus_per_executor + 1e-9)
    if cfg.gpus_per_executor > 0:
        fits = min(fits, math.floor(gpus / cfg.gpus_per_executor + 1e-9))
    return max(1, fits)


class RayEngine:
    name = "ray"

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.pool: _Pool | None = None
        self._round_key = 0

    def start(self, bench) -> None:
        import ray

        connect(self.cfg.include_dashboard)
        cfg = self.cfg
        cpus, gpus, where = _capacity()
        n = pool_size(cfg, cpus, gpus)
        want_cpus, want_gpus = n * cfg.cpus_per_executor, n * cfg.gpus_per_executor
        if want_cpus > cpus + 1e-9 or want_gpus > gpus + 1e-9:
            raise UserError("engine", f"{n} executors x ({cfg.cpus_per_executor:g} CPU, {cfg.gpus_per_executor:g} GPU) "
                                      f"ask for {want_cpus:g} CPUs and {want_gpus:g} GPUs, but {where}")
        use_cuda = cfg.gpus_per_executor > 0 and cfg.device != "cpu"
        remote = ray.remote(Executor).options(
            num_cpus=cfg.cpus_per_executor, num_gpus=cfg.gpus_per_executor,
            max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
        cfg_json = bench.cfg.model_dump_json()
        actors = [remote.remote(cfg_json, cfg.cpus_per_executor, use_cuda) for _ in range(n)]
        ready = [a.ready.remote() for a in actors]
        done, pending = ray.wait(ready, num_returns=n, timeout=cfg.start_timeout_s)
        if pending:
            for a in actors:
                ray.kill(a)
            free = ray.available_resources()
            raise UserError("engine", f"{len(pending)} of {n} executors did not start within {cfg.start_timeout_s:g} s "
                                      f"(asked {want_cpus:g} CPUs, {want_gpus:g} GPUs; {where}; free now: "
                                      f"{free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs)")
        self.executor_info = ray.get(done)
        self.pool = _Pool(actors, cfg.cpus_per_executor, cfg.gpus_per_executor)
        log.info("ray pool: %d executors %s", n, self.executor_info)

    def run(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        import ray
        from ray.exceptions import RayActorError

        actors = self.pool.actors
        self._round_key += 1
        broadcast_ref = [ray.put(broadcast)]
        chunks = _chunks(tasks, len(actors))
        results: list[list[ClientResult] | None] = [None] * len(chunks)
        next_chunk = 0
        in_flight: dict = {}

        def submit(actor_index: int) -> None:
            nonlocal next_chunk
            ref = actors[actor_index].run.remote(self._round_key, broadcast_ref, chunks[next_chunk])
            in_flight[ref] = (actor_index, next_chunk)
            next_chunk += 1

        for _ in range(2):  # two calls queued per executor: it starts the next while we collect one
            for i in range(len(actors)):
                if next_chunk < len(chunks):
                    submit(i)
        while in_flight:
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor_index, chunk_index = in_flight.pop(ref)
            try:
                results[chunk_index] = ray.get(ref)
            except RayActorError as e:  # restarts and retries were exhausted
                msg = f"executor died: {type(e).__name__}"
                results[chunk_index] = [ClientResult(t.client_id, t.round, status="error", error=msg)
                                        for t in chunks[chunk_index]]
            if next_chunk < len(chunks):
                submit(actor_index)
        return [r for chunk in results for r in chunk]

    def close(self) -> None:
        import ray

        if self.pool is not None:
            for a in self.pool.actors:
                ray.kill(a)
            self.pool = None


def _chunks(tasks: list, executors: int) -> list[list]:
    """About four calls per executor per round: enough to balance uneven clients, few enough that
    the per-call cost stays small."""
    size = max(1, math.ceil(len(tasks) / (4 * executors)))
    return [tasks[i:i + size] for i in range(0, len(tasks), size)]
