"""The Ray engine: a pool of long-lived executor actors runs the round's client tasks.

Clients are records, not actors: an executor that imported torch costs ~400 MB, so a pool of a few
executors (each with a fractional CPU/GPU quota) serves hundreds to thousands of clients. Each executor
builds the experiment's Workbench once (datasets, partition, model templates). Every round the
broadcast goes into the object store once and each executor gets one call with its share of the
clients, balanced by their training samples. Calls and results travel as one pickle each with their
tensors as numpy arrays (harness/transport.py). Results come back in task order, so aggregation order
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
from dataclasses import dataclass, field

from harness.config import EngineConfig
from harness.engine import ClientRunner
from harness.errors import UserError
from harness.records import ClientResult, ClientTask
from harness.training import torch_threads
from harness.transport import pack, unpack
from harness.workbench import Workbench

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # per call; a process that keeps dying is a bug to report, not to retry forever


class Executor:
    """One pool member. Ray instantiates it in its own process with its quota."""

    def __init__(self, spec, dataset_ref: list | None, cpus: float, use_cuda: bool):
        import ray
        import torch

        dataset = ray.get(dataset_ref[0]) if dataset_ref else None  # None: load it from the config
        torch.set_num_threads(torch_threads(cpus))
        device = "cuda" if use_cuda and torch.cuda.is_available() else "cpu"
        self.bench = Workbench(spec, device=device, dataset=dataset)  # the driver's spec: nothing validated again
        self.runner = ClientRunner(self.bench, self.bench.cfg.engine)

    def ready(self) -> dict:
        import torch

        return {"pid": os.getpid(), "device": str(self.bench.device), "threads": torch.get_num_threads()}

    def run(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        return self.runner.run(broadcast, tasks)

    def run_packed(self, broadcast: bytes, tasks: bytes) -> bytes:
        """`run` on packed arguments (harness.transport.pack), its results packed."""
        return pack(self.run(unpack(broadcast), unpack(tasks)))


def connect(include_dashboard: bool = False) -> None:
    """Join the current Ray session, the cluster at RAY_ADDRESS, or start a local one.

    A local Ray is this machine's alone: every listener (GCS, raylet, object manager, workers, agents,
    dashboard) is bound to 127.0.0.1, its token file is readable by its owner only, and a watcher
    process ends the session's processes when the driver dies, even by SIGKILL."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = dict(log_to_driver=False, logging_level=logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        return
    _loopback_only()
    _private_token_file()
    # A local Ray has token authentication on (Ray >= 2.59; the token in ~/.ray/auth_token, or
    # where RAY_AUTH_TOKEN_PATH says). The README explains it once; Ray's notice about it is not
    # repeated on every run.
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(include_dashboard=include_dashboard, dashboard_host="127.0.0.1", **kwargs)
    finally:
        notice.setLevel(level)
    _private_token_file()
    _watch_driver()


def _loopback_only() -> None:
    """Make Ray take 127.0.0.1 for this node's address, so that its servers bind there. Ray binds its
    gRPC servers to the node's address; ray.init(_node_ip_address="127.0.0.1") is turned back into
    the outward address by Ray (services.resolve_ip_for_localhost), but Ray takes the loopback address
    for the node where it is told that it runs no multi-node cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    inherited by every process of the session)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; the module may be imported already


def _private_token_file() -> None:
    """The token Ray would write to ~/.ray/auth_token with the process's umask (often 0644), written
    first with mode 0600; an existing one of ours is made 0600."""
    import secrets
    from pathlib import Path

    if os.environ.get("RAY_AUTH_MODE", "token") != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # as Ray's own generator makes them: 256 random bits
        elif path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except FileExistsError:
        pass
    except OSError as e:
        log.warning("cannot make the Ray token file %s private: %s", path, e)


_WATCHER = r"""
import os, sys, threading, psutil
driver = psutil.Process(int(sys.argv[1]))
seen = {}
def snapshot():
    try:
        for p in driver.children(recursive=True):
            seen.setdefault(p.pid, p)
    except psutil.Error:
        pass
def watch():
    while True:
        snapshot()
        if done.wait(1.0):
            return
done = threading.Event()
threading.Thread(target=watch, daemon=True).start()
sys.stdin.buffer.read()  # end of file: the driver has ended, however it ended
done.set()
procs = [p for p in seen.values() if p.pid != os.getpid()]
for p in list(procs):
    try:
        procs += p.children(recursive=True)
    except psutil.Error:
        pass
alive = []
for p in procs:
    try:
        if p.is_running():  # the same process (pid and start time), not a new one with its pid
            p.terminate()
            alive.append(p)
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(alive, timeout=3)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def _watch_driver() -> None:
    """A small process that ends this Ray session's processes once the driver has ended: Ray's
    agents and dashboard outlive a driver killed by SIGKILL. It holds the read end of a pipe whose
    write end only this process has; the kernel closes it however the process ends."""
    import subprocess
    import sys

    global _watcher
    _watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid())], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


_watcher = None  # kept referenced: its pipe stays open as long as this process lives


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


@dataclass
class Pool:
    """Executors of one quota, for the clients of `tiers` (None: the tiers of no group)."""

    tiers: frozenset[str] | None
    executors: int
    cpus: float
    gpus: float
    actors: list = field(default_factory=list)
    info: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.executors} executors x ({self.cpus:g} CPU, {self.gpus:g} GPU)"


