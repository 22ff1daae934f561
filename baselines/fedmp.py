"""FedMP (Jiang, Xu, Xu, Wang, Qiao and Zhao, "FedMP: Federated Learning through Adaptive Model
Pruning in Heterogeneous Edge Computing", ICDE 2022): every worker trains a model pruned by unit
magnitude at a ratio that a per-worker multi-armed bandit (E-UCB) chooses from the worker's measured
loss decrease and cost; the server recovers the pruned parts from the global model (R2SP) and
averages.

Official code: none was found (the public code index searched by name and title; the FedLPS
authors' port is the only implementation found); `official` follows the paper as far as it is known.

`variant: official` (the default), round t:
1. Server, per sampled worker: its E-UCB bandit (server state) picks a keep ratio a. E-UCB and
   FedLPS's P-UCBV are the same rule, so the bandit IS fedlps/pucbv.PUCBV: arms are intervals of the
   keep ratio, an arm is drawn uniformly with probability 1/max(m, 1) and otherwise by the index
   mean + sqrt(0.5 (var + 2) max(ln(psi T 2^-m), 0) / (4 n)) (T = rounds / clients per round,
   psi = T / K^2), a ratio is drawn in it and the arm split there. Where FedMP's rule differs from
   FedLPS's: the reward (below, a loss decrease per second instead of a utility of accuracy), the
   initial arms (`arms` equal intervals over [`arm_low`, `arm_high`], default one arm over
   [0.2, 1] as in the authors' port; the paper's range is not known here) and no tier cap (the
   bandit learns what the device can do; the tier only sets its compute speed).
2. The server prunes the global model at a: in every unit group the k = max(1, floor(a N)) units of
   largest L1 norm (harness.submodel.unit_l1_norms) stay, and the worker receives that submodel,
   physically smaller (harness.submodel.extract).
3. The worker trains it by local SGD and uploads it.
4. R2SP: each worker's model is recovered to full size with the global model's values where it was
   pruned (residual recovery), and the server takes the sample-weighted mean of the recovered
   models.
5. Reward of the worker's arm: r = (L_before - L_after) / T_round, L the cross-entropy of the
   received and of the trained submodel on the worker's training data, T_round its simulated round
   time (download + compute + upload); credited to the arm that holds a (fedlps/pucbv.PUCBV.credit).
Evaluation: the global model (client view = global view).
Costs: FLOPs measured with flop_counter on the submodel (3 x forward at its widths x samples
processed); bytes down: the submodel's values plus one bit per unit of the dense model (which units);
bytes up: the trained submodel's values. The two loss passes are inference, not charged.

`variant: reference`: the FedLPS authors' port (sunnyxuejj/FedLPS at
35fafba2171fac0b0de374ffcd2a85eb40bc975e, `FedMP.py`, script `script_baselines/FedMP/mnist_FedMP.sh`,
no extra arguments). Its quirks, each marked `Reference quirk` where it is implemented:
- the bandit (`Client_FedMP.E_UCB`, `ReferenceEUCB` below): one arm [0.2, 1]; the rewards are kept in
  a dict keyed by each arm's lower end in insertion order while the pull counts are in interval order,
  so after the first split the index of an arm is computed from another arm's rewards; it is called
  twice per round: before training (its ratio is the worker's keep ratio) and again after
  aggregation, a second draw that splits an arm once more and whose upper half is credited the
  reward; its random draws use Python's `random` module, which the code never seeds (here: a
  generator per client from (seed, "fedmp-eucb", client));
- the ratio overrides the device tier's (`client.mask_rate, _ = client.E_UCB()`): the tier never limits
  the model size, it only sets the compute speed;
- reward (`__main__`): (L_t - L_{t-1}) / (t_i - mean over the round's workers of t), L the worker's
  mean training loss (its record starts at 10), t its training time (FLOPs / tier speed: the
  simulated compute time); a round whose workers all took the same time (zero denominator, a
  division by zero there) credits nothing here;
- pruning (`mask_weight_magnitude`): per masked weight, the units whose L1 row norm is at least the
  k-th largest (k = max(int(a N), 1), ties all kept) stay; the others' weight rows are set to zero and
  frozen (gradients times the mask) in the dense model; their biases and the weights reading them
  still train; upload the update times the mask;
- aggregation (`agg/avg.py:avg`): global + the plain mean of the updates + Gaussian noise of std
  0.001 on every tensor (unseeded there; here from (seed, "fedmp-noise", round));
- evaluation: the global model;
- costs as the code counts them: FLOPs by the density rule on the trained model's nonzero weights
  (`count_training_flops`), bytes down the dense model (`param_size`), bytes up 4 per nonzero masked
  weight and per other value (`stat_param_sizes`).

Shared with the rest of fedbench: the P-UCBV bandit (fedlps/pucbv.py), unit index sets, extraction
and aggregation (harness/submodel.py), unit norms, masks, the density rule, byte counts and update
mean (harness/sparsity.py), update masks (harness/training.py), seeding (harness/seeding.py).
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from fedlps.masks import keep_widths, topk_mask
from fedlps.pucbv import PUCBV
from harness.cost import training_flops
from harness.errors import ConfigError
from harness.records import ClientResult, ClientTask
from harness.seeding import seed_of
from harness.sparsity import (apply_masks, masked_forward_flops, mean_update, model_holding, nonzero_bytes,
                              nonzero_densities, prunable_weights, reference_noise)
from harness.strategy import Client, MethodParams, Strategy
from harness.submodel import Contribution, aggregate, extract, state_bytes, unit_l1_norms
from harness.training import LocalJob

REFERENCE_INITIAL_LOSS = 10.0  # Client_FedMP.loss_record = [10]


@dataclass
class ReferenceEUCB:
    """The FedLPS authors' E-UCB (`Client_FedMP.E_UCB`), bookkeeping included. `rewards` is the
    code's dict as a list of [key, rewards] pairs in insertion order (key: an arm's lower end);
    `pulls` and `arms` are in interval order."""

    horizon: float
    arms: list[list[float]] = field(default_factory=lambda: [[0.2, 1.0]])
    rewards: list[list[Any]] = field(default_factory=lambda: [[0.2, [0.0]]])
    pulls: list[float] = field(default_factory=lambda: [1.0])
    selected: int = 0  # trainings so far (`selected_times`)
    es0: float = 1.0
    m: int = 0
    ep: float = 1.0
    losses: list[float] = field(default_factory=lambda: [REFERENCE_INITIAL_LOSS])
    rng: random.Random = field(default_factory=random.Random)

    def _rewards_of(self, key: float) -> list[float]:
        return next(r for k, r in self.rewards if k == key)

    def decide(self) -> tuple[float, int]:
        """(ratio, index of the new upper arm), as `E_UCB` returns them."""
        if self.selected == 0:
            self.es0, self.m, self.ep = 1.0, 0, 1.0
        phi = self.horizon / len(self.arms) ** 2
        log_term = math.log(phi * self.horizon * self.es0)
        scores = []
        # Reference quirk: scores in the dict's insertion order, pull counts in interval order.
        for j, (_, record) in enumerate(self.rewards):
            mean = sum(record) / len(record)
            var = sum((r - mean) ** 2 for r in record) / len(record)
            bonus = math.sqrt(0.5 * (abs(var) + 2) * log_term / (4 * self.pulls[j])) if log_term > 0 else 0.0
            scores.append(mean + bonus)
        if self.rng.random() < self.ep:
            j = self.rng.randint(0, len(self.arms) - 1)
        else:
            j = max(range(len(scores)), key=lambda i: (scores[i], -i))
        low, high = self.arms[j]
        action = self.rng.uniform(low, high)
        self.arms[j] = [low, action]
        self.arms.insert(j + 1, [action, high])
        self.rewards.append([action, copy.copy(self._rewards_of(low))])
        self.pulls.insert(j, self.pulls[j])
        self.pulls[j + 1] += 1
        self.es0 /= 2
        self.m += 1
        self.ep = 1 / self.m
        return action, j + 1

    def credit(self, index: int, reward: float) -> None:
        self._rewards_of(self.arms[index][0]).append(float(reward))

    def to_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"horizon": self.horizon, "arms": [list(a) for a in self.arms],
                "rewards": [[k, list(r)] for k, r in self.rewards], "pulls": list(self.pulls),
                "selected": self.selected, "es0": self.es0, "m": self.m, "ep": self.ep, "losses": list(self.losses),
                "rng": [version, list(internal), gauss]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReferenceEUCB:
        rng = random.Random()
        version, internal, gauss = d["rng"]
        rng.setstate((version, tuple(internal), gauss))
        return cls(horizon=d["horizon"], arms=[list(a) for a in d["arms"]], rewards=[[k, list(r)] for k, r in d["rewards"]],
                   pulls=list(d["pulls"]), selected=d["selected"], es0=d["es0"], m=d["m"], ep=d["ep"],
                   losses=list(d["losses"]), rng=rng)


def threshold_row_masks(weights: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Reference (`mask_weight_magnitude`): per weight, the rows whose L1 norm is at least the k-th
    largest, k = max(int(ratio x rows), 1); ties all stay."""
    out = {}
    for name, w in weights.items():
        norms = w.detach().abs().flatten(1).sum(1)
        k = max(int(ratio * len(norms)), 1)
        threshold = torch.topk(norms, k).values.min()
        out[name] = (norms >= threshold).view(-1, *([1] * (w.dim() - 1))).expand(w.shape).cpu()
    return out


