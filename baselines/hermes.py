"""Hermes (Li, Sun, Li, Pu, Li and Chen, "Hermes: an efficient federated learning framework for
heterogeneous mobile clients", MobiCom 2021): each client finds a small personalised subnetwork by
structured pruning, and the server averages only the parameters that overlap.

Official code: none was found (the public code index searched by name and title; the FedLPS authors'
port is the only implementation found); `official` follows the paper as far as it is known: structured (channel/unit) pruning driven by a group-lasso
penalty, only the subnetworks' parameters travel, the server averages each parameter over the
clients whose subnetwork holds it, and each client keeps a personalised structured sparse network.

`variant: official` (the default), round t, client k:
1. Its subnetwork (personal state): the units it kept in every unit group (harness/models.py), all
   of them before it first prunes. It receives that subnetwork of the global model, built physically
   smaller (harness.submodel.extract), so FLOPs, memory and bytes really shrink.
2. If the subnetwork's accuracy on the client's validation images exceeds `prune_start_acc` and its
   parameters are still more than `prune_end_rate` of the dense model's, it prunes: in every group
   the floor(`prune_percent` / 100 x kept units) units whose incoming weights have the smallest L2
   norm (the group-lasso groups) go, at least one unit staying.
3. Local SGD on the subnetwork with loss = cross-entropy + `lam` x sum over masked layers and units
   of ||W_u||_2 (group lasso, which drives whole units towards zero).
4. Upload: the trained subnetwork and the indices of its units.
Server: every global coordinate becomes the plain mean over the kept clients whose subnetwork holds
it (overlap-only averaging, harness.submodel.aggregate with weight 1); coordinates no client held
keep their value.

Evaluation: client view: every client with its subnetwork of the current global model (a client
that never pruned: the dense global model); global view: the global model.

Costs: FLOPs measured with flop_counter on the subnetwork that trains (3 x forward FLOPs at its
widths x samples processed); bytes down: the subnetwork's values; bytes up: the trained
subnetwork's values plus one bit per unit of the dense model (which units it kept). The
validation pass that decides pruning is inference and, as every method's evaluation, not charged.

`variant: reference`: the FedLPS authors' port (sunnyxuejj/FedLPS at
35fafba2171fac0b0de374ffcd2a85eb40bc975e, `Hermes.py`, script `script_baselines/Hermes/mnist_Hermes.sh`:
--prune_start_acc 0.5 --prune_end_rate 0.5), a different method; each quirk is marked
`Reference quirk` where it is implemented:
- no physical subnetwork: the client trains the dense model with the pruned units' weight rows at
  zero and frozen (gradients times the mask, `Client.train`); their biases, and the weights that
  read their outputs, still train;
- pruning (`Client.prune_by_percentile`, --prune_percent 10): per masked weight, the units whose L1
  row norm is below the 10th percentile (numpy's linear interpolation) of the nonzero row norms go;
  the test uses the received model's validation accuracy (`prune_start_acc`) and the fraction of
  nonzero parameters (`pruning_rate`, computed right after pruning) against `prune_end_rate`;
- the group lasso of `Client.loss` is computed from `param.data` (no gradient) and returns after the
  first parameter: it never changes training, so it is left out;
- aggregation (`agg/avg.py:avg`; the overlap-only `average_weights_with_masks` is commented out):
  global + the plain mean over the clients of their updates, zero where a client's mask is zero,
  + Gaussian noise of std 0.001 on every tensor (unseeded there; here from (seed, "hermes-noise",
  round));
- evaluation (`__main__`): every client with the aggregated global model masked by its row masks
  (a client that never pruned: the global model);
- costs as the code counts them: FLOPs by the density rule on the trained model's nonzero weights
  (`count_training_flops(full=False)`), bytes 4 per nonzero masked weight and per other value, no
  locations (`stat_param_sizes`), both ways.
In both variants the tier never limits the model: the caps only set the compute speed.

Shared with the rest of fedbench: unit index sets, extraction and count-normalised aggregation of
harness/submodel.py (as HeteroFL); weight masks, the density rule, byte counts, update mean and
personalised evaluation of harness/sparsity.py; the update masks of harness/training.py's LocalJob;
seeding from harness/seeding.py.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from harness.cost import training_flops
from harness.errors import ConfigError
from harness.records import ClientResult, ClientTask
from harness.sparsity import (Masks, apply_masks, evaluate_personal, masked_forward_flops, mean_update,
                              model_holding, nonzero_bytes, nonzero_densities, prunable_weights, reference_noise,
                              validation_accuracy)
from harness.strategy import Client, MethodParams, Strategy
from harness.submodel import Contribution, IndexSets, aggregate, extract, state_bytes, widths_of
from harness.training import LocalJob, LocalRule


def prune_units(norms: dict[str, torch.Tensor], kept: IndexSets, percent: float) -> IndexSets:
    """Official: per group drop the floor(percent / 100 x kept) kept units of smallest norm (ties to
    the lower index), at least one unit staying. `norms[g]` holds the norms of the kept units, in the
    order of `kept[g]`."""
    out = {}
    for g, idx in kept.items():
        n_drop = min(int(percent / 100 * len(idx)), len(idx) - 1)
        order = torch.sort(norms[g], stable=True).indices
        out[g] = torch.sort(idx[order[n_drop:]]).values
    return out


def percentile_row_masks(weights: dict[str, torch.Tensor], percent: float) -> Masks:
    """Reference (`Client.prune_by_percentile`): per weight, keep the rows whose L1 norm is not below
    the `percent`-th percentile of the nonzero row norms."""
    out = {}
    for name, w in weights.items():
        norms = w.detach().abs().flatten(1).sum(1).cpu()
        alive = norms[norms != 0].numpy()
        threshold = float(np.percentile(alive, percent)) if len(alive) else 0.0
        out[name] = ~(norms < threshold)
    return out


def row_masks_to_weights(rows: Masks, shapes: dict[str, torch.Size]) -> Masks:
    """Row masks (one bool per output unit) expanded to weight masks."""
    return {n: r.view(-1, *([1] * (len(shapes[n]) - 1))).expand(shapes[n]).clone() for n, r in rows.items()}


class GroupLassoRule(LocalRule):
    """Official local objective: cross-entropy + lam x sum over the masked weights `names` and their
    units (rows) of ||W_u||_2."""

    def __init__(self, lam: float, names: list[str]):
        self.lam = lam
        self.names = tuple(names)

    def penalty(self, params, anchor):
        return self.lam * sum(params[n].flatten(1).norm(dim=1).sum() for n in self.names)


class HermesParams(MethodParams):  # clip_grad_norm: None (the port does not clip)
    variant: Literal["official", "reference"] = "official"
    prune_start_acc: float = Field(0.5, ge=0, le=1, description="validation accuracy above which a client prunes")
    prune_end_rate: float = Field(0.5, gt=0, le=1, description="a client stops pruning at this fraction "
                                                               "of the dense model's parameters")
    prune_percent: float = Field(10.0, gt=0, lt=100, description="percent of the kept units pruned at a time")
    lam: float = Field(0.001, ge=0, description="official: weight of the group-lasso penalty")
    reference_noise: float = Field(0.001, ge=0, description="reference: std of the aggregate's noise")


class _HermesRules:
    """What both halves derive from the parameters."""

    def __init__(self, bench, params):
        super().__init__(bench, params)
        self.reference = params.variant == "reference"
        self.masked = prunable_weights(bench.layout)
        self.shapes = {n: bench.param_shapes[n] for n in self.masked}
        self.dense_params = sum(s.numel() for s in bench.param_shapes.values())


class HermesClient(_HermesRules, Client):
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        return self._reference_job(global_state, task) if self.reference else self._official_job(global_state, task)

    def _official_job(self, global_state, task):
        bench, p = self.bench, self.params
        kept = task.state["index_sets"] if task.state is not None else {
            g: torch.arange(n) for g, n in bench.full_widths.items()}
        sub = extract(global_state, bench.layout, kept)
        spec = bench.spec(widths_of(bench.full_widths, kept))
        acc = validation_accuracy(bench, model_holding(bench, spec, sub), task.client_id)
        if acc > p.prune_start_acc and self._params_of(sub) > p.prune_end_rate * self.dense_params:
            kept = prune_units(self._unit_l2_norms(sub), kept, p.prune_percent)
            sub = extract(global_state, bench.layout, kept)
            spec = bench.spec(widths_of(bench.full_widths, kept))
        # The penalty reads no anchor; an empty one switches it on (LocalJob.anchor).
        rule = dict(rule=GroupLassoRule(p.lam, self.masked), anchor={}) if p.lam else {}
        return bench.job(task, sub, spec, clip_grad_norm=p.clip_grad_norm, context={"index_sets": kept, "start": sub},
                         **rule)

    def _params_of(self, state) -> int:
        return sum(v.numel() for k, v in state.items() if k in self.bench.param_shapes)

    def _unit_l2_norms(self, state) -> dict[str, torch.Tensor]:
        """Per unit group, the L2 norm of each unit's incoming weights over the group's layers."""
        norms: dict[str, torch.Tensor] = {}
        for n in self.masked:
            group = self.bench.layout[n][0].group
            sq = state[n].detach().pow(2).flatten(1).sum(1).cpu()
            norms[group] = sq if group not in norms else norms[group] + sq
        return {g: v.sqrt() for g, v in norms.items()}

    def _reference_job(self, global_state, task):
        bench, p = self.bench, self.params
        rows = task.state["rows"] if task.state is not None else None
        rate = task.state["rate"] if task.state is not None else 1.0
        masks = row_masks_to_weights(rows, self.shapes) if rows is not None else None
        start = apply_masks(global_state, masks) if masks is not None else dict(global_state)
        acc = validation_accuracy(bench, model_holding(bench, bench.spec(), start), task.client_id)
        if acc > p.prune_start_acc and rate > p.prune_end_rate:
            # Reference quirk (Client.prune_by_percentile): rows below the percentile of L1 norms go.
            rows = percentile_row_masks({n: start[n] for n in self.masked}, p.prune_percent)
            masks = row_masks_to_weights(rows, self.shapes)
            start = apply_masks(start, masks)
            rate = sum(int((v != 0).sum()) if k in self.masked else v.numel()
                       for k, v in start.items() if k in bench.param_shapes) / self.dense_params
        update_masks = {n: m.to(bench.device, torch.get_default_dtype()) for n, m in masks.items()} if masks else None
        return bench.job(task, start, clip_grad_norm=p.clip_grad_norm, update_masks=update_masks,
                         context={"rows": rows, "rate": rate, "masks": masks, "start": start})

    def local_result(self, global_state, task: ClientTask, job: LocalJob) -> ClientResult:
        bench, stats, ctx = self.bench, job.stats, job.context
        trained = {k: v.cpu() for k, v in job.trained.items() if k in job.start}
        if self.reference:
            update = {k: w - global_state[k] for k, w in trained.items()}
            if ctx["masks"] is not None:
                update = apply_masks(update, ctx["masks"])
            payload = update
            share = ctx["rate"]
            flops = training_flops(masked_forward_flops(bench.flops, nonzero_densities(trained, self.masked)),
                                   stats.samples)
            bytes_down, bytes_up = nonzero_bytes(ctx["start"], self.masked), nonzero_bytes(trained, self.masked)
            state = {"rows": ctx["rows"], "rate": ctx["rate"]} if ctx["rows"] is not None else None
        else:
            kept = ctx["index_sets"]
            payload = Contribution(trained, kept, weight=1.0)
            widths = widths_of(bench.full_widths, kept)
            share = self._params_of(trained) / self.dense_params
            flops = training_flops(bench.flops.forward(widths), stats.samples)
            bytes_down = state_bytes(ctx["start"])
            bytes_up = state_bytes(trained) + (sum(bench.full_widths.values()) + 7) // 8
            state = {"index_sets": kept}
        return ClientResult(
            task.client_id, task.round, payload=payload, num_samples=len(job.y), train_loss=stats.loss,
            train_acc=stats.accuracy, keep_ratio=share, flops=flops, bytes_up=bytes_up, bytes_down=bytes_down,
            metrics={"density": share}, state=state)



class Hermes(_HermesRules, Strategy):
    Client = HermesClient
    Params = HermesParams
    title = "Hermes"
    client_columns = {"density": pa.float64()}

    @classmethod
    def check(cls, params, model, cfg):
        if not prunable_weights(model.layout):
            raise ConfigError("model.name", "Hermes needs a model with conv or linear layers besides the classifier")

    def setup(self, store):
        super().setup(store)
        self.global_state = self.bench.init_global_state()

    def configure(self, rnd, clients):
        return self.global_state, [None] * len(clients)

    # -- server side -------------------------------------------------------------------------------
    def aggregate(self, rnd, kept, dropped):
        """Dropped clients change nothing (their update and their pruning never arrived)."""
        if self.reference:
            new_state = mean_update(self.global_state, [r.payload for r in kept])
            if kept:
                # Reference quirk (agg/avg.py:avg): Gaussian noise on every tensor of the aggregate.
                new_state = reference_noise(new_state, self.params.reference_noise, self.bench.cfg.seed,
                                            "hermes-noise", rnd)
            self.global_state = new_state
        else:
            self.global_state = aggregate(self.global_state, self.bench.layout, [r.payload for r in kept])
        return {}

    def evaluate(self, rnd):
        bench = self.bench

        def personal(cid):
            state = self.store.get(cid)
            if state is None:
                return None
            if self.reference:
                return bench.spec(), apply_masks(self.global_state, row_masks_to_weights(state["rows"], self.shapes))
            kept = state["index_sets"]
            return bench.spec(widths_of(bench.full_widths, kept)), extract(self.global_state, bench.layout, kept)

        return evaluate_personal(bench, self.global_state, personal)

    def state_dict(self):
        return {"global_state": self.global_state}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
