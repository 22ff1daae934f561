"""FedRep (Collins, Hassani, Mokhtari and Shakkottai, "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021).

A shared body (the representation) and a personal head per client.

Every sampled client, in one round:
1. head epochs: local SGD on its head with the received body frozen (`head_epochs`, default 10);
2. body epochs: local SGD on the body with its new head frozen (`body_epochs`, default 1);
3. it uploads the body only; its head is its personal state (client store, checkpointed).
The server takes the sample-weighted mean of the bodies (the official code weights by samples;
`weighting: uniform`: the plain mean).
The head is the model's last linear layer (the paper's; the official CNNs' last fc layer).
A client's first head is the server's head: the initial model's (heads never travel, so the server
holds no trained head; the official code instead averages heads too and a never-selected client
reads that average through aliased tensors, which the paper's protocol, body only, does not send).
Evaluation: each client with the global body and its own head; a client that never trained with
the global body and the initial head, which is also the global view (the global model).
Costs: head epochs run the forward pass and back-propagate through the head only: (forward + 2 x
head forward FLOPs) x samples; body epochs 3 x forward FLOPs x samples. Bytes: the body down and up.

Official code: github lgcollins/FedRep at d82e62982e107bb3322541604f059c0ff28bd289,
`models/Update.py` `LocalUpdate.train` (head epochs = local_ep - local_rep_ep with the body frozen,
then the body; its scripts: `--local_ep 11 --local_rep_ep 1`: 10 head epochs, 1 body epoch) and
`main_fedrep.py` (the weighted mean of the body, `w_glob_keys`). Its optimiser (lr 0.01, momentum
0.5, weight decay 1e-4, batch 10) is replaced by the experiment's training settings, as for every
method.

Variant `reference` (`method.variant: reference`): the FedLPS authors' port (sunnyxuejj/FedLPS at
35fafba2171fac0b0de374ffcd2a85eb40bc975e, `FedRep.py` and `Client.py`; not in their run scripts).
Its quirks, each implemented where the comment `Reference quirk` names it:
- `__main__` fixes `client_all_epoch = 7` and `personal_epoch = 2`: 2 head epochs then 5 body
  epochs whatever `--local_ep` says (the defaults of `head_epochs`, `body_epochs` here);
- the personal layers are the last four entries of the model's state (`layers[-4:]`): on the
  MNIST CNN fc1 and fc2, so the shared body is the two convolutions;
- `Client.reset_optimizer` builds SGD over the parameters that require gradients at that moment,
  and a client's previous round ended with its head frozen: from its second round on, the
  optimiser holds only the body and the two head epochs compute (forward and head backward) but
  change nothing: a head is trained in its client's first round only;
- a client's first head is its own freshly initialised one (each client builds its own network),
  and a never-selected client is evaluated with the global body and that head;
- aggregation `agg/avg.py:avg` of the body updates: unweighted mean plus N(0, 0.001^2) noise;
- its cost line charges full training FLOPs for all 7 epochs; fedbench counts what runs (above).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from pydantic import Field

from baselines.fedavg import FedAvgParams, with_authors_noise
from baselines.personal import cohort_accuracies, own_initial_model
from harness.cost import training_flops
from harness.records import ClientResult, ClientTask, Evaluation
from harness.seeding import torch_generator
from harness.strategy import Client, Strategy
from harness.submodel import Contribution, aggregate, state_bytes


class FedRepParams(FedAvgParams):  # variant, reference_noise
    head_epochs: int | None = Field(None, gt=0, description="head epochs (default: official 10, reference 2)")
    body_epochs: int | None = Field(None, gt=0, description="body epochs (default: official 1, reference 5)")

    def epochs(self) -> tuple[int, int]:
        reference = self.variant == "reference"
        return (self.head_epochs or (2 if reference else 10)), (self.body_epochs or (5 if reference else 1))


def head_names(bench, reference: bool) -> tuple[str, ...]:
    """The personal head's parameters: the last linear layer (official); the last four parameter
    tensors (reference quirk, FedRep.py `personal_layers = layers[-4:]`)."""
    model = bench.build(device="meta")
    names = [n for n, _ in model.named_parameters()]
    if reference:
        return tuple(names[-4:])
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return tuple(n for n, p in model.named_parameters() if any(p is q for q in last.parameters()))


def head_forward_flops(bench, head: tuple[str, ...]) -> int:
    """Forward FLOPs of one sample in the head's layers."""
    per_weight = bench.flops.per_weight()
    return sum(per_weight.get(n, 0) for n in head)


