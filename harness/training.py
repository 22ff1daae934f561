"""Local training, written once: what a client trains (`LocalJob`), the rule it trains by, and the
one-by-one trainer. harness/batched/ runs the same rule for many stacked clients at once.

The rule of local SGD, shared by both trainers:
- data order: `minibatches` (a fresh permutation of the client's samples per epoch, from its own
  generator);
- clipping: `clip_coefficient` (as torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms);
- the step: `sgd_directions` (gradient plus weight decay, through the momentum buffer, times the
  update masks); the parameters then move by -lr times the direction.

A method that trains by another rule brings a `LocalRule` in its own module: a term added to the
loss (`penalty`, e.g. FedProx's proximal term) and/or its own step (`step`, e.g. Per-FedAvg's
meta-step), written as pure tensor code over one client's parameters and `StepOps`. Jobs with a rule
run through the functional program of harness/batched/, one by one as a group of one and batched as
a vmapped group, so the same code gives the same numbers either way.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.models import ModelSpec


class SGDSettings(Protocol):
    """The parts of the training config local SGD reads (harness.config.TrainConfig)."""

    epochs: int
    batch_size: int
    weight_decay: float
    momentum: float


@dataclass
class TrainStats:
    loss: float  # mean cross-entropy over the samples processed
    accuracy: float  # fraction of samples processed that were classified right while training
    samples: int  # samples processed (epochs x local training set)
    steps: int


def torch_threads(cpus: float) -> int:
    """Threads for a quota of `cpus`: as many as it allows, at least one. Results depend on the thread
    count, so equal quotas give equal numbers on every engine."""
    return max(1, math.floor(cpus + 1e-9))


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the rule -----------------------------------------------------------------------------------------
def minibatches(n: int, batch_size: int, epochs: int, generator: torch.Generator,
                device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """A client's minibatches: per epoch one permutation of its n samples (drawn on the CPU, moved to
    `device` once), cut into batches."""
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        if device is not None:
            order = order.to(device)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


def clip_coefficient(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor on the gradients for clipping at `max_norm`; `norms` holds the norm of each tensor
    along dim 0 (further dims: one per stacked client)."""
    return (max_norm / (torch.linalg.vector_norm(norms, dim=0) + 1e-6)).clamp(max=1.0)


def sgd_directions(params: list[torch.Tensor], grads: list[torch.Tensor], *, weight_decay: float,
                   momentum: float, buffers: list[torch.Tensor] | None = None,
                   masks: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """d = grad + weight_decay x param; with momentum the buffer becomes momentum x buffer + d (in
    place; it starts at zero) and d the buffer; then d x mask where a mask is given, so that masked
    coordinates keep their values. The step is param - lr x d."""
    d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else list(grads)
    if momentum:
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, d)
        d = list(buffers)
    if masks:
        d = [t if m is None else t * m for t, m in zip(d, masks)]
    return d


