"""`fedbench bench`: seconds per round of the same training on four executions, in one run.

- serial: the serial engine, every client in this process one after another, one torch thread;
- batched: the same in-process loop with `engine.batch_clients` on: the round's clients that share
  a model shape train as one vmapped program (harness/batched.py), from CUDA graphs on a GPU where
  `engine.cuda_graphs` allows;
- limit: what the hardware allows: a multiprocessing pool of as many worker processes as the Ray
  pool has executors, one torch thread each, each holding the data, every round's tasks split into
  equal contiguous parts, one message each way per worker and round (pickled as the Ray engine's);
- ray: the Ray engine with the same number of executors and quota (on CUDA, each executor gets an
  equal share of one GPU);
- plain (mnist workload): an independent lean PyTorch loop in a process pool like limit's, none of
  fedbench's training code: per worker one CNN module (the layers of harness.models.CNN, forward
  written with torch.nn.functional) and one torch.optim.SGD (foreach) reused for every client, each
  client's normalised training images one stacked tensor indexed per minibatch, in the same order
  (the same generator seed); per step only zero_grad, forward, cross-entropy, backward and the
  optimizer's step; no loss or accuracy statistics; the broadcast and the trained parameters travel
  as numpy arrays. Its trained parameters are checked against fedbench's every round
  (`plain_same_training`: every client's trained tensors bitwise equal, `plain_max_abs_diff` the
  largest difference).

serial, limit, ray and plain train the clients one by one. All do the same rounds from the same
initial model (FedAvg's aggregation included), with one warm-up round that is not timed; serial and
batched take turns on every round, and so do limit, ray and plain (all pools are up, only one works
at a time), so that a drift in the machine's speed affects each group alike. The peak memory of
the whole process tree during the Ray run (driver, Ray's own processes, executors) is reported as
`peak_rss_mb` (summed RSS) and `peak_pss_mb` (summed PSS, see PeakMemory), sampled while the pool
starts and over two further rounds (not while rounds are timed).

Workloads (`--workload`): `mnist`, the paper's MNIST CNN on mnist-5k; `cifar`, VGG-11 with static
BN on CIFAR-10 when torchvision's copy is under the default data root (~/.cache/fedbench/data),
otherwise on a synthetic CIFAR-shaped data set (uint8 3x32x32 images drawn from a fixed seed,
written to a temporary folder for the run and labelled as synthetic in the output): the speed of
training does not depend on pixel values.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from harness.config import DataConfig, ExperimentConfig, expand
from harness.engine import ClientRunner, SerialEngine, cuda_graphs_enabled
from harness.errors import ConfigError, UserError
from harness.records import ClientResult, ClientSlot, ClientTask
from harness.registry import method_class
from harness.seeding import rng, seed_of
from harness.state import MemoryStore
from harness.training import torch_threads
from harness.transport import pack, unpack
from harness.workbench import Workbench

WORKLOADS = ("mnist", "cifar")
METHOD_TITLES = {"fedavg": "FedAvg", "fedprox": "FedProx (mu 0.01)"}
SYNTHETIC_CIFAR = dict(train=10000, test=2000, seed=0)


def workload(clients: int, clients_per_round: int, executors: int, cpus_per_executor: float,
             name: str = "mnist", dataset: str | None = None, device: str = "cpu", epochs: int = 1,
             method: str = "fedavg"):
    """mnist: the paper's MNIST CNN on mnist-5k, 2 shards per client, batch 10; with more than 100
    clients the shards shrink so that the 4000 training images go round.
    cifar: VGG-11 with static BN on `dataset` (CIFAR-10 or the synthetic set), 2 shards of up to 50
    images per client, batch 20. Local epochs: `epochs` (default 1). The method: FedAvg, or FedProx
    (mu 0.01), whose proximal term takes the path of every method with its own local rule.
    On CUDA the Ray executors share one GPU in equal parts."""
    if name == "mnist":
        shard = min(20, 4000 // (2 * clients))
        data, model, batch = "mnist-5k", {"name": "cnn"}, 10
    elif name == "cifar":
        train_images = SYNTHETIC_CIFAR["train"] if dataset.startswith("npz:") else 50000
        shard = min(50, train_images // (2 * clients))
        data, model, batch = dataset, {"name": "vgg11", "norm": "sbn"}, 20
    else:
        raise UserError("--workload", f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    engine = {"backend": "ray", "executors": executors, "cpus_per_executor": cpus_per_executor,
              "device": device, "batch_clients": False, "start_timeout_s": 600}  # a loaded machine starts slowly
    if device == "cuda":
        engine["gpus_per_executor"] = 1.0 / executors
    raw = {"name": "bench", "seed": 1, "rounds": 1000,
           "data": {"dataset": data, "split": {"kind": "shards", "shards_per_client": 2, "shard_size": shard}},
           "clients": {"total": clients, "per_round": clients_per_round}, "model": model,
           "train": {"epochs": epochs, "batch_size": batch}, "method": {"name": method}, "engine": engine}
    return expand(raw)[0][0]


def cifar_dataset(folder: str | Path) -> tuple[str, str]:
    """(data.dataset value, label): CIFAR-10 from the default data root if it is there, otherwise a
    synthetic CIFAR-shaped set written as an npz file into `folder`."""
    from harness.data import load_dataset

    try:
        load_dataset(DataConfig(dataset="cifar10"))
        return "cifar10", f"cifar10 (from {DataConfig().root})"
    except ConfigError:
        pass
    spec = SYNTHETIC_CIFAR
    gen = np.random.default_rng(spec["seed"])
    path = Path(folder) / "synthetic-cifar.npz"
    np.savez(path, x_train=gen.integers(0, 256, (spec["train"], 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(spec["train"]) % 10,
             x_test=gen.integers(0, 256, (spec["test"], 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(spec["test"]) % 10)
    return f"npz:{path}", (f"synthetic CIFAR-shaped data ({spec['train']} train / {spec['test']} test uint8 "
                           f"3x32x32 images, 10 classes, seed {spec['seed']}; no CIFAR-10 under {DataConfig().root})")


def require_device(device: str) -> None:
    import torch

    if device not in ("cpu", "cuda"):
        raise UserError("--device", f"expected cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device", "cuda was asked for, but torch sees no CUDA device on this machine")


class PeakMemory:
    """Samples the memory of this process and all its descendants: the sum of their resident set
    sizes (RSS; a page shared by several processes, such as torch's libraries, counts once per
    process) and, where the system reports it, of their proportional set sizes (PSS; a shared page
    counts once in all, split among its processes: the physical memory the tree holds)."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak_rss, self.peak_pss = interval, 0, 0

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                rss += info.rss
                pss += getattr(info, "pss", 0)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self):  # may be entered several times: the peaks are over all of them
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _strategy(bench: Workbench):
    return method_class(bench.cfg.method.name)(bench, bench.method_params)


