"""PruneFL (Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices",
IEEE TNNLS 2022): adaptive unstructured pruning of one shared model.

The algorithm, as implemented here (METHODS.md, "PruneFL"):

- Prunable weights: the weight tensor of every conv and linear layer, the classifier included
  (`dense_layers` names any to keep dense). Biases, BatchNorm parameters and buffers stay dense. A mask
  is a bool tensor per prunable weight; density = kept weights / prunable weights.
- Initial pruning, on the server before round 0's clients train: client `initial_client` (0) trains
  the dense model on `initial_samples` (200) of its training samples, drawn at random (all of them if
  it has fewer), with the experiment's local SGD settings at the round-0 learning rate. It
  reconfigures (below; d = `drop_fraction`, no decay) after every `initial_interval` (50) local
  rounds, a local round being one pass over those samples, and stops once `initial_patience` (5)
  consecutive reconfigurations each changed the density by at most `initial_tolerance` (10%)
  relative to the density before, or after `initial_max_rounds` (1000) local rounds. As in the
  official code, reconfiguring starts only once the training accuracy over a stretch of local rounds
  reaches `initial_start_factor` / classes (1.5 / classes), and the initial stage adds no simulated
  time. It runs in the first `configure`, not in `setup`: restoring a checkpoint calls `setup` first
  and must not redo it.
- Local training (every sampled client, the one shared sparse model; tier caps do not apply): plain
  local SGD where the pruned weights are set to zero before every step, so they play no part in the
  forward pass while their gradients stay dense. Importance G = sum over the client's minibatches
  of grad^2 x batch size, per coordinate; uploaded with the model.
- Aggregation: the sample-weighted mean over clients of the in-use coordinates; pruned coordinates
  keep their stale global value (they resume from it if they grow back). The server sums the
  clients' importance over rounds since the last reconfiguration.
- Reconfiguration, at the start of every round t that is a positive multiple of `interval` (50):
  1. per layer, drop the floor(d x n_in_use) in-use weights of smallest |w|, with
     d = drop_fraction x 0.5^(t / drop_half_life) (0.3 x 0.5^(t/10000));
  2. candidates = the dropped weights plus all pruned ones, ordered by G_j / t_l (highest first,
     ties in layer then index order); re-add them one by one while G_j / t_l exceeds the running
     ratio (sum of kept G) / (c0 + sum of kept t), stopping at the first that does not
     (`greedy_readd`). "Kept G" includes the importance of the always-dense parameters, as in the
     official code; their time is part of c0.
  Importance accumulators then restart from zero.
- Time coefficients from this project's cost model, nothing typed in by hand:
  t_l = 3 x forward FLOPs of layer l per sample / numel(W_l) x samples per round / compute
        + 4 bytes / upload bandwidth,
  with samples per round = local epochs x the mean client training-set size and compute = the
  slowest configured tier's (a synchronous round lasts as long as its slowest client).
  c0 (`c0`, seconds) defaults to the dense model's download + upload time (all floating-point
  tensors, 4 bytes each, over the two bandwidths): the official code measured c0 as a per-round
  overhead that does not shrink with the model, which this cost model does not have.
- Cost rule per client and round (clients.parquet; keep_ratio and `density` = the model's density):
  FLOPs = 3 x (sum over prunable layers of forward FLOPs x layer density + the forward FLOPs of all
  other operations at full size) x samples processed; bytes down = bytes up = for each prunable
  weight `sparse_bytes(kept, numel)` (4-byte values plus a bitmap or 4-byte indices, whichever is
  smaller) + 4 bytes per value of every other floating-point tensor. Importance uploads are not
  charged, as in the official code's time estimate (the paper sends them only at reconfigurations).
- Evaluation: the global model with its mask applied.

Where this differs from the official code (jiangyuang/PruneFL), following METHODS.md:
- Importance: METHODS.md's "accumulated squared sum of local minibatch gradients times samples
  processed" is read as the sum over minibatches of grad^2 x batch size. The official federated
  client squares the sum of a round's minibatch gradients instead, times the samples processed; its
  initial stage sums squared minibatch gradients without the batch size (a near-constant factor,
  and the rule does not change when G is scaled). Clients upload importance every round they train,
  not only in reconfiguration rounds: with partial participation, the importance of clients absent
  from a reconfiguration round would otherwise be lost.
- The official drop step cuts at a magnitude threshold (ties at the threshold kept); here exactly
  floor(d x n_in_use) weights go, ties broken by index.
- Time coefficients come from the cost model above rather than from on-device measurements.

Variant `reference` (`method.variant: reference`): the FedLPS authors' port (sunnyxuejj/FedLPS at
35fafba2171fac0b0de374ffcd2a85eb40bc975e, `PruneFL.py` and `Models.py`), whose numbers the FedLPS
paper reports. No importance accumulation, no time model, no greedy rule:
- start (`Models.py:CommenNet.layer_prune`, `PruneFL.py:__main__`): every prunable layer is pruned
  by magnitude to density 1/2 (the floor(n/2) largest |w| stay, the others are set to 0); then one
  randomly chosen client (the code's choice is unseeded; here drawn from the seed) trains the global
  model for the experiment's local epochs on all its training data, at lr x 0.998^i in iteration i,
  and the mask is rebuilt from its last minibatch's gradients (`percentile_mask`, p = 0.3); the
  global model becomes the client's; this repeats up to 10 times and stops once the last 5 rebuilds
  each flipped fewer than 10 % of the mask's entries;
- masked training as above, without importance; the server keeps each client's gradient of its last
  minibatch (`param.grad` after training);
- aggregation: the plain (unweighted) mean of the clients' whole models (`agg/avg.py:average_w`, which
  overwrites the code's weighted average), so pruned coordinates become 0;
- after aggregating rounds t = 1, 6, 11, ... ((t - 1) % `interval` == 0, `interval` 5 by default), the
  mask is rebuilt from the mean over the round's clients of their last-minibatch gradients with
  p = drop_fraction x 0.5^(t / drop_half_life), drop_half_life 1 by default (0.3 x 0.5^t); the new
  mask applies from the next round (`Models.py:CommenNet.prunefl_readjust`);
- `percentile_mask`: per layer, a weight stays when its squared gradient (divided by the layer's
  size, which changes no ranking) is at least the layer's 100 p-th percentile (numpy's linear
  interpolation); where at least a fraction p of a layer's gradients are exactly 0 the threshold is 0
  and the whole layer becomes dense (on the MNIST CNN's fc1, whose dead ReLUs give many zeros);
- evaluation: the global model as it is (its pruned coordinates are already 0);
- cost as the code counts it: FLOPs of the dense model (its FLOP counter ignores the masks),
  bytes up = 4 per kept prunable weight and per other value plus one bit per prunable weight (the
  mask); bytes down the same without the mask bits, plus them when the mask changed since the
  client's last download.
"""
from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
import pyarrow as pa
import torch.nn as nn
from pydantic import Field

