"""Batched client execution: the clients of a round that share one model shape train as one program.

A method that opts in describes each client's local training as data, a `LocalJob`: the client's
starting model, its data, its random generator and the options of its `local_sgd` call. A job then
runs either alone (`LocalJob.run`, which is exactly the `local_sgd` call the method made before) or
together with the other jobs of its group (`train_group`): the clients' parameters are stacked along
a new leading dimension and one step of `torch.func.vmap(torch.func.grad(...))` over
`torch.func.functional_call` trains all of them. `train_group` reproduces `local_sgd` per client:

- data order: each client draws `torch.randperm(n, generator=its generator)` once per epoch, the
  same draws in the same order as `local_sgd`, so it sees the same minibatches;
- number of steps: epochs x ceil(n / batch size) per client; a client with fewer steps stops
  updating (its parameters, momentum buffers, statistics and accumulators are frozen by an
  `active` flag) while the others go on;
- partial last batches: every minibatch is padded to the batch size and carries per-sample weights
  (1 real, 0 padding); the loss is the weighted mean over the real samples, and batch normalisation
  computes its statistics over the real samples only (`_SampleWeightedBatchNorm`), so a padded
  batch gives the same loss, gradients and statistics as the short one;
- the update: gradient (clipped per client to `clip_grad_norm`, as `clip_grad_norm_` does), plus
  weight decay, through the momentum buffer, times the client's update masks, times its lr;
- per client: class masks (HeteroFL's masked cross-entropy: other logits set to 0), update masks
  (coordinates that keep their values), weight masks applied before every step and after training
  with squared-gradient importance (PruneFL), unit masks (`model.unit_masks`, FedLPS's fixed masks),
  the model's scaler (`rate`) and norm kind ('bn' running statistics included, updated per client
  over its real samples with PyTorch's rule; 'sbn'/'batch' keep none);
- loss and accuracy are summed on the device and read once per group at the end.

Results equal the unbatched path's within float rounding (the sums run in another order; in float64
the two agree to ~1e-13, tests/test_batched.py). One difference by design: `local_sgd` skips a
parameter that got no gradient, while here every trainable parameter gets its (zero) gradient plus
weight decay; every parameter of the models in harness/models.py takes part in the loss.

Groups (`group_key`): equal model structure and shapes, scaler and norm kind, the same unit-masked
groups and training options. So HeteroFL/FedRolex clients group by submodel width, FedAvg's and
PruneFL's form one group, and FedLPS's fixed-mask clients (full-width models whose masks are data)
form one group whatever their keep ratios.

What is not batched, and runs alone through `local_sgd` instead (automatically, per job):
- jobs with opaque hooks (`hooks`: before_batch, regularizer, after_backward, extra parameters) or
  a callable `update_masks`: FedLPS's learnable masks, whose scores change the mask and the model
  before every minibatch;
- jobs whose `train_fn` is not `local_sgd` (a method's own trainer, or a wrapped one in tests);
- clients without training data (no steps), and groups of one client on CPU;
- a group whose batched program raises: its clients then run alone, one by one, so that only a
  faulty client fails.

CUDA graphs (`engine.cuda_graphs`, only with a CUDA device): one batched step (gather of the
minibatch, forward, backward, update, accumulators) is captured once per group shape and replayed
for every step; the per-step inputs are copied into static tensors on the device, nothing syncs
with the CPU until the group's results are read. Captured programs are cached per shape across
rounds. If capturing fails the group runs eagerly and graphs stay off in this process. This path
was written on a machine without a GPU: tests/test_batched.py checks it against the CPU where CUDA
exists, and skips otherwise.
"""
from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.config import TrainConfig
from harness.training import TrainStats, local_sgd

if TYPE_CHECKING:
    from harness.strategy import ClientResult, ClientTask

log = logging.getLogger(__name__)