def _rounds(bench: Workbench, rounds: int):
    """Yield (round, broadcast, tasks) for warm-up + timed rounds, aggregating in between."""
    cfg = bench.cfg
    strategy = _strategy(bench)
    strategy.setup(MemoryStore())
    for rnd in range(rounds + 1):
        sampled = np.sort(rng(cfg.seed, "sample", rnd).choice(cfg.clients.total, cfg.clients.per_round, replace=False))
        tiers = bench.devices.tiers_of(rnd, sampled)
        slots = [ClientSlot(int(c), cfg.devices.tiers[t], bench.clients.num_samples(int(c))) for c, t in zip(sampled, tiers)]
        broadcast, instructions = strategy.configure(rnd, slots)
        results = yield rnd, broadcast, [ClientTask(s.client_id, rnd, s.tier, i) for s, i in zip(slots, instructions)]
        strategy.aggregate(rnd, [r for r in results if r.ok], [r for r in results if not r.ok])


def _time(bench: Workbench, rounds: int, *runs, compare=None) -> list[float]:
    """Median seconds per timed round of each `run(broadcast, tasks)` (round 0 is the warm-up).
    Several runs take turns on every round's tasks (in alternating order), so that a change in the
    machine's speed during the measurement affects them alike; they compute the same results
    (`compare(results of each run)` is called every round)."""
    times: list[list[float]] = [[] for _ in runs]
    loop = _rounds(bench, rounds)
    rnd, broadcast, tasks = next(loop)
    while True:
        order = list(range(len(runs)))[::(-1) ** rnd]
        outputs = [None] * len(runs)
        for k in order:
            start = time.perf_counter()
            outputs[k] = runs[k](broadcast, tasks)
            if rnd > 0:
                times[k].append(time.perf_counter() - start)
        if compare is not None:
            compare(outputs)
        try:
            rnd, broadcast, tasks = loop.send(outputs[order[-1]])
        except StopIteration:
            return [statistics.median(t) for t in times]