# -- a method's own rule ------------------------------------------------------------------------------
class StepOps(Protocol):
    """What a `LocalRule.step` may call. `params` and gradients are dicts of the model's parameters;
    in the batched program every tensor carries a leading client dimension, which the rule never
    sees: it uses these operations for anything per client and plain element-wise arithmetic (with
    Python numbers) for the rest, so the same code runs one by one and batched."""

    def grad(self, params: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        """Gradients of the job's loss (cross-entropy with its class and unit masks, plus the rule's
        penalty) at `params` on `batch`. The first call of a step is the one whose loss, accuracy,
        importance and BN statistics the job records."""

    def hvp(self, params: dict[str, torch.Tensor], batch, vector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Hessian of the same loss at `params` on `batch` times `vector`."""

    def sgd(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
            lr: float | None = None) -> dict[str, torch.Tensor]:
        """New parameters by the job's SGD settings: clipping, weight decay, momentum (its buffer
        advances once per call), update masks, and the round's lr (or `lr`)."""

    def descend(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                lr: float | None = None) -> dict[str, torch.Tensor]:
        """params - lr x grads, nothing else (the round's lr, or `lr`)."""


class LocalRule:
    """A method's local training rule: the default is plain local SGD on the cross-entropy.

    Subclasses override `penalty` (a term added to the loss, a pure function of one client's
    parameters and its `anchor` tensors, LocalJob.anchor), `step` (one local step from
    `batches_per_step` minibatches), or both; `key` names the rule and its hyper-parameters: jobs
    batch together only under equal keys, and a captured CUDA graph is reused only for its key."""

    batches_per_step: int = 1

    def key(self) -> tuple:
        return (type(self).__module__, type(self).__qualname__, tuple(sorted(vars(self).items())))

    def penalty(self, params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def step(self, ops: StepOps, params: dict[str, torch.Tensor], batches: list) -> dict[str, torch.Tensor]:
        return ops.sgd(params, ops.grad(params, batches[0]))


# -- what a client trains -----------------------------------------------------------------------------
@dataclass
class Hooks:
    """Per-minibatch callbacks for training that is not a fixed program (FedLPS's learnable masks);
    a job with hooks trains one by one.

    before_batch(): before each forward pass. regularizer(): a term added to the loss.
    after_backward(batch_size): with the gradients in place, before the update.
    update_masks(): per parameter name, the 0/1 update masks of this step.
    extra_params: further tensors trained by plain SGD at extra_lr (default: the job's lr)."""

    before_batch: Callable[[], None] | None = None
    regularizer: Callable[[], torch.Tensor] | None = None
    after_backward: Callable[[int], None] | None = None
    update_masks: Callable[[], dict[str, torch.Tensor]] | None = None
    extra_params: list[torch.Tensor] = field(default_factory=list)
    extra_lr: float | None = None


@dataclass(eq=False)
class LocalJob:
    """One client's local training, as data. A method describes it; the engine decides how to run it
    (one by one, or with the other clients of its shape as one batched program) and writes the
    outputs into it.

    spec: which model (widths, norm, scaler); start: its starting tensors (every parameter; buffers
      not given start as in a new model).
    x, y: the client's training data; lr; generator: the client's random stream (its data order).
    class_mask: bool per class; other logits are set to 0 before the loss (HeteroFL's masked CE).
    unit_masks: per unit group, fixed 0/1 multipliers of the units' outputs.
    update_masks: per parameter, fixed 0/1 tensors on the update (masked coordinates keep their values).
    weight_masks: per parameter, 0/1 tensors multiplied onto the weights before every step and after
      training; gradients stay dense.
    importance: accumulate sum over steps of grad^2 x batch size (before clipping): per coordinate of
      the weight-masked tensors (`grad_importance`), one total over the others (`dense_importance`).
    hooks: a function of the model being trained that returns its `Hooks` (trains one by one).
    rule: the method's LocalRule (None: plain SGD on the fast one-by-one path); anchor: per-client
      tensors its penalty reads (e.g. the global model); max_steps: stop after this many steps
      (partial work); `train` may differ per job (epochs, batch size).
    context: the method's own data, for building its result.

    Outputs: `trained` (the model's tensors after training, detached copies), `stats`, and the
    importance sums."""

    spec: ModelSpec
    start: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    train: SGDSettings
    lr: float
    generator: torch.Generator
    clip_grad_norm: float | None = None
    class_mask: torch.Tensor | None = None
    unit_masks: dict[str, torch.Tensor] | None = None
    update_masks: dict[str, torch.Tensor] | None = None
    weight_masks: dict[str, torch.Tensor] | None = None
    importance: bool = False
    hooks: Callable[[nn.Module], Hooks] | None = None
    rule: LocalRule | None = None
    anchor: dict[str, torch.Tensor] | None = None
    max_steps: int | None = None
    context: Any = None
    trained: dict[str, torch.Tensor] | None = None
    stats: TrainStats | None = None
    grad_importance: dict[str, torch.Tensor] | None = None
    dense_importance: float = 0.0

    def __post_init__(self):
        if self.hooks is not None and (self.rule is not None or self.anchor is not None):
            raise ValueError("a LocalJob has hooks or a rule, not both")

    @property
    def batchable(self) -> bool:
        return self.hooks is None and len(self.y) > 0

    @property
    def functional(self) -> bool:
        """Trained by the functional program (harness/batched/), alone or batched: jobs with a rule."""
        return self.rule is not None and len(self.y) > 0


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], fresh_buffers: dict[str, torch.Tensor]) -> None:
    """Put `tensors` (every parameter; any buffers) into `model`, a model reused across jobs; buffers
    that `tensors` does not give get their values of a new model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[name])
            p.grad = None
        for name, b in model.named_buffers():
            b.copy_(tensors[name] if name in tensors else fresh_buffers[name])


# -- one by one ---------------------------------------------------------------------------------------
class _WeightMasks:
    """Zero the masked weights before every step (gradients stay dense) and accumulate importance."""

    def __init__(self, model: nn.Module, job: LocalJob):
        params = dict(model.named_parameters())
        device = next(model.parameters()).device
        self.masked = [(params[n], m.to(device)) for n, m in (job.weight_masks or {}).items()]
        self.params = [(n, p) for n, p in params.items() if p.requires_grad]
        self.importance = {n: torch.zeros_like(params[n]) for n in (job.weight_masks or {})}
        self.dense = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def apply(self) -> None:
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
                self.dense += sq.sum()


def train_one(job: LocalJob, model_of: Callable[[LocalJob], nn.Module]) -> None:
    """Train a job alone on `model_of(job)` (a model of its spec holding its starting tensors); a job
    without training data does not train: its trained tensors are its starting ones."""
    if not len(job.y):
        job.trained, job.stats = dict(job.start), TrainStats(0.0, 0.0, 0, 0)
        return
    train_alone(job, model_of(job))


def train_alone(job: LocalJob, model: nn.Module) -> None:
    """Train `model` (already holding the job's starting tensors) by local SGD, one minibatch at a
    time, and write the job's outputs."""
    hooks = job.hooks(model) if job.hooks is not None else Hooks()
    masked = _WeightMasks(model, job) if (job.weight_masks or job.importance) else None
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    train, lr = job.train, job.lr
    buffers = [torch.zeros_like(p) for p in params] if train.momentum else None
    fixed_masks = [(job.update_masks or {}).get(n) for n, _ in named] if job.update_masks else None
    extra_lr = hooks.extra_lr if hooks.extra_lr is not None else lr
    absent = ~job.class_mask.to(job.x.device) if job.class_mask is not None else None
    # Per step the loss, the logits and the labels are kept (no arithmetic, no synchronisation);
    # the loss and accuracy are computed from them once, after training.
    losses: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    steps = 0
    for batch in minibatches(len(job.y), train.batch_size, train.epochs, job.generator, job.x.device):
        if job.max_steps is not None and steps >= job.max_steps:
            break
        xb, yb = job.x[batch], job.y[batch]
        if hooks.before_batch is not None:
            hooks.before_batch()
        if masked is not None:
            masked.apply()
        logits = model(xb)
        if absent is not None:
            logits = logits.masked_fill(absent, 0.0)
        loss = F.cross_entropy(logits, yb)
        objective = loss if hooks.regularizer is None else loss + hooks.regularizer()
        for p in params:
            p.grad = None
        for p in hooks.extra_params:
            p.grad = None
        objective.backward()
        if hooks.after_backward is not None:
            hooks.after_backward(len(yb))
        if masked is not None and job.importance:
            masked.accumulate(len(yb))
        with torch.no_grad():
            # a parameter outside the loss gets a zero gradient (and weight decay), as in the batched path
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if job.clip_grad_norm is not None:
                torch._foreach_mul_(grads, clip_coefficient(torch.stack(torch._foreach_norm(grads)), job.clip_grad_norm))
            masks = fixed_masks
            if hooks.update_masks is not None:
                step_masks = hooks.update_masks()
                masks = [step_masks.get(n) for n, _ in named]
            torch._foreach_add_(params, sgd_directions(params, grads, weight_decay=train.weight_decay,
                                                       momentum=train.momentum, buffers=buffers, masks=masks),
                                alpha=-lr)
            for p in hooks.extra_params:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=extra_lr)
        losses.append(loss.detach())
        outputs.append(logits.detach())
        labels.append(yb)
        steps += 1
    for p in params:
        p.grad = None
    if masked is not None:
        masked.apply()
        if job.importance:
            job.grad_importance = masked.importance
            job.dense_importance = float(masked.dense)
    job.trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    job.stats = _stats(losses, outputs, labels)


