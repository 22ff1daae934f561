"""Submodels, aggregation and masks by unit index sets: written once, used by every method.

An *index set* per unit group (harness/models.py) names the units a client keeps; a group that is
absent keeps all its units. From the model's layout this gives, for every tensor, the coordinates a
client holds: `extract` cuts them out (to build a physically smaller model), `aggregate` puts many
clients' tensors back into the global model as a weighted mean over the clients holding each
coordinate, and `coordinate_masks` turns unit masks into masks over tensor coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.models import CLASSES, Dim

State = dict[str, torch.Tensor]
IndexSets = dict[str, torch.Tensor]


def prefix_index_sets(full_widths: dict[str, int], widths: dict[str, int]) -> IndexSets:
    """The first `widths[g]` units of every group (HeteroFL)."""
    return {g: torch.arange(widths[g]) for g in full_widths}


def rolling_index_sets(full_widths: dict[str, int], widths: dict[str, int], start: int) -> IndexSets:
    """A window of `widths[g]` consecutive units starting at `start`, wrapping around (FedRolex)."""
    return {g: torch.sort((start + torch.arange(widths[g])) % n).values for g, n in full_widths.items()}


def widths_of(full_widths: dict[str, int], index_sets: IndexSets) -> dict[str, int]:
    return {g: len(index_sets[g]) if g in index_sets else n for g, n in full_widths.items()}


def _dim_index(dim: Dim, index_sets: IndexSets) -> torch.Tensor | None:
    if dim.group is None or dim.group == CLASSES or dim.group not in index_sets:
        return None
    idx = index_sets[dim.group]
    if dim.repeat > 1:
        idx = (idx[:, None] * dim.repeat + torch.arange(dim.repeat)).reshape(-1)
    return idx


AxisIndex = dict[tuple[str, int], torch.Tensor]  # (tensor name, axis) -> the global coordinates kept there


def extract(state: State, layout: dict[str, tuple[Dim, ...]], index_sets: IndexSets,
            axis_index: AxisIndex | None = None) -> State:
    """The tensors of the submodel that keeps `index_sets` (same names, smaller shapes). `axis_index`
    gives the kept coordinates of some tensor axes directly, instead of from their unit group."""
    out = {}
    for name, tensor in state.items():
        t = tensor
        for axis, dim in enumerate(layout.get(name, ())):
            idx = _axis_index(name, axis, dim, index_sets, axis_index)
            if idx is not None:
                t = t.index_select(axis, idx)
        out[name] = t.clone() if t is tensor else t
    return out


def _axis_index(name: str, axis: int, dim: Dim, index_sets: IndexSets, axis_index: AxisIndex | None):
    if axis_index and (name, axis) in axis_index:
        return axis_index[(name, axis)]
    return _dim_index(dim, index_sets)


def _as_slice(idx: torch.Tensor | None) -> slice | None:
    """The same coordinates as a slice when they are all of the axis or one increasing run."""
    if idx is None:
        return slice(None)
    n = idx.numel()
    if n and int(idx[-1]) - int(idx[0]) == n - 1 and bool((idx.diff() == 1).all()):
        return slice(int(idx[0]), int(idx[0]) + n)
    return None


def _region(name: str, dims: tuple[Dim, ...], index_sets: IndexSets, shape: torch.Size, axis_index: AxisIndex | None):
    """Indices addressing a client's coordinates in a global tensor: slices (a view, updated in place)
    where every axis is whole or one run of units, broadcastable index tensors otherwise."""
    if not dims:
        return (...,)
    indices = [_axis_index(name, axis, dim, index_sets, axis_index) for axis, dim in enumerate(dims)]
    slices = [_as_slice(idx) for idx in indices]
    if all(s is not None for s in slices):
        return tuple(slices)
    region = []
    for axis, idx in enumerate(indices):
        if idx is None:
            idx = torch.arange(shape[axis])
        view = [1] * len(dims)
        view[axis] = -1
        region.append(idx.view(view))
    return tuple(region)


@dataclass
class Contribution:
    """One client's tensors for aggregation.

    `weight` scales the client in the mean (1 for count-normalised, its sample count for FedAvg);
    `class_rows` (bool per class) restricts the classifier rows it updates (HeteroFL's label split);
    `coordinate_weights` (per tensor, of the client tensor's shape) further weights each coordinate:
    0/1 masks of the coordinates it really used (PruneFL), or counters (FedRolex's reference variant);
    `axis_index` as for `extract`."""

    state: State
    index_sets: IndexSets = field(default_factory=dict)
    weight: float = 1.0
    class_rows: torch.Tensor | None = None
    coordinate_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    axis_index: AxisIndex | None = None


def aggregate(global_state: State, layout: dict[str, tuple[Dim, ...]],
              contributions: list[Contribution]) -> State:
    """Every coordinate becomes the weighted mean over the contributions that hold it; coordinates
    that no contribution holds keep their global value. Contributions are summed in list order."""
    new_state = {}
    for name, g in global_state.items():
        if not g.is_floating_point():
            new_state[name] = g.clone()
            continue
        dims = layout.get(name, ())
        total = torch.zeros_like(g)
        count = torch.zeros_like(g)
        for c in contributions:
            if name not in c.state:
                continue
            values = c.state[name].to(g.dtype)
            weight = float(c.weight)
            if c.class_rows is not None and dims and dims[0].group == CLASSES:
                weight = weight * c.class_rows.to(g.dtype).view(-1, *([1] * (values.dim() - 1)))
            if name in c.coordinate_weights:
                weight = weight * c.coordinate_weights[name].to(g.dtype)
            region = _region(name, dims, c.index_sets, g.shape, c.axis_index)
            total[region] += weight * values
            count[region] += weight
        new_state[name] = torch.where(count > 0, total / count.clamp_min(1e-30), g)
    return new_state


def coordinate_masks(layout: dict[str, tuple[Dim, ...]], shapes: dict[str, torch.Size],
                     unit_masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """0/1 masks over tensor coordinates: a coordinate is kept when every unit it belongs to
    (its output unit, and the input unit it reads) is kept. Tensors that no masked group touches
    are left out."""
    masks = {}
    for name, shape in shapes.items():
        dims = layout.get(name, ())
        mask = None
        for axis, dim in enumerate(dims):
            if dim.group not in unit_masks:
                continue
            m = unit_masks[dim.group].float()
            if dim.repeat > 1:
                m = m.repeat_interleave(dim.repeat)
            view = [1] * len(shape)
            view[axis] = -1
            m = m.view(view)
            mask = m if mask is None else mask * m
        if mask is not None:
            masks[name] = mask.expand(shape).contiguous()
    return masks


def state_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if t.is_floating_point())


def unit_l1_norms(state: State, layout: dict[str, tuple[Dim, ...]]) -> dict[str, torch.Tensor]:
    """Per unit group, the L1 norm of each unit's incoming conv/linear weights (every coordinate of
    the unit's row, whatever inputs it reads), summed over the layers of a coupled group. Norm
    parameters, biases and the classifier are left out."""
    norms: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        dims = layout.get(name, ())
        if len(dims) < 2 or tensor.dim() < 2 or dims[0].group in (None, CLASSES):
            continue
        norm = tensor.detach().abs().sum(dim=tuple(range(1, tensor.dim())))
        group = dims[0].group
        norms[group] = norm if group not in norms else norms[group] + norm
    return norms
