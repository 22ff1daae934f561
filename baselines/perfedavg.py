"""Per-FedAvg (Fallah, Mokhtari and Ozdaglar, "Personalized Federated Learning with Theoretical
Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020).

FedAvg of a meta-model: a model that is good after one local gradient step.

1. Local training (`PerFedAvgRule`, the paper's Algorithm 1): every local step draws independent
   minibatches D, D' (and D'' for the Hessian-free version) from the client's data, here the next
   two (three) minibatches of its epochs' permutations, so each sample is used `train.epochs` times
   as in FedAvg:
       w~ = w - alpha grad f(w; D)                                   (the inner, personalising step)
       FO: w <- w - beta grad f(w~; D')
       HF: w <- w - beta (I - alpha Hess f(w; D'')) grad f(w~; D')  (an exact Hessian-vector product)
   beta is the round's learning rate (train.lr x lr_decay^t; with the job's weight decay, momentum
   and clipping), alpha is `alpha`; `version` picks FO or HF.
2. The server takes the sample-weighted mean of the client models (as FedAvg).
3. Evaluation (as the paper evaluates): every client adapts the global model by one step of size
   alpha on one minibatch of its own training data (`train.batch_size` samples drawn from
   (seed, round, client)), then is tested with it. A client needs no personal state: one that never
   trained adapts the global model the same way. The adaptation is the deployed model, not
   training: its FLOPs are not charged.
Costs: FO: 3 x forward FLOPs x samples (each sample is in one gradient); HF: the same for D and D'
plus, per sample of D'', the FLOPs of a Hessian-vector product measured by torch.utils.flop_counter
(`hvp_flops_per_sample`). Bytes: the dense model down and up.

Official code: none was published (Plato's port says so); this follows the paper's Algorithm 1 and
its FO/HF updates. The paper tunes alpha and beta; alpha defaults to 0.01 here.

Variant `reference` (`method.variant: reference`): the FedLPS authors' port (sunnyxuejj/FedLPS at
35fafba2171fac0b0de374ffcd2a85eb40bc975e, `PerFedAvg.py`; scripted in
`script_baselines/PerFedAvg/mnist_PerFedAvg.sh` with the protocol's arguments only), itself taken
from lgcollins/FedRep's `LocalUpdateMAML`. Its quirks, each implemented where the comment
`Reference quirk` names it:
- `Client_PerFedAvg.update_weights_perFedavg` computes adapted weights (`names_weights_copy`, inner
  rate lr x 0.001) that nothing uses: the second forward pass runs the unadapted network on the same
  minibatch, so each step is a plain SGD step on grad f(w; D): FedAvg's local training;
- its cost line charges two forward-backward passes per minibatch (`2 * len(loader) *
  count_training_flops`), which its client really runs (the first gradient, with create_graph, is
  computed and discarded); fedbench charges the same 2 x 3 x forward FLOPs x samples and computes
  the gradient once (the second is identical);
- aggregation `agg/avg.py:average_weights`: sample-weighted mean plus N(0, 0.001^2) noise on every
  tensor;
- the per-round client view (`__main__`, the `test accuracy` print) tests each client with its
  `local_net`: the model of its latest local training (not adapted); a never-selected client with
  its own freshly initialised network (each client builds its own model). The final
  "Last Personalized" fine-tune after the last round is not a per-round number and is not mirrored.
"""
from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.flop_counter import FlopCounterMode

from baselines.fedavg import FedAvg, FedAvgClient, FedAvgParams
from baselines.personal import (PERSONAL_COLUMNS, PersonalAccuracies, cohort_accuracies, own_initial_accuracies,
                                personal_metrics)
from harness.cost import training_flops
from harness.models import build_model
from harness.records import ClientResult, ClientTask, Evaluation
from harness.seeding import torch_generator
from harness.submodel import state_bytes
from harness.training import LocalJob, LocalRule


class PerFedAvgRule(LocalRule):
    """One Per-FedAvg step from 2 (FO) or 3 (HF) minibatches."""

    def __init__(self, alpha: float, hessian_free: bool):
        self.alpha = alpha
        self.hessian_free = hessian_free
        self.batches_per_step = 3 if hessian_free else 2

    def step(self, ops, params, batches):
        inner = ops.grad(params, batches[0])
        adapted = {n: params[n] - self.alpha * inner[n] for n in params}
        outer = ops.grad(adapted, batches[1])
        if self.hessian_free:
            curvature = ops.hvp(params, batches[2], outer)
            outer = {n: outer[n] - self.alpha * curvature[n] for n in outer}
        return ops.sgd(params, outer)


def step_batch_sizes(n: int, batch_size: int, epochs: int, per_step: int,
                     max_steps: int | None = None) -> list[list[int]]:
    """The sizes of the minibatches of each local step (harness.batched.schedule.client_steps: a
    step takes the next `per_step` minibatches; those left over at the end make no step)."""
    per_epoch = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    sizes = per_epoch * epochs
    steps = [sizes[i:i + per_step] for i in range(0, len(sizes) - per_step + 1, per_step)]
    return steps if max_steps is None else steps[:max_steps]