def plan_pools(cfg: EngineConfig, tier_names: list[str], cpus: float, gpus: float) -> list[Pool]:
    """One pool per `engine.groups` entry, and the main pool for the tiers of no group (with
    `executors: auto` it takes what the groups leave)."""
    pools = [Pool(frozenset(g.tiers), g.executors, g.cpus_per_executor, g.gpus_per_executor) for g in cfg.groups]
    if set(tier_names) - {t for g in cfg.groups for t in g.tiers}:
        left_cpus = max(cpus - sum(p.executors * p.cpus for p in pools), 0.0)
        left_gpus = max(gpus - sum(p.executors * p.gpus for p in pools), 0.0)
        pools.append(Pool(None, pool_size(cfg, left_cpus, left_gpus), cfg.cpus_per_executor, cfg.gpus_per_executor))
    return pools


class RayEngine:
    name = "ray"

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.pools: list[Pool] = []

    @property
    def actors(self) -> list:
        return [a for pool in self.pools for a in pool.actors]

    @property
    def executor_info(self) -> list[dict]:
        return [i for pool in self.pools for i in pool.info]

    def start(self, bench) -> None:
        """Start the pools for `bench`'s experiment; each executor builds the method's client half."""
        import ray

        connect(self.cfg.include_dashboard)
        cpus, gpus, self._where = _capacity()
        pools = plan_pools(self.cfg, [t.name for t in bench.cfg.devices.tiers], cpus, gpus)
        want_cpus = sum(p.executors * p.cpus for p in pools)
        want_gpus = sum(p.executors * p.gpus for p in pools)
        if want_cpus > cpus + 1e-9 or want_gpus > gpus + 1e-9:
            raise UserError("engine", f"{' + '.join(p.describe() for p in pools)} ask for {want_cpus:g} CPUs and "
                                      f"{want_gpus:g} GPUs, but {self._where}")
        # The driver's dataset goes into the object store once: executors on any node share it
        # without reading files there (their nodes need no copy of data.root).
        self._shared = (bench.experiment, [ray.put(bench.dataset)])
        self.pools = pools
        for pool in pools:
            pool.actors = [self._spawn(pool) for _ in range(pool.executors)]
        for pool in pools:
            pool.info = self._wait_ready(pool, pool.actors)
        self.pool_of_tier = {t.name: next(p for p in pools if p.tiers is None or t.name in p.tiers)
                             for t in bench.cfg.devices.tiers}
        # A client's work estimate for balancing: its training samples (the same epochs for all).
        self.work = bench.clients.num_samples
        log.info("ray pools: %s", [(p.describe(), sorted(p.tiers or []), p.info) for p in pools])

    def _spawn(self, pool: Pool):
        import ray

        use_cuda = pool.gpus > 0 and self.cfg.device != "cpu"
        remote = ray.remote(Executor).options(num_cpus=pool.cpus, num_gpus=pool.gpus)
        return remote.remote(*self._shared, pool.cpus, use_cuda)

    def _wait_ready(self, pool: Pool, actors: list) -> list[dict]:
        import ray

        timeout = self.cfg.start_timeout_s
        ready = [a.ready.remote() for a in actors]
        _, pending = ray.wait(ready, num_returns=len(ready), timeout=timeout)
        if pending:
            self.close()
            free = ray.available_resources()
            raise UserError("engine", f"{len(pending)} of {len(actors)} executors ({pool.cpus:g} CPU, {pool.gpus:g} GPU "
                                      f"each) did not start within {timeout:g} s; {self._where}; free now: "
                                      f"{free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs")
        return ray.get(ready)

    def _replace(self, pool: Pool, k: int) -> None:
        """A new executor in place of executor k of `pool`, whose process died."""
        import ray

        ray.kill(pool.actors[k])
        pool.actors[k] = self._spawn(pool)
        pool.info[k] = self._wait_ready(pool, [pool.actors[k]])[0]
        log.warning("an executor died and was replaced by process %d", pool.info[k]["pid"])

    def run(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        import ray
        from ray.exceptions import RayActorError

        # A small broadcast travels inside the calls; a larger one goes into the object store once.
        packed = pack(broadcast)
        broadcast_ref = packed if len(packed) < INLINE_BYTES else ray.put(packed)
        calls = []  # (pool, executor, indices of its tasks, the call)
        for pool in self.pools:
            mine = [i for i, t in enumerate(tasks) if self.pool_of_tier[t.tier.name] is pool]
            shares = balanced_shares([self.work(tasks[i].client_id) for i in mine], len(pool.actors))
            for k, share in enumerate(shares):
                if share:
                    indices = [mine[j] for j in share]
                    share_packed = pack([tasks[i] for i in indices])
                    calls.append((pool, k, indices, share_packed,
                                  pool.actors[k].run_packed.remote(broadcast_ref, share_packed)))
        results: list[ClientResult | None] = [None] * len(tasks)
        for pool, k, indices, share_packed, ref in calls:
            for attempt in range(MAX_RESTARTS + 1):
                try:
                    chunk = unpack(ray.get(ref))
                    break
                except RayActorError as e:  # the process died: the same calls on a new executor
                    if attempt == MAX_RESTARTS:
                        chunk = [ClientResult(tasks[i].client_id, tasks[i].round, status="error",
                                              error=f"executor died {attempt + 1} times: {type(e).__name__}")
                                 for i in indices]
                        break
                    self._replace(pool, k)
                    ref = pool.actors[k].run_packed.remote(broadcast_ref, share_packed)
            for i, result in zip(indices, chunk):
                results[i] = result
        return results

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.pools = []


INLINE_BYTES = 96 * 1024  # below Ray's limit for arguments sent inside a call (100 KiB)


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
