"""HeteroFL (Diao, Ding and Tarokh, "HeteroFL: Computation and Communication Efficient Federated
Learning for Heterogeneous Clients", ICLR 2021).

Every sampled client trains a physically smaller copy of the one global model:

1. Its keep ratio r is its device tier's cap. In every unit group it keeps the first ceil(r * K) of
   the K units (`index_sets`, the hook FedRolex overrides); a layer's inputs are the previous
   layer's kept outputs and residual shortcuts share the block's units (both given by the model
   layout). The client cuts those coordinates out of the global model and builds the model at
   that width, so FLOPs, memory and bytes really shrink.
2. Local SGD with three switches, all on by default:
   - scaler: in training each hidden layer's output is divided by r before its norm layer;
   - static BN (sBN): BN uses batch statistics in training and keeps no running statistics; before
     evaluation the server computes them for the global model over the clients' training data;
   - masked cross-entropy: logits of classes absent from the client's data are set to 0.
3. The client uploads its trained submodel and the unit indices it held.
4. Aggregation: each global coordinate becomes the plain mean over the clients that held it
   (count-normalised, no sample weights); with label split, a client updates only the classifier
   rows of its own classes. Coordinates that no client held keep their value.

Differences from the official code (diaoenmao/HeteroFL-...), following METHODS.md:
- the classes of a client (masked CE, label split) are those of its training plus validation
  data (the harness's partition), not of its training data alone;
- gradients are clipped at norm 5 by default (`clip_grad_norm`), as in the FedLPS authors' HeteroFL
  and FedRolex scripts whose protocol this benchmark follows (the official code clips at 1);
- the scaler divides every hidden unit group, so also the hidden linear layer of the paper's MNIST
  CNN (the official conv model has none).

Caution: the scaler is harmless before a BN layer (batch normalisation removes the factor), but the
MNIST CNN has no norm layers, so the 1/r factors reach the logits and the gradients (at r = 1/16
about 70x larger logits and 150-260x larger weight gradients than the dense model at init). With lr
0.1 and without clipping such clients diverge (NaN within two rounds): keep clip_grad_norm, or set
method.scaler=false for that model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.cost import training_flops
from harness.models import prefix_width
from harness.records import ClientResult, ClientTask
from harness.strategy import MethodParams, Strategy
from harness.submodel import Contribution, IndexSets, State, aggregate, extract, prefix_index_sets, state_bytes
from harness.training import LocalJob


@dataclass
class SubmodelUpload:
    """What a client sends back: its trained submodel and the global unit indices it held."""

    state: State
    index_sets: IndexSets


class HeteroFL(Strategy):
    title = "HeteroFL"

    class Params(MethodParams):
        clip_grad_norm: float | None = 5.0  # the FedLPS authors' HeteroFL and FedRolex scripts clip at 5
        scaler: bool = True
        static_bn: bool = True
        masked_ce: bool = True
        label_split: bool = True  # count-normalised aggregation restricted to each client's class rows

    @property
    def norm(self) -> str | None:
        """The clients' normalisation: static BN, or the configured model norm."""
        return "sbn" if self.params.static_bn else None

    def setup(self, store):
        super().setup(store)
        bench = self.bench
        # The global model holds exactly the tensors clients train: with static BN it has no running
        # statistics (evaluation computes them). Norm layers draw no random numbers at init, so
        # filtering the shared initial state gives the same weights as building it with this norm.
        keys = bench.build(bench.spec(norm=self.norm), device="meta").state_dict().keys()
        self.global_state = {k: v for k, v in bench.init_global_state().items() if k in keys}
        # Calibrating BN statistics is a pass over all training data; skip it for models without BN.
        self.calibrate_bn = self.params.static_bn and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in bench.build(device="meta").modules())

    def configure(self, rnd, clients):
        # The submodel of each client follows from (round, tier cap), which the task carries.
        return self.global_state, [None] * len(clients)

    # -- client side -------------------------------------------------------------------------------
    def widths(self, ratio: float) -> dict[str, int]:
        return {g: prefix_width(n, ratio) for g, n in self.bench.full_widths.items()}

    def index_sets(self, rnd: int, widths: dict[str, int]) -> IndexSets:
        """Which global units the submodel keeps in round `rnd`: the first ones of every group."""
        return prefix_index_sets(self.bench.full_widths, widths)

    # Batched, the clients of equal submodel widths train together.
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        bench, p = self.bench, self.params
        ratio = task.tier.cap
        widths = self.widths(ratio)
        index_sets = self.index_sets(task.round, widths)
        sub_state = extract(global_state, bench.layout, index_sets)
        spec = bench.spec(widths, norm=self.norm, rate=ratio if p.scaler else 1.0)
        class_mask = bench.class_mask(task.client_id).to(bench.device) if p.masked_ce else None
        return bench.job(task, sub_state, spec, clip_grad_norm=p.clip_grad_norm, class_mask=class_mask,
                         context=(ratio, widths, index_sets))

    def local_result(self, global_state, task: ClientTask, job: LocalJob) -> ClientResult:
        ratio, widths, index_sets = job.context
        trained = {k: v.cpu() for k, v in job.trained.items() if k in job.start}
        size = state_bytes(trained)
        return ClientResult(
            task.client_id, task.round, payload=SubmodelUpload(trained, index_sets), num_samples=len(job.y),
            train_loss=job.stats.loss, train_acc=job.stats.accuracy, keep_ratio=ratio,
            flops=training_flops(self.bench.flops.forward(widths), job.stats.samples), bytes_up=size, bytes_down=size)

    # -- server side -------------------------------------------------------------------------------
    def aggregate(self, rnd, kept, dropped):
        label_split = self.params.label_split
        contributions = [
            Contribution(r.payload.state, r.payload.index_sets, weight=1.0,
                         class_rows=self.bench.class_mask(r.client_id) if label_split else None)
            for r in kept]
        self.global_state = aggregate(self.global_state, self.bench.layout, contributions)
        return {}

    def evaluate(self, rnd):
        return self.bench.evaluate_global(self.global_state, static_bn=self.calibrate_bn)

    def state_dict(self):
        return {"global_state": self.global_state}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
