"""Engines execute a round's client tasks. The serial engine runs them in this process; the Ray
engine (harness/ray_engine.py) on a pool of executor actors. Both run their tasks through
`execute_tasks` (each task through `execute`, or all of them through the strategy's
`local_update_batch` when `engine.batch_clients` is on) and return the results in task order, so
the same config gives the same numbers on either."""
from __future__ import annotations

import logging
import math
import traceback
from contextlib import contextmanager

import torch

from harness.config import EngineConfig
from harness.strategy import ClientResult, ClientTask, Strategy

log = logging.getLogger(__name__)


def torch_threads(cpus: float) -> int:
    """Threads for a quota of `cpus`: as many as it allows, at least one. Results depend on the thread
    count, so equal quotas give equal numbers on every backend."""
    return max(1, math.floor(cpus + 1e-9))


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def failed_result(task: ClientTask, e: BaseException) -> ClientResult:
    """The failed result of `task`, naming the exception and where it was raised."""
    last = traceback.extract_tb(e.__traceback__)[-1:] or [None]
    where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last[0] else ""
    return ClientResult(task.client_id, task.round, status="error", error=f"{type(e).__name__}: {e}{where}")


def execute(strategy: Strategy, broadcast, task: ClientTask) -> ClientResult:
    """Run one client task; an exception becomes a failed result, never a failed round."""
    try:
        result = strategy.local_update(broadcast, task)
    except Exception as e:  # noqa: BLE001 - a client's failure is data, not a crash
        return failed_result(task, e)
    return result


def batching_enabled(cfg: EngineConfig, device) -> bool:
    """engine.batch_clients for an executor on `device`: 'auto' is on with CUDA, off on CPU."""
    if cfg.batch_clients == "auto":
        return torch.device(device).type == "cuda"
    return bool(cfg.batch_clients)


def execute_batch(strategy: Strategy, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
    """All tasks through the strategy's `local_update_batch` (results in task order, a raising client
    a failed result). Should the call itself raise, or answer out of order, the tasks run one by
    one through `execute`, so that only a faulty client fails."""
    try:
        results = strategy.local_update_batch(broadcast, tasks)
        if [(r.client_id, r.round) for r in results] != [(t.client_id, t.round) for t in tasks]:
            raise RuntimeError("local_update_batch returned results that do not match the tasks in order")
        return results
    except Exception as e:  # noqa: BLE001 - retried one by one
        log.warning("batched execution of %d tasks failed (%s: %s); running them one by one",
                    len(tasks), type(e).__name__, e)
        return [execute(strategy, broadcast, t) for t in tasks]


def execute_tasks(strategy: Strategy, broadcast, tasks: list[ClientTask], batch: bool) -> list[ClientResult]:
    """A call's tasks, batched or one by one; results in task order either way."""
    if batch and tasks:
        return execute_batch(strategy, broadcast, tasks)
    return [execute(strategy, broadcast, t) for t in tasks]


class SerialEngine:
    """All client tasks in this process, one after another, with the threads of one executor."""

    name = "serial"

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.threads = torch_threads(cfg.cpus_per_executor)

    def start(self, bench) -> None:
        self.strategy = bench.strategy
        self.batch = batching_enabled(self.cfg, bench.device)

    def run(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        with threads(self.threads):
            return execute_tasks(self.strategy, broadcast, tasks, self.batch)

    def close(self) -> None:
        pass


def make_engine(cfg: EngineConfig):
    if cfg.backend == "ray":
        from harness.ray_engine import RayEngine

        return RayEngine(cfg)
    return SerialEngine(cfg)
