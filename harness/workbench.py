"""The Workbench: everything a process needs to run an experiment's client tasks and evaluations.

Built from the config alone (data, partition, model layout, FLOP meter, device tiers, strategy), so
the driver and every executor build the same one and only small task records travel between them.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from harness.config import ExperimentConfig, method_params
from harness.cost import DeviceAssigner, FlopMeter
from harness.data import ClientData, Dataset, load_dataset, partition
from harness.models import UnitModel, build_model, resolve_model_name
from harness.seeding import seed_of, torch_generator
from harness.strategy import Evaluation, Strategy, method_class
from harness.training import calibrate_batchnorm, correct_per_sample


class Workbench:
    def __init__(self, cfg: ExperimentConfig, device: str = "cpu", dataset: Dataset | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dataset = dataset if dataset is not None else load_dataset(cfg.data)
        self.clients: list[ClientData] = partition(
            self.dataset.y_train.numpy(), self.dataset.y_test.numpy(), cfg.data.split, cfg.clients.total, cfg.seed)
        self.num_classes = self.dataset.num_classes
        self.image_shape = self.dataset.image_shape
        self.model_name = resolve_model_name(cfg.model.name, cfg.data.dataset, self.image_shape)
        template = self.build(device="meta")
        self.layout = template.layout
        self.full_widths = template.full_widths
        self.flops = FlopMeter(self.model_name, self.num_classes, self.image_shape)
        self.devices = DeviceAssigner(cfg.devices, cfg.clients.total, cfg.seed)
        self.strategy: Strategy = method_class(cfg.method.name)(self, method_params(cfg))

    # -- models ------------------------------------------------------------------------------------
    def build(self, widths: dict[str, int] | None = None, norm: str | None = None, rate: float = 1.0,
              device: str | torch.device | None = None) -> UnitModel:
        with torch.device(device or self.device):
            return build_model(self.model_name, self.num_classes, self.image_shape, widths,
                               norm or self.cfg.model.norm, rate)

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
    def test_index(self) -> list[torch.Tensor]:
        return [torch.from_numpy(c.test) for c in self.clients]

    # -- evaluation --------------------------------------------------------------------------------
    def test_correct(self, model: torch.nn.Module) -> torch.Tensor:
        """Per test sample: does `model` classify it right? Clients' test sets are subsets of the
        test set, so one pass serves the global accuracy and every client's accuracy."""
        return correct_per_sample(model, self.dataset.x_test, self.dataset.y_test, self.dataset.normalize)

    def client_accuracy(self, correct: torch.Tensor, client_id: int) -> float:
        idx = self.test_index[client_id]
        return float(correct[idx].float().mean()) if len(idx) else float("nan")

    def accuracy_on_client(self, model: torch.nn.Module, client_id: int) -> float:
        """`model` on one client's own test set (for personalised models)."""
        idx = self.test_index[client_id]
        correct = correct_per_sample(model, self.dataset.x_test[idx], self.dataset.y_test[idx], self.dataset.normalize)
        return float(correct.float().mean()) if len(idx) else float("nan")

    def evaluate_global(self, state: dict[str, torch.Tensor], static_bn: bool = False) -> Evaluation:
        """The global model on the whole test set and on every client's test set. With static BN
        the normalisation statistics are first computed over the clients' training data."""
        model = self.load(self.build(norm="bn" if static_bn else None), state)
        if static_bn:
            calibrate_batchnorm(model, self._training_batches())
        correct = self.test_correct(model)
        per_client = np.array([self.client_accuracy(correct, c) for c in range(len(self.clients))])
        return Evaluation(client_acc=per_client, acc_global=float(correct.float().mean()))

    def _training_batches(self, batch_size: int = 500):
        idx = torch.from_numpy(np.concatenate([c.train for c in self.clients]))
        for start in range(0, len(idx), batch_size):
            yield self.dataset.normalize(self.dataset.x_train[idx[start:start + batch_size]].to(self.device))
