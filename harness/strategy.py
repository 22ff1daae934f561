"""The Strategy interface: what a federated method is, in four parts.

- configure: what each sampled client receives (a broadcast shared by the round, plus a small
  per-client instruction such as its keep ratio);
- local_update: the client's local work, a pure function of the broadcast, its instruction and its
  personal state; it runs wherever the engine puts it (in process, or on a Ray executor);
- aggregate: how the server combines the results, in the fixed order of the client ids;
- evaluate: how each client's model is evaluated.

A method never touches Ray and the engine never branches on a method. The built-in methods are
listed in BUILTIN_METHODS; other methods are plugins found through the `fedbench.methods`
entry-point group (see pyproject.toml) or named by import path.
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from harness.config import Tier
from harness.errors import ConfigError

if TYPE_CHECKING:
    from harness.state import StateStore
    from harness.workbench import Workbench


class MethodParams(BaseModel):
    """Parameters every method has; a method's own Params subclass this."""

    model_config = ConfigDict(extra="forbid")
    clip_grad_norm: float | None = Field(None, gt=0, description="gradient-norm clipping in local training")


@dataclass
class ClientSlot:
    """A sampled client as the server sees it when configuring a round."""

    client_id: int
    tier: Tier
    num_samples: int


@dataclass
class ClientTask:
    client_id: int
    round: int
    tier: Tier
    instruction: Any = None
    state: Any = None  # the client's personal state from the store; None before its first round


@dataclass
class ClientResult:
    client_id: int
    round: int
    status: str = "ok"  # "ok" or "error"
    error: str | None = None
    payload: Any = None  # what the client uploads, in the method's own form
    num_samples: int = 0  # local training samples (the weight of sample-weighted means)
    train_loss: float = math.nan
    train_acc: float = math.nan
    keep_ratio: float = 1.0
    flops: float = 0.0  # training FLOPs actually spent
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # extra per-client columns
    state: Any = None  # new personal state; None keeps the stored one
    # Filled in by the harness from the cost model:
    sim_down_s: float = math.nan
    sim_compute_s: float = math.nan
    sim_up_s: float = math.nan

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def sim_s(self) -> float:
        return self.sim_down_s + self.sim_compute_s + self.sim_up_s


@dataclass
class Evaluation:
    client_acc: np.ndarray  # per client, over all clients, with the model each would use
    acc_global: float | None = None  # the global model on the whole test set (global methods)


class Strategy:
    Params: ClassVar[type[BaseModel]] = MethodParams

    def __init__(self, bench: Workbench, params: BaseModel):
        self.bench = bench
        self.params = params

    # -- server side (driver) -----------------------------------------------------------------------
    def setup(self, store: StateStore) -> None:
        """Initialise the server state (the global model) before round 0. `store` holds personal
        per-client state: the "client" namespace travels with each task (ClientTask.state, and
        ClientResult.state back); other namespaces are the server's own per-client records."""
        self.store = store

    def configure(self, rnd: int, clients: list[ClientSlot]) -> tuple[Any, list[Any]]:
        """(broadcast for the round, one instruction per client)."""
        raise NotImplementedError

    def aggregate(self, rnd: int, results: list[ClientResult]) -> dict[str, float]:
        """Combine the successful results; return round-level extras (e.g. {'density': ...})."""
        raise NotImplementedError

    def evaluate(self, rnd: int) -> Evaluation:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """All server state needed to resume (checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # -- client side (wherever the engine runs it) -------------------------------------------------
    def local_update(self, broadcast: Any, task: ClientTask) -> ClientResult:
        raise NotImplementedError

    def local_update_batch(self, broadcast: Any, tasks: list[ClientTask]) -> list[ClientResult]:
        """Several clients' local updates at once (when `engine.batch_clients` is on), with the same
        results as `local_update` on each: in task order, a client that raises as a failed result.
        This default runs them one by one; methods whose clients can train as one program opt in
        through harness.batched.BatchedLocalSGD."""
        from harness.engine import execute  # the engine imports this module

        return [execute(self, broadcast, t) for t in tasks]


# The built-in methods, found without package metadata (code shipped with `ray job submit
# --working-dir .` or py_modules); entry points add third-party ones.
BUILTIN_METHODS = {"fedavg": "baselines.fedavg:FedAvg", "heterofl": "baselines.heterofl:HeteroFL",
                   "fedrolex": "baselines.fedrolex:FedRolex", "prunefl": "baselines.prunefl:PruneFL",
                   "fedlps": "fedlps.strategy:FedLPS"}


@functools.cache
def _methods() -> dict[str, Any]:
    found = {ep.name: ep for ep in entry_points(group="fedbench.methods")}
    found.update({name: EntryPoint(name, value, "fedbench.methods") for name, value in BUILTIN_METHODS.items()})
    return found


def available_methods() -> list[str]:
    return sorted(_methods())


@functools.cache
def method_class(name: str) -> type[Strategy]:
    """A registered method by name, or any Strategy by import path `package.module:Class`."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError("method.name", f"cannot import {name!r}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ConfigError("method.name", f"{name!r} is not a Strategy subclass")
        return cls
    ep = _methods().get(name)
    if ep is None:
        raise ConfigError("method.name", f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return ep.load()


def method_params_model(name: str) -> type[BaseModel]:
    return method_class(name).Params
