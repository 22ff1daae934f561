"""The Strategy interface: what a federated method is.

- configure: what each sampled client receives (a broadcast shared by the round, plus a small
  per-client instruction such as its keep ratio);
- local_job: the client's local training described as data (harness.training.LocalJob: its model,
  data, masks and hyper-parameters), a pure function of the broadcast, the instruction and the
  client's personal state; the engine trains it wherever and however it runs clients (in process or
  on a Ray executor; one by one or batched);
- local_result: the trained job turned into what the client uploads;
- aggregate: how the server combines the kept results, in the fixed order of the client ids, and
  what it makes of the dropped ones;
- evaluate: how each client's model is evaluated.

A method never touches Ray and the engine never branches on a method. A method states the extra
columns it writes (`client_columns`, `round_columns`, with their Arrow types). Methods are found
through harness/registry.py.
"""
from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.records import ClientResult, ClientSlot, ClientTask, Evaluation
from harness.training import LocalJob


class MethodParams(BaseModel):
    """Parameters every method has; a method's own Params subclass this."""

    model_config = ConfigDict(extra="forbid")
    clip_grad_norm: float | None = Field(None, description="gradient-norm clipping in local training")

    @field_validator("clip_grad_norm")
    @classmethod
    def _positive(cls, v):  # a validator, not Field(gt=0): it holds where a method redefines the default
        if v is not None and not v > 0:
            raise ValueError("must be positive (or null: no clipping)")
        return v


class Strategy:
    Params: ClassVar[type[BaseModel]] = MethodParams
    title: ClassVar[str] = ""  # the method's name in tables and figures ("HeteroFL"); default: the class name
    client_columns: ClassVar[dict[str, pa.DataType]] = {}  # the keys of ClientResult.metrics
    round_columns: ClassVar[dict[str, pa.DataType]] = {}  # the keys of what aggregate returns
    # The new personal state of a client whose update was dropped (late, not kept) is stored too.
    stores_state_of_dropped: ClassVar[bool] = False

    def __init__(self, bench, params: BaseModel):
        """`bench`: the harness.workbench.Workbench of the process (data, models, cost meter)."""
        self.bench = bench
        self.params = params

    @classmethod
    def check(cls, params: BaseModel, model: nn.Module, cfg) -> None:
        """Checks of the parameters against the experiment (`cfg`) and its model (built on the meta
        device); raise harness.errors.ConfigError. Runs before anything is written."""

    @classmethod
    def describe(cls, params: dict[str, Any]) -> str:
        """The method as tables and figures name it, from its config entry without `name`:
        'HeteroFL (reference)', 'PruneFL (interval 10)'."""
        parts = [str(v) if k == "variant" else f"{k} {v}" for k, v in sorted(params.items())]
        title = cls.title or cls.__name__
        return f"{title} ({', '.join(parts)})" if parts else title

    # -- server side (driver) -----------------------------------------------------------------------
    def setup(self, store) -> None:
        """Initialise the server state (the global model) before round 0. `store` holds personal
        per-client state: the "client" namespace travels with each task (ClientTask.state, and
        ClientResult.state back); other namespaces are the server's own per-client records."""
        self.store = store

    def configure(self, rnd: int, clients: list[ClientSlot]) -> tuple[Any, list[Any]]:
        """(broadcast for the round, one instruction per client)."""
        raise NotImplementedError

    def aggregate(self, rnd: int, kept: list[ClientResult], dropped: list[ClientResult]) -> dict[str, Any]:
        """Combine the kept results (possibly none); `dropped` holds every other sampled client's result
        with its reason in `status` (error, late, not_kept). Returns the round's values of
        `round_columns`."""
        raise NotImplementedError

    def evaluate(self, rnd: int) -> Evaluation:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """All server state needed to resume (checkpoints): tensors and plain data only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # -- client side (wherever the engine runs it) -------------------------------------------------
    def local_job(self, broadcast: Any, task: ClientTask) -> LocalJob:
        raise NotImplementedError

    def local_result(self, broadcast: Any, task: ClientTask, job: LocalJob) -> ClientResult:
        raise NotImplementedError
