"""FedSpa (Huang, Liu, Shen, He, Lin and Tao, "Achieving Personalized Federated Learning with Sparse
Local Models", 2022): personalised sparse masks of fixed density that evolve by prune-and-regrow.

Official code: none could be obtained here (no snapshot of github huangtiansheng/fedspa exists in
this workplace, and the code index holds no other FedSpa repository); `official` follows the paper
as far as it is known. The method optimises one global model x for mean_k f_k(x * m_k): client k's personalised model
is x masked by its own mask m_k.

`variant: official` (the default), round t, client k:
1. Its mask m_k (personal state, kept by the client): at its first participation a random mask per
   masked weight (`harness.sparsity.prunable_weights`: every conv/linear weight but the classifier),
   with the layer densities of `distribution` (Erdos-Renyi-Kernel, as the sparse-training work FedSpa
   builds on; overall density 1 - `sparsity`), drawn from (seed, "fedspa-mask", client).
2. It trains x * m_k by local SGD with the masked coordinates frozen at zero (update masks): sparse
   to sparse, a fixed number of active weights throughout.
3. Prune and regrow (`prune_and_regrow`): per layer, drop the a_t fraction of its active weights of
   smallest |w|, then activate as many inactive weights (the dropped ones included) of largest |g|,
   g the dense gradient of the trained model on one minibatch of the client's data (drawn from
   (seed, "fedspa-grow", round, client)); the density stays exactly the same. a_t =
   `readjust_fraction` / 2 x (1 + cos(pi t / T_end)), T_end = `readjust_end` (default: the
   experiment's rounds), 0 from T_end on (cosine annealing).
4. Upload: the update (trained - x) * m_k (the mask it trained with) of the masked weights, the full
   update of every other tensor, and the new mask's locations.
Server: x += the plain mean over the kept clients of their updates (a coordinate outside a client's
mask counts as a zero update: the gradient of mean_k f_k(x * m_k)).

Evaluation: client view: every client with x * m_k, its current mask (a client that never trained:
its initial mask); global view: x.

Costs: FLOPs = 3 x forward FLOPs by the density rule (harness/sparsity.py: each masked layer's
flop_counter FLOPs times its density, as the sparse-training papers count them) x samples processed,
plus one dense forward and backward pass on the regrowth minibatch (3 x dense forward x its size).
Bytes down: the values of x at m_k (4 bytes each; the server knows the mask it was last sent) and
every unmasked tensor; bytes up: the update's values at m_k plus the new mask's locations (bitmap
or 32-bit indices, whichever is smaller) and every unmasked tensor.

`variant: reference`: the FedLPS authors' port (sunnyxuejj/FedLPS at
35fafba2171fac0b0de374ffcd2a85eb40bc975e, `FedSpa.py`, script `script_baselines/FedSpa/mnist_FedSpa.sh`:
--sparsity 0.5), which is a different method; each quirk is marked `Reference quirk` where it is
implemented:
- no initial mask: a client trains the dense model until the received model's accuracy on its
  validation images exceeds `prune_start_acc` (0.5, the option's default; `Client_FedSpa.train`);
- then `prune_by_layer` keeps the floor(0.5 n) weights of largest |w| per masked layer of the received
  model, which the server has already masked with the client's mask: from then on the mask never
  changes. Its `prune_by_dst` (the prune-and-regrow step) runs with its default sparsity 0.4, whose
  prune step only removes weights that are already zero, and grows weights_by_layer(0.5) - nonzeros
  = 0 weights: it changes nothing and is not reproduced. So the port is one-shot magnitude pruning
  with a fixed personal mask, without regrowth;
- training zeroes the gradients of weights whose value is below 1e-9: the pruned ones (update masks);
- aggregation (`agg/avg.py:avg`): x + the plain mean of the masked updates + Gaussian noise of std
  0.001 on every tensor (unseeded there; here from (seed, "fedspa-noise", round));
- evaluation (`__main__`): every client with the aggregated x masked by its mask; a client that never
  pruned (no mask) with x itself;
- costs as the code counts them: FLOPs by the density rule on the trained model's nonzero weights
  (`count_training_flops(full=False)`), bytes 4 per nonzero masked weight and per other value, no
  locations (`stat_param_sizes`), both ways.
The tier never limits the model (in both variants): the caps only set the compute speed.

Shared with the rest of fedbench: the masks, density rule, byte counts, update mean and personalised
evaluation of harness/sparsity.py; the update masks of harness/training.py's LocalJob (so the clients
batch); seeding from harness/seeding.py.
"""
from __future__ import annotations

