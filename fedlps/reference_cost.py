"""The time the FedLPS authors divide the P-UCBV reward by (the `reference` variant's reward).

Reference quirk (sunnyxuejj/FedLPS at 35fafba, FedLPS.py, the reward after each client's training):
not the simulated clock but per-dataset constants,

    t = 3 x train_flops / 1e6 / C / cap + upload bits / 8 / 2^20 / B

with cap the client's tier cap (`clients_mask_rate[i]`, not the keep ratio it trained at), and
(C, B) = (2788.128, 1) for MNIST and (672000, 14.9) for CIFAR-10, CIFAR-100 and Tiny ImageNet. Here
the CNN takes the MNIST constants and every other model the CIFAR ones.

train_flops (Hetero_Client.update_weights_leanable) = local epochs x batches per epoch x
utils/main_flops_counter.count_training_flops on the trained model, which is 3 x, per batch of
`local_bs` images, forward hooks on every Conv2d and Linear (nothing else is counted):

    conv:   (2 x nonzero weights + C_out if it has a bias) x H_out x W_out x local_bs + C_out
    linear: local_bs x (2 x nonzero weights + nonzero biases) + out_features

(the trailing C_out / out_features counts the mask, `args.learnable`). The trained model's masked
rows are zero, so a masked layer's nonzero weights are its kept rows x fan-in: we count that (and
every bias as nonzero). Upload bits (CommenNet.stat_param_sizes): 32 x (the nonzero masked weights +
every other parameter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

MNIST = (2788.128, 1.0)  # (MFLOP/s, MiB/s) of the reward on MNIST
CIFAR = (672000.0, 14.9)  # on CIFAR-10, CIFAR-100 and Tiny ImageNet


@dataclass(frozen=True)
class Layer:
    weight: str  # the parameter name of its weight
    group: str | None  # the unit group of its rows, None for the classifier
    conv: bool
    out: int  # output channels / features
    fan_in: int  # weights per output unit
    positions: int  # output positions per image (H_out x W_out; 1 for a linear layer)
    bias: bool


class ReferenceRewardCost:
    """Built once per process from the dense model (on the meta device: shapes only)."""

    def __init__(self, model: nn.Module, image_shape, full_widths: dict[str, int], batch_size: int,
                 constants: tuple[float, float]):
        self.batch_size = batch_size
        self.mflops, self.mib_s = constants
        shapes: dict[str, torch.Size] = {}
        modules = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        hooks = [m.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
                 for name, m in modules.items()]
        try:
            with torch.no_grad():
                model(torch.empty(1, *image_shape, device=next(model.parameters()).device))
        finally:
            for h in hooks:
                h.remove()
        layout = model.layout
        self.layers = []
        for name, m in modules.items():
            dims = layout.get(f"{name}.weight", ())
            group = dims[0].group if dims else None
            self.layers.append(Layer(f"{name}.weight", group if group in full_widths else None,
                                     isinstance(m, nn.Conv2d), m.weight.shape[0], m.weight[0].numel(),
                                     math.prod(shapes[name][2:]), m.bias is not None))
        masked = sum(layer.out * layer.fan_in for layer in self.layers if layer.group is not None)
        self.other_params = sum(p.numel() for p in model.parameters()) - masked

    def forward_flops(self, kept: dict[str, int]) -> float:
        """count_model_param_flops: one batch of `batch_size` images, `kept[g]` rows of group g."""
        b, total = self.batch_size, 0.0
        for layer in self.layers:
            nonzero = (kept[layer.group] if layer.group is not None else layer.out) * layer.fan_in
            bias = layer.out if layer.bias else 0
            if layer.conv:
                total += (2 * nonzero + bias) * layer.positions * b + layer.out
            else:
                total += b * (2 * nonzero + bias) + layer.out
        return total

    def upload_bits(self, kept: dict[str, int]) -> float:
        return 32.0 * (sum(kept[layer.group] * layer.fan_in for layer in self.layers if layer.group is not None)
                       + self.other_params)

    def seconds(self, kept: dict[str, int], steps: int, cap: float) -> float:
        """The reward's time for a training of `steps` minibatches with `kept` rows per group."""
        train_flops = steps * 3 * self.forward_flops(kept)
        return 3 * train_flops / 1e6 / self.mflops / cap + self.upload_bits(kept) / 8 / 2 ** 20 / self.mib_s
