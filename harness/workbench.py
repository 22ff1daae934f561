"""The Workbench: everything a process needs to run an experiment's client jobs and evaluations.

Built from the config alone (data, partition, model layout, FLOP meter, device tiers), so the driver
and every executor build the same one and only small task records travel between them.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from harness.availability import Availability
from harness.batched.groups import train_alone
from harness.config import ExperimentConfig
from harness.cost import DeviceAssigner, FlopMeter
from harness.data import TEST_SETS, ClientData, Dataset, load_dataset, partition
from harness.models import ModelSpec, UnitModel, build_model
from harness.records import ClientTask, Evaluation
from harness.seeding import seed_of, torch_generator
from harness.spec import ExperimentSpec, resolve
from harness.training import (LocalJob, SGDSettings, calibrate_batchnorm, correct_per_sample, load_tensors, threads,
                              torch_threads)


_PARTITIONS: dict[tuple, list[ClientData]] = {}


def client_partition(cfg: ExperimentConfig, dataset: Dataset) -> list[ClientData]:
    """The experiment's clients, partitioned once per process (validation and the run share it)."""
    key = (cfg.data.dataset, cfg.data.root, id(dataset), cfg.data.split.model_dump_json(), cfg.clients.total, cfg.seed)
    if key not in _PARTITIONS:
        if len(_PARTITIONS) >= 8:
            _PARTITIONS.pop(next(iter(_PARTITIONS)))
        _PARTITIONS[key] = partition(dataset.y_train.numpy(), dataset.y_test.numpy(), cfg.data.split,
                                     cfg.clients.total, cfg.seed)
    return _PARTITIONS[key]


