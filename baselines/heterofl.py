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

Variant `reference` (`method.variant: reference`): the FedLPS authors' port (sunnyxuejj/FedLPS at
35fafba2171fac0b0de374ffcd2a85eb40bc975e, `HeteroFL.py` and `Models.py`), whose numbers the FedLPS
paper reports. Its quirks, each implemented where the comment `Reference quirk` names it:
- no scaler, plain cross-entropy over all classes (no masked CE) and no label split: every coordinate
  becomes the plain mean over the clients that held it (`HeteroFL.py:combine`);
- widths max(int(r x K), 1) (floor, not ceil) and not every layer narrowed (`Models.py:MNISTNet`,
  `VGG._make_layers`): the MNIST CNN's fc1 keeps all 50 outputs (only the convolutions narrow, fc1's
  inputs follow conv2), VGG's first and last convolutions keep full width;
- BN with batch statistics in training and evaluation, no running statistics and no static-BN pass
  (`BatchNorm2d(momentum=None, track_running_stats=False)`): the `batch` norm, evaluated per client in
  minibatches of the training batch size as the code's test loaders do;
- momentum forced to 0 and clipping at 5 (`HeteroFL.py:__main__`, `config.momentum = 0`, `config.clip = 5`).
The switches below default to the variant's choice (None) and can still be set.

Caution: the scaler is harmless before a BN layer (batch normalisation removes the factor), but the
MNIST CNN has no norm layers, so the 1/r factors reach the logits and the gradients (at r = 1/16
about 70x larger logits and 150-260x larger weight gradients than the dense model at init). With lr
0.1 and without clipping such clients diverge (NaN within two rounds): keep clip_grad_norm, or set
method.scaler=false for that model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from harness.cost import training_flops
from harness.errors import ConfigError
from harness.models import CNN, VGG, prefix_width
from harness.records import ClientResult, ClientTask
from harness.strategy import Client, MethodParams, Strategy
from harness.submodel import (AxisIndex, Contribution, IndexSets, State, aggregate, extract, prefix_index_sets,
                              state_bytes)
from harness.training import LocalJob


@dataclass
class SubmodelUpload:
    """What a client sends back: its trained submodel and the global coordinates it held."""

    state: State
    index_sets: IndexSets
    axis_index: AxisIndex | None = None


def reference_full_groups(model) -> set[str]:
    """The unit groups the authors' models never narrow (Models.py): the CNN's fc1, VGG's first and
    last convolutions."""
    if isinstance(model, CNN):
        return {"fc1"}
    if isinstance(model, VGG):
        return {"conv0", f"conv{len(model.full_widths) - 1}"}
    return set()


class Settings:
    """What both halves derive from the parameters: the variant's switches, norm and SGD settings."""

    def __init__(self, bench, params):
        super().__init__(bench, params)
        self.reference = params.variant == "reference"
        official = not self.reference
        switch = lambda value: official if value is None else value  # noqa: E731
        self.scaler, self.static_bn = switch(params.scaler), switch(params.static_bn)
        self.masked_ce, self.label_split = switch(params.masked_ce), switch(params.label_split)
        # Reference quirk: the authors' VGG normalises with batch statistics, in evaluation too.
        self.norm = "sbn" if self.static_bn else ("batch" if self.reference else None)
        # Reference quirk: momentum forced to 0 (HeteroFL.py / FedRolex.py __main__).
        self.train = bench.cfg.train.model_copy(update={"momentum": 0.0}) if self.reference else bench.cfg.train
        self.full_groups = reference_full_groups(bench.build(device="meta")) if self.reference else set()