class _Pool:
    """A multiprocessing pool of worker processes, one torch thread each, each set up once by
    `initializer`; a round's tasks are split into equal contiguous parts, one message each way per
    worker. Messages are pickled as the Ray engine's are (harness.transport: tensors as numpy
    arrays): multiprocessing's own pickler would move every tensor into a new shared-memory segment
    and pass its file descriptor, which costs more than copying the bytes."""

    def __init__(self, processes: int, initializer, initargs, work):
        self.processes, self.work = processes, work
        # spawn: no server process left behind to count in the Ray run's memory
        self.pool = mp.get_context("spawn").Pool(processes, initializer=initializer, initargs=initargs)

    def run(self, broadcast, tasks):
        size = -(-len(tasks) // self.processes)
        parts = [pack((broadcast, tasks[i:i + size])) for i in range(0, len(tasks), size)]
        return [r for part in self.pool.map(self.work, parts) for r in unpack(part)]

    def close(self):
        self.pool.terminate()
        self.pool.join()


_worker: dict = {}


def _init_limit(cfg_json: str, threads: int, device: str = "cpu") -> None:
    import torch

    torch.set_num_threads(threads)
    cfg = ExperimentConfig.model_validate_json(cfg_json)
    bench = Workbench(cfg, device=device)
    _worker["runner"] = ClientRunner(bench, cfg.engine.model_copy(update={"batch_clients": False}))


def _limit_chunk(payload: bytes) -> bytes:
    return pack(_worker["runner"].run(*unpack(payload)))


# -- the plain loop -----------------------------------------------------------------------------------
def _plain_cnn(num_classes: int):
    """The paper's MNIST CNN written as plain PyTorch (the layers of harness.models.CNN, under the
    same parameter names)."""
    import torch.nn as nn
    import torch.nn.functional as F

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 10, 5), nn.Conv2d(10, 20, 5)
            self.fc1, self.fc2 = nn.Linear(320, 50), nn.Linear(50, num_classes)

        def forward(self, x):
            x = F.relu(F.max_pool2d(self.conv1(x), 2))
            x = F.relu(F.max_pool2d(self.conv2(x), 2))
            return self.fc2(F.relu(self.fc1(x.flatten(1))))

    return CNN()


def _init_plain(cfg_json: str, threads: int, device: str = "cpu") -> None:
    """The worker's data (every client's normalised training images, one stacked tensor per client),
    model and optimizer."""
    import torch

    torch.set_num_threads(threads)
    cfg = ExperimentConfig.model_validate_json(cfg_json)
    bench = Workbench(cfg, device=device)  # for the data and the partition only
    model = _plain_cnn(bench.num_classes).to(device)
    assert [n for n, _ in model.named_parameters()] == list(bench.param_shapes), "the plain CNN's names differ"
    t = cfg.train
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                foreach=True)
    _worker.update(cfg=cfg, device=device, data=[bench.train_data(c) for c in range(cfg.clients.total)],
                   model=model, optimizer=optimizer, mu=bench.method_params.mu if cfg.method.name == "fedprox" else None)