from harness.cost import client_time, sparse_bytes, training_flops
from harness.errors import ConfigError
from harness.records import ClientResult, ClientTask
from harness.seeding import rng, torch_generator
from harness.strategy import Client, MethodParams, Strategy
from harness.submodel import Contribution, aggregate, state_bytes
from harness.training import Hooks, LocalJob

log = logging.getLogger(__name__)

Masks = dict[str, torch.Tensor]  # prunable weight name -> bool tensor of its shape, True = in use

# The reference variant's constants (sunnyxuejj/FedLPS at 35fafba): `--mask_rate 0.5` for the start,
# `--initial-rounds 10`, `prunefl_readjust(..., prunable_params=0.3)` in the initial phase, and its
# stopping rule (5 rebuilds in a row that each flip fewer than 10 % of the mask).
REFERENCE_START_DENSITY = 0.5
REFERENCE_INITIAL_ITERATIONS = 10
REFERENCE_INITIAL_P = 0.3
REFERENCE_PATIENCE = 5
REFERENCE_FLIP_TOLERANCE = 0.1


# -- the reconfiguration rule, as pure functions ---------------------------------------------------
def drop_fraction(t: int, base: float, half_life: float) -> float:
    """d = base x 0.5^(t / half_life)."""
    return base * 0.5 ** (t / half_life)


