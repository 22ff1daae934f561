"""Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021).

A global model trained by FedAvg, and per client a personal model v_k kept close to it by a
proximal term: min_v F_k(v) + lam/2 ||v - w^t||^2.

Every sampled client, in one round:
1. global update: FedAvg's local SGD from the received global model w^t (uploaded);
2. personal update: local SGD from its personal model v_k on F_k(v) + lam/2 ||v - w^t||^2
   (`DittoRule`, anchored at w^t; gradient grad F_k(v) + lam (v - w^t)), with the same minibatches
   as the global update (the official code takes one minibatch per local iteration for both).
   v_k starts as the initial model w^0 (the paper's Algorithm 1, v_k^0 = w^0; the official code's
   `local_models` are copies of the initial model) and is the client's personal state (client
   store, checkpointed); it never travels.
The two updates are independent (both start from what the client holds), so they train as two jobs
of one step of the client's work, batched with the other clients' jobs of their kind.
The server takes the sample-weighted mean of the global models (as FedAvg; the official code's
`simple_average` of the updates is unweighted: the other baselines here weight by samples).
Evaluation: each client with its personal model; a client that never trained with w^0 (its v_k^0).
Costs: both trainings (2 x 3 x forward FLOPs x samples); bytes: the dense model down and up.

Official code: github litian96/ditto at 26d9b29a62f3872dcdf071be08e897607c283bb4,
`flearn/trainers_MTL/ditto.py`, `Server.train` (personal step `eff_grad = grads + lam *
(local_model - global_model)`, then the global step on the same `data_batch`); lam = 1 as in its
scripts (`run_fashion_clean_ditto_lam1.sh`). A dropped (late) client has still updated its personal
model, and keeps it.

Variant `reference` (`method.variant: reference`): the FedLPS authors' port (sunnyxuejj/FedLPS at
35fafba2171fac0b0de374ffcd2a85eb40bc975e, `Ditto.py` and `Client.py`; not in their run scripts).
Its quirks, each implemented where the comment `Reference quirk` names it:
- the global update `Client.update_weights` ends by loading the trained local model into
  `model_trans`, which is Ditto's personal model: the personal update then starts from the client's
  freshly trained local model, not from its previous personal model (nothing persists across rounds);
- `Client_Ditto.update_weights_ditto` adds lam x ||p - w^t|| per tensor, summed (a norm, not half its
  square), with lam = `--lamda` = 0.001, for `--local_ep` epochs on a new shuffle of the data;
- `__main__` aggregates the full models with `agg/avg.py:avg`, the aggregator of updates:
  w^{t+1} = mean_k(w_k) + w^t + N(0, 0.001^2) noise, unweighted: the global model about doubles
  every round and diverges (its numbers become NaN within some tens of rounds on the MNIST protocol);
- the cost lines count only the global update (`train_result['train_flops']`); fedbench's clock
  counts both trainings, which the client really runs (stated, not mirrored: costs are measured);
- evaluation with the personal models only; a never-selected client with its own freshly
  initialised network (`model_trans`, a copy of its own `local_net`).
"""
from __future__ import annotations


import torch
from pydantic import Field

from baselines.fedavg import FedAvg, FedAvgParams, with_authors_noise
from baselines.personal import PERSONAL_COLUMNS, PersonalAccuracies, own_initial_accuracies, personal_metrics
from harness.cost import training_flops
from harness.records import ClientResult, ClientTask
from harness.seeding import torch_generator
from harness.strategy import Client
from harness.submodel import state_bytes
from harness.training import LocalRule


class DittoRule(LocalRule):
    """Local SGD on the cross-entropy plus lam/2 ||v - anchor||^2 (the anchor: the round's global model)."""

    def __init__(self, lam: float):
        self.lam = lam

    def penalty(self, params, anchor):
        return self.lam / 2 * sum(((params[n] - anchor[n]) ** 2).sum() for n in anchor)


class DittoNormRule(LocalRule):
    """Reference quirk (Ditto.py, update_weights_ditto): lam x sum over tensors of ||v - anchor||."""

    def __init__(self, lam: float):
        self.lam = lam

    def penalty(self, params, anchor):
        return self.lam * sum(torch.linalg.vector_norm(params[n] - anchor[n]) for n in anchor)


