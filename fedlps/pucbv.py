"""P-UCBV: the per-client bandit that chooses FedLPS keep ratios (Xue et al., "Learnable Sparse
Customization in Heterogeneous Edge Computing", arXiv 2412.07216, Sec. on the sparse-ratio decision).

Each client owns one bandit whose arms are intervals of the keep ratio, initially K = 5 equal
intervals over [0.5, 1]. Every arm holds the rewards credited to it and a pull count n_j, starting
with one reward 0.0 and n_j = 1. On the client's m-th participation (m = its earlier decisions):

    T = R / q,  psi = T / K^2,  eps_m = 2^-m   (K = the current number of arms)
    I_j = mean_j + sqrt(0.5 * (var_j + 2) * max(ln(psi * T * eps_m), 0) / (4 * n_j))

(var_j: population variance of arm j's rewards). With probability 1 / max(m, 1) the arm is drawn
uniformly, otherwise it is argmax_j I_j (the first on ties). A ratio a ~ U(arm) is drawn and the arm
is split at a into [low, a] and [a, high], both inheriting the rewards and the count. The client then
trains at min(tier cap, a). After training the reward

    r = (U(acc_t) - U(max earlier acc)) / (t_compute + t_upload),   U(x) = 10 - 20 / (1 + exp(0.35 x))

is credited to the arm whose interval holds the ratio actually used (appending r and adding one pull);
a ratio the cap pushed below every arm credits no arm.

Scale of `acc`: a fraction in [0, 1], the client's mean local training accuracy of the round. The
authors' code feeds U with `correct / total` (a fraction) and keeps an accuracy record that starts at
[0], so the first reward compares with U(0) = 0; we do the same (`best_acc` starts at 0.0). On [0, 1]
U is almost linear (slope 1.75 at 0, 1.70 at 1); on a percent scale it would saturate at 10 for any
accuracy above ~15% and carry no signal.

Intervals are half-open, [low, high), except the last arm, which also holds its upper end. So the drawn
ratio a itself belongs to the upper half [a, high] of the split, which is the half the authors' code
credits (and whose pull count it increments).

Differences from the authors' code (sunnyxuejj/FedLPS at 35fafba, Hetero_Client.P_UCBV and FedLPS.py), following
METHODS.md: rewards are credited to the arm that holds the ratio used (the code credits arm 0 when the
ratio lies in the last arm and the last arm when the cap pushes it below every arm); the pull count
grows when a reward is credited, so n_j always equals the number of rewards (the code increments the
count of the upper half at decision time, even when no reward follows); the index of an arm is
computed from its own rewards and count (after the first split the code pairs an arm's count with
another arm's rewards: `ReferencePUCBV.indices`); the code's
arm deletion on an accuracy drop of more than 5 is not reproduced (with accuracies in [0, 1] it never
fires there either); the time in the reward is the harness's simulated compute + upload time, not the
code's per-dataset constants; randomness comes from the bandit's own `random.Random`, not the global
one. `ReferencePUCBV` (FedLPS's `reference` variant) is the code's bandit with its crediting, pull
counts and indexing (the time in its reward is the caller's: FedLPS's reference variant passes the
code's constants); it too never deletes arms and draws from its own generator.

FedMP's E-UCB (Jiang et al., ICDE 2022; baselines/fedmp.py) is the same decision rule (index,
exploration schedule, split): FedMP's official variant uses this class with its own reward (loss
decrease per second of round time), its own initial arms and no tier cap.

Pure Python, no torch: the whole state (arms, counts, rewards, decisions, best accuracy and the random
generator's state) round-trips through `to_dict` / `from_dict` as plain data, for both classes.
"""
from __future__ import annotations

import array
import math
import random
from dataclasses import dataclass, field
from typing import Any


def utility(acc: float) -> float:
    """U(x) = 10 - 20 / (1 + exp(0.35 x)), x a fraction in [0, 1]."""
    return 10.0 - 20.0 / (1.0 + math.exp(0.35 * acc))


def exploration_log(horizon: float, num_arms: int, decisions: int) -> float:
    """max(ln(psi * T * eps_m), 0), psi = T / K^2, eps_m = 2^-m."""
    psi = horizon / num_arms ** 2
    # ln(psi T 2^-m) = ln(psi T) - m ln 2: 2^-m itself underflows to 0 after ~1075 decisions
    return max(math.log(psi * horizon) - decisions * math.log(2.0), 0.0)


def _rng_state(rng: random.Random) -> list:
    """The generator's state as plain data; its 625 words as one bytes value, since stored states go
    through the state store's safe (and per object slow) unpickler every round."""
    version, internal, gauss = rng.getstate()
    return [version, array.array("Q", internal).tobytes(), gauss]


def _rng_of(state: list) -> random.Random:
    rng = random.Random()
    version, internal, gauss = state
    if isinstance(internal, bytes):
        internal = array.array("Q", internal)
    rng.setstate((version, tuple(internal), gauss))
    return rng


