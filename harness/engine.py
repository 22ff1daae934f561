"""Engines execute a round's client tasks. The serial engine runs them in this process; the Ray
engine (harness/ray_engine.py) on a pool of executor actors. Both call `execute` on each task and
return the results in task order, so the same config gives the same numbers on either."""
from __future__ import annotations

import math
import traceback
from contextlib import contextmanager

import torch

from harness.config import EngineConfig
from harness.strategy import ClientResult, ClientTask, Strategy


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


def execute(strategy: Strategy, broadcast, task: ClientTask) -> ClientResult:
    """Run one client task; an exception becomes a failed result, never a failed round."""
    try:
        result = strategy.local_update(broadcast, task)
    except Exception as e:  # noqa: BLE001 - a client's failure is data, not a crash
        last = traceback.extract_tb(e.__traceback__)[-1:] or [None]
        where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last[0] else ""
        return ClientResult(task.client_id, task.round, status="error", error=f"{type(e).__name__}: {e}{where}")
    return result


class SerialEngine:
    """All client tasks in this process, one after another, with the threads of one executor."""

    name = "serial"

    def __init__(self, cfg: EngineConfig):
        self.threads = torch_threads(cfg.cpus_per_executor)

    def start(self, bench) -> None:
        self.strategy = bench.strategy

    def run(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        with threads(self.threads):
            return [execute(self.strategy, broadcast, t) for t in tasks]

    def close(self) -> None:
        pass


def make_engine(cfg: EngineConfig):
    if cfg.backend == "ray":
        from harness.ray_engine import RayEngine

        return RayEngine(cfg)
    return SerialEngine(cfg)