import math
from typing import Literal

import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field

from harness.cost import training_flops
from harness.errors import ConfigError
from harness.records import ClientResult, ClientTask
from harness.seeding import torch_generator
from harness.sparsity import (Masks, apply_masks, density, evaluate_personal,
                              keep_counts, location_bytes, mask_densities, masked_bytes, masked_forward_flops, mean_update,
                              model_holding, nonzero_bytes, nonzero_densities, prunable_weights, random_masks,
                              reference_noise, top_magnitude, validation_accuracy)
from harness.strategy import Client, MethodParams, Strategy
from harness.training import LocalJob


def readjust_fraction(t: int, alpha: float, t_end: int) -> float:
    """a_t = alpha / 2 x (1 + cos(pi t / t_end)) before t_end, 0 from then on."""
    return 0.0 if t >= t_end else alpha / 2 * (1 + math.cos(math.pi * t / t_end))


def prune_and_regrow(weights: dict[str, torch.Tensor], masks: Masks, grads: dict[str, torch.Tensor],
                     fraction: float) -> Masks:
    """Per layer: drop floor(fraction x active) active weights of smallest |w|, then activate as many
    inactive ones (the just dropped included) of largest |grad|; ties go to the lower flat index.
    Every layer keeps exactly its number of active weights."""
    out = {}
    for name, mask in masks.items():
        flat = mask.flatten().clone()
        active = flat.nonzero().squeeze(1)
        n = int(math.floor(fraction * len(active) + 1e-9))
        if n:
            w = weights[name].detach().flatten().abs().cpu()
            drop = active[torch.sort(w[active], stable=True).indices[:n]]
            flat[drop] = False
            inactive = (~flat).nonzero().squeeze(1)
            g = grads[name].detach().flatten().abs().cpu()
            flat[inactive[torch.sort(g[inactive], descending=True, stable=True).indices[:n]]] = True
        out[name] = flat.view(mask.shape)
    return out


class FedSpaParams(MethodParams):  # clip_grad_norm: None (neither the paper nor the port clips)
    variant: Literal["official", "reference"] = "official"
    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of the masked weights removed")
    distribution: Literal["erk", "uniform"] | None = Field(
        None, description="layer densities of the official masks (default erk)")
    readjust_fraction: float = Field(0.3, ge=0, le=1, description="official: a_0 of the cosine schedule")
    readjust_end: int | None = Field(None, gt=0, description="official: T_end (default: the rounds)")
    prune_start_acc: float = Field(0.5, ge=0, le=1, description="reference: validation accuracy "
                                                                "above which the client prunes")
    reference_noise: float = Field(0.001, ge=0, description="reference: std of the aggregate's noise")


class _FedSpaRules:
    """What both halves derive from the parameters: the masked weights and their kept counts."""

    def __init__(self, bench, params):
        super().__init__(bench, params)
        self.reference = params.variant == "reference"
        self.masked = prunable_weights(bench.layout)
        self.shapes = {n: bench.param_shapes[n] for n in self.masked}
        self.counts = keep_counts(self.shapes, 1 - params.sparsity,
                                  "uniform" if self.reference else (params.distribution or "erk"))

    def initial_masks(self, client_id: int) -> Masks:
        """Official: the client's first mask, a function of (seed, client)."""
        return random_masks(self.shapes, self.counts, torch_generator(self.bench.cfg.seed, "fedspa-mask", client_id))