@functools.cache
def hvp_flops_per_sample(model_name: str, num_classes: int, image_shape: tuple[int, ...]) -> int:
    """FLOPs of one Hessian-vector product of the cross-entropy (forward-over-reverse) for one sample,
    measured on the meta device like harness.cost.FlopMeter."""
    with torch.device("meta"):
        model = build_model(model_name, num_classes, image_shape)
        x = torch.empty(1, *image_shape)
        y = torch.zeros(1, dtype=torch.long)
    params = dict(model.named_parameters())

    def loss(p):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    with FlopCounterMode(display=False) as counter:
        torch.func.jvp(torch.func.grad(loss), (params,), ({k: torch.empty_like(v) for k, v in params.items()},))
    return int(counter.get_total_flops())


class PerFedAvgParams(FedAvgParams):  # variant, reference_noise
    version: Literal["fo", "hf"] = Field("fo", description="first-order (FO) or Hessian-free (HF) meta-step")
    alpha: float = Field(0.01, gt=0, allow_inf_nan=False,
                         description="the inner (personalisation) step size; beta is train.lr")


class PerFedAvgClient(FedAvgClient):
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        p = self.params
        if p.variant == "reference":
            # Reference quirk (PerFedAvg.py, update_weights_perFedavg): the adapted weights are never
            # used, so the step is plain SGD on the gradient at w (FedAvg's local training).
            return self.bench.job(task, global_state, clip_grad_norm=p.clip_grad_norm)
        return self.bench.job(task, global_state, clip_grad_norm=p.clip_grad_norm,
                              rule=PerFedAvgRule(p.alpha, p.version == "hf"))

    def local_result(self, global_state, task: ClientTask, job: LocalJob) -> ClientResult:
        bench, p = self.bench, self.params
        trained = {k: v.cpu() for k, v in job.trained.items() if k in global_state}
        size = state_bytes(trained)
        forward = bench.flops.forward()
        metrics = {}
        if p.variant == "reference":
            # Reference quirk (PerFedAvg.py, train_flops): two forward-backward passes per minibatch.
            flops = 2 * training_flops(forward, job.stats.samples)
            # Reference quirk (PerFedAvg.py, __main__): the client view is the client's trained model.
            metrics = personal_metrics(bench.accuracy_on_client(bench.trained_model(job), task.client_id))
        elif p.version == "fo":
            flops = training_flops(forward, job.stats.samples)
        else:
            steps = step_batch_sizes(len(job.y), job.train.batch_size, job.train.epochs, 3, job.max_steps)
            gradient_samples = sum(s[0] + s[1] for s in steps)
            hvp_samples = sum(s[2] for s in steps)
            flops = (training_flops(forward, gradient_samples) +
                     hvp_samples * hvp_flops_per_sample(bench.model_name, bench.num_classes, bench.image_shape))
        return ClientResult(
            task.client_id, task.round, payload=trained, num_samples=len(job.y), train_loss=job.stats.loss,
            train_acc=job.stats.accuracy, keep_ratio=1.0, flops=float(flops), bytes_up=size, bytes_down=size,
            metrics=metrics)


class PerFedAvg(FedAvg):
    Client = PerFedAvgClient
    Params = PerFedAvgParams
    title = "Per-FedAvg"
    client_columns = PERSONAL_COLUMNS
    stores_state_of_dropped = True  # reference: a late client has still trained its local_net

    def setup(self, store):
        super().setup(store)
        self.personal = PersonalAccuracies(self.bench.clients.eval_ids)
        self._own_initial = None

    def aggregate(self, rnd, kept, dropped):
        """Sample-weighted mean of the kept client models; dropped updates are lost."""
        # reference: plus the authors' noise (agg/avg.py `average_weights`), as FedAvg's reference variant
        super().aggregate(rnd, kept, dropped)
        if self.params.variant == "reference":
            # a dropped (late) client has trained its local_net all the same
            self.personal.record(kept + dropped)
        return {}

    def evaluate(self, rnd):
        bench = self.bench
        global_view = bench.evaluate_global(self.global_state)
        if self.params.variant == "reference":
            if self._own_initial is None:
                self._own_initial = own_initial_accuracies(bench)
            return self.personal.evaluation(self._own_initial, global_view)
        return Evaluation(clients=self.adapted_accuracies(rnd), global_clients=global_view.clients,
                          acc_global=global_view.acc_global)

    def adapted_accuracies(self, rnd: int) -> dict[str, np.ndarray]:
        """Each evaluated client's accuracy with the global model after one step of size alpha on one
        of its training minibatches (in eval_ids order)."""
        bench, alpha = self.bench, self.params.alpha

        def prepare(model, cid):
            bench.load(model, self.global_state)
            x, y = bench.train_data(cid)
            if len(y):
                order = torch.randperm(len(y), generator=torch_generator(bench.cfg.seed, "perfedavg-adapt", rnd, cid))
                batch = order[:bench.cfg.train.batch_size].to(x.device)
                model.train()
                params = list(model.parameters())
                grads = torch.autograd.grad(F.cross_entropy(model(x[batch]), y[batch]), params)
                with torch.no_grad():
                    torch._foreach_add_(params, list(grads), alpha=-alpha)
            return True

        return cohort_accuracies(bench, prepare)

    def state_dict(self):
        return {**super().state_dict(), "personal_acc": self.personal.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.personal.load_state_dict(state["personal_acc"])
