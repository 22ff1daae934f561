"""Engines execute a round's client tasks and return their results in task order, so the same config
gives the same numbers on either engine.

An engine satisfies `Engine`: the serial engine (here) runs the tasks in this process; the Ray engine
(harness/ray_engine.py) on a pool of executor actors. Both run a call's tasks through a
`ClientRunner`, on the method's client half built in that process from (method parameters, the
process's Workbench): each task's LocalJobs (the method's description of the client's training) are
trained one by one, or, with `engine.batch_clients`, together with the jobs of their shape and rule
as one batched program (harness/batched/), from captured CUDA graphs where `engine.cuda_graphs`
allows.
"""
from __future__ import annotations

import traceback
from typing import Any, Protocol

import torch

from harness.batched import GraphCache, train_jobs
from harness.records import CODE_ERRORS, ClientResult, ClientTask
from harness.registry import method_class
from harness.training import LocalJob, threads, torch_threads


class Engine(Protocol):
    name: str

    def start(self, bench) -> None:
        """Get ready to run the experiment's tasks (`bench`: the driver's Workbench)."""

    def run(self, broadcast: Any, tasks: list[ClientTask]) -> list[ClientResult]:
        """The tasks' results, in task order; a client that fails gives a result of status error."""

    def close(self) -> None:
        ...


def failed_result(task: ClientTask, e: BaseException) -> ClientResult:
    """The failed result of `task`, naming the exception and where it was raised."""
    last = traceback.extract_tb(e.__traceback__)[-1:] or [None]
    where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last[0] else ""
    return ClientResult(task.client_id, task.round, status="error", error=f"{type(e).__name__}: {e}{where}",
                        error_type=f"{type(e).__module__}.{type(e).__qualname__}",
                        traceback="".join(traceback.format_exception(e)), code_error=isinstance(e, CODE_ERRORS))


def batching_enabled(cfg, device) -> bool:
    """engine.batch_clients for an executor on `device`: 'auto' is on with CUDA, off on CPU."""
    if cfg.batch_clients == "auto":
        return torch.device(device).type == "cuda"
    return bool(cfg.batch_clients)


def cuda_graphs_enabled(cfg, device) -> bool:
    """engine.cuda_graphs: 'auto' and True mean on where the device is CUDA; never on a CPU."""
    return cfg.cuda_graphs in ("auto", True) and torch.device(device).type == "cuda" and torch.cuda.is_available()


class ClientRunner:
    """Runs a call's tasks in this process on the method's client half, built here from the method's
    parameters and `bench` (this process's Workbench).

    Each task is the generator `client.work(broadcast, task)`, which yields jobs and returns the
    result. One by one, a task runs to its end before the next (one model per spec in memory).
    Batched, every task advances to its next yield, the jobs of all tasks are trained by group, and
    so on until every task has returned. A client that raises anywhere becomes a failed result;
    the others go on."""

    def __init__(self, bench, engine_cfg, client=None):
        self.bench = bench
        self.client = client or method_class(bench.experiment.method).client(bench, bench.method_params)
        self.batch = batching_enabled(engine_cfg, bench.device)
        self.graphs = GraphCache() if self.batch and cuda_graphs_enabled(engine_cfg, bench.device) else None

    def run(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        if not self.batch:
            return [self._run_all(broadcast, [task])[0] for task in tasks]
        return self._run_all(broadcast, tasks)

    def _run_all(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        results: list[ClientResult | None] = [None] * len(tasks)
        works = {i: self.client.work(broadcast, task) for i, task in enumerate(tasks)}
        while works:
            pending: list[tuple[int, LocalJob]] = []
            for i in list(works):
                try:
                    yielded = works[i].send(None)
                except StopIteration as done:
                    results[i] = done.value
                    del works[i]
                    continue
                except Exception as e:  # noqa: BLE001 - a client's failure is data, not a crash
                    results[i] = failed_result(tasks[i], e)
                    del works[i]
                    continue
                pending += [(i, job) for job in (yielded if isinstance(yielded, list) else [yielded])]
            errors = train_jobs([job for _, job in pending], self.bench, self.graphs, batch=self.batch)
            for (i, _), error in zip(pending, errors):
                if error is not None and i in works:
                    works.pop(i).close()
                    results[i] = failed_result(tasks[i], error)
        return results  # type: ignore[return-value]


class SerialEngine:
    """All client tasks in this process, one after another, with the threads of one executor."""

    name = "serial"

    def __init__(self, cfg):
        self.cfg = cfg
        self.threads = torch_threads(cfg.cpus_per_executor)

    def start(self, bench) -> None:
        self.runner = ClientRunner(bench, self.cfg)

    def run(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        with threads(self.threads):
            return self.runner.run(broadcast, tasks)

    def close(self) -> None:
        pass