class DittoParams(FedAvgParams):  # variant, reference_noise
    lam: float | None = Field(None, ge=0, allow_inf_nan=False,
                              description="weight of the proximal term (default: official 1, reference 0.001)")

    @property
    def lam_value(self) -> float:
        if self.lam is not None:
            return self.lam
        return 0.001 if self.variant == "reference" else 1.0


class DittoClient(Client):
    def work(self, global_state, task: ClientTask):
        bench, p = self.bench, self.params
        anchor = {k: v.to(bench.device) for k, v in global_state.items()}
        global_job = bench.job(task, global_state, clip_grad_norm=p.clip_grad_norm)
        if p.variant == "reference":
            yield global_job
            # Reference quirk (Client.update_weights loads the trained local model into model_trans):
            # the personal update starts from the freshly trained local model, on a new shuffle.
            start = {k: v for k, v in global_job.trained.items() if k in global_state}
            personal_job = bench.job(task, start, clip_grad_norm=p.clip_grad_norm, rule=DittoNormRule(p.lam_value),
                                     anchor=anchor,
                                     generator=torch_generator(bench.cfg.seed, "ditto-personal", task.round,
                                                               task.client_id))
            yield personal_job
        else:
            start = task.state["personal"] if task.state is not None else bench.init_global_state()
            # the same data order as the global update (bench.job's default generator is a function
            # of (seed, round, client))
            personal_job = bench.job(task, start, clip_grad_norm=p.clip_grad_norm, rule=DittoRule(p.lam_value),
                                     anchor=anchor)
            yield [global_job, personal_job]
        trained = {k: v.cpu() for k, v in global_job.trained.items() if k in global_state}
        personal = {k: v.cpu() for k, v in personal_job.trained.items() if k in global_state}
        size = state_bytes(trained)
        accuracies = bench.accuracy_on_client(bench.trained_model(personal_job), task.client_id)
        forward = bench.flops.forward()
        return ClientResult(
            task.client_id, task.round, payload=trained, num_samples=len(global_job.y),
            train_loss=global_job.stats.loss, train_acc=global_job.stats.accuracy, keep_ratio=1.0,
            flops=training_flops(forward, global_job.stats.samples + personal_job.stats.samples),
            bytes_up=size, bytes_down=size, metrics=personal_metrics(accuracies),
            state=None if p.variant == "reference" else {"personal": personal})


class Ditto(FedAvg):
    Client = DittoClient
    Params = DittoParams
    title = "Ditto"
    client_columns = PERSONAL_COLUMNS
    stores_state_of_dropped = True  # a late client has updated its personal model all the same

    def setup(self, store):
        super().setup(store)
        self.personal = PersonalAccuracies(self.bench.clients.eval_ids)
        self._fallback = None

    def aggregate(self, rnd, kept, dropped):
        """Official: the sample-weighted mean of the kept global updates (dropped ones are lost).
        Every client that trained, kept or not, has a new personal model."""
        if self.params.variant == "reference" and kept:
            # Reference quirk (Ditto.py __main__ with agg/avg.py `avg`): full models aggregated as
            # updates: mean_k(w_k) + w^t, unweighted, plus noise.
            summed = {k: torch.stack([r.payload[k].to(v.dtype) for r in kept]).mean(0) + v
                      for k, v in self.global_state.items()}
            self.global_state = with_authors_noise(summed, self.bench.cfg.seed, "ditto", rnd,
                                                   self.params.reference_noise)
        elif self.params.variant != "reference":
            super().aggregate(rnd, kept, dropped)
        self.personal.record(kept + dropped)
        return {}

    def evaluate(self, rnd):
        bench = self.bench
        if self._fallback is None:
            if self.params.variant == "reference":
                self._fallback = own_initial_accuracies(bench)
            else:  # v_k^0 = w^0
                self._fallback = bench.evaluate_global(bench.init_global_state()).clients
        return self.personal.evaluation(self._fallback, bench.evaluate_global(self.global_state))

    def state_dict(self):
        return {**super().state_dict(), "personal_acc": self.personal.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.personal.load_state_dict(state["personal_acc"])