def loss_on(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean cross-entropy of `model` (evaluation mode) on normalised images `x`."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            total += float(F.cross_entropy(model(x[start:start + batch_size]), y[start:start + batch_size],
                                           reduction="sum"))
    return total / max(len(y), 1)


class FedMPParams(MethodParams):  # clip_grad_norm: None (the port does not clip)
    variant: Literal["official", "reference"] = "official"
    arms: int = Field(1, ge=1, description="official: initial number of equal arms")
    arm_low: float = Field(0.2, gt=0, lt=1, description="official: lower end of the keep-ratio arms")
    arm_high: float = Field(1.0, gt=0, le=1, description="official: upper end of the keep-ratio arms")
    reference_noise: float = Field(0.001, ge=0, description="reference: std of the aggregate's noise")

    @model_validator(mode="after")
    def _arm_range(self):
        if self.arm_low >= self.arm_high:
            raise ValueError(f"arm_low ({self.arm_low}) must be below arm_high ({self.arm_high})")
        return self


class _FedMPRules:
    """What both halves derive from the parameters."""

    def __init__(self, bench, params):
        super().__init__(bench, params)
        self.reference = params.variant == "reference"
        self.masked = prunable_weights(bench.layout)
        cfg = bench.cfg
        self.horizon = cfg.rounds / cfg.clients.per_round


