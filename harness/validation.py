"""Every input error of an experiment, found before anything runs or is written: the CLI validates
all experiments of a config first, so that a mistake in the last grid point stops the command at
once, with one line naming the field or file."""
from __future__ import annotations

from harness.availability import Availability
from harness.config import ExperimentConfig, method_params
from harness.cost import DeviceAssigner
from harness.data import load_dataset, partition
from harness.models import build_model, resolve_model_name
from harness.registry import method_class


def validate(cfg: ExperimentConfig) -> None:
    """Raise the ConfigError of the first problem of `cfg`: its data (files, labels, whether the
    split can be made), its model for that data, its method's own checks, its device and availability traces."""
    import torch

    dataset = load_dataset(cfg.data)
    partition(dataset.y_train.numpy(), dataset.y_test.numpy(), cfg.data.split, cfg.clients.total, cfg.seed)
    name = resolve_model_name(cfg.model.name, cfg.data.dataset, dataset.image_shape)
    with torch.device("meta"):
        model = build_model(name, dataset.num_classes, dataset.image_shape, norm=cfg.model.norm)
    method_class(cfg.method.name).check(method_params(cfg), model, cfg)
    DeviceAssigner(cfg.devices, cfg.clients.total, cfg.seed)
    Availability(cfg.devices, cfg.clients.total, cfg.seed)
