"""Which methods exist: the built-in ones, those that installed packages register under the
`fedbench.methods` entry-point group, and any Strategy named by import path (`package.module:Class`).

The built-in methods are found by module path, so they work where fedbench's package metadata is not
installed (code shipped to Ray workers with `ray job submit --working-dir .`).
"""
from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points

import pyarrow as pa

from harness.errors import ConfigError
from harness.strategy import Strategy

BUILT_IN = {
    "fedavg": "baselines.fedavg:FedAvg",
    "fedprox": "baselines.fedprox:FedProx",
    "heterofl": "baselines.heterofl:HeteroFL",
    "fedrolex": "baselines.fedrolex:FedRolex",
    "prunefl": "baselines.prunefl:PruneFL",
    "fedlps": "fedlps.strategy:FedLPS",
    "perfedavg": "baselines.perfedavg:PerFedAvg",
    "ditto": "baselines.ditto:Ditto",
    "fedrep": "baselines.fedrep:FedRep",
    "hermes": "baselines.hermes:Hermes",
    "fedspa": "baselines.fedspa:FedSpa",
    "fedmp": "baselines.fedmp:FedMP",
    "cs": "baselines.cs:CS",
}


@functools.cache
def _registered() -> dict[str, str]:
    found = {ep.name: ep.value for ep in entry_points(group="fedbench.methods")}
    return {**found, **BUILT_IN}


def available_methods() -> list[str]:
    return sorted(_registered())


def _import(path: str, field: str = "method.name") -> type[Strategy]:
    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(field, f"cannot import {path!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(field, f"{path!r} is not a Strategy subclass")
    return cls


@functools.cache
def method_class(name: str) -> type[Strategy]:
    """A registered method by name, or any Strategy by import path `package.module:Class`."""
    if ":" in name:
        return _import(name)
    path = _registered().get(name)
    if path is None:
        raise ConfigError("method.name", f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _import(path)


def declared_columns(kind: str, method: str) -> dict[str, pa.DataType]:
    """The extra `kind` ('client' or 'round') columns of every registered method and of `method`:
    one schema for a folder of results, whichever methods it holds (null where a method has none).
    A registered method that cannot be imported adds nothing."""
    classes = []
    for name in [*available_methods(), method]:
        try:
            classes.append(method_class(name))
        except ConfigError:
            if name == method:
                raise
    columns: dict[str, pa.DataType] = {}
    for cls in classes:
        for column, dtype in getattr(cls, f"{kind}_columns").items():
            if columns.setdefault(column, dtype) != dtype:
                raise ValueError(f"{cls.__name__} declares {kind} column {column!r} as {dtype}, another method "
                                 f"as {columns[column]}")
    return columns
