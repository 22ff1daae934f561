"""The stacked tensors of a group of clients and the batched step: the rule of harness/training.py
wrapped for K clients at once."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.batched.norm import functional_template
from harness.batched.schedule import Schedule
from harness.training import LocalJob, TrainStats, clip_coefficient, sgd_directions


def _per_client(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) -> (K, 1, ...), broadcastable against `like`."""
    return t.view(len(t), *([1] * (like.dim() - 1)))


class StackedClients:
    """What one batched program reads and updates in place: per client k, its parameters, buffers,
    momentum buffers, masks, lr and accumulators at index k; the current step's minibatch in
    (index, weight, active); `step()` trains every active client one step."""

    def __init__(self, jobs: list[LocalJob], model: nn.Module, fresh_buffers: dict[str, torch.Tensor], capacity: int):
        first = jobs[0]
        device, dtype = first.x.device, first.x.dtype
        self.K = K = len(jobs)
        train = first.train
        self.bs, self.weight_decay, self.momentum = train.batch_size, train.weight_decay, train.momentum
        self.clip = first.clip_grad_norm
        self.fresh_buffers = fresh_buffers
        self.ctx = SimpleNamespace(sample_weight=None, new_buffers={})
        self.template = functional_template(model, self.ctx)
        named = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        self.names = list(named)
        stacked = lambda t: torch.empty((K, *t.shape), dtype=t.dtype, device=device)  # noqa: E731
        self.params = {n: stacked(p) for n, p in named.items()}
        self.consts = {n: stacked(b) for n, b in buffers.items()}
        self.buffers = [torch.zeros_like(p) for p in self.params.values()] if self.momentum else None
        self.update_masks = {n: torch.ones_like(self.params[n]) for n in (first.update_masks or {})}
        self.weight_masks = {n: torch.ones_like(self.params[n]) for n in (first.weight_masks or {})}
        self.importance = first.importance
        self.grad_importance = {n: torch.zeros_like(self.params[n]) for n in self.weight_masks}
        self.dense_importance = torch.zeros(K, dtype=torch.float64, device=device)
        self.unit_masks = {g: stacked(m) for g, m in (first.unit_masks or {}).items()}
        self.class_mask = stacked(first.class_mask.bool()) if first.class_mask is not None else None
        self.lr = torch.empty(K, dtype=dtype, device=device)
        self.capacity = capacity
        self.x = torch.zeros((capacity, *first.x.shape[1:]), dtype=dtype, device=device)
        self.y = torch.zeros(capacity, dtype=first.y.dtype, device=device)
        self.loss_sum = torch.zeros(K, dtype=torch.float64, device=device)
        self.correct = torch.zeros(K, dtype=torch.float64, device=device)
        # the current step's inputs (static tensors, for CUDA graphs)
        self.index = torch.zeros((K, self.bs), dtype=torch.int64, device=device)
        self.weight = torch.ones((K, self.bs), dtype=dtype, device=device)
        self.active = torch.zeros(K, dtype=torch.bool, device=device)
        self.graph = None

        def client_loss(params, consts, xb, yb, w, class_mask, unit_masks):
            self.ctx.sample_weight = w
            self.ctx.new_buffers = {}
            self.template.unit_masks = unit_masks
            logits = torch.func.functional_call(self.template, (params, consts), (xb,))
            if class_mask is not None:
                logits = torch.where(class_mask, logits, 0.0)
            loss = (F.cross_entropy(logits, yb, reduction="none") * w).sum() / w.sum()
            correct = ((logits.argmax(1) == yb).to(w.dtype) * w).sum()
            return loss, (loss.detach(), correct.detach(), dict(self.ctx.new_buffers))

        in_dims = (0, 0, 0, 0, 0, 0 if self.class_mask is not None else None, 0 if self.unit_masks else None)
        self.grad_fn = torch.func.vmap(torch.func.grad(client_loss, has_aux=True), in_dims=in_dims)

    @torch.no_grad()
    def load(self, jobs: list[LocalJob]) -> None:
        """The jobs' starting tensors, masks and data into the stacked tensors; accumulators to zero."""
        for k, job in enumerate(jobs):
            for n, t in self.params.items():
                t[k].copy_(job.start[n])
            for n, t in self.consts.items():
                t[k].copy_(job.start[n] if n in job.start else self.fresh_buffers[n])
            for n, t in self.update_masks.items():
                t[k].copy_(job.update_masks[n])
            for n, t in self.weight_masks.items():
                t[k].copy_(job.weight_masks[n])
            for g, t in self.unit_masks.items():
                t[k].copy_(job.unit_masks[g])
            if self.class_mask is not None:
                self.class_mask[k].copy_(job.class_mask)
            self.lr[k] = job.lr
        for t in [*(self.buffers or []), *self.grad_importance.values(), self.dense_importance, self.loss_sum,
                  self.correct]:
            t.zero_()
        rows = sum(len(j.y) for j in jobs)
        torch.cat([j.x for j in jobs], out=self.x[:rows])
        torch.cat([j.y for j in jobs], out=self.y[:rows])

    def step(self) -> None:
        """One local step of every active client on its minibatch in (index, weight). Device work
        only: no synchronisation with the CPU."""
        act = self.active
        for n, m in self.weight_masks.items():
            self.params[n].mul_(m)
        xb, yb, w = self.x[self.index], self.y[self.index], self.weight
        grads, (loss, correct, new_buffers) = self.grad_fn(self.params, self.consts, xb, yb, w,
                                                           self.class_mask, self.unit_masks)
        count = w.sum(1)
        if self.importance:
            for n, g in grads.items():
                sq = g.square() * _per_client(count.to(g.dtype), g)
                if n in self.grad_importance:
                    self.grad_importance[n].add_(torch.where(_per_client(act, sq), sq, 0.0))
                else:
                    self.dense_importance.add_(torch.where(act, sq.flatten(1).sum(1).double(), 0.0))
        grads = [grads[n] for n in self.names]
        if self.clip is not None:
            coef = clip_coefficient(torch.stack([g.flatten(1).norm(dim=1) for g in grads]), self.clip)
            grads = [g * _per_client(coef, g) for g in grads]
        params = [self.params[n] for n in self.names]
        masks = [self.update_masks.get(n) for n in self.names] if self.update_masks else None
        directions = sgd_directions(params, grads, weight_decay=self.weight_decay, momentum=self.momentum,
                                    buffers=self.buffers, masks=masks)
        for p, d in zip(params, directions):
            p.copy_(torch.where(_per_client(act, p), p - _per_client(self.lr, p) * d, p))
        for n, b in new_buffers.items():
            t = self.consts[n]
            t.copy_(torch.where(_per_client(act, t), b.to(t.dtype), t))
        self.loss_sum.add_(torch.where(act, loss.double() * count.double(), 0.0))
        self.correct.add_(torch.where(act, correct.double(), 0.0))

    @torch.no_grad()
    def store(self, jobs: list[LocalJob], plan: Schedule) -> None:
        """The trained tensors and stats into the jobs. The one read of the sums comes first: a device
        error surfaces before any job is touched."""
        for n, m in self.weight_masks.items():
            self.params[n].mul_(m)
        sums = torch.stack([self.loss_sum, self.correct, self.dense_importance]).cpu()
        for k, job in enumerate(jobs):
            job.trained = {n: t[k].clone() for n, t in (self.params | self.consts).items()}
            samples = plan.samples[k]
            job.stats = TrainStats(float(sums[0, k]) / max(samples, 1), float(sums[1, k]) / max(samples, 1),
                                   samples, plan.steps[k])
            if self.importance:
                job.grad_importance = {n: g[k].clone() for n, g in self.grad_importance.items()}
                job.dense_importance = float(sums[2, k])


def run(program: StackedClients, jobs: list[LocalJob], plan: Schedule, graphed: bool = False) -> None:
    """Train the jobs with `program` step by step (replaying its captured graph when `graphed`)."""
    program.load(jobs)
    device = program.x.device
    index, weight, active = (t.to(device) for t in (plan.index, plan.weight, plan.active))
    for s in range(index.shape[0]):
        program.index.copy_(index[s])
        program.weight.copy_(weight[s])
        program.active.copy_(active[s])
        if graphed:
            program.graph.replay()
        else:
            program.step()
    program.store(jobs, plan)