# -- one client's local training, as data -----------------------------------------------------------
class MaskedTraining:
    """local_sgd hooks for weight masks: zero the masked weights before every step (gradients stay
    dense) and accumulate importance grad^2 x batch size, per coordinate for the masked tensors and
    as one float64 total for every other parameter (PruneFL's training)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        self.masked = [(params[n], m.to(params[n].device)) for n, m in masks.items()]
        self.params = [(n, p) for n, p in params.items() if p.requires_grad]
        self.importance = {n: torch.zeros_like(params[n]) for n in masks}
        self._dense = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)

    @torch.no_grad()
    def apply_masks(self) -> None:
        for p, m in self.masked:
            p.mul_(m)

    @torch.no_grad()
    def accumulate(self, batch_size: int) -> None:
        for name, p in self.params:
            if p.grad is None:
                continue
            sq = p.grad.pow(2).mul_(batch_size)
            if name in self.importance:
                self.importance[name] += sq
            else:
                self._dense += sq.sum()

    @property
    def dense_importance(self) -> float:
        return float(self._dense)


@dataclass(eq=False)
class LocalJob:
    """One client's local training: the arguments of one `local_sgd` call, plus what it produced.

    model, x, y, train, lr, generator, clip_grad_norm, class_mask: as in `local_sgd`.
    update_masks: fixed per-parameter 0/1 tensors multiplied onto the update (a callable, as
      `local_sgd` accepts, makes the job run alone).
    weight_masks: per-parameter 0/1 (or bool) tensors multiplied onto the weights before every step
      and once after training, the gradients staying dense (`MaskedTraining`).
    importance: accumulate sum over steps of grad^2 x batch size, before clipping, into
      `grad_importance` (per coordinate, for the weight-masked tensors) and `dense_importance`
      (a total over the other parameters).
    hooks: further `local_sgd` keywords (before_batch, regularizer, after_backward, extra_params,
      extra_lr); any of them makes the job run alone.
    train_fn: the unbatched trainer, `local_sgd` or a function with its signature; anything but
      `local_sgd` itself makes the job run alone.
    context: the method's own data, for building its result afterwards.

    After training: `stats`, and `model` holds the trained weights (and statistics)."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    train: TrainConfig
    lr: float
    generator: torch.Generator
    clip_grad_norm: float | None = None
    class_mask: torch.Tensor | None = None
    update_masks: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]] | None = None
    weight_masks: dict[str, torch.Tensor] | None = None
    importance: bool = False
    hooks: dict[str, Any] = field(default_factory=dict)
    train_fn: Callable[..., TrainStats] = local_sgd
    context: Any = None
    stats: TrainStats | None = None
    grad_importance: dict[str, torch.Tensor] | None = None
    dense_importance: float = 0.0

    @property
    def batchable(self) -> bool:
        return (not self.hooks and not callable(self.update_masks) and self.train_fn is local_sgd
                and len(self.y) > 0)

    def run(self) -> TrainStats:
        """Train alone: exactly one `local_sgd` call (with `MaskedTraining` hooks for weight masks)."""
        hooks = dict(self.hooks)
        masked = None
        if self.weight_masks is not None or self.importance:
            masked = MaskedTraining(self.model, self.weight_masks or {})
            hooks["before_batch"] = masked.apply_masks
            if self.importance:
                hooks["after_backward"] = masked.accumulate
        self.stats = self.train_fn(self.model, self.x, self.y, self.train, self.lr, self.generator,
                                   clip_grad_norm=self.clip_grad_norm, class_mask=self.class_mask,
                                   update_masks=self.update_masks, **hooks)
        if masked is not None:
            masked.apply_masks()
            if self.importance:
                self.grad_importance = masked.importance
                self.dense_importance = masked.dense_importance
        return self.stats