class FedSpaClient(_FedSpaRules, Client):
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        bench = self.bench
        masks = task.state["masks"] if task.state is not None else None
        if not self.reference and masks is None:
            masks = self.initial_masks(task.client_id)
        start = apply_masks(global_state, masks) if masks is not None else dict(global_state)
        if self.reference:
            # Reference quirk (Client_FedSpa.train): prune once the received model's validation
            # accuracy exceeds prune_start_acc; repeated every round, it keeps the mask it finds.
            acc = validation_accuracy(bench, model_holding(bench, bench.spec(), start), task.client_id)
            if acc > self.params.prune_start_acc:
                masks = {n: top_magnitude(start[n], self.counts[n]) for n in self.masked}
                start = apply_masks(start, masks)
        update_masks = {n: m.to(bench.device, torch.get_default_dtype()) for n, m in masks.items()} if masks else None
        return bench.job(task, start, clip_grad_norm=self.params.clip_grad_norm, update_masks=update_masks,
                         context={"masks": masks, "start": start})

    def local_result(self, global_state, task: ClientTask, job: LocalJob) -> ClientResult:
        bench = self.bench
        masks, start = job.context["masks"], job.context["start"]
        trained = {k: v.cpu() for k, v in job.trained.items() if k in global_state}
        update = {k: w - global_state[k] for k, w in trained.items()}
        if masks is not None:
            update = apply_masks(update, masks)
        stats = job.stats
        if self.reference:
            forward = masked_forward_flops(bench.flops, nonzero_densities(trained, self.masked))
            flops = training_flops(forward, stats.samples)
            bytes_down, bytes_up = nonzero_bytes(start, self.masked), nonzero_bytes(trained, self.masked)
            new_masks = masks
        else:
            fraction = readjust_fraction(task.round, self.params.readjust_fraction,
                                         self.params.readjust_end or bench.cfg.rounds)
            grads, grow_samples = self._regrowth_gradients(job, task)
            new_masks = prune_and_regrow(trained, masks, grads, fraction)
            flops = (training_flops(masked_forward_flops(bench.flops, mask_densities(masks)), stats.samples)
                     + training_flops(bench.flops.forward(), grow_samples))
            bytes_down = masked_bytes(start, masks, locations=False)
            bytes_up = masked_bytes(update, masks, locations=False) + location_bytes(new_masks)
        share = density(masks) if masks is not None else 1.0
        return ClientResult(
            task.client_id, task.round, payload=update, num_samples=len(job.y), train_loss=stats.loss,
            train_acc=stats.accuracy, keep_ratio=share, flops=flops, bytes_up=bytes_up, bytes_down=bytes_down,
            metrics={"density": share}, state={"masks": new_masks} if new_masks is not None else None)

    def _regrowth_gradients(self, job: LocalJob, task: ClientTask) -> tuple[dict[str, torch.Tensor], int]:
        """Official: the dense gradient of the trained model's loss on one minibatch of the client's
        data, drawn from (seed, "fedspa-grow", round, client); and that minibatch's size."""
        if not len(job.y):
            return {n: torch.zeros(s) for n, s in self.shapes.items()}, 0
        gen = torch_generator(self.bench.cfg.seed, "fedspa-grow", task.round, task.client_id)
        batch = torch.randperm(len(job.y), generator=gen)[:job.train.batch_size].to(job.x.device)
        model = self.bench.trained_model(job)
        model.unit_masks = {}
        model.train()
        params = dict(model.named_parameters())
        loss = F.cross_entropy(model(job.x[batch]), job.y[batch])
        grads = torch.autograd.grad(loss, [params[n] for n in self.masked])
        return {n: g.detach().cpu() for n, g in zip(self.masked, grads)}, len(batch)



class FedSpa(_FedSpaRules, Strategy):
    Client = FedSpaClient
    Params = FedSpaParams
    title = "FedSpa"
    client_columns = {"density": pa.float64()}

    @classmethod
    def check(cls, params, model, cfg):
        if not prunable_weights(model.layout):
            raise ConfigError("model.name", "FedSpa needs a model with conv or linear layers besides the classifier")

    def setup(self, store):
        super().setup(store)
        self.global_state = self.bench.init_global_state()

    def configure(self, rnd, clients):
        return self.global_state, [None] * len(clients)

    # -- server side -------------------------------------------------------------------------------
    def aggregate(self, rnd, kept, dropped):
        """Dropped clients change nothing (their update and their new mask never arrived)."""
        new_state = mean_update(self.global_state, [r.payload for r in kept])
        if self.reference and kept:
            # Reference quirk (agg/avg.py:avg): Gaussian noise on every tensor of the aggregate.
            new_state = reference_noise(new_state, self.params.reference_noise, self.bench.cfg.seed,
                                        "fedspa-noise", rnd)
        self.global_state = new_state
        return {}

    def personal_masks(self, client_id: int) -> Masks | None:
        state = self.store.get(client_id)
        if state is not None:
            return state["masks"]
        return None if self.reference else self.initial_masks(client_id)

    def evaluate(self, rnd):
        spec = self.bench.spec()

        def personal(cid):
            masks = self.personal_masks(cid)
            return None if masks is None else (spec, apply_masks(self.global_state, masks))

        return evaluate_personal(self.bench, self.global_state, personal)

    def state_dict(self):
        return {"global_state": self.global_state}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