class Workbench:
    """`spec`: the experiment's ExperimentSpec (an ExperimentConfig is resolved first); `cfg` is its
    validated config, `method_params` its method's typed parameters."""

    def __init__(self, spec: ExperimentSpec | ExperimentConfig, device: str = "cpu", dataset: Dataset | None = None):
        spec = spec if isinstance(spec, ExperimentSpec) else resolve(spec)
        self.experiment = spec
        self.cfg = cfg = spec.config
        self.method_params = spec.params
        self.device = torch.device(device)
        self.dataset = dataset if dataset is not None else load_dataset(cfg.data)
        self.clients: list[ClientData] = client_partition(cfg, self.dataset)
        self.num_classes = self.dataset.num_classes
        self.image_shape = self.dataset.image_shape
        self.model_name = spec.model
        template = self.build(ModelSpec((), cfg.model.norm), device="meta")
        self.layout = template.layout
        self.full_widths = template.full_widths
        self.param_shapes = {n: p.shape for n, p in template.named_parameters()}
        self.flops = FlopMeter(self.model_name, self.num_classes, self.image_shape)
        self.devices = DeviceAssigner(cfg.devices, cfg.clients.total, cfg.seed)
        self.availability = Availability(cfg.devices, cfg.clients.total, cfg.seed)
        self._models: dict[ModelSpec, tuple[UnitModel, dict[str, torch.Tensor]]] = {}

    # -- models ------------------------------------------------------------------------------------
    def spec(self, widths: dict[str, int] | None = None, norm: str | None = None, rate: float = 1.0) -> ModelSpec:
        """The spec of the model at `widths` (absent groups: all units), `norm` (default: the
        experiment's model.norm) and scaler `rate`."""
        return ModelSpec(tuple(sorted({**self.full_widths, **(widths or {})}.items())), norm or self.cfg.model.norm,
                         rate)

    def build(self, spec: ModelSpec | None = None, device: str | torch.device | None = None) -> UnitModel:
        """A new model of `spec` (default: the dense model), freshly initialised."""
        spec = spec or self.spec()
        with torch.device(device or self.device):
            return build_model(self.model_name, self.num_classes, self.image_shape, dict(spec.widths), spec.norm,
                               spec.rate)

    def model(self, spec: ModelSpec) -> tuple[UnitModel, dict[str, torch.Tensor]]:
        """This process's model of `spec`, reused across clients (building one costs more than a few
        local steps of a small client), and the buffers of a new one."""
        if spec not in self._models:
            model = self.build(spec)
            self._models[spec] = model, {k: v.clone() for k, v in model.named_buffers()}
        return self._models[spec]

    def loaded(self, job: LocalJob) -> UnitModel:
        """This process's model of the job's spec, holding the job's starting tensors and unit masks."""
        model, fresh = self.model(job.spec)
        load_tensors(model, job.start, fresh)
        model.unit_masks = dict(job.unit_masks or {})
        return model

    def trained_model(self, job: LocalJob) -> UnitModel:
        """This process's model of the job's spec, holding the job's trained tensors."""
        model, fresh = self.model(job.spec)
        load_tensors(model, job.trained, fresh)
        return model

    def train_here(self, job: LocalJob) -> None:
        """Train a job in this process as an executor would (its thread count): for training on the
        server, such as PruneFL's initial pruning."""
        with threads(torch_threads(self.cfg.engine.cpus_per_executor)):
            train_alone(job, self)

    def init_global_state(self) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(self.cfg.seed, "init"))
            model = self.build(device="cpu")
        return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def load(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=False)
        return model

    def lr(self, rnd: int) -> float:
        return self.cfg.train.lr * self.cfg.train.lr_decay ** rnd

    def generator(self, rnd: int, client_id: int) -> torch.Generator:
        """The client task's own random stream: a function of (seed, round, client) only."""
        return torch_generator(self.cfg.seed, "client", rnd, client_id)

    def job(self, task: ClientTask, start: dict[str, torch.Tensor], spec: ModelSpec | None = None,
            generator: torch.Generator | None = None, train: SGDSettings | None = None, **options) -> LocalJob:
        """The client's local SGD on its training data from `start` (moved to this process's device),
        with the experiment's training settings (or `train`) at the task's round's learning rate,
        drawing its data order from `generator` (default: the task's own stream); `options`: further
        LocalJob fields (clip_grad_norm, masks, hooks, context, ...)."""
        x, y = self.train_data(task.client_id)
        start = {k: v.to(self.device) for k, v in start.items()}
        return LocalJob(spec or self.spec(), start, x, y, train or self.cfg.train, self.lr(task.round),
                        generator or self.generator(task.round, task.client_id), **options)

    # -- data --------------------------------------------------------------------------------------
    def train_data(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.clients[client_id].train)
        x = self.dataset.normalize(self.dataset.x_train[idx].to(self.device))
        return x, self.dataset.y_train[idx].to(self.device)

    def class_mask(self, client_id: int) -> torch.Tensor:
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[torch.from_numpy(self.clients[client_id].classes)] = True
        return mask

    @functools.cached_property
    def test_index(self) -> dict[str, list[torch.Tensor]]:
        """Per test-set construction, each client's test images (indices into the test set)."""
        return {kind: [torch.from_numpy(c.tests[kind]) for c in self.clients] for kind in TEST_SETS}

    # -- evaluation --------------------------------------------------------------------------------
    def _per_client(self, correct: torch.Tensor, kind: str) -> np.ndarray:
        return np.array([float(correct[idx].float().mean()) if len(idx) else np.nan for idx in self.test_index[kind]])

    def evaluate_global(self, state: dict[str, torch.Tensor], static_bn: bool = False,
                        norm: str | None = None) -> Evaluation:
        """The global model (of `norm`, default the experiment's) on the whole test set and on every
        client's test sets. With static BN the normalisation statistics are first computed over the
        clients' training data. Clients' test sets are subsets of the test set, so one pass serves
        all, unless the model normalises with batch statistics in evaluation too (`batch` norm):
        then each client's test set is evaluated on its own, in minibatches of the training batch
        size, as a client would."""
        model = self.load(self.build(self.spec(norm="bn" if static_bn else norm)), state)
        if static_bn:
            calibrate_batchnorm(model, self._training_batches())
        correct = correct_per_sample(model, self.dataset.x_test, self.dataset.y_test, self.dataset.normalize)
        if (norm or self.cfg.model.norm) == "batch" and any(
                isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            clients = {kind: np.array([self._accuracy(model, idx, self.cfg.train.batch_size) for idx in index])
                       for kind, index in self.test_index.items()}
        else:
            clients = {kind: self._per_client(correct, kind) for kind in TEST_SETS}
        return Evaluation(clients=clients, acc_global=float(correct.float().mean()))

    def _accuracy(self, model: torch.nn.Module, idx: torch.Tensor, batch_size: int = 1000) -> float:
        if not len(idx):
            return float("nan")
        correct = correct_per_sample(model, self.dataset.x_test[idx], self.dataset.y_test[idx], self.dataset.normalize,
                                     batch_size)
        return float(correct.float().mean())

    def accuracy_on_client(self, model: torch.nn.Module, client_id: int) -> dict[str, float]:
        """`model` on one client's own test sets (for personalised models), per construction."""
        return {kind: self._accuracy(model, self.test_index[kind][client_id]) for kind in TEST_SETS}

    def _training_batches(self, batch_size: int = 500):
        idx = torch.from_numpy(np.concatenate([c.train for c in self.clients]))
        for start in range(0, len(idx), batch_size):
            yield self.dataset.normalize(self.dataset.x_train[idx[start:start + batch_size]].to(self.device))
