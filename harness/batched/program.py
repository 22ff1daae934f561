"""The stacked tensors of a group of clients and the batched step: the jobs' LocalRule run for K
clients at once (`StackedOps`: its gradients vmapped over the clients; for one client on the CPU,
plain autograd)."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.batched.norm import functional_template
from harness.batched.schedule import Schedule
from harness.training import LocalJob, LocalRule, TrainStats, clip_coefficient, sgd_directions


def _per_client(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) -> (K, 1, ...), broadcastable against `like`."""
    return t.view(len(t), *([1] * (like.dim() - 1)))


def _first(tree):
    """Client 0's slice of a stacked tensor, or of each tensor of a dict (None stays None)."""
    if isinstance(tree, dict):
        return {k: v[0] for k, v in tree.items()}
    return None if tree is None else tree[0]


def _stacked(tree):
    """The inverse of _first, over tuples too."""
    if isinstance(tree, dict):
        return {k: v.unsqueeze(0) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_stacked(t) for t in tree)
    return tree.unsqueeze(0)


def _one_client(fn):
    """`fn` of one client's tensors, called on the stacked tensors of a program of one client (a
    leading dimension of 1): as torch.func.vmap(fn) would be for K = 1."""
    return lambda *args: _stacked(fn(*(_first(a) for a in args)))


def _leaves(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().requires_grad_() for n, p in params.items()}


def _autograd_grad(loss_fn, params, *inputs):
    """torch.func.grad(loss_fn, has_aux=True)(params, *inputs) by plain autograd."""
    leaves = _leaves(params)
    with torch.enable_grad():
        objective, aux = loss_fn(leaves, *inputs)
        grads = torch.autograd.grad(objective, list(leaves.values()), materialize_grads=True)
    return dict(zip(leaves, grads)), aux


def _autograd_hvp(objective_fn, params, *inputs_and_vector):
    """The Hessian of objective_fn at `params` times the vector (the last argument), by double backward."""
    *inputs, vector = inputs_and_vector
    leaves = _leaves(params)
    with torch.enable_grad():
        grads = torch.autograd.grad(objective_fn(leaves, *inputs), list(leaves.values()), create_graph=True,
                                    materialize_grads=True)
        linked = [(n, g) for n, g in zip(leaves, grads) if g.requires_grad]
        if not linked:
            return {n: torch.zeros_like(p) for n, p in leaves.items()}
        products = torch.autograd.grad([g for _, g in linked], list(leaves.values()),
                                       grad_outputs=[vector[n] for n, _ in linked], materialize_grads=True)
    return dict(zip(leaves, (p.detach() for p in products)))


class StackedOps:
    """harness.training.StepOps for the K stacked clients of a program."""

    def __init__(self, program: StackedClients):
        self.p = program
        self.recorded = None  # the first grad call of the step: (grads, loss, correct, new_buffers, count)

    def _inputs(self, batch):
        xb, yb, w = batch
        p = self.p
        return p.consts, xb, yb, w, p.class_mask, p.unit_masks, p.anchor

    def grad(self, params, batch):
        grads, (loss, correct, new_buffers) = self.p.grad_fn(params, *self._inputs(batch))
        if self.recorded is None:
            self.recorded = (grads, loss, correct, new_buffers, batch[2].sum(1))
        return grads

    def hvp(self, params, batch, vector):
        return self.p.hvp_fn(params, *self._inputs(batch), vector)

    def sgd(self, params, grads, lr=None):
        p = self.p
        names = p.names
        g = [grads[n] for n in names]
        if p.clip is not None:
            coef = clip_coefficient(torch.stack([t.flatten(1).norm(dim=1) for t in g]), p.clip)
            g = [t * _per_client(coef, t) for t in g]
        current = [params[n] for n in names]
        masks = [p.update_masks.get(n) for n in names] if p.update_masks else None
        directions = sgd_directions(current, g, weight_decay=p.weight_decay, momentum=p.momentum,
                                    buffers=p.buffers, masks=masks)
        return self._move(current, directions, lr)

    def descend(self, params, grads, lr=None):
        names = self.p.names
        return self._move([params[n] for n in names], [grads[n] for n in names], lr)

    def _move(self, current, directions, lr):
        rate = self.p.lr if lr is None else torch.full_like(self.p.lr, lr)
        return {n: t - _per_client(rate, t) * d for n, t, d in zip(self.p.names, current, directions)}