def _stats(losses: list[torch.Tensor], outputs: list[torch.Tensor], labels: list[torch.Tensor]) -> TrainStats:
    """The mean loss and the accuracy over the samples of every step, from each step's mean loss,
    logits and labels: the loss summed in float64 step by step (mean x batch size, in step order)."""
    if not losses:
        return TrainStats(0.0, 0.0, 0, 0)
    sizes = [len(y) for y in labels]
    loss_sum = 0.0
    for loss, size in zip(torch.stack(losses).tolist(), sizes):
        loss_sum += loss * size
    samples = sum(sizes)
    correct = int((torch.cat(outputs).argmax(1) == torch.cat(labels)).sum())
    return TrainStats(loss_sum / samples, correct / samples, samples, len(losses))


# -- evaluation -----------------------------------------------------------------------------------------
@torch.no_grad()
def correct_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 1000) -> torch.Tensor:
    """Bool per sample: is the model's prediction right? (x is uint8, normalised per batch.)"""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(y), batch_size):
        xb = normalize(x[start:start + batch_size].to(device))
        out.append((model(xb).argmax(1).cpu() == y[start:start + batch_size]))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches) -> None:
    """Static BN: running statistics as the cumulative average over `batches` (train mode, no grad)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for xb in batches:
        model(xb)
    model.eval()
