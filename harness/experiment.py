"""The round loop: sample -> configure -> execute client tasks -> aggregate -> evaluate -> record.

All federated state (the strategy's server state, the client state store, the rows recorded so far
and the running totals) can be exported after any round and restored, so an interrupted experiment
continues where it stopped and ends with the numbers of an uninterrupted run. Every random stream
derives from (seed, round, client), so there is no generator state to carry besides what strategies
keep in their own state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from harness import storage
from harness.config import ExperimentConfig, axis_label
from harness.cost import client_time
from harness.engine import make_engine
from harness.results import CLIENT_EXTRAS, CLIENTS, ROUNDS, SUMMARY, write_table, write_yaml
from harness.seeding import rng
from harness.state import DiskStore, MemoryStore
from harness.strategy import ClientResult, ClientSlot, ClientTask
from harness.workbench import Workbench

log = logging.getLogger(__name__)

CLIENT_PARTS = "_clients"  # clients.parquet in parts while the experiment runs
FLUSH_EVERY_S = 10.0  # rounds.parquet and the next part of clients.parquet, while it runs
RoundCallback = Callable[[dict[str, Any], Callable[[], dict[str, Any]] | None], None]


def setting_label(cfg: ExperimentConfig) -> str:
    """Names what is being compared on: everything but the method, the seed and where it runs."""
    core = cfg.model_dump(exclude={"name", "method", "seed", "engine", "out", "checkpoint_every"})
    digest = hashlib.sha1(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:6]
    s = cfg.data.split
    split = {"shards": f"shards{s.shards_per_client}x{s.shard_size}", "dirichlet": f"dir{s.alpha:g}",
             "iid": "iid"}[s.kind]
    dataset = cfg.data.dataset
    if dataset.startswith("npz:"):
        dataset = "npz-" + Path(dataset[4:]).stem
    return f"{dataset}_{split}_{cfg.clients.total}c{cfg.clients.per_round}_{digest}"


class Experiment:
    """One federated experiment. `on_round(row, checkpoint)` is called after every evaluated round
    with its rounds.parquet row and, every `cfg.checkpoint_every` rounds, a function returning the
    full state (for `restore`)."""

    def __init__(self, cfg: ExperimentConfig, *, engine=None, progress: bool = False,
                 on_round: RoundCallback | None = None):
        self.cfg = cfg
        self.out_dir = storage.resolve(cfg.out) / cfg.name
        self.bench = Workbench(cfg)
        self.strategy = self.bench.strategy
        self.store = DiskStore() if cfg.engine.state_store == "disk" else MemoryStore()
        self.strategy.setup(self.store)
        self.engine = engine
        self.progress = progress
        self.on_round = on_round
        self.identity = dict(experiment=cfg.name, setting=setting_label(cfg), method=cfg.method.name,
                             method_label=axis_label(cfg.method.model_dump()), dataset=cfg.data.dataset,
                             model=self.bench.model_name, seed=cfg.seed)
        self.next_round = 0
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []  # rows not yet in a part of clients.parquet
        self.client_parts = 0  # parts written: <experiment>/_clients/part-000000.parquet, ...
        self.totals = dict(sim=0.0, flops=0.0, up=0, down=0, wall=0.0)

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Tensors and plain data only (harness.state.dumps). Client rows already written as parts
        are counted, not copied."""
        return {"config": self.cfg.model_dump(mode="json"), "next_round": self.next_round,
                "strategy": self.strategy.state_dict(), "store": self.store.export(),
                "rounds": list(self.rounds), "clients": list(self.clients), "client_parts": self.client_parts,
                "totals": dict(self.totals)}

    def restore(self, state: dict[str, Any]) -> None:
        def comparable(config):  # the folder may have moved since (a copied results folder)
            return {k: v for k, v in config.items() if k != "out"}

        if comparable(state["config"]) != comparable(self.cfg.model_dump(mode="json")):
            raise ValueError(f"checkpoint of experiment {self.cfg.name} was made with another config")
        self.next_round = state["next_round"]
        self.strategy.load_state_dict(state["strategy"])
        self.store.restore(state["store"])
        self.rounds, self.clients = list(state["rounds"]), list(state["clients"])
        self.client_parts = state["client_parts"]
        self.totals = dict(state["totals"])

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._clear_stale()
        write_yaml(self.out_dir / "config.yaml", cfg.model_dump(mode="json"))
        owns_engine = self.engine is None
        engine = self.engine or make_engine(cfg.engine)
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.rounds, initial=self.next_round, desc=cfg.name, unit="round", dynamic_ncols=True)
        last_flush = time.monotonic()
        last_checkpoint = self.next_round
        try:
            engine.start(self.bench)
            while self.next_round < cfg.rounds:
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
        storage.merge_parquet(parts, self.out_dir / "clients.parquet", CLIENTS)
        (self.out_dir / CLIENT_PARTS).delete()
        return self._summary()

    def _play_round(self, engine, rnd: int) -> dict[str, Any] | None:
        cfg, bench, strategy = self.cfg, self.bench, self.strategy
        started = time.perf_counter()
        sampled = np.sort(rng(cfg.seed, "sample", rnd).choice(cfg.clients.total, cfg.clients.per_round, replace=False))
        tier_of = bench.devices.tiers_for_round(rnd)
        slots = [ClientSlot(int(c), cfg.devices.tiers[tier_of[c]], bench.clients[c].num_samples) for c in sampled]
        broadcast, instructions = strategy.configure(rnd, slots)
        tasks = [ClientTask(s.client_id, rnd, s.tier, ins, self.store.get(s.client_id))
                 for s, ins in zip(slots, instructions)]
        results = engine.run(broadcast, tasks)
        ok = [r for r in results if r.ok]
        for slot, r in zip(slots, results):
            if r.ok:
                t = client_time(slot.tier, cfg.devices, r.flops, r.bytes_down, r.bytes_up)
                r.sim_down_s, r.sim_compute_s, r.sim_up_s = t.down_s, t.compute_s, t.up_s
                if r.state is not None:
                    self.store.put(r.client_id, r.state)
            else:
                log.warning("client %d failed in round %d: %s", r.client_id, rnd, r.error)
        extras = strategy.aggregate(rnd, ok) if ok else {}
        self.clients.extend(self._client_row(slot, r) for slot, r in zip(slots, results))
        flops, up, down = sum(r.flops for r in ok), sum(r.bytes_up for r in ok), sum(r.bytes_down for r in ok)
        sim_round = max((r.sim_s for r in ok), default=0.0)
        totals = self.totals
        totals["sim"] += sim_round
        totals["flops"] += flops
        totals["up"] += up
        totals["down"] += down
        evaluated = (rnd + 1) % cfg.eval_every == 0 or rnd == cfg.rounds - 1
        ev = strategy.evaluate(rnd) if evaluated else None
        wall = time.perf_counter() - started
        totals["wall"] += wall
        if ev is None:
            return None
        weights = np.array([r.num_samples for r in ok], dtype=float)
        row = dict(
            self.identity, round=rnd,
            acc_clients_mean=float(np.nanmean(ev.client_acc)), acc_clients_std=float(np.nanstd(ev.client_acc)),
            acc_global=ev.acc_global,
            train_loss=_weighted([r.train_loss for r in ok], weights),
            train_acc=_weighted([r.train_acc for r in ok], weights),
            clients_ok=len(ok), clients_failed=len(results) - len(ok),
            keep_ratio_mean=float(np.mean([r.keep_ratio for r in ok])) if ok else None,
            density=extras.get("density"),
            sim_round_s=sim_round, sim_total_s=totals["sim"], flops=flops, flops_total=totals["flops"],
            bytes_up=up, bytes_down=down, bytes_up_total=totals["up"], bytes_down_total=totals["down"],
            wall_s=wall, wall_total_s=totals["wall"])
        self.rounds.append(row)
        return row

    def _flush(self) -> None:
        """rounds.parquet whole (one row per evaluated round); the client rows since the last flush as
        the next part of clients.parquet, so a long run never rewrites a growing file."""
        write_table(self.out_dir / "rounds.parquet", self.rounds, ROUNDS)
        if self.clients:
            write_table(self.out_dir / CLIENT_PARTS / f"part-{self.client_parts:06d}.parquet", self.clients, CLIENTS)
            self.client_parts += 1
            self.clients = []

    def _parts(self) -> list[storage.Location]:
        return [self.out_dir / CLIENT_PARTS / f"part-{k:06d}.parquet" for k in range(self.client_parts)]

    def _clear_stale(self) -> None:
        """Before (re)starting: no summary of an earlier attempt beside new rows, and no client parts
        beyond those this run's state counts (written after the checkpoint it continues from)."""
        (self.out_dir / "summary.parquet").delete()
        (self.out_dir / "clients.parquet").delete()
        keep = {p.name for p in self._parts()}
        for part in (self.out_dir / CLIENT_PARTS).children():
            if part.name not in keep:
                part.delete()

    def _summary(self) -> dict[str, Any]:
        rounds, totals = self.rounds, self.totals
        summary = dict(self.identity, rounds=self.cfg.rounds, status="completed",
                       final_acc=rounds[-1]["acc_clients_mean"], best_acc=max(r["acc_clients_mean"] for r in rounds),
                       final_acc_global=rounds[-1]["acc_global"], sim_total_s=totals["sim"],
                       flops_total=totals["flops"], bytes_up_total=totals["up"], bytes_down_total=totals["down"],
                       wall_total_s=totals["wall"])
        write_table(self.out_dir / "summary.parquet", [summary], SUMMARY)
        return summary

    def _client_row(self, slot: ClientSlot, r: ClientResult) -> dict[str, Any]:
        unknown = set(r.metrics) - CLIENT_EXTRAS
        if unknown:
            raise ValueError(f"result metrics {sorted(unknown)} have no column in clients.parquet")
        row = dict(self.identity, round=r.round, client_id=r.client_id, tier=slot.tier.name, cap=slot.tier.cap,
                   num_samples=slot.num_samples, status=r.status, error=r.error)
        if r.ok:
            row.update(keep_ratio=r.keep_ratio, flops=r.flops, bytes_up=r.bytes_up, bytes_down=r.bytes_down,
                       sim_s=r.sim_s, sim_down_s=r.sim_down_s, sim_compute_s=r.sim_compute_s, sim_up_s=r.sim_up_s,
                       train_acc=r.train_acc, train_loss=r.train_loss, **r.metrics)
        return row


def _weighted(values, weights) -> float | None:
    if not len(values) or weights.sum() <= 0:
        return None
    v = np.asarray(values, dtype=float)
    return float((v * weights).sum() / weights.sum()) if not np.isnan(v).any() else math.nan