def _plain_chunk(payload: bytes) -> bytes:
    """Train the tasks' clients from the broadcast (parameter name -> numpy array); per client its
    trained parameters as numpy arrays, in the model's order."""
    import torch
    import torch.nn.functional as F

    broadcast, tasks = pickle.loads(payload)
    cfg, model, optimizer, data = _worker["cfg"], _worker["model"], _worker["optimizer"], _worker["data"]
    params = list(model.parameters())
    start = [torch.from_numpy(broadcast[name]).to(_worker["device"]) for name, _ in model.named_parameters()]
    train, results = cfg.train, []
    mu = _worker["mu"]
    for task in tasks:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        optimizer.param_groups[0]["lr"] = train.lr * train.lr_decay ** task.round
        optimizer.state.clear()  # momentum buffers start at zero for every client
        generator = torch.Generator().manual_seed(seed_of(cfg.seed, "client", task.round, task.client_id))
        x, y = data[task.client_id]
        for _ in range(train.epochs):
            order = torch.randperm(len(y), generator=generator).to(x.device)
            for begin in range(0, len(y), train.batch_size):
                batch = order[begin:begin + train.batch_size]
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x[batch]), y[batch])
                if mu is not None:  # FedProx: mu/2 ||w - w_global||^2
                    loss = loss + mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(params, start))
                loss.backward()
                optimizer.step()
        results.append((task.client_id, len(y), [p.detach().to("cpu", copy=True).numpy() for p in params]))
    return pickle.dumps(results, pickle.HIGHEST_PROTOCOL)


class _PlainRun:
    """The plain loop on its pool: the broadcast goes out as numpy arrays, the trained parameters
    come back as numpy arrays and become results under fedbench's parameter names (FedAvg's payload)."""

    def __init__(self, pool: "_Pool", names: list[str]):
        self.pool, self.names = pool, names

    def __call__(self, broadcast, tasks) -> list[ClientResult]:
        import torch

        out = self.pool.run({n: broadcast[n].numpy() for n in self.names}, tasks)
        return [ClientResult(client_id, task.round, num_samples=samples,
                             payload={n: torch.from_numpy(a) for n, a in zip(self.names, arrays)})
                for task, (client_id, samples, arrays) in zip(tasks, out)]


class _SameTraining:
    """Checks, every round, that the plain loop trained every client as fedbench did: the same
    clients, and every trained parameter equal (`max_abs_diff` over all of them, 0.0 when bitwise)."""

    def __init__(self, fedbench_run: int, plain_run: int):
        self.runs, self.same, self.max_abs_diff = (fedbench_run, plain_run), True, 0.0

    def __call__(self, outputs):
        ours, plain = (outputs[k] for k in self.runs)
        self.same &= [a.client_id for a in ours] == [b.client_id for b in plain]
        for a, b in zip(ours, plain):
            self.same &= a.payload.keys() == b.payload.keys()
            for name, tensor in b.payload.items():
                diff = float((a.payload[name] - tensor).abs().max())
                self.max_abs_diff = max(self.max_abs_diff, diff)
        self.same &= self.max_abs_diff == 0.0


