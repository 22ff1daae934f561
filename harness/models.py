"""The paper's models, each exposing its units.

A *unit* is an output channel of a conv or an output neuron of a linear layer. Units are organised in
named *unit groups*: a group is one layer's outputs, or several layers' outputs that a residual
addition couples (they must keep the same units). `model.layout` says, for every parameter and
buffer, which group indexes each of its leading dimensions, so that submodel extraction, aggregation
by index sets, unit masks and FLOP counting are shared code (harness/submodel.py), not per method.

Every model is built at given widths (units kept per group) and takes three training-time options:
`norm` ('bn': BatchNorm with running statistics; 'sbn': static BN, batch statistics in training and
statistics computed by the server before evaluation (HeteroFL); 'batch': batch statistics always, as in
the FedLPS authors' VGG), `rate` (HeteroFL's scaler: hidden outputs divided by the rate in training)
and `unit_masks` (group -> 0/1 vector multiplied onto the units after their norm, for FedLPS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.errors import ConfigError

CLASSES = "classes"  # the classifier's outputs: never removed; rows can be restricted per client


@dataclass(frozen=True)
class Dim:
    """How one tensor dimension maps onto units: `group` None means never sliced (the input
    channels of the first layer); `repeat` > 1 marks a flattened input where each unit spans
    `repeat` consecutive features."""

    group: str | None
    repeat: int = 1


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build for a client: units kept per group, the norm kind and HeteroFL's scaler
    rate. Hashable: an executor keeps one built model per spec and reuses it across clients."""

    widths: tuple[tuple[str, int], ...]
    norm: str
    rate: float = 1.0


class UnitModel(nn.Module):
    FULL: dict[str, int] = {}

    def __init__(self, widths: dict[str, int] | None, norm: str, rate: float):
        super().__init__()
        self.full_widths = dict(self.FULL)
        self.widths = {**self.FULL, **(widths or {})}
        for group, k in self.widths.items():
            if group not in self.FULL or not 1 <= k <= self.FULL[group]:
                raise ValueError(f"width {k} of group {group!r} is outside 1..{self.FULL.get(group)}")
        self.norm_kind = norm
        self.rate = rate
        self.unit_masks: dict[str, torch.Tensor] = {}
        self.layout: dict[str, tuple[Dim, ...]] = {}
        self.hidden_groups: list[str] = list(self.FULL)

    # -- construction helpers -----------------------------------------------------------------------
    def _declare(self, name: str, out: str | None, inp: Dim | str | None) -> None:
        module = self.get_submodule(name)
        inp_dim = inp if isinstance(inp, Dim) else Dim(inp)
        self.layout[f"{name}.weight"] = (Dim(out), inp_dim)
        if getattr(module, "bias", None) is not None:
            self.layout[f"{name}.bias"] = (Dim(out),)

    def _norm(self, name: str, group: str) -> nn.Module:
        width = self.widths[group]
        if self.norm_kind == "bn":
            bn = nn.BatchNorm2d(width)
        else:
            bn = nn.BatchNorm2d(width, momentum=None, track_running_stats=False)
        self.add_module(name, bn)
        for p in ("weight", "bias", "running_mean", "running_var"):
            if getattr(bn, p, None) is not None:
                self.layout[f"{name}.{p}"] = (Dim(group),)
        return bn

    # -- forward helper ----------------------------------------------------------------------------
    def unit(self, x: torch.Tensor, group: str, norm: nn.Module | None = None) -> torch.Tensor:
        """Scaler, then norm, then unit mask, applied to the outputs of a layer of `group`."""
        if self.training and self.rate != 1.0:
            x = x / self.rate
        if norm is not None:
            x = norm(x)
        mask = self.unit_masks.get(group)
        if mask is not None:
            x = x * mask.view(1, -1, *([1] * (x.dim() - 2)))
        return x


