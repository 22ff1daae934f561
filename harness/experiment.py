"""The round loop: sample -> configure -> execute client tasks -> aggregate -> evaluate -> record.

All federated state (the strategy's server state, the client state store, the rows recorded so far
and the running totals) can be exported after any round and restored, so an interrupted experiment
continues where it stopped and ends with the numbers of an uninterrupted run. Every random stream
derives from (seed, round, client), so there is no generator state to carry besides what strategies
keep in their own state.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import numpy as np

from harness import storage
from harness.availability import round_outcome, sample_clients, sample_size, tiebreak_order
from harness.columns import ClientRow, RoundRow, SummaryRow, accuracies, machine, row as record_row
from harness.config import EngineConfig, ExperimentConfig, portable
from harness.cost import client_time
from harness.engine import Engine, SerialEngine
from harness.ray_engine import RayEngine
from harness.records import ERROR, LATE, NOT_KEPT, ClientResult, ClientSlot, ClientTask
from harness.registry import declared_columns, method_class
from harness.results import CLIENTS, ROUNDS, SUMMARY, with_columns, write_table, write_yaml
from harness.spec import ExperimentSpec, resolve
from harness.state import DiskStore, MemoryStore
from harness.workbench import Workbench

log = logging.getLogger(__name__)

CLIENT_PARTS = "_clients"  # clients.parquet in parts while the experiment runs
FLUSH_EVERY_S = 10.0  # rounds.parquet and the next part of clients.parquet, while it runs
RoundCallback = Callable[[dict[str, Any], Callable[[], dict[str, Any]] | None], None]


def make_engine(cfg: EngineConfig) -> Engine:
    return RayEngine(cfg) if cfg.backend == "ray" else SerialEngine(cfg)


class Experiment:
    """One federated experiment. `on_round(row, checkpoint)` is called after every evaluated round
    with its rounds.parquet row and, every `cfg.checkpoint_every` rounds, a function returning the
    full state (for `restore`)."""

    def __init__(self, spec: ExperimentSpec | ExperimentConfig, *, engine=None, progress: bool = False,
                 on_round: RoundCallback | None = None):
        self.spec = spec = spec if isinstance(spec, ExperimentSpec) else resolve(spec)
        self.cfg = cfg = spec.config
        self.out_dir = storage.resolve(cfg.out) / cfg.name
        self.bench = Workbench(spec)
        self.strategy = method_class(cfg.method.name)(self.bench, spec.params)
        self.round_columns = declared_columns("round", cfg.method.name)
        self.client_columns = declared_columns("client", cfg.method.name)
        self.rounds_schema = with_columns(ROUNDS, self.round_columns)
        self.clients_schema = with_columns(CLIENTS, self.client_columns)
        self.store = DiskStore() if cfg.engine.state_store == "disk" else MemoryStore()
        self.strategy.setup(self.store)
        self.engine = engine
        self.progress = progress
        self.on_round = on_round
        self.identity = spec.identity
        self.next_round = 0
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []  # rows not yet in a part of clients.parquet
        self.client_parts = 0  # parts written: <experiment>/_clients/part-000000.parquet, ...
        self.totals = dict(sim=0.0, flops=0.0, up=0, down=0, wall=0.0)
        # Client failures so far: tasks failed, rounds with a failure, the first one, and why the
        # experiment stopped (None while it may go on).
        self.failures: dict[str, Any] = dict(clients=0, rounds=0, first=None, stopped=None, trained=0)

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Tensors and plain data only (harness.state.dumps). Client rows already written as parts
        are counted, not copied."""
        return {"config": self.cfg.model_dump(mode="json"), "next_round": self.next_round,
                "strategy": self.strategy.state_dict(), "store": self.store.export(),
                "rounds": list(self.rounds), "clients": list(self.clients), "client_parts": self.client_parts,
                "totals": dict(self.totals), "failures": dict(self.failures)}

    def restore(self, state: dict[str, Any]) -> None:
        changed = config_changes(state["config"], self.cfg.model_dump(mode="json"), type(self.cfg))
        if changed:
            raise ValueError(f"checkpoint of experiment {self.cfg.name} was made with another config ({changed})")
        self.next_round = state["next_round"]
        self.strategy.load_state_dict(state["strategy"])
        self.store.restore(state["store"])
        self.rounds, self.clients = list(state["rounds"]), list(state["clients"])
        self.client_parts = state["client_parts"]
        self.totals = dict(state["totals"])
        self.failures = dict(self.failures, **state.get("failures", {}))  # older checkpoints have none

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        owns_engine = self.engine is None
        engine = self.engine or make_engine(cfg.engine)
        bar = None
        last_checkpoint = self.next_round
        try:
            engine.start(self.bench)  # a pool the cluster cannot hold fails before any write
            self._clear_stale()
            write_yaml(self.out_dir / "config.yaml", portable(cfg))
            if self.progress:
                from tqdm import tqdm
                bar = tqdm(total=cfg.rounds, initial=self.next_round, desc=cfg.name, unit="round", dynamic_ncols=True)
            last_flush = time.monotonic()
            while self.next_round < cfg.rounds and self.failures["stopped"] is None:
                row = self._play_round(engine, self.next_round)
                self.next_round += 1
                if row is not None and self.on_round is not None:
                    due = cfg.checkpoint_every and (self.next_round - last_checkpoint >= cfg.checkpoint_every
                                                    or self.next_round == cfg.rounds)
                    if due:
                        last_checkpoint = self.next_round
                    self.on_round(row, self.state if due else None)
                if bar is not None:
                    if row is not None:
                        bar.set_postfix_str(f"acc={row['acc_clients_mean']:.3f} sim={self.totals['sim']:.1f}s")
                    bar.update(1)
                if time.monotonic() - last_flush > FLUSH_EVERY_S:
                    self._flush()
                    last_flush = time.monotonic()
        finally:
            if bar is not None:
                bar.close()
            if owns_engine:
                engine.close()
            self.store.close()
        self._flush()
        parts = self._parts()
        storage.merge_parquet(parts, self.out_dir / "clients.parquet", self.clients_schema)
        (self.out_dir / CLIENT_PARTS).delete()
        return self._summary()

    def _play_round(self, engine, rnd: int) -> dict[str, Any] | None:
        cfg, bench, strategy = self.cfg, self.bench, self.strategy
        started = time.perf_counter()
        wanted = sample_size(cfg.clients.per_round, cfg.clients.overselect)
        sampled, tier_of = sample_clients(rnd, cfg.seed, cfg.clients.total, wanted, bench.availability, bench.devices)
        slots = [ClientSlot(int(c), cfg.devices.tiers[t], bench.clients.num_samples(int(c)))
                 for c, t in zip(sampled, tier_of)]
        broadcast, instructions = strategy.configure(rnd, slots)
        tasks = [ClientTask(s.client_id, rnd, s.tier, ins, self.store.get(s.client_id))
                 for s, ins in zip(slots, instructions)]
        results = engine.run(broadcast, tasks)
        for r in results:
            if r.trained and r.num_samples and not math.isfinite(r.train_loss):
                # a diverged client: its update (and personal state) would spread NaN or inf
                r.status, r.error = ERROR, "training diverged: the local loss is not finite"
                r.payload = r.state = None
        self._count_failures(rnd, results)
        for slot, r in zip(slots, results):
            if r.trained:
                t = client_time(slot.tier, cfg.devices, r.flops, r.bytes_down, r.bytes_up)
                r.sim_down_s, r.sim_compute_s, r.sim_up_s = t.down_s, t.compute_s, t.up_s
            else:
                log.warning("client %d failed in round %d: %s", r.client_id, rnd, r.error)
        outcome = round_outcome({r.client_id: r.sim_s for r in results if r.trained}, cfg.clients.per_round,
                                cfg.clients.deadline_s, tiebreak_order(cfg.seed, rnd, sampled))
        for r in results:
            if r.client_id in outcome.late:
                r.status = LATE
            elif r.client_id in outcome.not_kept:
                r.status = NOT_KEPT
        kept = [r for r in results if r.ok]
        dropped = [r for r in results if not r.ok]
        lost = [r for r in dropped if r.trained]  # late and not kept: work done, update lost
        for r in kept + (lost if strategy.stores_state_of_dropped else []):
            if r.state is not None:
                self.store.put(r.client_id, r.state)
        extras = strategy.aggregate(rnd, kept, dropped)
        self._check_columns(extras, self.round_columns, "round")
        self.clients.extend(self._client_row(slot, r) for slot, r in zip(slots, results))
        flops, up, down = sum(r.flops for r in kept), sum(r.bytes_up for r in kept), sum(r.bytes_down for r in kept)
        totals = self.totals
        totals["sim"] += outcome.duration_s
        totals["flops"] += flops
        totals["up"] += up
        totals["down"] += down
        evaluated = (rnd + 1) % cfg.eval_every == 0 or rnd == cfg.rounds - 1
        ev = strategy.evaluate(rnd) if evaluated else None
        wall = time.perf_counter() - started
        totals["wall"] += wall
        if ev is None:
            return None
        weights = np.array([r.num_samples for r in kept], dtype=float)
        row = record_row(RoundRow, **self.identity, round=rnd, **accuracies(ev.clients, ev.global_clients),
                         acc_global=ev.acc_global,
                         train_loss=_weighted([r.train_loss for r in kept], weights),
                         train_acc=_weighted([r.train_acc for r in kept], weights),
                         clients_ok=len(kept), clients_failed=sum(not r.trained for r in results),
                         clients_late=len(outcome.late), clients_not_kept=len(outcome.not_kept),
                         clients_offline_short=wanted - len(sampled),
                         keep_ratio_mean=float(np.mean([r.keep_ratio for r in kept])) if kept else None,
                         sim_round_s=outcome.duration_s, sim_total_s=totals["sim"], flops=flops,
                         flops_total=totals["flops"], bytes_up=up, bytes_down=down, bytes_up_total=totals["up"],
                         bytes_down_total=totals["down"], flops_dropped=sum(r.flops for r in lost),
                         bytes_dropped=sum(r.bytes_up + r.bytes_down for r in lost), wall_s=wall,
                         wall_total_s=totals["wall"])
        row.update(extras)
        self.rounds.append(row)
        return row

    def _count_failures(self, rnd: int, results: list[ClientResult]) -> None:
        """Stop at once on a bug in the method's code; count other failures, and end the experiment
        (failed) after a round where more than engine.max_failed_fraction of the clients failed, or
        any client of round 0."""
        bug = next((r for r in results if r.code_error), None)
        if bug is not None:
            raise ClientCodeError(self.cfg.name, self.cfg.method.name, bug)
        failed = [r for r in results if not r.trained]
        f = self.failures
        f["trained"] += len(results) - len(failed)
        if not failed:
            return
        f["clients"] += len(failed)
        f["rounds"] += 1
        if f["first"] is None:
            f["first"] = f"round {rnd}, client {failed[0].client_id}: {failed[0].error}"
        limit = 0.0 if rnd == 0 else self.cfg.engine.max_failed_fraction
        if len(failed) > limit * len(results):
            f["stopped"] = (f"{len(failed)} of {len(results)} clients failed in round {rnd}"
                            + (" (round 0 allows none)" if rnd == 0 else f" (limit: engine.max_failed_fraction="
                                                                          f"{limit:g})")
                            + f"; first: {failed[0].error}")

    def _flush(self) -> None:
        """rounds.parquet whole (one row per evaluated round); the client rows since the last flush as
        the next part of clients.parquet, so a long run never rewrites a growing file."""
        write_table(self.out_dir / "rounds.parquet", self.rounds, self.rounds_schema)
        if self.clients:
            write_table(self.out_dir / CLIENT_PARTS / f"part-{self.client_parts:06d}.parquet", self.clients,
                        self.clients_schema)
            self.client_parts += 1
            self.clients = []

    def _parts(self) -> list[storage.Location]:
        return [self.out_dir / CLIENT_PARTS / f"part-{k:06d}.parquet" for k in range(self.client_parts)]

    def _clear_stale(self) -> None:
        """Before (re)starting: no summary of an earlier attempt beside new rows, and no client parts
        beyond those this run's state counts (written after the checkpoint it continues from)."""
        summary = self.out_dir / "summary.parquet"
        try:
            ended = storage.read_parquet(summary)["status"].iloc[0]
        except Exception:  # noqa: BLE001 - none, or a damaged one: nothing finished is lost
            ended = None
        if ended is not None:
            raise RuntimeError(f"{self.out_dir} holds a finished experiment ({ended}); only `fedbench run "
                               f"--overwrite` replaces one")
        summary.delete()
        (self.out_dir / "clients.parquet").delete()
        keep = {p.name for p in self._parts()}
        for part in (self.out_dir / CLIENT_PARTS).children():
            if part.name not in keep:
                part.delete()

    def status(self) -> tuple[str, str | None]:
        """(`completed`, `degraded` or `failed`, and why where it is not `completed`)."""
        f = self.failures
        if f["stopped"] is not None:
            return "failed", f["stopped"]
        if f["trained"] == 0:
            return "failed", "no client trained in any round (none was online, or every one failed)"
        if f["clients"]:
            return "degraded", (f"{f['clients']} client tasks failed in {f['rounds']} rounds, each round within "
                                f"engine.max_failed_fraction={self.cfg.engine.max_failed_fraction:g}; "
                                f"first: {f['first']}")
        return "completed", None

    def _summary(self) -> dict[str, Any]:
        rounds, totals = self.rounds, self.totals
        status, note = self.status()
        last = rounds[-1] if rounds else {}
        summary = record_row(SummaryRow, **self.identity, rounds=self.cfg.rounds, status=status, status_note=note,
                             final_acc=last.get("acc_clients_mean"),
                             best_acc=max((r["acc_clients_mean"] for r in rounds), default=None),
                             final_acc_global=last.get("acc_global"),
                             final_acc_global_clients=last.get("acc_global_clients_mean"), sim_total_s=totals["sim"],
                             flops_total=totals["flops"], bytes_up_total=totals["up"], bytes_down_total=totals["down"],
                             wall_total_s=totals["wall"], **machine())
        write_table(self.out_dir / "summary.parquet", [summary], SUMMARY)
        return summary

    def _check_columns(self, values: dict[str, Any], declared: dict[str, Any], kind: str) -> None:
        unknown = set(values) - set(declared)
        if unknown:
            raise ValueError(f"method {self.cfg.method.name} reports {kind} values {sorted(unknown)} that are not "
                             f"among its {kind}_columns")

    def _client_row(self, slot: ClientSlot, r: ClientResult) -> dict[str, Any]:
        self._check_columns(r.metrics, self.client_columns, "client")
        work = dict(keep_ratio=r.keep_ratio, flops=r.flops, bytes_up=r.bytes_up, bytes_down=r.bytes_down,
                    sim_s=r.sim_s, sim_down_s=r.sim_down_s, sim_compute_s=r.sim_compute_s, sim_up_s=r.sim_up_s,
                    train_acc=r.train_acc, train_loss=r.train_loss) if r.trained else {}
        row = record_row(ClientRow, **self.identity, round=r.round, client_id=r.client_id, tier=slot.tier.name,
                         cap=slot.tier.cap, num_samples=slot.num_samples, status=r.status, error=r.error, **work)
        return {**row, **(r.metrics if r.trained else {})}


