"""The Workbench: everything a process needs to run an experiment's client jobs and evaluations.

Built from the config alone (data, partition, model layout, FLOP meter, device tiers), so the driver
and every executor build the same one and only small task records travel between them.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from harness.availability import Availability
from harness.batched.groups import train_single
from harness.config import ExperimentConfig
from harness.cost import DeviceAssigner, FlopMeter
from harness.data import TEST_SETS, Dataset, Partition
from harness.population import client_population, load_data
from harness.models import ModelSpec, UnitModel, build_model
from harness.records import ClientTask, Evaluation
from harness.seeding import seed_of, torch_generator
from harness.spec import ExperimentSpec, resolve
from harness.synthetic import SyntheticClients
from harness.training import (LocalJob, SGDSettings, calibrate_batchnorm, correct_per_sample, load_tensors, threads,
                              torch_threads)


_PARTITIONS: dict[tuple, object] = {}


def client_partition(cfg: ExperimentConfig, dataset) -> Partition | SyntheticClients:
    """The experiment's clients (harness.population.client_population: a Partition, or synthetic
    clients generated on demand), built once per process (validation and the run share them)."""
    key = (id(dataset), cfg.data.model_dump_json(), cfg.clients.total, cfg.seed)
    if key not in _PARTITIONS:
        if len(_PARTITIONS) >= 8:
            _PARTITIONS.pop(next(iter(_PARTITIONS)))
        _PARTITIONS[key] = client_population(cfg, dataset)
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
        self.dataset = dataset if dataset is not None else load_data(cfg.data, cfg.seed)
        # len(clients), clients[c] (a record), clients.num_samples(c), .train_data(c), .eval_ids, ...:
        # harness.data.Partition, or harness.synthetic.SyntheticClients (nothing held per client)
        self.clients = client_partition(cfg, self.dataset)
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
            train_single(job, self)

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
        return self.clients.train_data(client_id, self.device)

    def class_mask(self, client_id: int) -> torch.Tensor:
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[torch.from_numpy(self.clients.classes(client_id))] = True
        return mask

    @functools.cached_property
    def eval_set(self):
        """The test samples evaluations run on and, per test-set construction, those of each client
        of `clients.eval_ids` (every client of a partition; a fixed cohort of synthetic clients)."""
        return self.clients.eval_set()

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate_global(self, state: dict[str, torch.Tensor], static_bn: bool = False,
                        norm: str | None = None) -> Evaluation:
        """The global model (of `norm`, default the experiment's) on the whole test set and on the test
        sets of every client of `clients.eval_ids` (Evaluation's arrays follow that order). With static BN the normalisation statistics are first computed over the
        clients' training data. Clients' test sets are subsets of the test set, so one pass serves
        all, unless the model normalises with batch statistics in evaluation too (`batch` norm):
        then each client's test set is evaluated on its own, in minibatches of the training batch
        size, as a client would."""
        model = self.load(self.build(self.spec(norm="bn" if static_bn else norm)), state)
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if static_bn and has_bn:
            calibrate_batchnorm(model, self._training_batches())
        ev = self.eval_set
        correct = correct_per_sample(model, ev.x, ev.y, ev.normalize)
        if (norm or self.cfg.model.norm) == "batch" and has_bn:
            clients = {kind: np.array([self._accuracy(model, ev.x[torch.from_numpy(index[k])], ev.y[torch.from_numpy(index[k])],
                                                      self.cfg.train.batch_size) for k in range(len(index))])
                       for kind, index in ev.index.items()}
        else:
            clients = {kind: ev.per_client_mean(correct, kind) for kind in TEST_SETS}
        return Evaluation(clients=clients, acc_global=float(correct.float().mean()))

    def _accuracy(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
        if not len(y):
            return float("nan")
        correct = correct_per_sample(model, x, y, self.dataset.normalize, batch_size)
        return float(correct.float().mean())

    def accuracy_on_client(self, model: torch.nn.Module, client_id: int) -> dict[str, float]:
        """`model` on one client's own test sets (for personalised models), per construction."""
        return {kind: self._accuracy(model, *self.clients.test_data(kind, client_id)) for kind in TEST_SETS}

    def _training_batches(self):
        for x in self.clients.training_batches():
            yield x.to(self.device)
