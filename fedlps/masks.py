"""Unit importance scores and unit masks for FedLPS (Xue et al., "Learnable Sparse Customization in
Heterogeneous Edge Computing", arXiv 2412.07216, Sec. on learnable sparse patterns).

Every maskable unit group g (every group of the model's `full_widths`: all conv and linear layers
except the classifier) has one score per unit, s_g in R^{N_g}. At keep ratio rho the mask keeps the
k_g = max(1, floor(rho * N_g)) units with the largest sigmoid(s_g); ties go to the lower unit index.

- `paper` variant: the forward pass uses the hard mask m, the backward pass treats it as
  m + sigmoid(s) - stopgrad(sigmoid(s)) (straight-through), so the task loss trains the scores.
- Regulariser lambda * sum_g mean_u (s_gu - sigmoid(||W_gu||_1))^2, per unit (paper) or against the
  layer's mean target (reference; see `score_regularizer`). The target is a constant (no gradient to
  the weights), as the authors' code computes it from `param.data`.
- Fixed-ratio ablation masks (the paper's comparison of sparsification strategies, authors' code
  sunnyxuejj/FedLPS_Ablation): random units, the units of largest L1 norm (magnitude), or the first
  units (ordered, a HeteroFL-style prefix). They are drawn once per round, as in that code.

`||W_gu||_1` is harness.submodel.unit_l1_norms: the unit's incoming conv/linear weights, summed over
the layers of a coupled group.

The `reference` variant's masks (the authors' Models.WeightLayer) differ: `reference_score_masks`
keeps the units strictly above the k-th largest sigmoid(score) (k - 1 of them), and
`weight_row_masks` masks only the masked units' incoming weights.
"""
from __future__ import annotations

import math

import torch

from harness.models import Dim

MASK_STRATEGIES = ("learnable", "random", "magnitude", "ordered")


def keep_count(units: int, rho: float) -> int:
    """k = max(1, floor(rho * units)); the epsilon keeps e.g. 0.3 * 10 at 3, not 2."""
    return max(1, min(units, math.floor(rho * units + 1e-9)))


def keep_widths(full_widths: dict[str, int], rho: float) -> dict[str, int]:
    return {g: keep_count(n, rho) for g, n in full_widths.items()}


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 float mask of the k largest entries of a 1-D tensor, ties to the lower index."""
    order = torch.sort(values.detach(), descending=True, stable=True).indices
    mask = torch.zeros_like(values, dtype=torch.float32)
    mask[order[:k]] = 1.0
    return mask


def score_masks(scores: dict[str, torch.Tensor], widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """Hard masks: per group the top widths[g] units by sigmoid(score)."""
    return {g: topk_mask(torch.sigmoid(s.detach()), widths[g]) for g, s in scores.items()}


def threshold_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Reference quirk (Models.WeightLayer.forward): the threshold is the smallest of the top k values
    and `nn.Threshold` keeps only the values strictly above it, so k - 1 units stay (fewer on ties
    at the threshold), none at k = 1."""
    threshold = torch.topk(values.detach(), k).values.min()
    return (values.detach() > threshold).float()


def reference_score_masks(scores: dict[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """The authors' masks: k = max(int(rho * N), 1) (a plain truncation), then `threshold_mask` on
    sigmoid(score)."""
    return {g: threshold_mask(torch.sigmoid(s.detach()), max(int(rho * len(s)), 1)) for g, s in scores.items()}


def weight_row_masks(layout: dict[str, tuple[Dim, ...]], shapes: dict[str, torch.Size],
                     unit_masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """0/1 masks over the incoming weights of the masked units only (the rows of every conv/linear
    weight whose output group is masked). Reference quirk (Models.WeightLayer.forward,
    Hetero_Client.update_weights_leanable): the authors mask `param.data` of the weights alone, so a
    masked unit's bias, its norm and the next layer's weights that read it are neither frozen nor
    left out of the upload."""
    masks = {}
    for name, shape in shapes.items():
        dims = layout.get(name, ())
        if len(dims) < 2 or len(shape) < 2 or dims[0].group not in unit_masks:
            continue
        rows = unit_masks[dims[0].group].float().view(-1, *([1] * (len(shape) - 1)))
        masks[name] = rows.expand(shape).contiguous()
    return masks


def straight_through(hard: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Forward value exactly `hard`; gradient d/ds = sigmoid'(s) times the mask's gradient."""
    soft = torch.sigmoid(scores)
    return hard + (soft - soft.detach())


def init_scores_paper(norms: dict[str, torch.Tensor], noise: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Paper variant, first participation: sigmoid(||W_u||_1) + noise * N(0, 1). The noise breaks the
    near-ties of wide layers, whose L1 norms saturate the sigmoid."""
    out = {}
    for g in sorted(norms):
        base = torch.sigmoid(norms[g].detach().float().cpu())
        out[g] = base + noise * torch.randn(base.shape, generator=generator)
    return out


def init_scores_reference(full_widths: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Reference variant (authors' WeightLayer): every round, random normal scores sorted in descending
    order, so the first mask of the round is the prefix of the layer."""
    return {g: torch.sort(torch.randn(n, generator=generator), descending=True).values
            for g, n in sorted(full_widths.items())}


def score_regularizer(scores: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], lam: float,
                      per_unit: bool = True) -> torch.Tensor:
    """lambda * sum_g mean_u (s_gu - t_gu)^2 with t = sigmoid(||W_gu||_1) (a constant).

    per_unit=False is the reference variant: the authors' code takes MSELoss between scores of shape
    (N, 1) and targets of shape (N,), which broadcasts to all N x N pairs; its value is
    mean_u (s_u - mean t)^2 + var(t) and its gradient 2 / N * (s_u - mean t). We use the first term:
    each score is pulled to the layer's mean target, with the same gradient (var(t) is a constant)."""
    total = None
    for g, s in scores.items():
        t = torch.sigmoid(norms[g].detach().to(s.dtype))
        if not per_unit:
            t = t.mean()
        term = ((s - t) ** 2).mean()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return lam * total


def fixed_masks(strategy: str, widths: dict[str, int], full_widths: dict[str, int],
                generator: torch.Generator | None = None,
                norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The ablations' masks, fixed for a round: `random` (uniform random units, from `generator`),
    `magnitude` (largest unit L1 norms `norms`, ties to the lower index), `ordered` (the first units)."""
    out = {}
    for g in sorted(full_widths):
        n, k = full_widths[g], widths[g]
        if strategy == "random":
            values = torch.rand(n, generator=generator)
        elif strategy == "magnitude":
            values = norms[g].detach().float().cpu()
        elif strategy == "ordered":
            values = torch.zeros(n)  # all tied: the stable sort keeps the first k
        else:
            raise ValueError(f"unknown fixed mask strategy {strategy!r}")
        out[g] = topk_mask(values, k)
    return out