class ClientCodeError(RuntimeError):
    """A client raised one of CODE_ERRORS: a bug in the method's code, shown with the client's
    traceback (from the executor process where it ran)."""

    def __init__(self, experiment: str, method: str, result: ClientResult):
        self.result = result
        super().__init__(f"experiment {experiment} stopped: method {method} raised {result.error_type} on client "
                         f"{result.client_id} in round {result.round} (a bug in the method's code, not a client "
                         f"failure). The client's traceback:\n{(result.traceback or result.error or '').rstrip()}")


def config_changes(stored: dict[str, Any], current: dict[str, Any], schema=ExperimentConfig) -> str | None:
    """None if `current` is the config `stored` was made with, else what differs. Compared key by key
    after `stored` is read with today's schema: an option that `stored` lacks (added to fedbench since)
    counts as its default, so an upgrade alone never stops a resume; `out` may differ (a moved folder)."""
    from pydantic import ValidationError

    try:
        then = schema.model_validate({k: v for k, v in stored.items() if k != "out"}).model_dump(mode="json")
    except ValidationError as e:
        first = e.errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']} under today's schema"
    diffs = _diff(then, current, "")
    return ", ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "") if diffs else None


def _diff(a: Any, b: Any, at: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) if k != "out" or at
                for d in (_diff(a.get(k), b.get(k), f"{at}.{k}" if at else k) if k in a and k in b
                          else [f"{at}.{k}" if at else k])]
    return [] if a == b else [f"{at}: {a!r} -> {b!r}"]



def _weighted(values, weights) -> float | None:
    if not len(values) or weights.sum() <= 0:
        return None
    v = np.asarray(values, dtype=float)
    return float((v * weights).sum() / weights.sum()) if not np.isnan(v).any() else math.nan