@dataclass
class Arm:
    low: float
    high: float
    rewards: list[float] = field(default_factory=lambda: [0.0])
    n: int = 1

    def mean(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    def variance(self) -> float:
        mu = self.mean()
        return sum((r - mu) ** 2 for r in self.rewards) / len(self.rewards)


@dataclass(frozen=True)
class Decision:
    ratio: float  # the drawn ratio a (before the tier cap)
    arm: int  # index of the arm drawn from, before the split
    low: float  # that arm's interval
    high: float
    explored: bool  # drawn uniformly rather than by the index


@dataclass
class PUCBV:
    horizon: float  # T = R / q
    arms: list[Arm]
    decisions: int = 0  # m
    best_acc: float = 0.0  # max of the earlier accuracies, the initial 0 included
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def new(cls, seed: int, horizon: float, num_arms: int = 5, low: float = 0.5, high: float = 1.0) -> PUCBV:
        if num_arms < 1 or not 0 < low < high:
            raise ValueError(f"need num_arms >= 1 and 0 < low < high, got {num_arms}, {low}, {high}")
        if horizon <= 0:
            raise ValueError(f"the horizon T must be positive, got {horizon}")
        edges = [low + (high - low) * i / num_arms for i in range(num_arms + 1)]
        edges[-1] = high
        return cls(horizon=float(horizon), arms=[Arm(edges[i], edges[i + 1]) for i in range(num_arms)],
                   rng=random.Random(seed))

    # -- deciding ----------------------------------------------------------------------------------
    def exploration_log(self) -> float:
        """max(ln(psi * T * eps_m), 0) for the next decision."""
        return exploration_log(self.horizon, len(self.arms), self.decisions)

    def indices(self) -> list[float]:
        bonus = self.exploration_log()
        return [a.mean() + math.sqrt(0.5 * (a.variance() + 2.0) * bonus / (4.0 * a.n)) for a in self.arms]

    def decide(self) -> Decision:
        """Pick an arm, draw a ratio from it, split the arm there; returns the decision."""
        explore_p = 1.0 / max(self.decisions, 1)
        explored = self.rng.random() < explore_p
        if explored:
            j = self.rng.randrange(len(self.arms))
        else:
            idx = self.indices()
            j = max(range(len(idx)), key=lambda i: (idx[i], -i))
        arm = self.arms[j]
        a = self.rng.uniform(arm.low, arm.high)
        self.arms[j:j + 1] = [Arm(arm.low, a, list(arm.rewards), arm.n), Arm(a, arm.high, list(arm.rewards), arm.n)]
        self.decisions += 1
        return Decision(ratio=a, arm=j, low=arm.low, high=arm.high, explored=explored)

    # -- learning ----------------------------------------------------------------------------------
    def arm_of(self, ratio: float) -> int | None:
        """The arm whose interval holds `ratio`; None below the first or above the last arm."""
        last = len(self.arms) - 1
        for i, a in enumerate(self.arms):
            if a.low <= ratio < a.high or (i == last and ratio == a.high):
                return i
        return None

    def credit(self, ratio: float, reward: float) -> int | None:
        """Credit `reward` to the arm holding `ratio`; returns its index, or None if no arm does."""
        j = self.arm_of(ratio)
        if j is not None:
            self.arms[j].rewards.append(float(reward))
            self.arms[j].n += 1
        return j

    def reward(self, acc: float, seconds: float) -> float:
        """r for an accuracy `acc` in [0, 1] reached in `seconds` of compute + upload."""
        return (utility(acc) - utility(self.best_acc)) / max(seconds, 1e-12)

    def observe(self, ratio: float, acc: float, seconds: float) -> tuple[float, int | None]:
        """After a training at `ratio`: compute the reward, credit it, remember the accuracy.
        Returns (reward, index of the credited arm or None)."""
        r = self.reward(acc, seconds)
        j = self.credit(ratio, r)
        self.best_acc = max(self.best_acc, float(acc))
        return r, j

    # -- plain-data state --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "horizon": self.horizon,
            "arms": [{"low": a.low, "high": a.high, "rewards": list(a.rewards), "n": a.n} for a in self.arms],
            "decisions": self.decisions,
            "best_acc": self.best_acc,
            "rng": _rng_state(self.rng),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PUCBV:
        arms = [Arm(a["low"], a["high"], list(a["rewards"]), int(a["n"])) for a in d["arms"]]
        return cls(horizon=float(d["horizon"]), arms=arms, decisions=int(d["decisions"]),
                   best_acc=float(d["best_acc"]), rng=_rng_of(d["rng"]))


@dataclass
class ReferencePUCBV:
    """The authors' P-UCBV, bookkeeping included: `Hetero_Client.P_UCBV` decides, the round loop of
    `FedLPS.py` credits (sunnyxuejj/FedLPS at 35fafba). Same interface as PUCBV.

    `arms` ([low, high], `mab_arms`) and `pulls` (`pull_times`) are in interval order; `rewards` is
    the code's dict `arms_reward` as [key, rewards] pairs in insertion order, the key an arm's lower
    end: the initial arms in order, then the upper half of every split in the order of the splits."""

    horizon: float
    arms: list[list[float]]
    rewards: list[list[Any]]
    pulls: list[float]
    decisions: int = 0  # the code's m
    best_acc: float = 0.0  # max(acc_record), whose first entry is 0
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def new(cls, seed: int, horizon: float, num_arms: int = 5, low: float = 0.5, high: float = 1.0) -> ReferencePUCBV:
        if num_arms < 1 or not 0 < low < high or horizon <= 0:
            raise ValueError(f"need num_arms >= 1, 0 < low < high and horizon > 0, got {num_arms}, {low}, {high}, "
                             f"{horizon}")
        step = (high - low) / num_arms  # np.linspace(0.5, 1, 6)'s edges
        edges = [low + i * step for i in range(num_arms)] + [high]
        arms = [[edges[i], edges[i + 1]] for i in range(num_arms)]
        return cls(horizon=float(horizon), arms=arms, rewards=[[a[0], [0.0]] for a in arms],
                   pulls=[1.0] * num_arms, rng=random.Random(seed))

    def _rewards_of(self, key: float) -> list[float]:
        return next(r for k, r in self.rewards if k == key)

    def indices(self) -> list[float]:
        """Reference quirk (P_UCBV): score j takes the mean and variance of the j-th reward list in
        the dict's insertion order but the pull count of the j-th arm in interval order, and its
        argmax indexes the arms in interval order. After the first split the two orders differ: an
        arm is chosen by another arm's rewards."""
        bonus = exploration_log(self.horizon, len(self.arms), self.decisions)
        out = []
        for j, (_, record) in enumerate(self.rewards):
            mean = sum(record) / len(record)
            var = sum((r - mean) ** 2 for r in record) / len(record)
            out.append(mean + math.sqrt(0.5 * (var + 2.0) * bonus / (4.0 * self.pulls[j])))
        return out

    def decide(self) -> Decision:
        explored = self.rng.random() < 1.0 / max(self.decisions, 1)  # ep: 1, 1, 1/2, 1/3, ...
        if explored:
            j = self.rng.randrange(len(self.arms))
        else:
            idx = self.indices()
            j = max(range(len(idx)), key=lambda i: (idx[i], -i))  # np.argmax: the first maximum
        low, high = self.arms[j]
        a = self.rng.uniform(low, high)
        self.arms[j:j + 1] = [[low, a], [a, high]]
        self.rewards.append([a, list(self._rewards_of(low))])
        # Reference quirk: both halves inherit the pull count and the upper half, whose lower end is
        # the ratio drawn, gets one more pull now, whether or not a reward is credited to it later.
        self.pulls[j:j + 1] = [self.pulls[j], self.pulls[j] + 1]
        self.decisions += 1
        return Decision(ratio=a, arm=j, low=low, high=high, explored=explored)

    def arm_of(self, ratio: float) -> int:
        """Reference quirk (FedLPS.py, after training): the arm before the first arm whose lower end
        exceeds `ratio`; when none does (the ratio lies in the last arm) arm 0, and when the first
        does (the tier cap pushed the ratio below every arm) index -1, the last arm."""
        for i, (low, _) in enumerate(self.arms):
            if low > ratio:
                return (i - 1) % len(self.arms)
        return 0

    def credit(self, ratio: float, reward: float) -> int:
        """Append `reward` to the rewards of `arm_of(ratio)` (its pull count does not change)."""
        j = self.arm_of(ratio)
        self._rewards_of(self.arms[j][0]).append(float(reward))
        return j

    def reward(self, acc: float, seconds: float) -> float:
        return (utility(acc) - utility(self.best_acc)) / max(seconds, 1e-12)

    def observe(self, ratio: float, acc: float, seconds: float) -> tuple[float, int]:
        r = self.reward(acc, seconds)
        j = self.credit(ratio, r)
        self.best_acc = max(self.best_acc, float(acc))
        return r, j

    def to_dict(self) -> dict[str, Any]:
        return {"reference": True, "horizon": self.horizon, "arms": [list(a) for a in self.arms],
                "rewards": [[k, list(r)] for k, r in self.rewards], "pulls": list(self.pulls),
                "decisions": self.decisions, "best_acc": self.best_acc, "rng": _rng_state(self.rng)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReferencePUCBV:
        return cls(horizon=float(d["horizon"]), arms=[list(a) for a in d["arms"]],
                   rewards=[[k, list(r)] for k, r in d["rewards"]], pulls=list(d["pulls"]),
                   decisions=int(d["decisions"]), best_acc=float(d["best_acc"]), rng=_rng_of(d["rng"]))