def run_bench(clients_per_round: int = 10, rounds: int = 10, clients: int = 100, executors: int = 2,
              cpus_per_executor: float = 1.0, workload_name: str = "mnist", device: str = "cpu",
              epochs: int = 1, method: str = "fedavg") -> dict:
    import torch

    from harness.ray_engine import RayEngine

    require_device(device)
    with tempfile.TemporaryDirectory(prefix="fedbench-bench-") as folder:
        dataset, dataset_label = (None, "mnist-5k") if workload_name == "mnist" else cifar_dataset(folder)
        cfg = workload(clients, clients_per_round, executors, cpus_per_executor, workload_name, dataset, device, epochs,
                       method)
        bench = Workbench(cfg, device=device)
        threads = torch_threads(cpus_per_executor)
        serial = SerialEngine(cfg.engine)
        serial.start(bench)
        batched = SerialEngine(cfg.engine.model_copy(update={"batch_clients": True}))
        batched.start(bench)
        serial_s, batched_s = _time(bench, rounds, serial.run, batched.run)

        # Memory is sampled while the Ray pool starts and over two rounds after the timed ones, with
        # the process pools gone: reading every process's memory map costs CPU the executors would miss.
        memory = PeakMemory()
        engine = RayEngine(cfg.engine)
        pools = []
        try:
            with memory:
                engine.start(bench)
            args = (cfg.model_dump_json(), threads, device)
            pools.append(_Pool(executors, _init_limit, args, _limit_chunk))
            runs = [pools[0].run, engine.run]
            same = None
            if workload_name == "mnist":
                pools.append(_Pool(executors, _init_plain, args, _plain_chunk))
                runs.append(_PlainRun(pools[1], list(bench.param_shapes)))
                same = _SameTraining(1, 2)
            limit_s, ray_s, *plain = _time(bench, rounds, *runs, compare=same)
            for pool in pools:
                pool.close()
            pools = []
            with memory:
                _time(bench, 2, engine.run)
        finally:
            for pool in pools:
                pool.close()
            engine.close()
    plain_s = plain[0] if plain else None
    import ray

    t = cfg.train
    return {
        "clients": clients, "clients_per_round": clients_per_round, "rounds_timed": rounds,
        "executors": executors, "cpus_per_executor": cpus_per_executor,
        "serial_s_per_round": round(serial_s, 4), "limit_s_per_round": round(limit_s, 4),
        "ray_s_per_round": round(ray_s, 4), "ray_vs_limit": round(ray_s / limit_s, 3),
        "plain_s_per_round": round(plain_s, 4) if plain_s else None,
        "ray_vs_plain": round(ray_s / plain_s, 3) if plain_s else None,
        "plain_same_training": same.same if same else None,
        "plain_max_abs_diff": same.max_abs_diff if same else None,
        "ray_vs_serial": round(ray_s / serial_s, 3), "peak_rss_mb": round(memory.peak_rss / 2**20, 1),
        "peak_pss_mb": round(memory.peak_pss / 2**20, 1),
        "batched_s_per_round": round(batched_s, 4), "batched_vs_serial": round(batched_s / serial_s, 3),
        "workload": workload_name, "method": method, "device": device, "dataset": dataset_label, "model": bench.model_name,
        "norm": cfg.model.norm, "epochs": t.epochs, "batch_size": t.batch_size,
        "gpus_per_executor": cfg.engine.gpus_per_executor,
        "cuda_graphs": cuda_graphs_enabled(cfg.engine, device),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "ray": ray.__version__,
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
    }


