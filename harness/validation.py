"""Every input error of an experiment, found before anything runs or is written: the CLI validates
all experiments of a config first, so that a mistake in the last grid point stops the command at
once, with one line naming the field or file."""
from __future__ import annotations

from harness.availability import Availability
from harness.config import ExperimentConfig
from harness.cost import DeviceAssigner
from harness.errors import ConfigError
from harness.population import load_data
from harness.models import build_model
from harness.registry import method_class
from harness.spec import ExperimentSpec, resolve
from harness.workbench import client_partition


def validate(cfg: ExperimentConfig) -> ExperimentSpec:
    """The experiment's spec, or the ConfigError of the first problem of `cfg`: its data (files,
    labels, whether the split can be made), its model for that data, its method's parameters and own
    checks, its device and availability traces."""
    import torch

    dataset = load_data(cfg.data, cfg.seed)
    client_partition(cfg, dataset)
    spec = resolve(cfg)
    with torch.device("meta"):
        model = build_model(spec.model, dataset.num_classes, dataset.image_shape, norm=cfg.model.norm)
    method_class(cfg.method.name).check(spec.params, model, cfg)
    devices = DeviceAssigner(cfg.devices, cfg.clients.total, cfg.seed)
    late = sorted(r for _, r in (devices.trace or {}) if r is not None and r >= cfg.rounds)
    if late:
        raise ConfigError("devices.trace", f"{cfg.devices.trace}: a row names round {late[0]}, but the experiment "
                                           f"has rounds 0..{cfg.rounds - 1}")
    Availability(cfg.devices, cfg.clients.total, cfg.seed)
    return spec
