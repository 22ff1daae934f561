"""The Ray engine: a pool of long-lived executor actors runs the round's client tasks.

Clients are records, not actors: an executor that imported torch costs ~400 MB, so a pool of a few
executors (each with a fractional CPU/GPU quota) serves hundreds to thousands of clients. Each executor
builds the experiment's Workbench once (datasets, partition, model templates). Every round the
broadcast goes into the object store once and each executor gets one call with its share of the
clients, balanced by their training samples. Results come back in task order, so aggregation order
never depends on timing.

The pool lands in the current placement group when there is one (a Ray Tune trial reserves
[driver bundle] + [executor bundle] * k), otherwise on the cluster at RAY_ADDRESS, otherwise on a local
Ray started on demand. An executor whose process dies is replaced and its call of the round rerun on
the new one (calls are pure functions of their inputs, so the results do not change).
"""
from __future__ import annotations

import logging
import math
import os
import time

from harness.config import EngineConfig, ExperimentConfig
from harness.engine import batching_enabled, execute_tasks, torch_threads
from harness.errors import UserError
from harness.strategy import ClientResult, ClientTask

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # per call; a process that keeps dying is a bug to report, not to retry forever


class Executor:
    """One pool member. Ray instantiates it in its own process with its quota."""

    def __init__(self, cfg_json: str, dataset_ref: list, cpus: float, use_cuda: bool):
        import ray
        import torch

        dataset = ray.get(dataset_ref[0])
        torch.set_num_threads(torch_threads(cpus))
        device = "cuda" if use_cuda and torch.cuda.is_available() else "cpu"
        from harness.workbench import Workbench

        self.bench = Workbench(ExperimentConfig.model_validate_json(cfg_json), device=device, dataset=dataset)

    def ready(self) -> dict:
        import torch

        return {"pid": os.getpid(), "device": str(self.bench.device), "threads": torch.get_num_threads()}

    def run(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        batch = batching_enabled(self.bench.cfg.engine, self.bench.device)
        return execute_tasks(self.bench.strategy, broadcast, tasks, batch)


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
        self.actors: list = []
        self.executor_info: list[dict] = []

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
        self._where = where
        self._remote = ray.remote(Executor).options(num_cpus=cfg.cpus_per_executor, num_gpus=cfg.gpus_per_executor)
        # The driver's dataset goes into the object store once: executors on any node share it
        # without reading files there (their nodes need no copy of data.root).
        self._args = (bench.cfg.model_dump_json(), [ray.put(bench.dataset)], cfg.cpus_per_executor,
                      cfg.gpus_per_executor > 0 and cfg.device != "cpu")
        self.actors = [self._remote.remote(*self._args) for _ in range(n)]
        self.executor_info = self._wait_ready(self.actors)
        # A client's work estimate for balancing: its training samples (the same epochs for all).
        self.work = [c.num_samples for c in bench.clients]
        log.info("ray pool: %d executors %s", n, self.executor_info)

    def _wait_ready(self, actors: list) -> list[dict]:
        import ray

        cfg = self.cfg
        ready = [a.ready.remote() for a in actors]
        done, pending = ray.wait(ready, num_returns=len(ready), timeout=cfg.start_timeout_s)
        if pending:
            for a in actors:
                ray.kill(a)
            free = ray.available_resources()
            raise UserError("engine", f"{len(pending)} of {len(actors)} executors did not start within "
                                      f"{cfg.start_timeout_s:g} s ({cfg.cpus_per_executor:g} CPU, "
                                      f"{cfg.gpus_per_executor:g} GPU each; {self._where}; free now: "
                                      f"{free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs)")
        return ray.get(ready)

    def _replace(self, k: int) -> None:
        """A new executor in place of executor k, whose process died."""
        import ray

        ray.kill(self.actors[k])
        self.actors[k] = self._remote.remote(*self._args)
        self.executor_info[k] = self._wait_ready([self.actors[k]])[0]
        log.warning("executor %d died and was replaced by process %d", k, self.executor_info[k]["pid"])

    def run(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        import ray
        from ray.exceptions import RayActorError

        # A small broadcast travels inside the calls; a larger one goes into the object store once.
        broadcast_ref = broadcast if _nbytes(broadcast) < INLINE_BYTES else ray.put(broadcast)
        shares = balanced_shares([self.work[t.client_id] for t in tasks], len(self.actors))
        calls = {k: self.actors[k].run.remote(broadcast_ref, [tasks[i] for i in share])
                 for k, share in enumerate(shares) if share}
        results: list[ClientResult | None] = [None] * len(tasks)
        for k, ref in calls.items():
            share = [tasks[i] for i in shares[k]]
            for attempt in range(MAX_RESTARTS + 1):
                try:
                    chunk = ray.get(ref)
                    break
                except RayActorError as e:  # the process died: the same calls on a new executor
                    if attempt == MAX_RESTARTS:
                        chunk = [ClientResult(t.client_id, t.round, status="error",
                                              error=f"executor died {attempt + 1} times: {type(e).__name__}")
                                 for t in share]
                        break
                    self._replace(k)
                    ref = self.actors[k].run.remote(broadcast_ref, share)
            for i, result in zip(shares[k], chunk):
                results[i] = result
        return results

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


INLINE_BYTES = 96 * 1024  # below Ray's limit for arguments sent inside a call (100 KiB)


def _nbytes(value) -> int:
    """Bytes of the tensors and arrays in a (nested) broadcast; other values count as small."""
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def balanced_shares(work: list[float], executors: int) -> list[list[int]]:
    """Task indices per executor, balanced by estimated work (longest first to the least loaded),
    each share in task order. One call per executor and round: on this workload a call costs as
    much as a few local steps, so fewer, larger calls beat finer-grained balancing."""
    loads = [0.0] * executors
    shares: list[list[int]] = [[] for _ in range(executors)]
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        k = min(range(executors), key=lambda e: (loads[e], e))
        shares[k].append(i)
        loads[k] += work[i]
    return [sorted(share) for share in shares]