def print_bench(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    r = result
    model = {"cnn": "MNIST CNN", "vgg11": f"VGG-11 ({ {'sbn': 'static BN'}.get(r['norm'], r['norm'])})"}.get(
        r["model"], r["model"])
    print(f"workload: {model} on {r['dataset']}, {r['clients']} clients, {r['clients_per_round']} "
          f"per round, {METHOD_TITLES[r.get('method', 'fedavg')]}, batch {r['batch_size']}, {r['epochs']} epoch(s); device {r['device']}; "
          f"{r['executors']} executors x {r['cpus_per_executor']:g} CPU"
          + (f" x {r['gpus_per_executor']:g} GPU" if r["gpus_per_executor"] else "")
          + f"; median of {r['rounds_timed']} rounds after a warm-up")
    print(f"  serial          {r['serial_s_per_round']:.4f} s/round")
    print(f"  batched         {r['batched_s_per_round']:.4f} s/round   batched/serial {r['batched_vs_serial']:.3f}"
          f"   CUDA graphs {'on' if r['cuda_graphs'] else 'off'}")
    print(f"  limit (procs)   {r['limit_s_per_round']:.4f} s/round")
    print(f"  ray             {r['ray_s_per_round']:.4f} s/round   ray/limit {r['ray_vs_limit']:.3f}   "
          f"ray/serial {r['ray_vs_serial']:.3f}")
    if r["plain_s_per_round"] is not None:
        print(f"  plain loop      {r['plain_s_per_round']:.4f} s/round   ray/plain {r['ray_vs_plain']:.3f}   "
              "same training: " + ("yes, bitwise" if r["plain_same_training"] else
                                   f"largest difference of a trained parameter {r['plain_max_abs_diff']:.1e}"))
    print(f"  peak memory of the process tree during the Ray run: {r['peak_rss_mb']:.0f} MB summed RSS, "
          f"{r['peak_pss_mb']:.0f} MB summed PSS (shared pages counted once)")


# -- the scale workload --------------------------------------------------------------------------------
def scale_workload(clients: int, clients_per_round: int, rounds: int, method: str, executors: int,
                   cpus_per_executor: float, out: str):
    """Synthetic(0.5, 0.5), FedProx's multinomial logistic regression, 1 local epoch of batch 10 at
    lr 0.05, five device tiers, on the Ray engine; per-client accuracy over the fixed cohort of 1000
    clients every round."""
    engine = {"backend": "ray", "executors": executors, "cpus_per_executor": cpus_per_executor, "device": "cpu",
              "batch_clients": False, "start_timeout_s": 600}
    raw = {"name": "scale", "seed": 1, "rounds": rounds, "out": out, "checkpoint_every": 0,
           "data": {"dataset": "synthetic", "alpha": 0.5, "beta": 0.5},
           "clients": {"total": clients, "per_round": clients_per_round}, "model": {"name": "mlr"},
           "train": {"epochs": 1, "batch_size": 10, "lr": 0.05}, "method": {"name": method}, "engine": engine}
    if method == "fedlps":
        raw["method"]["variant"] = "paper"
    return expand(raw)[0][0]


class _TimedEngine:
    """The Ray engine, noting when its pool is up and how long each round's client work takes."""

    def __init__(self, engine):
        self.engine, self.name, self.started_at, self.run_s = engine, engine.name, None, []

    def start(self, bench):
        self.engine.start(bench)
        self.started_at = time.time()

    def run(self, broadcast, tasks):
        start = time.perf_counter()
        results = self.engine.run(broadcast, tasks)
        self.run_s.append(time.perf_counter() - start)
        return results

    def close(self):
        self.engine.close()


def _start_ray(attempts: int = 3) -> None:
    """A local Ray, retried: on a loaded machine its raylet may miss Ray's fixed 30 s to register."""
    import ray

    from harness.ray_engine import connect

    for attempt in range(attempts):
        try:
            connect()
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()


def run_scale_bench(clients: int, clients_per_round: int = 100, rounds: int = 5, method: str = "fedavg",
                    executors: int = 2, cpus_per_executor: float = 1.0) -> dict:
    """A fresh experiment of the scale workload, timed from before anything is built:
    - startup_s: from the start of this process (its imports included) until the first round starts
      (after the Workbench, the strategy, Ray and its executor pool);
    - per round: round_s (its wall time, rounds.parquet's wall_s), train_s (the engine's call: the
      executors' client work as the driver waits for it) and the rest, the harness's own work
      (sampling, tiers, configure, the state store, aggregation, evaluation, records);
      overhead_fraction = 1 - train_s / round_s, the median over the rounds after round 0 (round 0
      also builds the evaluation cohort's test set: its time is reported as first_round_s);
    - peak_pss_mb / peak_rss_mb: the memory of the whole process tree (this process, Ray's processes,
      the executors), sampled every 0.1 s by a thread from start to end (PeakMemory)."""
    import ray
    import torch

    from harness.experiment import Experiment
    from harness.ray_engine import RayEngine

    memory = PeakMemory()
    with tempfile.TemporaryDirectory(prefix="fedbench-scale-") as folder, memory:
        _start_ray()
        cfg = scale_workload(clients, clients_per_round, rounds, method, executors, cpus_per_executor, folder)
        engine = _TimedEngine(RayEngine(cfg.engine))
        experiment = Experiment(cfg, engine=engine)
        try:
            experiment.run()
        finally:
            engine.close()
        startup_s = engine.started_at - psutil.Process().create_time()
        rows = experiment.rounds
    rounds_s = [r["wall_s"] for r in rows]
    fractions = [1 - t / r for t, r in zip(engine.run_s[1:], rounds_s[1:])]
    return {
        "workload": "synthetic", "clients": clients, "clients_per_round": clients_per_round, "method": method,
        "rounds": rounds, "executors": executors, "cpus_per_executor": cpus_per_executor,
        "startup_s": round(startup_s, 2), "first_round_s": round(rounds_s[0], 3),
        "round_s_median": round(statistics.median(rounds_s[1:]), 4),
        "train_s_median": round(statistics.median(engine.run_s[1:]), 4),
        "overhead_fraction": round(statistics.median(fractions), 4),
        "peak_pss_mb": round(memory.peak_pss / 2**20, 1), "peak_rss_mb": round(memory.peak_rss / 2**20, 1),
        "final_acc": round(rows[-1]["acc_clients_mean"], 4),
        "data": "Synthetic(0.5, 0.5), model mlr, 1 epoch, batch 10, lr 0.05; accuracy over a cohort of 1000",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "ray": ray.__version__},
    }