class StackedClients:
    """What one batched program reads and updates in place: per client k, its parameters, buffers,
    momentum buffers, masks, anchor, lr and accumulators at index k; the current step's minibatches
    in (index, weight, active); `step()` trains every active client one step by the jobs' rule."""

    def __init__(self, jobs: list[LocalJob], model: nn.Module, fresh_buffers: dict[str, torch.Tensor], capacity: int):
        first = jobs[0]
        device, dtype = first.x.device, first.x.dtype
        self.K = K = len(jobs)
        self.rule = first.rule or LocalRule()
        self.per_step = self.rule.batches_per_step
        train = first.train
        self.bs, self.weight_decay, self.momentum = train.batch_size, train.weight_decay, train.momentum
        self.clip = first.clip_grad_norm
        self.fresh_buffers = fresh_buffers
        self.template, self.ctx = functional_template(model)
        named = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        self.names = list(named)
        stacked = lambda t: torch.empty((K, *t.shape), dtype=t.dtype, device=device)  # noqa: E731
        self.params = {n: stacked(p) for n, p in named.items()}
        self.consts = {n: stacked(b) for n, b in buffers.items()}
        self.anchor = {n: stacked(t) for n, t in first.anchor.items()} if first.anchor is not None else None
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
        self.index = torch.zeros((K, self.per_step, self.bs), dtype=torch.int64, device=device)
        self.weight = torch.ones((K, self.per_step, self.bs), dtype=dtype, device=device)
        self.active = torch.zeros(K, dtype=torch.bool, device=device)
        self.graph = None
        rule = self.rule

        def logits_and_loss(params, consts, xb, yb, w, class_mask, unit_masks, anchor):
            self.ctx.sample_weight = w
            self.ctx.new_buffers = {}
            self.template.unit_masks = unit_masks
            logits = torch.func.functional_call(self.template, (params, consts), (xb,))
            if class_mask is not None:
                logits = torch.where(class_mask, logits, 0.0)
            loss = (F.cross_entropy(logits, yb, reduction="none") * w).sum() / w.sum()
            penalty = rule.penalty(params, anchor) if anchor is not None else None
            return logits, loss, (loss if penalty is None else loss + penalty)

        def client_loss(params, consts, xb, yb, w, class_mask, unit_masks, anchor):
            logits, loss, objective = logits_and_loss(params, consts, xb, yb, w, class_mask, unit_masks, anchor)
            correct = ((logits.argmax(1) == yb).to(w.dtype) * w).sum()
            return objective, (loss.detach(), correct.detach(), dict(self.ctx.new_buffers))

        def client_hvp(params, consts, xb, yb, w, class_mask, unit_masks, anchor, vector):
            def g(p):
                return torch.func.grad(lambda q: logits_and_loss(q, consts, xb, yb, w, class_mask, unit_masks,
                                                                 anchor)[2])(p)
            return torch.func.jvp(g, (params,), (vector,))[1]

        if K == 1 and device.type == "cpu":
            # One client needs no vmap, and on the CPU functorch's transforms cost several times the
            # arithmetic of a small model's step: plain autograd, on client 0's slices.
            self.grad_fn = _one_client(partial(_autograd_grad, client_loss))
            self.hvp_fn = _one_client(partial(_autograd_hvp, lambda *args: logits_and_loss(*args)[2]))
            return
        dims = (0, 0, 0, 0, 0, 0 if self.class_mask is not None else None, 0 if self.unit_masks else None,
                0 if self.anchor is not None else None)
        self.grad_fn = torch.func.vmap(torch.func.grad(client_loss, has_aux=True), in_dims=dims)
        self.hvp_fn = torch.func.vmap(client_hvp, in_dims=(*dims, 0))

    @torch.no_grad()
    def load(self, jobs: list[LocalJob]) -> None:
        """The jobs' starting tensors, masks, anchors and data into the stacked tensors; accumulators
        to zero."""
        for k, job in enumerate(jobs):
            for n, t in self.params.items():
                t[k].copy_(job.start[n])
            for n, t in self.consts.items():
                t[k].copy_(job.start[n] if n in job.start else self.fresh_buffers[n])
            for n, t in (self.anchor or {}).items():
                t[k].copy_(job.anchor[n])
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
        """One local step of every active client on its minibatches in (index, weight). Device work
        only: no synchronisation with the CPU."""
        act = self.active
        for n, m in self.weight_masks.items():
            self.params[n].mul_(m)
        batches = [(self.x[self.index[:, j]], self.y[self.index[:, j]], self.weight[:, j]) for j in range(self.per_step)]
        ops = StackedOps(self)
        new_params = self.rule.step(ops, dict(self.params), batches)
        grads, loss, correct, new_buffers, count = ops.recorded
        if self.importance:
            for n, g in grads.items():
                sq = g.square() * _per_client(count.to(g.dtype), g)
                if n in self.grad_importance:
                    self.grad_importance[n].add_(torch.where(_per_client(act, sq), sq, 0.0))
                else:
                    self.dense_importance.add_(torch.where(act, sq.flatten(1).sum(1).double(), 0.0))
        for n, p in self.params.items():
            p.copy_(torch.where(_per_client(act, p), new_params[n], p))
        for n, b in new_buffers.items():
            t = self.consts[n]
            t.copy_(torch.where(_per_client(act, t), b.to(t.dtype), t))
        self.loss_sum.add_(torch.where(act, loss.double() * count.double(), 0.0))
        self.correct.add_(torch.where(act, correct.double(), 0.0))

    @torch.no_grad()
    def store(self, jobs: list[LocalJob], plan: Schedule) -> None:
        """The trained tensors and stats into the jobs. The one read of the sums comes first: a device
        error surfaces before any job is touched. Loss and accuracy are over the samples of each
        step's first minibatch (those a one-minibatch step trains on)."""
        for n, m in self.weight_masks.items():
            self.params[n].mul_(m)
        sums = torch.stack([self.loss_sum, self.correct, self.dense_importance]).cpu()
        counted = (plan.weight[:, :, 0].sum(-1) * plan.active).sum(0)
        for k, job in enumerate(jobs):
            job.trained = {n: t[k].clone() for n, t in (self.params | self.consts).items()}
            seen = max(float(counted[k]), 1.0)
            job.stats = TrainStats(float(sums[0, k]) / seen, float(sums[1, k]) / seen, plan.samples[k], plan.steps[k])
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
