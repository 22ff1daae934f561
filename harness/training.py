"""Local training and evaluation, shared by every method.

`local_sgd` is plain minibatch SGD (weight decay, optional momentum and gradient clipping) over a
client's data in an order drawn from the task's generator; methods customise it through hooks
instead of writing their own loops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.config import TrainConfig


@dataclass
class TrainStats:
    loss: float  # mean cross-entropy over the samples processed
    accuracy: float  # fraction of samples processed that were classified right while training
    samples: int  # samples processed (epochs x local training set)
    steps: int


def local_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train: TrainConfig,
    lr: float,
    generator: torch.Generator,
    *,
    extra_params: list[torch.Tensor] = (),
    extra_lr: float | None = None,
    clip_grad_norm: float | None = None,
    class_mask: torch.Tensor | None = None,
    before_batch: Callable[[], None] | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
    after_backward: Callable[[int], None] | None = None,
    update_masks: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]] | None = None,
) -> TrainStats:
    """Train `model` in place for `train.epochs` epochs on (x, y).

    clip_grad_norm: clip the model's gradient norm before each update (a method parameter).
    class_mask: bool per class; logits of the other classes are set to 0 before the loss
      (HeteroFL's masked cross-entropy).
    before_batch(): called before each forward pass (recompute masks, apply weight masks).
    regularizer(): an extra loss term added to the cross-entropy.
    after_backward(batch_size): called with gradients in place, before the update.
    update_masks: per parameter name, 0/1 tensors multiplied onto the update (gradient plus weight
      decay) so that masked coordinates keep their values exactly.
    extra_params: further tensors trained by the same optimizer (e.g. importance scores), at
      extra_lr (default lr), without weight decay.
    """
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    momentum = {}
    n = len(y)
    total_loss, correct, samples, steps = 0.0, 0, 0, 0
    for _ in range(train.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, train.batch_size):
            batch = order[start:start + train.batch_size].to(x.device)
            xb, yb = x[batch], y[batch]
            if before_batch is not None:
                before_batch()
            logits = model(xb)
            if class_mask is not None:
                logits = logits.masked_fill(~class_mask.to(logits.device), 0.0)
            loss = F.cross_entropy(logits, yb)
            objective = loss if regularizer is None else loss + regularizer()
            for _, p in named:
                p.grad = None
            for p in extra_params:
                p.grad = None
            objective.backward()
            if after_backward is not None:
                after_backward(len(yb))
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_([p for _, p in named], clip_grad_norm)
            masks = update_masks() if callable(update_masks) else (update_masks or {})
            with torch.no_grad():
                for name, p in named:
                    if p.grad is None:
                        continue
                    d = p.grad.add(p, alpha=train.weight_decay) if train.weight_decay else p.grad
                    if train.momentum:
                        buf = momentum.get(name)
                        buf = d.clone() if buf is None else buf.mul_(train.momentum).add_(d)
                        momentum[name] = buf
                        d = buf
                    if name in masks:
                        d = d * masks[name]
                    p.sub_(d, alpha=lr)
                for p in extra_params:
                    if p.grad is not None:
                        p.sub_(p.grad, alpha=extra_lr if extra_lr is not None else lr)
            batch_n = len(yb)
            total_loss += float(loss.detach()) * batch_n
            correct += int((logits.argmax(1) == yb).sum())
            samples += batch_n
            steps += 1
    return TrainStats(total_loss / max(samples, 1), correct / max(samples, 1), samples, steps)


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