def drop_lowest(weight: torch.Tensor, mask: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, dropped) masks: the floor(fraction x in-use) in-use weights of smallest |w| are dropped,
    ties going to the lower flat index first."""
    in_use = mask.flatten().nonzero().squeeze(1)
    n_drop = int(fraction * len(in_use))
    order = torch.sort(weight.detach().flatten()[in_use].abs(), stable=True).indices
    dropped = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    dropped[in_use[order[:n_drop]]] = True
    dropped = dropped.view(mask.shape)
    return mask & ~dropped, dropped


def greedy_readd(gain: torch.Tensor, cost: torch.Tensor, kept_gain: float, kept_cost: float) -> torch.Tensor:
    """Which candidates come back, in the order they do (indices into `gain`/`cost`).

    Candidates are visited by gain / cost, highest first (ties in list order); each is re-added while
    its ratio exceeds the running ratio (kept_gain + gains re-added) / (kept_cost + costs re-added),
    and the first that does not stops the search."""
    gain, cost = gain.double().flatten(), cost.double().flatten()
    ratio = gain / cost
    order = torch.sort(ratio, descending=True, stable=True).indices
    g, c = gain[order], cost[order]
    # the running totals just before each candidate is considered
    num = kept_gain + torch.cat([g.new_zeros(1), torch.cumsum(g, 0)[:-1]])
    den = kept_cost + torch.cat([c.new_zeros(1), torch.cumsum(c, 0)[:-1]])
    refused = (ratio[order] <= num / den).nonzero()
    count = int(refused[0]) if len(refused) else len(order)
    return order[:count]


def reconfigure(weights: dict[str, torch.Tensor], masks: Masks, importance: dict[str, torch.Tensor],
                time_per_weight: dict[str, float], fraction: float, c0: float, dense_importance: float = 0.0) -> Masks:
    """New masks: drop the `fraction` smallest in-use weights per layer, then greedily re-add
    candidates (dropped + pruned) by importance per unit of time (`greedy_readd`)."""
    kept_gain, kept_cost = float(dense_importance), float(c0)
    kept_flat, gains, costs, positions = [], [], [], []
    offset = 0
    for name, mask in masks.items():
        kept, _ = drop_lowest(weights[name], mask, fraction)
        g = importance[name].flatten().double()
        flat = kept.flatten()
        kept_gain += float(g[flat].sum())
        kept_cost += time_per_weight[name] * int(flat.sum())
        candidates = (~flat).nonzero().squeeze(1)  # just dropped, or pruned before
        gains.append(g[candidates])
        costs.append(torch.full((len(candidates),), time_per_weight[name], dtype=torch.float64))
        positions.append(candidates + offset)
        kept_flat.append(flat)
        offset += flat.numel()
    new_flat = torch.cat(kept_flat)
    positions = torch.cat(positions)
    new_flat[positions[greedy_readd(torch.cat(gains), torch.cat(costs), kept_gain, kept_cost)]] = True
    out, start = {}, 0
    for name, mask in masks.items():
        out[name] = new_flat[start:start + mask.numel()].view(mask.shape).clone()
        start += mask.numel()
    return out


def magnitude_masks(weights: dict[str, torch.Tensor], masks: Masks, keep: float) -> Masks:
    """Reference variant: per layer, the floor(keep x n) weights of largest |w| stay."""
    out = {}
    for name, mask in masks.items():
        w = weights[name].flatten()
        kept = torch.zeros(w.numel(), dtype=torch.bool)
        kept[torch.topk(w.abs(), int(keep * w.numel())).indices] = True
        out[name] = kept.view(mask.shape)
    return out


def percentile_mask(grad: torch.Tensor, p: float) -> torch.Tensor:
    """Reference variant (`Models.py:CommenNet.prunefl_readjust`): keep the weights whose squared
    gradient (over the layer's size) is not below its 100 p-th percentile."""
    importance = grad.float().square() / grad.numel()
    threshold = float(np.percentile(importance.abs().cpu().numpy(), 100 * p))
    return ~(importance.abs() < threshold)


def flipped(before: Masks, after: Masks) -> float:
    """The fraction of mask entries that changed."""
    total = sum(m.numel() for m in before.values())
    return sum(int((before[n] ^ after[n]).sum()) for n in before) / total


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tensors.items()}


