"""`fedbench bench`: seconds per round of the same training on three executions, in one run.

- serial: the serial engine, every client in this process, one torch thread;
- limit: what the hardware allows: a multiprocessing pool of as many worker processes as the Ray
  pool has executors, one torch thread each, each holding the data, every round's tasks split into
  equal contiguous parts, one message each way per worker and round (plain pickles);
- ray: the Ray engine with the same number of executors and quota.

Each does the same rounds from the same initial model (FedAvg's aggregation included), with one
warm-up round that is not timed. The peak resident memory of the whole process tree (driver, pool
workers, Ray's own processes, executors) is sampled throughout.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import platform
import statistics
import sys
import threading
import time

import numpy as np
import psutil

from harness.config import expand
from harness.engine import SerialEngine, execute, torch_threads
from harness.seeding import rng
from harness.state import MemoryStore
from harness.strategy import ClientSlot, ClientTask
from harness.workbench import Workbench


def workload(clients: int, clients_per_round: int, executors: int, cpus_per_executor: float):
    """The paper's MNIST CNN on mnist-5k, 2 shards per client, batch 10, one local epoch, FedAvg.
    With more than 100 clients the shards shrink so that the 4000 training images go round."""
    shard = min(20, 4000 // (2 * clients))
    raw = {"name": "bench", "seed": 1, "rounds": 1000,
           "data": {"dataset": "mnist-5k", "split": {"kind": "shards", "shards_per_client": 2, "shard_size": shard}},
           "clients": {"total": clients, "per_round": clients_per_round}, "model": {"name": "cnn"},
           "train": {"epochs": 1, "batch_size": 10}, "method": {"name": "fedavg"},
           "engine": {"backend": "ray", "executors": executors, "cpus_per_executor": cpus_per_executor}}
    return expand(raw)[0][0]


class PeakRSS:
    """Samples the resident memory of this process and all its descendants."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _rounds(bench: Workbench, rounds: int):
    """Yield (round, broadcast, tasks) for warm-up + timed rounds, aggregating in between."""
    cfg = bench.cfg
    strategy = bench.strategy
    strategy.setup(MemoryStore())
    for rnd in range(rounds + 1):
        sampled = np.sort(rng(cfg.seed, "sample", rnd).choice(cfg.clients.total, cfg.clients.per_round, replace=False))
        tiers = bench.devices.tiers_for_round(rnd)
        slots = [ClientSlot(int(c), cfg.devices.tiers[tiers[c]], bench.clients[c].num_samples) for c in sampled]
        broadcast, instructions = strategy.configure(rnd, slots)
        results = yield rnd, broadcast, [ClientTask(s.client_id, rnd, s.tier, i) for s, i in zip(slots, instructions)]
        strategy.aggregate(rnd, [r for r in results if r.ok])


def _time(bench: Workbench, rounds: int, run) -> float:
    """Median seconds per timed round of `run(broadcast, tasks)` (round 0 is the warm-up)."""
    times = []
    loop = _rounds(bench, rounds)
    rnd, broadcast, tasks = next(loop)
    while True:
        start = time.perf_counter()
        results = run(broadcast, tasks)
        if rnd > 0:
            times.append(time.perf_counter() - start)
        try:
            rnd, broadcast, tasks = loop.send(results)
        except StopIteration:
            return statistics.median(times)


_worker_bench: Workbench | None = None


def _init_worker(cfg_json: str, threads: int) -> None:
    global _worker_bench
    import torch

    from harness.config import ExperimentConfig

    torch.set_num_threads(threads)
    _worker_bench = Workbench(ExperimentConfig.model_validate_json(cfg_json))


def _run_chunk(payload: bytes) -> bytes:
    # Plain pickles both ways: multiprocessing's own pickler would move every tensor into a new
    # shared-memory segment and pass its file descriptor, which costs more than copying the bytes.
    broadcast, tasks = pickle.loads(payload)
    return pickle.dumps([execute(_worker_bench.strategy, broadcast, t) for t in tasks], pickle.HIGHEST_PROTOCOL)


def run_bench(clients_per_round: int = 10, rounds: int = 10, clients: int = 100, executors: int = 2,
              cpus_per_executor: float = 1.0) -> dict:
    import torch

    from harness.ray_engine import RayEngine

    cfg = workload(clients, clients_per_round, executors, cpus_per_executor)
    bench = Workbench(cfg)
    threads = torch_threads(cpus_per_executor)
    with PeakRSS() as memory:
        serial = SerialEngine(cfg.engine)
        serial.start(bench)
        serial_s = _time(bench, rounds, serial.run)

        ctx = mp.get_context("forkserver")
        with ctx.Pool(executors, initializer=_init_worker, initargs=(cfg.model_dump_json(), threads)) as pool:
            def limit_run(broadcast, tasks):
                size = -(-len(tasks) // executors)
                parts = [pickle.dumps((broadcast, tasks[i:i + size]), pickle.HIGHEST_PROTOCOL)
                         for i in range(0, len(tasks), size)]
                return [r for part in pool.map(_run_chunk, parts) for r in pickle.loads(part)]
            limit_s = _time(bench, rounds, limit_run)

        engine = RayEngine(cfg.engine)
        engine.start(bench)
        try:
            ray_s = _time(bench, rounds, engine.run)
        finally:
            engine.close()
    import ray

    return {
        "clients": clients, "clients_per_round": clients_per_round, "rounds_timed": rounds,
        "executors": executors, "cpus_per_executor": cpus_per_executor,
        "serial_s_per_round": round(serial_s, 4), "limit_s_per_round": round(limit_s, 4),
        "ray_s_per_round": round(ray_s, 4), "ray_vs_limit": round(ray_s / limit_s, 3),
        "ray_vs_serial": round(ray_s / serial_s, 3), "peak_rss_mb": round(memory.peak / 2**20, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "ray": ray.__version__},
    }


def print_bench(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    r = result
    print(f"workload: MNIST CNN on mnist-5k, {r['clients']} clients, {r['clients_per_round']} per round, "
          f"FedAvg, batch 10, 1 epoch; {r['executors']} executors x {r['cpus_per_executor']:g} CPU; "
          f"median of {r['rounds_timed']} rounds after a warm-up")
    print(f"  serial          {r['serial_s_per_round']:.4f} s/round")
    print(f"  limit (procs)   {r['limit_s_per_round']:.4f} s/round")
    print(f"  ray             {r['ray_s_per_round']:.4f} s/round   ray/limit {r['ray_vs_limit']:.3f}   "
          f"ray/serial {r['ray_vs_serial']:.3f}")
    print(f"  peak RSS of the process tree: {r['peak_rss_mb']:.0f} MB")
