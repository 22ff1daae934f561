"""Measured FLOPs, device tiers and the simulated clock.

Device heterogeneity is simulated, not slept: a client's round takes download bytes / bandwidth +
training FLOPs / its tier's compute + upload bytes / bandwidth, with FLOPs measured by
torch.utils.flop_counter on the (sub)model the client really trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.config import DevicesConfig, Tier
from harness.errors import ConfigError
from harness.models import build_model
from harness.seeding import rng, uniform_at


class FlopMeter:
    """Forward FLOPs per sample of a model at given widths, measured once per shape on the meta
    device (no memory, no compute) and cached."""

    def __init__(self, model_name: str, num_classes: int, image_shape):
        self.model_name = model_name
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self._measured: dict[tuple[tuple[str, int], ...], dict[str, int]] = {}

    def _measure(self, widths: tuple[tuple[str, int], ...]) -> dict[str, int]:
        if widths not in self._measured:
            self._measured[widths] = self._count(widths)
        return self._measured[widths]

    def _count(self, widths: tuple[tuple[str, int], ...]) -> dict[str, int]:
        with torch.device("meta"):
            model = build_model(self.model_name, self.num_classes, self.image_shape, dict(widths))
            x = torch.empty(1, *self.image_shape)
        with FlopCounterMode(display=False) as counter:
            model(x)
        root = type(model).__name__
        per_module = {}
        for key, ops in counter.get_flop_counts().items():
            if key.startswith(root + "."):
                per_module[key[len(root) + 1:]] = int(sum(ops.values()))
        per_module[""] = int(counter.get_total_flops())
        return per_module

    def forward(self, widths: dict[str, int] | None = None) -> int:
        """Forward FLOPs of one sample."""
        return self._measure(tuple(sorted((widths or {}).items())))[""]

    def per_weight(self, widths: dict[str, int] | None = None) -> dict[str, int]:
        """Forward FLOPs of one sample per layer, keyed by the layer's weight name."""
        counts = self._measure(tuple(sorted((widths or {}).items())))
        return {f"{m}.weight": f for m, f in counts.items() if m}


def training_flops(forward_flops_per_sample: float, samples_processed: int) -> float:
    """Forward + backward (twice the forward) over every sample processed."""
    return 3.0 * forward_flops_per_sample * samples_processed


def sparse_bytes(kept: int, total: int, value_bytes: int = 4) -> int:
    """Bytes of a sparse tensor upload: the kept values plus whichever locates them more cheaply,
    a bitmap over all coordinates (total / 8 bytes) or 32-bit indices (4 bytes per kept value)."""
    return kept * value_bytes + min((total + 7) // 8, 4 * kept)


@dataclass(frozen=True)
class ClientTime:
    down_s: float
    compute_s: float
    up_s: float

    @property
    def total_s(self) -> float:
        return self.down_s + self.compute_s + self.up_s


def client_time(tier: Tier, devices: DevicesConfig, flops: float, bytes_down: float,
                bytes_up: float) -> ClientTime:
    return ClientTime(down_s=bytes_down / (devices.down_mb_s * 1e6),
                      compute_s=flops / (tier.compute_mflops * 1e6),
                      up_s=bytes_up / (devices.up_mb_s * 1e6))


class DeviceAssigner:
    """Which tier each client has in a round: drawn from the tier proportions once (`fixed`) or every
    round (`dynamic`), seeded; a trace file (CSV: client_id, tier and optionally round) overrides.

    A client's tier is a function of (seed, client) or (seed, round, client) alone: `tiers_of` draws
    it for the clients asked about only (the round's sample), never for the whole population; it
    gives the same tiers as drawing all of them (`tiers_for_round`, numpy's choice over all clients).
    """

    def __init__(self, devices: DevicesConfig, num_clients: int, seed: int):
        self.tiers = devices.tiers
        self.assignment = devices.assignment
        self.num_clients = num_clients
        self.seed = seed
        p = np.array([t.proportion for t in self.tiers], dtype=float)
        self.probabilities = p / p.sum()
        self.cdf = self.probabilities.cumsum()
        self.cdf /= self.cdf[-1]  # as numpy's choice(p=...) maps its uniform draws
        self.trace = self._read_trace(devices.trace) if devices.trace else None

    def _stream(self, rnd: int) -> tuple:
        return (self.seed, "tiers") if self.assignment == "fixed" else (self.seed, "tiers", rnd)

    def _read_trace(self, path: str) -> dict[tuple[int, int | None], int]:
        import pandas as pd

        try:
            df = pd.read_csv(Path(path).expanduser())
        except (OSError, ValueError) as e:
            raise ConfigError("devices.trace", f"cannot read {path}: {e}") from None
        missing = {"client_id", "tier"} - set(df.columns)
        if missing:
            raise ConfigError("devices.trace", f"{path} lacks column(s) {', '.join(sorted(missing))}")
        names = {t.name: i for i, t in enumerate(self.tiers)}
        unknown = set(df["tier"].astype(str)) - set(names)
        if unknown:
            raise ConfigError("devices.trace", f"{path} names unknown tier(s) {', '.join(sorted(unknown))}")
        rounds = df["round"] if "round" in df.columns else pd.Series([None] * len(df), dtype=object)
        try:
            keys = [(int(c), None if pd.isna(r) else int(r)) for c, r in zip(df["client_id"], rounds)]
        except (TypeError, ValueError):
            raise ConfigError("devices.trace", f"{path}: client_id and round must be integers") from None
        bad = [(c, r) for c, r in keys if not 0 <= c < self.num_clients or (r is not None and r < 0)]
        if bad:
            c, r = bad[0]
            raise ConfigError("devices.trace", f"{path}: row client {c}{'' if r is None else f', round {r}'}: needs "
                                               f"0 <= client_id < {self.num_clients} and round >= 0")
        # Rows without a round hold in every round; a row for a round overrides them there.
        trace = {k: names[str(t)] for k, t in zip(keys, df["tier"]) if k[1] is None}
        trace.update({k: names[str(t)] for k, t in zip(keys, df["tier"]) if k[1] is not None})
        return trace

    def tiers_of(self, rnd: int, ids) -> np.ndarray:
        """The tier index of each client in `ids` in round `rnd`."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._traced(rnd, ids, self.cdf.searchsorted(uniform_at(ids, *self._stream(rnd)), side="right"))

    def tiers_for_round(self, rnd: int) -> np.ndarray:
        """Every client's tier in round `rnd` (O(clients): for tests and small populations)."""
        ids = np.arange(self.num_clients)
        return self._traced(rnd, ids, self.cdf.searchsorted(rng(*self._stream(rnd)).random(self.num_clients),
                                                             side="right"))

    def _traced(self, rnd: int, ids: np.ndarray, tiers: np.ndarray) -> np.ndarray:
        tiers = tiers.astype(np.int64)
        if self.trace:
            for k, cid in enumerate(ids.tolist()):
                t = self.trace.get((cid, rnd), self.trace.get((cid, None)))
                if t is not None:
                    tiers[k] = t
        return tiers