class FedMPClient(_FedMPRules, Client):
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        bench = self.bench
        ratio = float(task.instruction["keep_ratio"])
        if self.reference:
            # Reference quirk (Client_FedMP.update_weights_MP): the dense model with zeroed, frozen rows.
            masks = threshold_row_masks({n: global_state[n] for n in self.masked}, ratio)
            start = apply_masks(global_state, masks)
            update_masks = {n: m.to(bench.device, torch.get_default_dtype()) for n, m in masks.items()}
            return bench.job(task, start, clip_grad_norm=self.params.clip_grad_norm, update_masks=update_masks,
                             context={"masks": masks, "ratio": ratio})
        widths = keep_widths(bench.full_widths, ratio)
        norms = unit_l1_norms(global_state, bench.layout)
        index_sets = {g: topk_mask(norms[g], widths[g]).nonzero().squeeze(1) for g in bench.full_widths}
        sub = extract(global_state, bench.layout, index_sets)
        return bench.job(task, sub, bench.spec(widths), clip_grad_norm=self.params.clip_grad_norm,
                         context={"index_sets": index_sets, "widths": widths, "ratio": ratio})

    def local_result(self, global_state, task: ClientTask, job: LocalJob) -> ClientResult:
        bench, stats, ctx = self.bench, job.stats, job.context
        trained = {k: v.cpu() for k, v in job.trained.items() if k in job.start}
        metrics = {"arm_low": task.instruction["arm_low"], "arm_high": task.instruction["arm_high"]}
        if self.reference:
            payload = apply_masks({k: w - global_state[k] for k, w in trained.items()}, ctx["masks"])
            flops = training_flops(masked_forward_flops(bench.flops, nonzero_densities(trained, self.masked)),
                                   stats.samples)
            bytes_down, bytes_up = state_bytes(global_state), nonzero_bytes(trained, self.masked)
            metrics["loss_decrease"] = math.nan
        else:
            before = loss_on(model_holding(bench, job.spec, job.start), job.x, job.y)
            after = loss_on(bench.trained_model(job), job.x, job.y)
            metrics["loss_decrease"] = before - after
            payload = Contribution(trained, ctx["index_sets"], weight=float(len(job.y)))
            flops = training_flops(bench.flops.forward(ctx["widths"]), stats.samples)
            bytes_down = state_bytes(job.start) + (sum(bench.full_widths.values()) + 7) // 8
            bytes_up = state_bytes(trained)
        return ClientResult(
            task.client_id, task.round, payload=payload, num_samples=len(job.y), train_loss=stats.loss,
            train_acc=stats.accuracy, keep_ratio=ctx["ratio"], flops=flops, bytes_up=bytes_up, bytes_down=bytes_down,
            metrics=metrics)