def density(masks: Masks) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0


# -- the method ----------------------------------------------------------------------------------
class Settings:
    """What both halves derive from the parameters and the model: the variant, the prunable layers,
    and the cost rule."""

    class Params(MethodParams):  # clip_grad_norm: None, as PruneFL does not clip
        variant: Literal["official", "reference"] = "official"
        interval: int | None = Field(None, gt=0, description="federated rounds between reconfigurations "
                                                             "(default: official 50, reference 5)")
        drop_fraction: float = Field(0.3, ge=0, lt=1, description="d at t = 0")
        drop_half_life: float | None = Field(None, gt=0, description="rounds in which d halves (default: "
                                                                     "official 10000, reference 1)")
        c0: float | None = Field(None, gt=0, description="fixed per-round time (s); default: the dense "
                                 "model's download + upload time")
        dense_layers: list[str] = Field(default_factory=list, description="conv/linear weights kept dense")
        initial_pruning: bool = True
        initial_client: int = Field(0, ge=0)
        initial_samples: int = Field(200, gt=0)
        initial_interval: int = Field(50, gt=0, description="local rounds between initial reconfigurations")
        initial_patience: int = Field(5, gt=0, description="consecutive small density changes that stop it")
        initial_tolerance: float = Field(0.1, ge=0, description="a small change: |density/previous - 1| <= this")
        initial_max_rounds: int = Field(1000, gt=0, description="local rounds at most")
        initial_start_factor: float = Field(1.5, ge=0, description="reconfigure once training accuracy "
                                            ">= this / classes")

    @staticmethod
    def _layers(model: nn.Module) -> list[str]:
        return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    @classmethod
    def check(cls, params, model, cfg):
        layers = cls._layers(model)
        unknown = set(params.dense_layers) - set(layers)
        if unknown:
            raise ConfigError("method.dense_layers", f"not conv/linear weights of the model: "
                              f"{', '.join(sorted(unknown))}; choose from {', '.join(layers)}")
        if params.initial_pruning and params.initial_client >= cfg.clients.total:
            raise ConfigError("method.initial_client", f"{params.initial_client} is not a client "
                              f"(there are {cfg.clients.total})")

    def __init__(self, bench, params):
        super().__init__(bench, params)
        cfg = bench.cfg
        self.reference = params.variant == "reference"
        self.interval = params.interval or (5 if self.reference else 50)
        self.half_life = params.drop_half_life or (1.0 if self.reference else 10000.0)
        template = bench.build(device="meta")
        shapes = {k: v for k, v in template.state_dict().items() if v.is_floating_point()}
        self.prunable = [n for n in self._layers(template) if n not in params.dense_layers]
        self.shapes = {n: shapes[n].shape for n in self.prunable}
        per_weight = bench.flops.per_weight()
        self.layer_flops = {n: per_weight.get(n, 0) for n in self.prunable}
        self.forward_flops = bench.flops.forward()
        self.dense_bytes = state_bytes({k: v for k, v in shapes.items() if k not in self.shapes})

        # The time coefficients of the cost model, on the slowest tier (a synchronous round lasts as
        # long as its slowest client): a weight of layer l costs its training FLOPs over a round's
        # samples plus its 4 bytes of upload; c0 is the dense model's download and upload.
        slowest = min(cfg.devices.tiers, key=lambda t: t.compute_mflops)
        samples = cfg.train.epochs * bench.clients.mean_num_samples()
        self.time_per_weight = {
            n: client_time(slowest, cfg.devices, training_flops(self.layer_flops[n] / s.numel(), samples), 0, 4).total_s
            for n, s in self.shapes.items()}
        full_bytes = state_bytes(shapes)
        self.c0 = params.c0 if params.c0 is not None else client_time(slowest, cfg.devices, 0, full_bytes,
                                                                        full_bytes).total_s

    def sparse_cost(self, masks: Masks) -> tuple[float, int]:
        """(forward FLOPs per sample, bytes of the model) at these masks (the module's cost rule)."""
        forward, nbytes = float(self.forward_flops), self.dense_bytes
        for name, m in masks.items():
            kept, total = int(m.sum()), m.numel()
            forward -= self.layer_flops[name] * (1 - kept / total)
            nbytes += sparse_bytes(kept, total)
        return forward, nbytes

    def reference_cost(self, masks: Masks, mask_changed: bool) -> tuple[float, int, int]:
        """Reference variant: (forward FLOPs per sample, bytes up, bytes down) as the code counts them."""
        values = self.dense_bytes + 4 * sum(int(m.sum()) for m in masks.values())
        mask_bytes = (sum(m.numel() for m in masks.values()) + 7) // 8
        return float(self.forward_flops), values + mask_bytes, values + (mask_bytes if mask_changed else 0)

    def _last_gradients(self, into: dict):
        """Reference variant: hooks that keep the prunable weights' gradients of the last minibatch in
        `into["last_grads"]` (the code reads `param.grad` after training)."""
        def hooks(model) -> Hooks:
            params = dict(model.named_parameters())

            def keep(_batch_size):
                into["last_grads"] = {n: params[n].grad.detach().clone() for n in self.prunable}

            return Hooks(after_backward=keep)

        return hooks