class HeteroFLClient(Settings, Client):
    def widths(self, ratio: float) -> dict[str, int]:
        if self.reference:
            # Reference quirk: max(int(r x K), 1) units, and some groups never narrow.
            return {g: n if g in self.full_groups else max(int(ratio * n), 1) for g, n in self.bench.full_widths.items()}
        return {g: prefix_width(n, ratio) for g, n in self.bench.full_widths.items()}

    def index_sets(self, task: ClientTask, widths: dict[str, int]) -> tuple[IndexSets, AxisIndex | None]:
        """Which global units the client's submodel keeps: the first ones of every group (FedRolex
        overrides this), and no axis given directly."""
        return prefix_index_sets(self.bench.full_widths, widths), None

    # Batched, the clients of equal submodel widths train together.
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        bench = self.bench
        ratio = task.tier.cap
        widths = self.widths(ratio)
        index_sets, axis_index = self.index_sets(task, widths)
        sub_state = extract(global_state, bench.layout, index_sets, axis_index)
        spec = bench.spec(widths, norm=self.norm, rate=ratio if self.scaler else 1.0)
        class_mask = bench.class_mask(task.client_id).to(bench.device) if self.masked_ce else None
        return bench.job(task, sub_state, spec, train=self.train, clip_grad_norm=self.params.clip_grad_norm,
                         class_mask=class_mask, context=(ratio, widths, index_sets, axis_index))

    def local_result(self, global_state, task: ClientTask, job: LocalJob) -> ClientResult:
        ratio, widths, index_sets, axis_index = job.context
        trained = {k: v.cpu() for k, v in job.trained.items() if k in job.start}
        size = state_bytes(trained)
        return ClientResult(
            task.client_id, task.round, payload=SubmodelUpload(trained, index_sets, axis_index), num_samples=len(job.y),
            train_loss=job.stats.loss, train_acc=job.stats.accuracy, keep_ratio=ratio,
            flops=training_flops(self.bench.flops.forward(widths), job.stats.samples), bytes_up=size, bytes_down=size)


class HeteroFL(Settings, Strategy):
    Client = HeteroFLClient
    title = "HeteroFL"

    class Params(MethodParams):
        variant: Literal["official", "reference"] = "official"
        clip_grad_norm: float | None = 5.0  # both variants clip at 5 (the FedLPS authors' code; official: 1)
        scaler: bool | None = None  # None: the variant's choice (official: on, reference: off)
        static_bn: bool | None = None
        masked_ce: bool | None = None
        label_split: bool | None = None  # count-normalised aggregation restricted to each client's class rows

    @classmethod
    def check(cls, params, model, cfg):
        if params.variant == "reference" and not isinstance(model, (CNN, VGG)):
            raise ConfigError("method.variant", "the reference variant mirrors the authors' CNN and VGG models; "
                                                "use model.name cnn, vgg11 or vgg13")

    def setup(self, store):
        super().setup(store)
        bench = self.bench
        # The global model holds exactly the tensors clients train: with static BN it has no running
        # statistics (evaluation computes them). Norm layers draw no random numbers at init, so
        # filtering the shared initial state gives the same weights as building it with this norm.
        keys = bench.build(bench.spec(norm=self.norm), device="meta").state_dict().keys()
        self.global_state = {k: v for k, v in bench.init_global_state().items() if k in keys}
        # Calibrating BN statistics is a pass over all training data; skip it for models without BN.
        self.calibrate_bn = self.static_bn and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in bench.build(device="meta").modules())

    def configure(self, rnd, clients):
        # The submodel of each client follows from (round, tier cap), which the task carries.
        return self.global_state, [None] * len(clients)

    def contributions(self, kept) -> list[Contribution]:
        return [Contribution(r.payload.state, r.payload.index_sets, weight=1.0, axis_index=r.payload.axis_index,
                             class_rows=self.bench.class_mask(r.client_id) if self.label_split else None)
                for r in kept]

    def aggregate(self, rnd, kept, dropped):
        """Dropped clients' updates are lost; they change nothing."""
        self.global_state = aggregate(self.global_state, self.bench.layout, self.contributions(kept))
        return {}

    def evaluate(self, rnd):
        return self.bench.evaluate_global(self.global_state, static_bn=self.calibrate_bn, norm=self.norm)

    def state_dict(self):
        return {"global_state": self.global_state}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