def print_scale(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    r = result
    print(f"synthetic workload: {r['clients']:,} clients, {r['clients_per_round']} per round, {r['method']}, "
          f"{r['rounds']} rounds on {r['executors']} Ray executors x {r['cpus_per_executor']:g} CPU")
    print(f"  start-up to the first round   {r['startup_s']:.1f} s")
    print(f"  round (median after round 0)  {r['round_s_median']:.3f} s, of which client training "
          f"{r['train_s_median']:.3f} s: overhead {100 * r['overhead_fraction']:.1f} %")
    print(f"  peak memory of the process tree: {r['peak_pss_mb']:.0f} MB PSS ({r['peak_rss_mb']:.0f} MB summed RSS)")


def plot_scale(folder: str | Path) -> Path:
    """results/scale/scale.png: start-up, peak PSS and round time against the number of clients, a
    line per method, from the JSON files of `fedbench bench --workload synthetic --json` in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    runs = [r for r in runs if r.get("workload") == "synthetic"]
    if not runs:
        raise UserError(str(folder), "holds no JSON result of `fedbench bench --workload synthetic --json`")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("startup_s", "start-up to round 0 (s)"), ("peak_pss_mb", "peak PSS of the process tree (MB)"),
              ("round_s_median", "round time, median (s)")]
    for method in sorted({r["method"] for r in runs}):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["clients"])
        for ax, (key, label) in zip(axes, panels):
            ax.plot([r["clients"] for r in mine], [r[key] for r in mine], marker="o", label=method)
            if key == "round_s_median":
                ax.plot([r["clients"] for r in mine], [r["train_s_median"] for r in mine], ls="--", marker=".",
                        label=f"{method}: client training")
    for ax, (key, label) in zip(axes, panels):
        ax.set_xscale("log")
        ax.set_xlabel("clients")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].legend(fontsize=7)
    r = runs[0]
    fig.suptitle(f"Synthetic(0.5, 0.5), {r['clients_per_round']} clients per round, Ray engine "
                 f"({r['executors']} executors x {r['cpus_per_executor']:g} CPU), {r['machine']['cpus']}-core machine")
    fig.tight_layout()
    out = folder / "scale.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def scale_table(folder: str | Path) -> str:
    """The README's table of the scale runs in `folder` (markdown), by method and population."""
    runs = sorted((json.loads(p.read_text()) for p in Path(folder).glob("*.json")),
                  key=lambda r: (r["method"], r["clients"]))
    lines = ["| method | clients | start-up s | peak PSS MB | summed RSS MB | round s (median) | client training s | "
             "overhead % |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['method']} | {r['clients']:,} | {r['startup_s']:.1f} | {r['peak_pss_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['round_s_median']:.2f} | {r['train_s_median']:.2f} | "
                     f"{100 * r['overhead_fraction']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m harness.bench plot|table results/scale
    if sys.argv[1:2] in (["plot"], ["table"]) and len(sys.argv) == 3:
        print(plot_scale(sys.argv[2]) if sys.argv[1] == "plot" else scale_table(sys.argv[2]))
    else:
        sys.exit("usage: python -m harness.bench plot|table FOLDER")