class PruneFLClient(Settings, Client):
    def local_job(self, broadcast, task: ClientTask) -> LocalJob:
        bench = self.bench
        masks = {n: m.to(bench.device) for n, m in broadcast["masks"].items()}
        if self.reference:
            context: dict = {}
            return bench.job(task, broadcast["state"], clip_grad_norm=self.params.clip_grad_norm, weight_masks=masks,
                             hooks=self._last_gradients(context), context=context)
        return bench.job(task, broadcast["state"], clip_grad_norm=self.params.clip_grad_norm, weight_masks=masks,
                         importance=True)

    def local_result(self, broadcast, task: ClientTask, job: LocalJob) -> ClientResult:
        global_state, masks = broadcast["state"], broadcast["masks"]
        stats, y = job.stats, job.y
        trained = {k: v.cpu() for k, v in job.trained.items() if k in global_state}
        share = density(masks)
        if self.reference:
            forward, up, down = self.reference_cost(masks, task.instruction["mask_changed"])
            payload = {"state": trained, "last_grads": {n: g.cpu() for n, g in job.context["last_grads"].items()}}
        else:
            forward, up = self.sparse_cost(masks)
            down = up
            payload = {"state": trained, "importance": {n: g.cpu() for n, g in job.grad_importance.items()},
                       "dense_importance": job.dense_importance}
        return ClientResult(
            task.client_id, task.round, payload=payload, num_samples=len(y), train_loss=stats.loss,
            train_acc=stats.accuracy, keep_ratio=share, flops=training_flops(forward, stats.samples),
            bytes_up=up, bytes_down=down, metrics={"density": share})