class FedRepClient(Client):
    def work(self, body, task: ClientTask):
        bench, p = self.bench, self.params
        reference = p.variant == "reference"
        head = head_names(bench, reference)
        head_epochs, body_epochs = p.epochs()
        if task.state is not None:
            own_head = task.state["head"]
        elif reference:
            # Reference quirk (Client(local_net=all_models[...]) per client): its own initial head.
            own_head = {n: v for n, v in own_initial_model(bench, task.client_id).items() if n in head}
        else:
            own_head = body["initial_head"]
        start = {**body["body"], **own_head}
        train = bench.cfg.train
        zeros = lambda names: {n: torch.zeros(bench.param_shapes[n], device=bench.device) for n in names}  # noqa: E731
        frozen = [n for n in bench.param_shapes if n not in head]
        if reference and task.state is not None:
            # Reference quirk (Client.reset_optimizer keeps only the parameters that require
            # gradients, and the last round left the head frozen): the head epochs change nothing.
            frozen = list(bench.param_shapes)
        head_job = bench.job(task, start, clip_grad_norm=p.clip_grad_norm, update_masks=zeros(frozen),
                             train=train.model_copy(update={"epochs": head_epochs}))
        yield head_job
        body_job = bench.job(task, {k: v for k, v in head_job.trained.items() if k in start},
                             clip_grad_norm=p.clip_grad_norm, update_masks=zeros(head),
                             train=train.model_copy(update={"epochs": body_epochs}),
                             generator=torch_generator(bench.cfg.seed, "fedrep-body", task.round, task.client_id))
        yield body_job
        trained = {k: v.cpu() for k, v in body_job.trained.items() if k in body["body"]}
        forward = bench.flops.forward()
        flops = ((forward + 2 * head_forward_flops(bench, head)) * head_job.stats.samples +
                 training_flops(forward, body_job.stats.samples))
        return ClientResult(
            task.client_id, task.round, payload=trained, num_samples=len(body_job.y),
            train_loss=body_job.stats.loss, train_acc=body_job.stats.accuracy, keep_ratio=1.0, flops=float(flops),
            bytes_up=state_bytes(trained), bytes_down=state_bytes(body["body"]),
            state={"head": {k: v.cpu() for k, v in body_job.trained.items() if k in head}})


class FedRep(Strategy):
    Client = FedRepClient
    Params = FedRepParams
    title = "FedRep"
    stores_state_of_dropped = True  # a late client has trained its head all the same

    def setup(self, store):
        super().setup(store)
        self.head = head_names(self.bench, self.params.variant == "reference")
        self.global_state = self.bench.init_global_state()  # its head stays the initial one

    def configure(self, rnd, clients):
        body = {k: v for k, v in self.global_state.items() if k not in self.head}
        initial_head = {k: v for k, v in self.global_state.items() if k in self.head}
        return {"body": body, "initial_head": initial_head}, [None] * len(clients)

    def aggregate(self, rnd, kept, dropped):
        """The mean of the kept bodies (official: sample-weighted; reference: unweighted plus noise);
        dropped updates are lost."""
        reference = self.params.variant == "reference"
        uniform = reference or self.params.weighting == "uniform"
        contributions = [Contribution(r.payload, weight=1.0 if uniform else r.num_samples) for r in kept]
        new_state = aggregate(self.global_state, self.bench.layout, contributions)
        if reference and kept:
            # Reference quirk (agg/avg.py, avg): noise on the aggregated body.
            noisy = with_authors_noise({k: v for k, v in new_state.items() if k not in self.head},
                                       self.bench.cfg.seed, "fedrep", rnd, self.params.reference_noise)
            new_state.update(noisy)
        self.global_state = new_state
        return {}

    def evaluate(self, rnd):
        """Each evaluated client (eval_ids) with the global body and its own head (see the module's
        docstring for a client without one); the global view: the global model."""
        bench, reference = self.bench, self.params.variant == "reference"
        global_view = bench.evaluate_global(self.global_state)

        def prepare(model, cid):
            state = self.store.get(cid)
            if state is None and not reference:
                return False
            own_head = state["head"] if state is not None else self._own_initial_head(cid)
            bench.load(model, {**self.global_state, **own_head})
            return True

        clients = cohort_accuracies(bench, prepare, fallback=global_view.clients)
        return Evaluation(clients=clients, global_clients=global_view.clients, acc_global=global_view.acc_global)

    @functools.lru_cache(maxsize=None)
    def _own_initial_head(self, client_id: int) -> dict[str, torch.Tensor]:
        return {n: v for n, v in own_initial_model(self.bench, client_id).items() if n in self.head}

    def state_dict(self):
        return {"global_state": self.global_state}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
