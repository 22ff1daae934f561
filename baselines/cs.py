"""CS, Complement Sparsification (Jiang and Borcea, "Complement Sparsification: Low-Overhead Model
Pruning for Federated Learning", AAAI 2023): the server sends a sparse global model, the clients send
back the complementary sparse model (the weights the server had pruned), and the server merges the
two into a dense model, which it prunes again.

Official code: github XJ8/complement-sparsification-FL at 2153adf5221346097939631e88aee6e7334681a5
(Flower and TensorFlow): `fem_sim.py` (`FlwrClient.fit`, `SaveModelStrategy.aggregate_fit`) and
`flip_prune.py` (`flip_prune`, `dataless_prune`). `variant: official` (the default) follows it:
- round 0: the global model is dense; clients train it and send it whole; the server takes the
  sample-weighted mean (Flower's FedAvg);
- the server then prunes every conv and linear kernel (the classifier included:
  `harness.sparsity.layer_weights`, as tfmot's prune_low_magnitude on the whole model) by
  magnitude to sparsity `sparsity` (0.5: per kernel the round(n x (1 - s)) weights of largest |w|
  stay, as tfmot's magnitude pruning keeps them) and broadcasts that sparse model;
- round t >= 1: each client trains the sparse model densely (every weight, the pruned ones starting
  from zero) and sends its kernels only at the coordinates the server had pruned (the complement),
  other tensors whole; the server's sample-weighted mean of them is, on a kernel, zero where the
  server kept weights, so kernel = sparse global + `server_lr` (1.5, `fem_sim.py`) x mean complement,
  and every other tensor is the mean; then it prunes again.
The official code picks the pruning mask by one epoch of tfmot pruning on server-side data and then
applies that mask to the aggregated model (`dataless_prune`); the paper's method needs no server
data, so here the mask is the aggregated model's own magnitudes.
Evaluation: the sparse global model, as the official code's evaluation function receives it (client
view = global view).
Kept weights never take a client update: they change only by leaving the mask. With this project's
local SGD (lr 0.1, a few dozen steps) the complement, trained from zero, stays smaller than the kept
weights, so the magnitude mask does not change and the broadcast model does not learn (quickstart,
20 rounds: 15 % accuracy); the official code trains its clients with Adam (lr 0.01), whose steps do
not shrink with the gradient, and picks the mask from a copy fine-tuned one epoch on server-side
data. This variant reproduces the algorithm, not that optimiser.
Costs: clients train every weight, so FLOPs are the dense model's (3 x flop_counter forward x samples
processed): CS saves communication, not client computation. Bytes down: the sparse model (values of
the kept kernel weights plus their locations, bitmap or indices, and every other tensor); bytes up:
the complement's values (4 bytes each; the server knows its own mask) and every other tensor; round
0 dense both ways.

`variant: reference`: the FedLPS authors' port (sunnyxuejj/FedLPS at
35fafba2171fac0b0de374ffcd2a85eb40bc975e, `CS.py`, script `script_baselines/CS/mnist_CS.sh`:
--mask_rate 0.5), which is not complementary. Its quirks, each marked `Reference quirk`:
- from round 1 on the server prunes the global model before broadcasting it (`mask`): per masked
  weight (all conv/linear weights but the classifier), the values with |w| above the 50th
  percentile (numpy, linear interpolation) stay, the others become 0, and the pruned model replaces
  the global model;
- clients train it densely and prune their update before sending it (`prune`): per masked weight
  the values with |delta| at least the 50th percentile of |delta| stay (the update's largest half,
  not the complement of the server's mask); other tensors whole; round 0 unpruned;
- aggregation (`agg/avg.py:avg`): global + the plain mean of the updates (the sample counts are
  collected and unused) + Gaussian noise of std 0.001 on every tensor (unseeded there; here from
  (seed, "cs-noise", round));
- evaluation: the aggregated model, before the next round's pruning;
- costs as the code counts them: FLOPs by the density rule on the received model's nonzero weights,
  counted before training (`count_training_flops` on the pruned model), although every weight then
  trains; bytes down 4 per nonzero masked weight and per other value (`stat_param_sizes`), bytes up
  4 per nonzero value of the update (`ul_cost`), no locations.
In both variants the tier never limits the model: the caps only set the compute speed.

Shared with the rest of fedbench: weight masks, magnitude selection, the density rule, byte counts,
update mean (harness/sparsity.py), seeding (harness/seeding.py); clients train plain dense jobs, so
they batch as FedAvg's do.
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
from harness.sparsity import (Masks, apply_masks, density, layer_weights, masked_bytes, masked_forward_flops,
                              mean_update, nonzero_bytes, nonzero_densities, prunable_weights, reference_noise,
                              top_magnitude)
from harness.strategy import Client, MethodParams, Strategy
from harness.submodel import state_bytes
from harness.training import LocalJob


def complement_masks(state: dict[str, torch.Tensor], names: list[str], sparsity: float) -> Masks:
    """Official: per kernel the round(n x (1 - sparsity)) weights of largest |w|."""
    return {n: top_magnitude(state[n], int(round(state[n].numel() * (1 - sparsity)))) for n in names}


def above_percentile(t: torch.Tensor, percent: float, strict: bool) -> torch.Tensor:
    """Reference: bool mask of |t| above (strict) or at least the `percent`-th percentile of |t|."""
    threshold = float(np.percentile(t.detach().abs().cpu().numpy(), percent))
    return t.abs() > threshold if strict else t.abs() >= threshold


class CSParams(MethodParams):  # clip_grad_norm: None (neither code clips)
    variant: Literal["official", "reference"] = "official"
    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of each kernel the server prunes "
                                                          "(reference: --mask_rate)")
    server_lr: float = Field(1.5, gt=0, description="official: factor on the clients' complement")
    reference_noise: float = Field(0.001, ge=0, description="reference: std of the aggregate's noise")


class _CSRules:
    """What both halves derive from the parameters."""

    def __init__(self, bench, params):
        super().__init__(bench, params)
        self.reference = params.variant == "reference"
        self.masked = prunable_weights(bench.layout) if self.reference else layer_weights(bench.layout)


class CSClient(_CSRules, Client):
    def local_job(self, broadcast, task: ClientTask) -> LocalJob:
        return self.bench.job(task, broadcast["state"], clip_grad_norm=self.params.clip_grad_norm)

    def local_result(self, broadcast, task: ClientTask, job: LocalJob) -> ClientResult:
        bench, stats = self.bench, job.stats
        start, masks = broadcast["state"], broadcast["masks"]
        trained = {k: v.cpu() for k, v in job.trained.items() if k in start}
        if self.reference:
            payload = {k: w - start[k] for k, w in trained.items()}
            if task.round > 0:
                # Reference quirk (CS.py `prune`): the update's largest half per masked weight.
                payload = apply_masks(payload, {n: above_percentile(payload[n], self.params.sparsity * 100,
                                                                    strict=False) for n in self.masked})
            densities = nonzero_densities(start, self.masked)
            flops = training_flops(masked_forward_flops(bench.flops, densities), stats.samples)
            bytes_down = nonzero_bytes(start, self.masked)
            bytes_up = sum(int((v != 0).sum()) * v.element_size() for v in payload.values())
            share = sum(densities[n] * start[n].numel() for n in self.masked) / sum(start[n].numel() for n in self.masked)
        else:
            flops = training_flops(bench.flops.forward(), stats.samples)
            if masks is None:
                payload, bytes_down, bytes_up, share = trained, state_bytes(start), state_bytes(trained), 1.0
            else:
                complement = {n: ~m for n, m in masks.items()}
                payload = apply_masks(trained, complement)
                bytes_down = masked_bytes(start, masks)
                bytes_up = masked_bytes(payload, complement, locations=False)
                share = density(masks)
        return ClientResult(task.client_id, task.round, payload=payload, num_samples=len(job.y),
                            train_loss=stats.loss, train_acc=stats.accuracy, keep_ratio=share, flops=flops,
                            bytes_up=bytes_up, bytes_down=bytes_down, metrics={"density": share})



class CS(_CSRules, Strategy):
    Client = CSClient
    Params = CSParams
    title = "CS"
    client_columns = {"density": pa.float64()}

    @classmethod
    def check(cls, params, model, cfg):
        if not layer_weights(model.layout):
            raise ConfigError("model.name", "CS needs a model with conv or linear layers")

    def setup(self, store):
        super().setup(store)
        self.global_state = self.bench.init_global_state()
        self.masks: Masks | None = None  # official: the server's mask (None: the model is dense)

    def configure(self, rnd, clients):
        if self.reference and rnd > 0:
            # Reference quirk (CS.py `mask`): the global model itself is pruned before broadcasting.
            pruned = {n: above_percentile(self.global_state[n], self.params.sparsity * 100, strict=True)
                      for n in self.masked}
            self.global_state = apply_masks(self.global_state, pruned)
        return {"state": self.global_state, "masks": self.masks}, [None] * len(clients)

    # -- server side -------------------------------------------------------------------------------
    def aggregate(self, rnd, kept, dropped):
        """Dropped clients change nothing."""
        if not kept:
            return {}
        if self.reference:
            new_state = mean_update(self.global_state, [r.payload for r in kept])
            # Reference quirk (agg/avg.py:avg): Gaussian noise on every tensor of the aggregate.
            self.global_state = reference_noise(new_state, self.params.reference_noise, self.bench.cfg.seed,
                                                "cs-noise", rnd)
            return {}
        total = float(sum(r.num_samples for r in kept))
        mean = {k: sum(r.num_samples * r.payload[k] for r in kept) / total for k in self.global_state}
        if self.masks is not None:
            for n in self.masked:
                mean[n] = self.global_state[n] + self.params.server_lr * mean[n]
        self.masks = complement_masks(mean, self.masked, self.params.sparsity)
        self.global_state = apply_masks(mean, self.masks)
        return {}

    def evaluate(self, rnd):
        return self.bench.evaluate_global(self.global_state)

    def state_dict(self):
        return {"global_state": self.global_state, "masks": self.masks}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
        self.masks = state["masks"]