class PruneFL(Settings, Strategy):
    Client = PruneFLClient
    title = "PruneFL"
    client_columns = round_columns = {"density": pa.float64()}

    # -- server side -------------------------------------------------------------------------------
    def setup(self, store):
        super().setup(store)
        self.global_state = self.bench.init_global_state()
        self.masks = {n: torch.ones(s, dtype=torch.bool) for n, s in self.shapes.items()}
        self._reset_importance()
        self.last_reconfiguration = 0  # the round of the latest reconfiguration (0: none yet)
        self.reconfigurations = 0
        self.initial_densities: list[float] = []  # after each reconfiguration of the initial stage
        self.initial_rounds = 0
        self.initial_done = not self.params.initial_pruning
        self.mask_version, self.seen_version = 0, {}  # reference cost: has a client the current mask?
        if self.reference:  # Reference quirk: magnitude pruning to density 1/2 before anything else
            self.masks = magnitude_masks(self.global_state, self.masks, REFERENCE_START_DENSITY)
            self.global_state = self.masked_state()

    def _reset_importance(self) -> None:
        self.importance = {n: torch.zeros(s) for n, s in self.shapes.items()}
        self.dense_importance = 0.0
        self.accumulated = 0  # client updates summed into the importance

    def _initial_pruning(self) -> None:
        p, bench = self.params, self.bench
        seed = bench.cfg.seed
        x, y = bench.train_data(p.initial_client)
        if len(y) == 0:
            raise ConfigError("method.initial_client", f"client {p.initial_client} has no training samples")
        pick = np.sort(rng(seed, "prunefl", "initial-samples").permutation(len(y))[:p.initial_samples])
        pick = torch.from_numpy(pick).to(x.device)
        x, y = x[pick], y[pick]
        weights = self.global_state
        started, small_changes, segment = False, [], 0
        while self.initial_rounds < p.initial_max_rounds:
            epochs = min(p.initial_interval, p.initial_max_rounds - self.initial_rounds)
            job = LocalJob(bench.spec(), weights, x, y, bench.cfg.train.model_copy(update={"epochs": epochs}),
                           bench.lr(0), torch_generator(seed, "prunefl", "initial", segment), p.clip_grad_norm,
                           weight_masks={n: m.to(bench.device) for n, m in self.masks.items()}, importance=True)
            bench.train_here(job)
            weights = {n: t.cpu() for n, t in job.trained.items()}
            self._accumulate(job.grad_importance, job.dense_importance)
            self.initial_rounds += epochs
            segment += 1
            started = started or job.stats.accuracy >= p.initial_start_factor / bench.num_classes
            if not started:
                continue
            self.masks = reconfigure(weights, self.masks, self.importance, self.time_per_weight,
                                     p.drop_fraction, self.c0, self.dense_importance)
            self._reset_importance()
            self.initial_densities.append(density(self.masks))
            if len(self.initial_densities) > 1:
                before, now = self.initial_densities[-2:]
                small_changes.append(abs(now / before - 1) <= p.initial_tolerance)
            if len(small_changes) >= p.initial_patience and all(small_changes[-p.initial_patience:]):
                break
        self.global_state = {k: v.clone() for k, v in weights.items() if k in self.global_state}
        self._reset_importance()  # federated training accumulates afresh
        log.info("prunefl initial pruning: %d local rounds, %d reconfigurations, density %.4f",
                 self.initial_rounds, len(self.initial_densities), density(self.masks))

    def _accumulate(self, importance: dict[str, torch.Tensor], dense_importance: float) -> None:
        for n, g in importance.items():
            self.importance[n] += g.to(self.importance[n].device)
        self.dense_importance += dense_importance
        self.accumulated += 1

    def _initial_phase_reference(self) -> None:
        """Reference variant: the start on one client (see the module docstring)."""
        bench, seed = self.bench, self.bench.cfg.seed
        client = int(rng(seed, "prunefl", "initial-client").integers(len(bench.clients)))
        x, y = bench.train_data(client)
        flips = []
        for i in range(REFERENCE_INITIAL_ITERATIONS):
            context: dict = {}
            job = LocalJob(bench.spec(), self.global_state, x, y, bench.cfg.train, bench.lr(i),
                           torch_generator(seed, "prunefl", "initial", i),
                           weight_masks={n: m.to(bench.device) for n, m in self.masks.items()},
                           hooks=self._last_gradients(context), context=context)
            bench.train_here(job)
            new = {n: percentile_mask(g, REFERENCE_INITIAL_P) for n, g in job.context["last_grads"].items()}
            flips.append(flipped(self.masks, new))
            self.global_state = {k: v.cpu().clone() for k, v in job.trained.items() if k in self.global_state}
            self.masks = new
            self.initial_rounds += bench.cfg.train.epochs
            self.initial_densities.append(density(self.masks))
            if len(flips) >= REFERENCE_PATIENCE and all(f < REFERENCE_FLIP_TOLERANCE for f in flips[-REFERENCE_PATIENCE:]):
                break
        self.mask_version += 1
        log.info("prunefl (reference) initial phase on client %d: %d iterations, density %.4f", client,
                 len(flips), density(self.masks))

    def configure(self, rnd, clients):
        p = self.params
        if not self.initial_done:  # here rather than in setup: restoring a checkpoint calls setup first
            self._initial_phase_reference() if self.reference else self._initial_pruning()
            self.initial_done = True
        if self.reference:
            instructions = [{"mask_changed": self.seen_version.get(s.client_id) != self.mask_version} for s in clients]
            for s in clients:
                self.seen_version[s.client_id] = self.mask_version
            return {"state": self.global_state, "masks": self.masks}, instructions
        if rnd > 0 and rnd % self.interval == 0 and rnd > self.last_reconfiguration and self.accumulated:
            d = drop_fraction(rnd, p.drop_fraction, self.half_life)
            self.masks = reconfigure(self.global_state, self.masks, self.importance, self.time_per_weight,
                                     d, self.c0, self.dense_importance)
            self._reset_importance()
            self.last_reconfiguration = rnd
            self.reconfigurations += 1
        return {"state": self.global_state, "masks": self.masks}, [None] * len(clients)

    def aggregate(self, rnd, kept, dropped):
        """Dropped clients' updates, importance and gradients are ignored (their work did not reach
        the server)."""
        if self.reference:
            return self._aggregate_reference(rnd, kept)
        contributions = [Contribution(r.payload["state"], weight=r.num_samples, coordinate_weights=self.masks)
                         for r in kept]
        self.global_state = aggregate(self.global_state, self.bench.layout, contributions)
        for r in kept:
            self._accumulate(r.payload["importance"], r.payload["dense_importance"])
        return {"density": density(self.masks)}

    def _aggregate_reference(self, rnd, kept):
        """Reference variant: the plain mean of the clients' models; in rounds 1, 6, 11, ... the mask
        rebuilt from their mean last-minibatch gradients (the round's density is the mask it trained)."""
        trained_density = density(self.masks)
        self.global_state = aggregate(self.global_state, self.bench.layout,
                                      [Contribution(r.payload["state"]) for r in kept])
        if kept and rnd >= 1 and (rnd - 1) % self.interval == 0:
            p = drop_fraction(rnd, self.params.drop_fraction, self.half_life)
            mean_grad = {n: sum(r.payload["last_grads"][n] for r in kept) / len(kept) for n in self.prunable}
            self.masks = {n: percentile_mask(mean_grad[n], p) for n in self.prunable}
            self.mask_version += 1
            self.reconfigurations += 1
            self.last_reconfiguration = rnd
        return {"density": trained_density}

    def masked_state(self) -> dict[str, torch.Tensor]:
        return {k: v * self.masks[k] if k in self.masks else v for k, v in self.global_state.items()}

    def evaluate(self, rnd):
        return self.bench.evaluate_global(self.global_state if self.reference else self.masked_state())

    def state_dict(self):
        return {"global_state": _clone(self.global_state), "masks": _clone(self.masks),
                "importance": _clone(self.importance), "dense_importance": self.dense_importance,
                "accumulated": self.accumulated, "last_reconfiguration": self.last_reconfiguration,
                "reconfigurations": self.reconfigurations, "initial_densities": list(self.initial_densities),
                "initial_rounds": self.initial_rounds, "initial_done": self.initial_done,
                "mask_version": self.mask_version, "seen_version": dict(self.seen_version)}

    def load_state_dict(self, state):
        self.global_state = _clone(state["global_state"])
        self.masks = _clone(state["masks"])
        self.importance = _clone(state["importance"])
        self.dense_importance = float(state["dense_importance"])
        self.accumulated = int(state["accumulated"])
        self.last_reconfiguration = int(state["last_reconfiguration"])
        self.reconfigurations = int(state["reconfigurations"])
        self.initial_densities = list(state["initial_densities"])
        self.initial_rounds = int(state["initial_rounds"])
        self.initial_done = bool(state["initial_done"])
        self.mask_version = int(state["mask_version"])
        self.seen_version = {int(c): int(v) for c, v in state["seen_version"].items()}