def group_key(job: LocalJob) -> tuple:
    """Jobs with equal keys can be trained as one program: same model structure and shapes, same
    forward options (norm kind, scaler, unit-masked groups), same training settings and options."""
    m = job.model
    t = job.train
    masks = job.update_masks if isinstance(job.update_masks, dict) else {}
    return (type(m), getattr(m, "norm_kind", None), getattr(m, "rate", 1.0),
            tuple(sorted(getattr(m, "unit_masks", {}) or {})),
            tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in m.named_buffers()),
            str(job.x.device), tuple(job.x.shape[1:]), job.x.dtype,
            t.epochs, t.batch_size, t.weight_decay, t.momentum, job.clip_grad_norm,
            job.class_mask is not None, tuple(sorted(masks)), tuple(sorted(job.weight_masks or {})),
            job.importance)


# -- running many jobs ------------------------------------------------------------------------------
def train_jobs(jobs: list[LocalJob], cuda_graphs: bool = False) -> list[BaseException | None]:
    """Train every job, batched by group where possible; per job, the exception that stopped it
    (None: trained, `job.stats` set). A group whose batched program raises runs job by job."""
    errors: list[BaseException | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    alone: list[int] = []
    for i, job in enumerate(jobs):
        if job.batchable:
            groups.setdefault(group_key(job), []).append(i)
        else:
            alone.append(i)
    for members in groups.values():
        use_graphs = cuda_graphs and jobs[members[0]].x.device.type == "cuda"
        if len(members) == 1 and not use_graphs:
            alone.extend(members)
            continue
        # The batched program draws the clients' data orders from their generators; run alone
        # after a failure, a client must draw them again from the same state.
        rng_states = [jobs[i].generator.get_state() for i in members]
        try:
            train_group([jobs[i] for i in members], cuda_graphs=use_graphs)
        except Exception as e:  # noqa: BLE001 - retried client by client below
            log.warning("batched training of %d clients failed (%s: %s); running them one by one",
                        len(members), type(e).__name__, e)
            for i, state in zip(members, rng_states):
                jobs[i].generator.set_state(state)
            alone.extend(members)
    for i in sorted(alone):
        try:
            jobs[i].run()
        except Exception as e:  # noqa: BLE001 - a client's failure is data
            errors[i] = e
    return errors


class BatchedLocalSGD:
    """Strategy mixin for methods whose local update is: build a `LocalJob` (`local_job`), train it,
    build the result from the trained job (`local_result`). It provides `local_update` (the job
    alone) and `local_update_batch` (all tasks' jobs through `train_jobs`); both give the same
    results. Put it before Strategy: `class FedAvg(BatchedLocalSGD, Strategy)`.

    A subclass that overrides `local_update` without overriding `local_update_batch` is run through
    its own `local_update`, one task at a time (so its override is never bypassed)."""

    def local_job(self, broadcast, task: ClientTask) -> LocalJob:
        raise NotImplementedError

    def local_result(self, broadcast, task: ClientTask, job: LocalJob) -> ClientResult:
        raise NotImplementedError

    def local_update(self, broadcast, task: ClientTask) -> ClientResult:
        job = self.local_job(broadcast, task)
        job.run()
        return self.local_result(broadcast, task, job)

    def local_update_batch(self, broadcast, tasks: list[ClientTask]) -> list[ClientResult]:
        if type(self).local_update is not BatchedLocalSGD.local_update:
            return super().local_update_batch(broadcast, tasks)  # type: ignore[misc]
        from harness.engine import failed_result

        bench = self.bench  # type: ignore[attr-defined]
        results: list[ClientResult | None] = [None] * len(tasks)
        pending: list[tuple[int, LocalJob]] = []
        for i, task in enumerate(tasks):
            try:
                job = self.local_job(broadcast, task)
                if not job.batchable:  # trained now: its model need not wait for the others
                    job.run()
                    results[i] = self.local_result(broadcast, task, job)
                    continue
            except Exception as e:  # noqa: BLE001
                results[i] = failed_result(task, e)
                continue
            pending.append((i, job))
        graphs = cuda_graphs_enabled(bench.cfg.engine, bench.device)
        errors = train_jobs([job for _, job in pending], cuda_graphs=graphs)
        for (i, job), error in zip(pending, errors):
            if error is not None:
                results[i] = failed_result(tasks[i], error)
                continue
            try:
                results[i] = self.local_result(broadcast, tasks[i], job)
            except Exception as e:  # noqa: BLE001
                results[i] = failed_result(tasks[i], e)
        return results  # type: ignore[return-value]


def cuda_graphs_enabled(engine_cfg, device) -> bool:
    """engine.cuda_graphs: 'auto' and True mean on where the device is CUDA; never on a CPU."""
    setting = getattr(engine_cfg, "cuda_graphs", "auto")
    return (setting is True or setting == "auto") and torch.device(device).type == "cuda" \
        and torch.cuda.is_available() and not _graphs_broken


# -- the batched program ----------------------------------------------------------------------------
class _SampleWeightedBatchNorm(nn.Module):
    """BatchNorm in training mode whose statistics are taken over the samples of weight 1 only (the
    padding of a short minibatch has weight 0). Same parameters and buffers as the module it
    replaces; the sample weights come from `ctx.sample_weight`, and updated running statistics go to
    `ctx.new_buffers` (PyTorch's rule: unbiased variance, momentum or cumulative average)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, prefix: str, ctx: SimpleNamespace):
        super().__init__()
        self.eps, self.momentum, self.track = bn.eps, bn.momentum, bn.track_running_stats
        self.weight, self.bias = bn.weight, bn.bias
        if self.track:
            self.register_buffer("running_mean", bn.running_mean)
            self.register_buffer("running_var", bn.running_var)
            self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.prefix, self.ctx = prefix, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.ctx.sample_weight.view(-1, *([1] * (x.dim() - 1)))
        dims = [0, *range(2, x.dim())]
        channel = (1, -1, *([1] * (x.dim() - 2)))
        n = self.ctx.sample_weight.sum() * math.prod(x.shape[2:])
        mean = (x * w).sum(dims) / n
        centered = x - mean.view(channel)
        var = (centered.square() * w).sum(dims) / n
        out = centered * torch.rsqrt(var + self.eps).view(channel)
        if self.weight is not None:
            out = out * self.weight.view(channel) + self.bias.view(channel)
        if self.track:
            count = self.num_batches_tracked + 1
            factor = self.momentum if self.momentum is not None else 1.0 / count
            mean, var = mean.detach(), var.detach()
            self.ctx.new_buffers[self.prefix + "running_mean"] = (1 - factor) * self.running_mean + factor * mean
            self.ctx.new_buffers[self.prefix + "running_var"] = (
                (1 - factor) * self.running_var + factor * var * n.detach() / (n.detach() - 1))
            self.ctx.new_buffers[self.prefix + "num_batches_tracked"] = count
        return out


def _template(model: nn.Module, ctx: SimpleNamespace) -> nn.Module:
    """A structure-only (meta) copy of `model` for functional_call, its norms sample-weighted."""
    template = copy.deepcopy(model).to("meta")
    for name, module in list(template.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                full = f"{name}.{child_name}." if name else f"{child_name}."
                setattr(module, child_name, _SampleWeightedBatchNorm(child, full, ctx))
    return template.train()  # local_sgd trains in training mode whatever the model's mode was


@dataclass
class _Schedule:
    """Per step s and client k: the sample indices (into the group's concatenated data), the sample
    weights (1 real, 0 padding) and whether the client is still training."""

    index: torch.Tensor  # (S, K, B) int64
    weight: torch.Tensor  # (S, K, B)
    active: torch.Tensor  # (S, K) bool
    samples: list[int]
    steps: list[int]


def _schedule(jobs: list[LocalJob], dtype: torch.dtype) -> _Schedule:
    """The minibatches of every client, from the same randperm draws `local_sgd` makes."""
    train = jobs[0].train
    bs, epochs = train.batch_size, train.epochs
    sizes = [len(j.y) for j in jobs]
    steps = [epochs * math.ceil(n / bs) for n in sizes]
    total = max(steps)
    index = torch.zeros(total, len(jobs), bs, dtype=torch.int64)
    weight = torch.zeros(total, len(jobs), bs, dtype=dtype)
    active = torch.zeros(total, len(jobs), dtype=torch.bool)
    offset = 0
    for k, (job, n) in enumerate(zip(jobs, sizes)):
        s = 0
        for _ in range(epochs):
            order = torch.randperm(n, generator=job.generator)
            for start in range(0, n, bs):
                batch = order[start:start + bs]
                index[s, k, :len(batch)] = batch + offset
                index[s, k, len(batch):] = batch[0] + offset  # padding: any real sample, weight 0
                weight[s, k, :len(batch)] = 1
                active[s, k] = True
                s += 1
        # After its last step a client computes on real samples of its own (so that nothing in the
        # discarded computation is degenerate), and the `active` flag drops the result.
        filler = torch.arange(bs) % n + offset
        index[s:, k] = filler
        weight[s:, k] = 1
        offset += n
    samples = [epochs * n for n in sizes]
    return _Schedule(index, weight, active, samples, steps)


class _GroupState:
    """The stacked tensors one batched program reads and updates in place, and its step function."""

    def __init__(self, jobs: list[LocalJob], capacity: int):
        first = jobs[0]
        model = first.model
        device, dtype = first.x.device, first.x.dtype
        self.K = K = len(jobs)
        train = first.train
        self.bs = train.batch_size
        self.weight_decay, self.momentum = train.weight_decay, train.momentum
        self.clip = first.clip_grad_norm
        self.ctx = SimpleNamespace(sample_weight=None, new_buffers={})
        self.template = _template(model, self.ctx)
        named = list(model.named_parameters())
        self.trainable = [n for n, p in named if p.requires_grad]
        self.constants = [n for n, p in named if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        tensors = dict(named) | dict(model.named_buffers())
        self.params = {n: torch.empty((K, *tensors[n].shape), dtype=tensors[n].dtype, device=device)
                       for n in self.trainable}
        self.consts = {n: torch.empty((K, *tensors[n].shape), dtype=tensors[n].dtype, device=device)
                       for n in self.constants}
        self.velocity = {n: torch.zeros_like(p) for n, p in self.params.items()} if self.momentum else {}
        self.update_masks = {n: torch.ones_like(self.params[n]) for n in (first.update_masks or {})}
        self.weight_masks = {n: torch.ones_like(self.params[n]) for n in (first.weight_masks or {})}
        self.importance = first.importance
        self.grad_importance = {n: torch.zeros_like(self.params[n]) for n in self.weight_masks}
        self.dense_importance = torch.zeros(K, dtype=torch.float64, device=device)
        unit = getattr(model, "unit_masks", {}) or {}
        self.unit_masks = {g: torch.empty((K, *m.shape), dtype=m.dtype, device=device) for g, m in unit.items()}
        self.class_mask = (torch.empty((K, *first.class_mask.shape), dtype=torch.bool, device=device)
                           if first.class_mask is not None else None)
        self.lr = torch.empty(K, dtype=dtype, device=device)
        self.capacity = capacity
        self.x = torch.zeros((capacity, *first.x.shape[1:]), dtype=dtype, device=device)
        self.y = torch.zeros(capacity, dtype=first.y.dtype, device=device)
        self.loss_sum = torch.zeros(K, dtype=torch.float64, device=device)
        self.correct = torch.zeros(K, dtype=torch.float64, device=device)
        # the current step's inputs (static for CUDA graphs)
        self.index = torch.zeros((K, self.bs), dtype=torch.int64, device=device)
        self.weight = torch.ones((K, self.bs), dtype=dtype, device=device)
        self.active = torch.zeros(K, dtype=torch.bool, device=device)
        self.graph = None

        def client_loss(params, consts, xb, yb, w, class_mask, unit_masks):
            self.ctx.sample_weight = w
            self.ctx.new_buffers = {}
            if hasattr(self.template, "unit_masks"):
                self.template.unit_masks = unit_masks
            logits = torch.func.functional_call(self.template, (params, consts), (xb,))
            if class_mask is not None:
                logits = torch.where(class_mask, logits, 0.0)
            count = w.sum()
            loss = (F.cross_entropy(logits, yb, reduction="none") * w).sum() / count
            correct = ((logits.argmax(1) == yb).to(w.dtype) * w).sum()
            return loss, (loss.detach(), correct.detach(), dict(self.ctx.new_buffers))

        in_dims = (0, 0, 0, 0, 0, 0 if self.class_mask is not None else None, 0 if self.unit_masks else None)
        self.grad_fn = torch.func.vmap(torch.func.grad(client_loss, has_aux=True), in_dims=in_dims)

    @torch.no_grad()
    def load(self, jobs: list[LocalJob]) -> int:
        """Copy the jobs' starting state into the stacked tensors and reset the accumulators;
        returns the number of data rows used."""
        for k, job in enumerate(jobs):
            tensors = dict(job.model.named_parameters()) | dict(job.model.named_buffers())
            for n, t in (self.params | self.consts).items():
                t[k].copy_(tensors[n])
            for n, t in self.update_masks.items():
                t[k].copy_(job.update_masks[n])
            for n, t in self.weight_masks.items():
                t[k].copy_(job.weight_masks[n])
            for g, t in self.unit_masks.items():
                t[k].copy_(job.model.unit_masks[g])
            if self.class_mask is not None:
                self.class_mask[k].copy_(job.class_mask)
            self.lr[k] = job.lr
        for t in [*self.velocity.values(), *self.grad_importance.values(), self.dense_importance,
                  self.loss_sum, self.correct]:
            t.zero_()
        rows = sum(len(j.y) for j in jobs)
        torch.cat([j.x for j in jobs], out=self.x[:rows])
        torch.cat([j.y for j in jobs], out=self.y[:rows])
        return rows

    def step(self) -> None:
        """One local step of every client on the minibatch in (index, weight), updating in place
        the clients flagged active. Device work only: no synchronisation with the CPU."""
        K, act = self.K, self.active
        for n, m in self.weight_masks.items():
            self.params[n].mul_(m)
        xb, yb, w = self.x[self.index], self.y[self.index], self.weight
        grads, (loss, correct, new_buffers) = self.grad_fn(self.params, self.consts, xb, yb, w,
                                                           self.class_mask, self.unit_masks)

        def per_client(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            """(K,) -> (K, 1, ...), broadcastable against `like`."""
            return t.view(K, *([1] * (like.dim() - 1)))

        count = w.sum(1)
        if self.importance:
            for n, g in grads.items():
                sq = g.square() * per_client(count.to(g.dtype), g)
                if n in self.grad_importance:
                    self.grad_importance[n].add_(torch.where(per_client(act, sq), sq, 0.0))
                else:
                    self.dense_importance.add_(torch.where(act, sq.flatten(1).sum(1).double(), 0.0))
        if self.clip is not None:
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()])
            coef = (self.clip / (norms.norm(dim=0) + 1e-6)).clamp(max=1.0)
            grads = {n: g * per_client(coef, g) for n, g in grads.items()}
        for n, p in self.params.items():
            on = per_client(act, p)
            d = grads[n].add(p, alpha=self.weight_decay) if self.weight_decay else grads[n]
            if self.momentum:
                v = self.velocity[n]
                v.copy_(torch.where(on, v * self.momentum + d, v))
                d = v
            if n in self.update_masks:
                d = d * self.update_masks[n]
            p.copy_(torch.where(on, p - per_client(self.lr, p) * d, p))
        for n, b in new_buffers.items():
            t = self.consts[n]
            t.copy_(torch.where(per_client(act, t), b.to(t.dtype), t))
        self.loss_sum.add_(torch.where(act, loss.double() * count.double(), 0.0))
        self.correct.add_(torch.where(act, correct.double(), 0.0))

    @torch.no_grad()
    def store(self, jobs: list[LocalJob], schedule: _Schedule) -> None:
        """Write the trained tensors back into the jobs' models and their stats. The one read of the
        sums comes first: a device error surfaces before any job's model is touched."""
        for n, m in self.weight_masks.items():
            self.params[n].mul_(m)
        sums = torch.stack([self.loss_sum, self.correct, self.dense_importance]).cpu()
        for k, job in enumerate(jobs):
            tensors = dict(job.model.named_parameters()) | dict(job.model.named_buffers())
            for n, t in (self.params | self.consts).items():
                tensors[n].copy_(t[k])
            samples = schedule.samples[k]
            job.stats = TrainStats(float(sums[0, k]) / max(samples, 1), float(sums[1, k]) / max(samples, 1),
                                   samples, schedule.steps[k])
            if self.importance:
                job.grad_importance = {n: g[k].clone() for n, g in self.grad_importance.items()}
                job.dense_importance = float(sums[2, k])


def train_group(jobs: list[LocalJob], cuda_graphs: bool = False) -> None:
    """Train jobs of one group (equal `group_key`) as one batched program; see the module doc."""
    keys = {group_key(j) for j in jobs}
    if len(keys) != 1:
        raise ValueError("train_group needs jobs of one group (equal group_key)")
    schedule = _schedule(jobs, jobs[0].x.dtype)
    rows = sum(len(j.y) for j in jobs)
    device = jobs[0].x.device
    if cuda_graphs:
        state = _graphed_state(jobs, rows)
        if state is not None:
            _run(state, jobs, schedule, device, graphed=True)
            return
    _run(_GroupState(jobs, rows), jobs, schedule, device, graphed=False)


def _run(state: _GroupState, jobs: list[LocalJob], schedule: _Schedule, device, graphed: bool) -> None:
    state.load(jobs)
    index, weight, active = (t.to(device) for t in (schedule.index, schedule.weight, schedule.active))
    for s in range(index.shape[0]):
        state.index.copy_(index[s])
        state.weight.copy_(weight[s])
        state.active.copy_(active[s])
        if graphed:
            state.graph.replay()
        else:
            state.step()
    state.store(jobs, schedule)


# -- CUDA graphs ------------------------------------------------------------------------------------
_GRAPH_CACHE: OrderedDict[tuple, _GroupState] = OrderedDict()
_GRAPH_CACHE_SIZE = 16  # captured programs kept per process (each holds its own memory pool)
_graphs_broken = False


def _graphed_state(jobs: list[LocalJob], rows: int) -> _GroupState | None:
    """A captured program for this group's shape (from the cache, or captured now), or None when
    capturing fails (graphs are then turned off for this process)."""
    global _graphs_broken
    if _graphs_broken or not torch.cuda.is_available():
        return None
    key = (group_key(jobs[0]), len(jobs))
    state = _GRAPH_CACHE.get(key)
    if state is not None and state.capacity >= rows:
        _GRAPH_CACHE.move_to_end(key)
        return state
    _GRAPH_CACHE.pop(key, None)
    try:
        # room for larger rounds of the same shape without capturing again
        state = _GroupState(jobs, capacity=max(rows, int(rows * 1.5)))
        state.load(jobs)
        state.active.zero_()  # warm-up and capture steps change nothing: every client is inactive
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                state.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            state.step()
        state.graph = graph
    except Exception as e:  # noqa: BLE001 - eager execution gives the same results
        _graphs_broken = True
        log.warning("CUDA graph capture failed (%s: %s); batched training runs eagerly", type(e).__name__, e)
        return None
    _GRAPH_CACHE[key] = state
    while len(_GRAPH_CACHE) > _GRAPH_CACHE_SIZE:
        _GRAPH_CACHE.popitem(last=False)
    return state
