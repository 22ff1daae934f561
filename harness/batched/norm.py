"""Batch normalisation over the real samples of padded minibatches, for the functional program."""
from __future__ import annotations

import copy
import math
import weakref
from types import SimpleNamespace

import torch
import torch.nn as nn


class SampleWeightedBatchNorm(nn.Module):
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


_templates: "weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, SimpleNamespace]]" = weakref.WeakKeyDictionary()


def functional_template(model: nn.Module) -> tuple[nn.Module, SimpleNamespace]:
    """A structure-only (meta) copy of `model` for functional_call, its norms sample-weighted, in
    training mode (as local training runs), and the context its norms read (sample weights) and write
    (new running statistics). One per model: the copy costs as much as several small training steps,
    and a process keeps one model per shape."""
    if model not in _templates:
        ctx = SimpleNamespace(sample_weight=None, new_buffers={})
        template = copy.deepcopy(model).to("meta")
        for name, module in list(template.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    full = f"{name}.{child_name}." if name else f"{child_name}."
                    setattr(module, child_name, SampleWeightedBatchNorm(child, full, ctx))
        _templates[model] = (template.train(), ctx)
    return _templates[model]
