"""Weight masks, their costs and personalised evaluation, written once for the sparse methods
(Hermes, FedSpa, FedMP, CS in baselines/; PruneFL's weight masks are the same kind of mask).

A *weight mask* is a bool tensor per masked weight (True = in use). The masked weights of a model
are, unless a method says otherwise, those of `prunable_weights`: every conv and linear weight whose
rows are units (harness/models.py), i.e. all but the classifier, as in the FedLPS authors' code
(`mask_weight_indicator` without the last layer). Unit masks (structured pruning) become weight
masks through harness.submodel.coordinate_masks; physically smaller submodels through
harness.submodel.extract.

Costs (stated in every method's docstring):
- `masked_forward_flops`: forward FLOPs per sample by the density rule: each masked layer's FLOPs
  (measured with torch.utils.flop_counter, harness.cost.FlopMeter) times the layer's density, every
  other operation at full size. This is how the unstructured-sparsity papers (and the FedLPS
  authors' counter, `count_training_flops(full=False)`, which counts nonzero weights) count a
  sparse model's FLOPs; a dense kernel does not run faster on zeros.
- `masked_bytes`: 4-byte values of the kept coordinates of every masked tensor, plus (with
  `locations`) whichever locates them more cheaply, a bitmap or 32-bit indices
  (harness.cost.sparse_bytes); every other floating-point tensor in full.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from harness.cost import FlopMeter, sparse_bytes
from harness.models import CLASSES, Dim, ModelSpec
from harness.records import Evaluation
from harness.seeding import rng
from harness.training import correct_per_sample, load_tensors

Masks = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


def prunable_weights(layout: dict[str, tuple[Dim, ...]]) -> list[str]:
    """The conv and linear weights whose rows are units: every one but the classifier."""
    return [n for n, dims in layout.items()
            if n.endswith("weight") and len(dims) >= 2 and dims[0].group not in (None, CLASSES)]


def layer_weights(layout: dict[str, tuple[Dim, ...]]) -> list[str]:
    """Every conv and linear weight, the classifier included."""
    return [n for n, dims in layout.items() if n.endswith("weight") and len(dims) >= 2]


def top_magnitude(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the `keep` entries of largest |value|, ties to the lower flat index."""
    order = torch.sort(values.detach().abs().flatten(), descending=True, stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mask[order[:keep]] = True
    return mask.view(values.shape)


def keep_counts(shapes: dict[str, torch.Size], density: float, distribution: str = "uniform") -> dict[str, int]:
    """Weights kept per layer for an overall `density`.

    uniform: floor(density x n) in every layer (the FedLPS authors' `_weights_by_layer`).
    erk: Erdos-Renyi-Kernel (Evci et al., RigL): layer l's density is proportional to
    sum(shape) / prod(shape), scaled so that the kept total is density x all weights; a layer whose
    density would exceed 1 is dense and the others are rescaled."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    if distribution == "uniform":
        return {n: int(math.floor(density * n_w + 1e-9)) for n, n_w in sizes.items()}
    if distribution != "erk":
        raise ValueError(f"unknown layer distribution {distribution!r}")
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        free = [n for n in shapes if n not in dense]
        scale = budget / sum(raw[n] * sizes[n] for n in free) if free else 0.0
        over = [n for n in free if scale * raw[n] > 1]
        if not over:
            break
        dense.update(over)
    return {n: sizes[n] if n in dense else int(math.floor(scale * raw[n] * sizes[n] + 1e-9)) for n in shapes}


def random_masks(shapes: dict[str, torch.Size], counts: dict[str, int], generator: torch.Generator) -> Masks:
    """Per layer, `counts[n]` coordinates drawn uniformly at random."""
    out = {}
    for n in sorted(shapes):
        numel = math.prod(shapes[n])
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[torch.randperm(numel, generator=generator)[:counts[n]]] = True
        out[n] = mask.view(shapes[n])
    return out


def apply_masks(state: State, masks: Masks) -> State:
    """The state with masked-out coordinates set to zero."""
    return {k: v * masks[k].to(v.device, v.dtype) if k in masks else v.clone() for k, v in state.items()}


def density(masks: Masks) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0


# -- costs --------------------------------------------------------------------------------------------
def masked_forward_flops(meter: FlopMeter, densities: dict[str, float], widths: dict[str, int] | None = None) -> float:
    """Forward FLOPs per sample of the model at `widths` whose weights `densities` (name -> kept
    fraction) are masked: the density rule of the module docstring."""
    per_weight = meter.per_weight(widths)
    return float(meter.forward(widths)) - sum(per_weight[n] * (1.0 - d) for n, d in densities.items())


def mask_densities(masks: Masks) -> dict[str, float]:
    return {n: float(m.float().mean()) for n, m in masks.items()}


def nonzero_densities(state: State, names: list[str]) -> dict[str, float]:
    """Per weight, the fraction of nonzero values (how the FedLPS authors' counter sees sparsity)."""
    return {n: float((state[n] != 0).float().mean()) for n in names}


def masked_bytes(state: State, masks: Masks, locations: bool = True) -> int:
    """Bytes of `state` sent sparsely at `masks` (module docstring)."""
    total = 0
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        if k in masks:
            kept = int(masks[k].sum())
            total += sparse_bytes(kept, v.numel(), v.element_size()) if locations else kept * v.element_size()
        else:
            total += v.numel() * v.element_size()
    return total


def location_bytes(masks: Masks) -> int:
    """Bytes that say where the kept coordinates are: per mask a bitmap or 32-bit indices, whichever
    is smaller."""
    return sum(min((m.numel() + 7) // 8, 4 * int(m.sum())) for m in masks.values())


def nonzero_bytes(state: State, names: list[str]) -> int:
    """The FedLPS authors' `stat_param_sizes` in bytes: 4 per nonzero value of the masked weights
    `names`, 4 per value of every other floating-point tensor; no locations."""
    return sum(int((v != 0).sum()) * v.element_size() if k in names else v.numel() * v.element_size()
               for k, v in state.items() if v.is_floating_point())


# -- aggregation ---------------------------------------------------------------------------------------
def mean_update(global_state: State, updates: list[State]) -> State:
    """global + the plain mean of the clients' updates (a coordinate a client did not train counts as
    a zero update). No updates: the global state unchanged."""
    if not updates:
        return global_state
    new = {}
    for k, g in global_state.items():
        total = torch.zeros_like(g)
        for u in updates:
            if k in u:
                total += u[k].to(g.dtype)
        new[k] = g + total / len(updates)
    return new


def reference_noise(state: State, std: float, seed: int, purpose: str, rnd: int) -> State:
    """The FedLPS authors' `agg/avg.py:avg` adds N(0, dp^2) (dp = 0.001) to every tensor of the
    aggregate from the unseeded torch generator; here it is drawn from (seed, purpose, round)."""
    if std <= 0:
        return state
    gen = rng(seed, purpose, rnd)
    return {k: v + std * torch.from_numpy(gen.standard_normal(tuple(v.shape))).to(v.dtype) for k, v in state.items()}


# -- evaluation ----------------------------------------------------------------------------------------
def validation_accuracy(bench, model: torch.nn.Module, client: int) -> float:
    """`model`'s accuracy on the client's validation samples (NaN: it has none)."""
    x, y = bench.clients.val_data(client)
    if not len(y):
        return math.nan
    return float(correct_per_sample(model, x, y, bench.dataset.normalize).float().mean())


def model_holding(bench, spec: ModelSpec, state: State) -> torch.nn.Module:
    """This process's model of `spec` holding `state` (no unit masks)."""
    model, fresh = bench.model(spec)
    load_tensors(model, {k: v.to(bench.device) for k, v in state.items()}, fresh)
    model.unit_masks = {}
    return model


def evaluate_personal(bench, global_state: State,
                      personal: Callable[[int], tuple[ModelSpec, State] | None]) -> Evaluation:
    """The client view: each client with its personalised model `personal(client)` (a spec and its
    tensors), a client without one (None) with the global model; the global view: the global model
    on every client's test sets."""
    dense = bench.evaluate_global(global_state)
    clients = {kind: acc.copy() for kind, acc in dense.clients.items()}
    for k, cid in enumerate(bench.clients.eval_ids):  # the order of Evaluation's arrays
        own = personal(int(cid))
        if own is None:
            continue
        for kind, acc in bench.accuracy_on_client(model_holding(bench, *own), int(cid)).items():
            clients[kind][k] = acc
    return Evaluation(clients=clients, global_clients=dense.clients, acc_global=dense.acc_global)
