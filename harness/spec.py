"""An experiment validated once: the frozen spec that the driver, the sweep's trials and the
executors receive (never the raw config), with the method's parameters typed, the model resolved
and the labels that results carry computed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from harness.config import ExperimentConfig, axis_label, method_params
from harness.population import load_data
from harness.models import resolve_model_name
from harness.registry import method_class


@dataclass(frozen=True)
class ExperimentSpec:
    config: ExperimentConfig  # validated; nothing changes it after resolution
    params: BaseModel  # the method's own parameters, typed (its Params class)
    model: str  # the model's name, `auto` resolved by the data set
    identity: dict[str, Any] = field(compare=False)  # the labels every row of the results carries

    @property
    def method(self) -> str:
        return self.config.method.name


def resolve(cfg: ExperimentConfig) -> ExperimentSpec:
    """The spec of `cfg`: its method's parameters validated, its model resolved (loading the data set
    once per process), its labels computed."""
    params = method_params(cfg)
    model = resolve_model_name(cfg.model.name, cfg.data.dataset, load_data(cfg.data, cfg.seed).image_shape)
    identity = dict(experiment=cfg.name, setting=setting_label(cfg), setting_title=setting_title(cfg),
                    method=cfg.method.name, method_label=axis_label(cfg.method.model_dump()),
                    method_title=method_class(cfg.method.name).describe(cfg.method.params()),
                    dataset=dataset_name(cfg), model=model, seed=cfg.seed)
    return ExperimentSpec(cfg, params, model, identity)


def dataset_name(cfg: ExperimentConfig) -> str:
    """The data set, as results name it: npz files by their file name (no path of this machine)."""
    dataset = cfg.data.dataset
    return f"npz:{Path(dataset[4:]).name}" if dataset.startswith("npz:") else dataset


def setting_label(cfg: ExperimentConfig) -> str:
    """Names what is being compared on: everything but the method, the seed and where it runs (a
    digest of the settings that differ from the defaults, so a new option leaves labels alone)."""
    core = cfg.model_dump(exclude={"name", "method", "seed", "engine", "out", "checkpoint_every"}, exclude_defaults=True)
    data = core.setdefault("data", {})
    data.pop("root", None)
    data.pop("download", None)
    data["dataset"] = dataset_name(cfg)
    digest = hashlib.sha1(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:6]
    s = cfg.data.split
    split = {"shards": f"shards{s.shards_per_client}x{s.shard_size}", "dirichlet": f"dir{s.alpha:g}",
             "iid": "iid", "natural": "natural"}[s.kind]
    dataset = cfg.data.dataset
    if dataset.startswith("npz:"):
        dataset = "npz-" + Path(dataset[4:]).stem
    if dataset == "synthetic":  # generated per client: no split
        d = cfg.data
        dataset, split = "synthetic", "iid" if d.iid else f"a{d.alpha:g}b{d.beta:g}"
    return f"{dataset}_{split}_{cfg.clients.total}c{cfg.clients.per_round}_{digest}"


DATASET_TITLES = {"mnist-5k": "MNIST-5k", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
                  "cifar100": "CIFAR-100"}


def setting_title(cfg: ExperimentConfig) -> str:
    """The setting as a paper's figure names it: 'MNIST, 2 shards of 100 per client, 100 clients (10 per
    round)', plus the deadline, over-selection and availability where set."""
    dataset = cfg.data.dataset
    if dataset.startswith("npz:"):
        stem = Path(dataset[4:]).stem
        dataset = DATASET_TITLES.get(stem.lower(), stem)
    elif dataset == "synthetic":
        dataset = "Synthetic IID" if cfg.data.iid else f"Synthetic({cfg.data.alpha:g}, {cfg.data.beta:g})"
    else:
        dataset = DATASET_TITLES[dataset]
    s = cfg.data.split
    split = {"shards": f"{s.shards_per_client} shards of {s.shard_size} per client", "dirichlet": f"Dirichlet({s.alpha:g})",
             "iid": "IID", "natural": "natural clients"}[s.kind]
    c, d = cfg.clients, cfg.devices
    parts = [dataset] + ([] if cfg.data.dataset == "synthetic" else [split]) + [f"{c.total} clients ({c.per_round} per round)"]
    if c.deadline_s is not None:
        parts.append(f"deadline {c.deadline_s:g} s")
    if c.overselect > 1:
        parts.append(f"over-selection {c.overselect:g}")
    if d.availability != "always" or d.availability_trace:
        parts.append("partial availability")
    return ", ".join(parts)
