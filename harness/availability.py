"""Heterogeneity as deployments meet it: clients that are offline, a round deadline and
over-selection (as FedScale's availability traces, deadlines and over-commitment; Flower's minimum
clients and timeouts).

Availability is counted in rounds, not in simulated seconds: the simulated clock differs per method,
and the leaderboard pairs methods by seed, so every method must see the same clients online in a
round. A client is online in round r when
- its tier's probability (`devices.availability: {tier: p}`; tiers not named: 1) admits it: the
  client's draw from (seed, round, client) is below p; and
- the availability trace (`devices.availability_trace`, CSV `client_id,start_round,end_round`, both
  ends inclusive) has an interval holding r (with `devices.availability_period` P the trace repeats:
  round r is looked up as r mod P); a client the trace does not name is always online by the trace.

Which sampled clients' updates reach aggregation (`round_outcome`): a client whose simulated
download + compute + upload time exceeds `clients.deadline_s` is late; of the others the first
`clients.per_round` to finish are kept (ties broken by an order drawn from (seed, round, client)), the
rest are not kept. The round lasts until the last kept client finishes, or exactly the deadline when a
client was late and fewer than `per_round` were kept (the server waited for it in vain).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.errors import ConfigError
from harness.schema import sample_size  # noqa: F401 - re-exported for the round loop
from harness.seeding import rng, uniform_at


class Availability:
    def __init__(self, devices, num_clients: int, seed: int):
        self.num_clients, self.seed = num_clients, seed
        names = [t.name for t in devices.tiers]
        p = devices.availability
        self.probability = None if p == "always" else np.array([p.get(n, 1.0) for n in names], dtype=float)
        self.period = devices.availability_period
        self.trace = _read_trace(devices.availability_trace, num_clients) if devices.availability_trace else None

    @property
    def always(self) -> bool:
        return self.probability is None and self.trace is None

    def online(self, rnd: int, tier_of: np.ndarray, ids=None) -> np.ndarray:
        """Bool per client of `ids` (default: every client): online in round `rnd` (`tier_of`: each
        one's tier index that round). A client's draw is the same whichever clients are asked about."""
        everyone = ids is None
        ids = np.arange(self.num_clients) if everyone else np.asarray(ids, dtype=np.int64).reshape(-1)
        online = np.ones(len(ids), dtype=bool)
        if self.probability is not None:
            draws = rng(self.seed, "online", rnd).random(self.num_clients) if everyone else \
                uniform_at(ids, self.seed, "online", rnd)
            online &= draws < self.probability[tier_of]
        if self.trace is not None:
            r = rnd % self.period if self.period else rnd
            named, intervals = self.trace
            in_trace = {cid for cid, start, end in intervals if start <= r <= end}
            online &= np.array([c in in_trace or c not in named for c in ids.tolist()], dtype=bool)
        return online


def sample_clients(rnd: int, seed: int, num_clients: int, wanted: int, availability: Availability, devices):
    """(sampled client ids in increasing order, their tier indices) of round `rnd`: `wanted` clients
    drawn uniformly without replacement from those online, or all online ones if fewer.

    Always online: numpy's choice(num_clients, wanted) (O(wanted) for large populations). Otherwise,
    up to MATERIALISE clients, the choice among the online set; above, candidates are drawn in
    batches (uniform, without repeats) and checked until `wanted` are online: the same distribution,
    O(wanted / fraction online), no array over the population (unless a quarter of it was checked
    without finding `wanted` online: then the choice among the online set)."""
    gen = rng(seed, "sample", rnd)
    if availability.always:
        sampled = np.sort(gen.choice(num_clients, min(wanted, num_clients), replace=False))
    else:
        seen: set[int] = set()
        kept: list[int] = []
        while num_clients > MATERIALISE and len(kept) < wanted and len(seen) < num_clients // 4:
            batch = list(dict.fromkeys(c for c in gen.integers(num_clients, size=2 * wanted).tolist() if c not in seen))
            seen.update(batch)
            ok = availability.online(rnd, devices.tiers_of(rnd, batch), batch)
            kept += [c for c, up in zip(batch, ok) if up][:wanted - len(kept)]
        if len(kept) < wanted:  # a small population, or one with few clients online: draw among all online
            every = np.arange(num_clients)
            online = every[availability.online(rnd, devices.tiers_for_round(rnd), every)]
            kept = gen.choice(online, min(wanted, len(online)), replace=False).tolist()
        sampled = np.sort(np.array(kept, dtype=np.int64))
    return sampled, devices.tiers_of(rnd, sampled)


MATERIALISE = 100_000  # up to this many clients a round's online set is cheap to draw whole


def _read_trace(path: str, num_clients: int):
    import pandas as pd

    try:
        df = pd.read_csv(Path(path).expanduser())
    except (OSError, ValueError) as e:
        raise ConfigError("devices.availability_trace", f"cannot read {path}: {e}") from None
    missing = {"client_id", "start_round", "end_round"} - set(df.columns)
    if missing:
        raise ConfigError("devices.availability_trace", f"{path} lacks column(s) {', '.join(sorted(missing))}")
    try:
        rows = [(int(c), int(s), int(e)) for c, s, e in zip(df["client_id"], df["start_round"], df["end_round"])]
    except (TypeError, ValueError):
        raise ConfigError("devices.availability_trace", f"{path}: client_id, start_round and end_round must be "
                                                        f"integers") from None
    bad = [r for r in rows if not 0 <= r[0] < num_clients or r[1] > r[2] or r[1] < 0]
    if bad:
        c, s, e = bad[0]
        raise ConfigError("devices.availability_trace", f"{path}: row client {c}, rounds {s}..{e}: needs "
                                                        f"0 <= client_id < {num_clients} and 0 <= start_round <= end_round")
    return {c for c, _, _ in rows}, rows


@dataclass
class Outcome:
    kept: list[int]
    late: list[int]
    not_kept: list[int]
    duration_s: float


def round_outcome(times: dict[int, float], per_round: int, deadline_s: float | None,
                  tiebreak: dict[int, float]) -> Outcome:
    """Who of the clients that trained (client -> simulated seconds) reaches aggregation, and how long
    the round lasts (see the module docstring)."""
    late = sorted(c for c, t in times.items() if deadline_s is not None and t > deadline_s)
    on_time = sorted(times.keys() - set(late), key=lambda c: (times[c], tiebreak[c]))
    kept, not_kept = on_time[:per_round], on_time[per_round:]
    if late and len(kept) < per_round:
        duration = float(deadline_s)
    else:
        duration = max((times[c] for c in kept), default=0.0)
    return Outcome(sorted(kept), late, sorted(not_kept), duration)


def tiebreak_order(seed: int, rnd: int, ids) -> dict[int, float]:
    """Per client of `ids`, its place among clients that finish at the same simulated time in round
    `rnd` (the draws of rng(seed, "tiebreak", rnd).random(clients) at those ids)."""
    ids = [int(c) for c in ids]
    return dict(zip(ids, uniform_at(ids, seed, "tiebreak", rnd).tolist()))