class FedMP(_FedMPRules, Strategy):
    Client = FedMPClient
    Params = FedMPParams
    title = "FedMP"
    client_columns = {"arm_low": pa.float64(), "arm_high": pa.float64(), "loss_decrease": pa.float64()}

    @classmethod
    def check(cls, params, model, cfg):
        if not prunable_weights(model.layout):
            raise ConfigError("model.name", "FedMP needs a model with conv or linear layers besides the classifier")

    def setup(self, store):
        super().setup(store)
        self.global_state = self.bench.init_global_state()

    # -- the bandits (server state, in the store's "bandit" namespace) ------------------------------
    def _bandit(self, client_id: int):
        state = self.store.get(client_id, "bandit")
        seed = seed_of(self.bench.cfg.seed, "fedmp-eucb", client_id)
        if self.reference:
            return ReferenceEUCB(self.horizon, rng=random.Random(seed)) if state is None else ReferenceEUCB.from_dict(state)
        if state is None:
            p = self.params
            return PUCBV.new(seed, horizon=self.horizon, num_arms=p.arms, low=p.arm_low, high=p.arm_high)
        return PUCBV.from_dict(state)

    def configure(self, rnd, clients):
        instructions = []
        for slot in clients:
            bandit = self._bandit(slot.client_id)
            if self.reference:
                ratio, upper = bandit.decide()
                bandit.selected += 1
                low, high = bandit.arms[upper - 1][0], bandit.arms[upper][1]
            else:
                d = bandit.decide()
                ratio, low, high = d.ratio, d.low, d.high
            self.store.put(slot.client_id, bandit.to_dict(), "bandit")
            instructions.append({"keep_ratio": ratio, "arm_low": low, "arm_high": high})
        return self.global_state, instructions

    # -- server side -------------------------------------------------------------------------------
    def aggregate(self, rnd, kept, dropped):
        """Dropped workers change nothing: no update, no reward (their bandit decided when the round
        was configured)."""
        if self.reference:
            return self._aggregate_reference(rnd, kept)
        if kept:
            # R2SP: each worker's model recovered to full size from the global model, then averaged.
            recovered = [aggregate(self.global_state, self.bench.layout, [r.payload]) for r in kept]
            weights = [r.num_samples for r in kept]
            total = float(sum(weights))
            self.global_state = {k: sum(w * m[k] for w, m in zip(weights, recovered)) / total
                                 for k in self.global_state}
        for r in kept:
            if math.isnan(r.metrics["loss_decrease"]) or not r.sim_s > 0:
                continue
            bandit = self._bandit(r.client_id)
            bandit.credit(r.keep_ratio, r.metrics["loss_decrease"] / r.sim_s)
            self.store.put(r.client_id, bandit.to_dict(), "bandit")
        return {}

    def _aggregate_reference(self, rnd, kept):
        if not kept:
            return {}
        new_state = mean_update(self.global_state, [r.payload for r in kept])
        # Reference quirk (agg/avg.py:avg): Gaussian noise on every tensor of the aggregate.
        self.global_state = reference_noise(new_state, self.params.reference_noise, self.bench.cfg.seed,
                                            "fedmp-noise", rnd)
        mean_time = sum(r.sim_compute_s for r in kept) / len(kept)
        for r in kept:
            bandit = self._bandit(r.client_id)
            bandit.losses.append(r.train_loss)
            # Reference quirk (__main__): a second E-UCB draw after aggregation; its upper arm gets
            # the reward (L_t - L_{t-1}) / (t_i - mean t).
            _, upper = bandit.decide()
            denominator = r.sim_compute_s - mean_time
            if denominator != 0:
                bandit.credit(upper, (bandit.losses[-1] - bandit.losses[-2]) / denominator)
            self.store.put(r.client_id, bandit.to_dict(), "bandit")
        return {}

    def evaluate(self, rnd):
        return self.bench.evaluate_global(self.global_state)

    def state_dict(self):
        return {"global_state": self.global_state}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
