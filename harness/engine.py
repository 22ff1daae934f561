"""Engines execute a round's client tasks and return their results in task order, so the same config
gives the same numbers on either engine.

An engine satisfies `Engine`: the serial engine (here) runs the tasks in this process; the Ray engine
(harness/ray_engine.py) on a pool of executor actors. Both run a call's tasks through a
`ClientRunner`: each task's LocalJob (the method's description of the client's training) is trained
one by one, or, with `engine.batch_clients`, together with the jobs of its shape as one batched
program (harness/batched/), from captured CUDA graphs where `engine.cuda_graphs` allows.
"""
from __future__ import annotations

import traceback
from typing import Any, Protocol

import torch

from harness.batched import GraphCache, train_jobs
from harness.records import ClientResult, ClientTask
from harness.training import LocalJob, threads, torch_threads, train_one


class Engine(Protocol):
    name: str

    def start(self, bench, strategy) -> None:
        """Get ready to run the experiment's tasks (`bench`: the driver's Workbench)."""

    def run(self, broadcast: Any, tasks: list[ClientTask]) -> list[ClientResult]:
        """The tasks' results, in task order; a client that fails gives a result of status error."""

    def close(self) -> None:
        ...


def failed_result(task: ClientTask, e: BaseException) -> ClientResult:
    """The failed result of `task`, naming the exception and where it was raised."""
    last = traceback.extract_tb(e.__traceback__)[-1:] or [None]
    where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last[0] else ""
    return ClientResult(task.client_id, task.round, status="error", error=f"{type(e).__name__}: {e}{where}")


def batching_enabled(cfg, device) -> bool:
    """engine.batch_clients for an executor on `device`: 'auto' is on with CUDA, off on CPU."""
    if cfg.batch_clients == "auto":
        return torch.device(device).type == "cuda"
    return bool(cfg.batch_clients)


def cuda_graphs_enabled(cfg, device) -> bool:
    """engine.cuda_graphs: 'auto' and True mean on where the device is CUDA; never on a CPU."""
    return cfg.cuda_graphs in ("auto", True) and torch.device(device).type == "cuda" and torch.cuda.is_available()


class ClientRunner:
    """Runs a call's tasks in this process with `strategy` and `bench` (this process's Workbench).

    One by one, each job is prepared, trained on this process's model of its spec and turned into
    its result before the next (one model per spec in memory). Batched, all jobs are prepared, then
    trained by group, then turned into results. A client that raises anywhere becomes a failed
    result; the others go on."""

    def __init__(self, bench, strategy, engine_cfg):
        self.bench, self.strategy = bench, strategy
        self.batch = batching_enabled(engine_cfg, bench.device)
        self.graphs = GraphCache() if self.batch and cuda_graphs_enabled(engine_cfg, bench.device) else None

    def run(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        if not self.batch:
            return [self.run_one(broadcast, task) for task in tasks]
        results: list[ClientResult | None] = [None] * len(tasks)
        pending: list[tuple[int, LocalJob]] = []
        for i, task in enumerate(tasks):
            try:
                pending.append((i, self.strategy.local_job(broadcast, task)))
            except Exception as e:  # noqa: BLE001 - a client's failure is data, not a crash
                results[i] = failed_result(task, e)
        errors = train_jobs([job for _, job in pending], self.bench, self.graphs)
        for (i, job), error in zip(pending, errors):
            results[i] = failed_result(tasks[i], error) if error is not None else self._result(broadcast, tasks[i], job)
        return results  # type: ignore[return-value]

    def run_one(self, broadcast, task: ClientTask) -> ClientResult:
        try:
            job = self.strategy.local_job(broadcast, task)
            train_one(job, self.bench.loaded)
        except Exception as e:  # noqa: BLE001
            return failed_result(task, e)
        return self._result(broadcast, task, job)

    def _result(self, broadcast, task: ClientTask, job: LocalJob) -> ClientResult:
        try:
            return self.strategy.local_result(broadcast, task, job)
        except Exception as e:  # noqa: BLE001
            return failed_result(task, e)


class SerialEngine:
    """All client tasks in this process, one after another, with the threads of one executor."""

    name = "serial"

    def __init__(self, cfg):
        self.cfg = cfg
        self.threads = torch_threads(cfg.cpus_per_executor)

    def start(self, bench, strategy) -> None:
        self.runner = ClientRunner(bench, strategy, self.cfg)

    def run(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        with threads(self.threads):
            return self.runner.run(broadcast, tasks)

    def close(self) -> None:
        pass