class CNN(UnitModel):
    """The FedLPS paper's MNIST CNN: conv5x5 1->10, maxpool2, relu, conv5x5 10->20, maxpool2, relu,
    fc 320->50, relu, fc 50->classes."""

    FULL = {"conv1": 10, "conv2": 20, "fc1": 50}

    def __init__(self, num_classes: int, image_shape, widths=None, norm="bn", rate=1.0):
        super().__init__(widths, norm, rate)
        c, h, w = image_shape
        w1, w2, w3 = (self.widths[g] for g in ("conv1", "conv2", "fc1"))
        spatial = (((h - 4) // 2 - 4) // 2) * (((w - 4) // 2 - 4) // 2)
        if spatial <= 0:
            raise ConfigError("model.name", f"cnn needs images of at least 12x12, got {h}x{w}")
        self.conv1 = nn.Conv2d(c, w1, 5)
        self.conv2 = nn.Conv2d(w1, w2, 5)
        self.fc1 = nn.Linear(w2 * spatial, w3)
        self.fc2 = nn.Linear(w3, num_classes)
        self._declare("conv1", "conv1", None)
        self._declare("conv2", "conv2", "conv1")
        self._declare("fc1", "fc1", Dim("conv2", spatial))
        self._declare("fc2", CLASSES, "fc1")

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.unit(self.conv1(x), "conv1"), 2))
        x = F.relu(F.max_pool2d(self.unit(self.conv2(x), "conv2"), 2))
        x = F.relu(self.unit(self.fc1(x.flatten(1)), "fc1"))
        return self.fc2(x)


VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


class VGG(UnitModel):
    """VGG with BN: conv3x3-norm-relu blocks and max pools, then one linear classifier (the FedLPS
    authors' VGG). Each conv is its own unit group, `conv0` .. `convN`."""

    def __init__(self, arch: str, num_classes: int, image_shape, widths=None, norm="bn", rate=1.0):
        self.plan = VGG_CONFIGS[arch]
        convs = [v for v in self.plan if v != "M"]
        self.FULL = {f"conv{i}": v for i, v in enumerate(convs)}
        super().__init__(widths, norm, rate)
        c, h, w = image_shape
        pools = self.plan.count("M")
        spatial = (h >> pools) * (w >> pools)
        if spatial <= 0:
            raise ConfigError("model.name", f"{arch} needs images of at least {2 ** pools}x{2 ** pools}, got {h}x{w}")
        self.convs = nn.ModuleList()
        prev: str | None = None
        in_ch = c
        for i in range(len(convs)):
            group = f"conv{i}"
            self.convs.append(nn.Conv2d(in_ch, self.widths[group], 3, padding=1))
            self._declare(f"convs.{i}", group, prev)
            self._norm(f"norm{i}", group)
            prev, in_ch = group, self.widths[group]
        self.classifier = nn.Linear(in_ch * spatial, num_classes)
        self._declare("classifier", CLASSES, Dim(prev, spatial))

    def forward(self, x):
        i = 0
        for v in self.plan:
            if v == "M":
                x = F.max_pool2d(x, 2)
            else:
                x = F.relu(self.unit(self.convs[i](x), f"conv{i}", getattr(self, f"norm{i}")))
                i += 1
        return self.classifier(x.flatten(1))


class ResNet18(UnitModel):
    """CIFAR ResNet-18 (3x3 stem, four stages of two basic blocks, global average pool, linear).
    The residual stream of stage s is one unit group `res{s}` shared by the stem (s=1), every
    block's second conv and the projection shortcut; each block's first conv is its own group."""

    STAGES = (64, 128, 256, 512)

    def __init__(self, num_classes: int, image_shape, widths=None, norm="bn", rate=1.0):
        self.FULL = {}
        for s, planes in enumerate(self.STAGES, start=1):
            self.FULL[f"res{s}"] = planes
            for b in range(2):
                self.FULL[f"block{s}.{b}"] = planes
        super().__init__(widths, norm, rate)
        c = image_shape[0]
        self.stem = nn.Conv2d(c, self.widths["res1"], 3, padding=1, bias=False)
        self._declare("stem", "res1", None)
        self._norm("stem_norm", "res1")
        self.blocks = nn.ModuleList()
        self.block_plan: list[tuple[str, str, str, bool, int]] = []
        prev_res = "res1"
        for s in range(1, 5):
            res = f"res{s}"
            for b in range(2):
                idx = len(self.blocks)
                inner = f"block{s}.{b}"
                stride = 2 if (s > 1 and b == 0) else 1
                project = prev_res != res
                block = nn.Module()
                block.conv1 = nn.Conv2d(self.widths[prev_res], self.widths[inner], 3, stride, 1, bias=False)
                block.conv2 = nn.Conv2d(self.widths[inner], self.widths[res], 3, 1, 1, bias=False)
                if project:
                    block.shortcut = nn.Conv2d(self.widths[prev_res], self.widths[res], 1, stride, bias=False)
                self.blocks.append(block)
                self._declare(f"blocks.{idx}.conv1", inner, prev_res)
                self._declare(f"blocks.{idx}.conv2", res, inner)
                self._norm(f"norm{idx}_1", inner)
                self._norm(f"norm{idx}_2", res)
                if project:
                    self._declare(f"blocks.{idx}.shortcut", res, prev_res)
                    self._norm(f"norm{idx}_sc", res)
                self.block_plan.append((prev_res, inner, res, project, idx))
                prev_res = res
        self.classifier = nn.Linear(self.widths["res4"], num_classes)
        self._declare("classifier", CLASSES, "res4")

    def forward(self, x):
        x = F.relu(self.unit(self.stem(x), "res1", self.stem_norm))
        for _, inner, res, project, idx in self.block_plan:
            block = self.blocks[idx]
            out = F.relu(self.unit(block.conv1(x), inner, getattr(self, f"norm{idx}_1")))
            out = self.unit(block.conv2(out), res, getattr(self, f"norm{idx}_2"))
            if project:
                x = self.unit(block.shortcut(x), res, getattr(self, f"norm{idx}_sc"))
            x = F.relu(out + x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class LogisticRegression(UnitModel):
    """Multinomial logistic regression, FedProx's model for its Synthetic data: one linear layer from
    the (flattened) input features to the class logits. It has no hidden units, so it has no unit
    group: the unit-based methods have nothing to shrink or mask (HeteroFL's and FedRolex's
    submodels are the whole model, FedLPS's masks are empty, so its keep ratio changes neither the
    training nor the cost); PruneFL prunes its weights like any other."""

    FULL: dict[str, int] = {}

    def __init__(self, num_classes: int, image_shape, widths=None, norm="bn", rate=1.0):
        super().__init__(widths, norm, rate)
        self.fc = nn.Linear(math.prod(image_shape), num_classes)
        self._declare("fc", CLASSES, None)

    def forward(self, x):
        return self.fc(x.flatten(1))


class MLP(UnitModel):
    """One hidden layer of 100 ReLU neurons (no normalisation: `norm` is ignored): fc1 features->100,
    fc2 100->classes. Its unit group is `fc1`, the hidden neurons: HeteroFL keeps the first
    ceil(p x 100) of them (fc1's rows, fc2's columns), FedRolex a window of them rolling each round,
    FedLPS masks neurons by learned importance (their outputs zeroed); PruneFL prunes weights."""

    FULL = {"fc1": 100}

    def __init__(self, num_classes: int, image_shape, widths=None, norm="bn", rate=1.0):
        super().__init__(widths, norm, rate)
        self.fc1 = nn.Linear(math.prod(image_shape), self.widths["fc1"])
        self.fc2 = nn.Linear(self.widths["fc1"], num_classes)
        self._declare("fc1", "fc1", None)
        self._declare("fc2", CLASSES, "fc1")

    def forward(self, x):
        return self.fc2(F.relu(self.unit(self.fc1(x.flatten(1)), "fc1")))


MODEL_NAMES = ("cnn", "vgg11", "vgg13", "resnet18", "mlr", "mlp")


def resolve_model_name(name: str, dataset: str, image_shape) -> str:
    if name != "auto":
        return name
    if dataset == "synthetic":
        return "mlr"
    if dataset == "cifar100":
        return "vgg13"
    return "vgg11" if image_shape[0] == 3 else "cnn"


def build_model(name: str, num_classes: int, image_shape, widths: dict[str, int] | None = None,
                norm: str = "bn", rate: float = 1.0) -> UnitModel:
    if name == "cnn":
        return CNN(num_classes, image_shape, widths, norm, rate)
    if name in VGG_CONFIGS:
        return VGG(name, num_classes, image_shape, widths, norm, rate)
    if name == "resnet18":
        return ResNet18(num_classes, image_shape, widths, norm, rate)
    if name == "mlr":
        return LogisticRegression(num_classes, image_shape, widths, norm, rate)
    if name == "mlp":
        return MLP(num_classes, image_shape, widths, norm, rate)
    raise ConfigError("model.name", f"unknown model {name!r}")


def prefix_width(units: int, ratio: float) -> int:
    """HeteroFL's width: ceil(ratio * units), at least one unit."""
    return max(1, min(units, math.ceil(ratio * units - 1e-9)))
