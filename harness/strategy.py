"""What a federated method is: a server half (`Strategy`) and a client half (`Client`).

The server half (one object, in the driver) holds the server state:
- configure: what each sampled client receives (a broadcast shared by the round, plus a small
  per-client instruction such as its keep ratio);
- aggregate: how the server combines the kept results, in the fixed order of the client ids, and
  what it makes of the dropped ones;
- evaluate: how each client's model is evaluated;
- state_dict / load_state_dict: everything needed to resume.

The client half is built, the same way by every engine (the serial one included) and in every
process that runs client work, from the method's parameters and the process's Workbench (data,
models, FLOP meter, the frozen spec: what a client may read). It holds no server state; its work is
a pure function of the broadcast, the instruction and the client's personal state:
- local_job: the client's local training described as data (harness.training.LocalJob: its model,
  data, masks, hyper-parameters and, for a method with its own rule, its `LocalRule`); the engine
  trains it wherever and however it runs clients (in process or on a Ray executor; one by one or
  batched);
- local_result: the trained job turned into what the client uploads;
- or `work`, a generator that yields jobs (one, or a list) as many times as the method trains and
  returns the result, for methods that train more than once per round (Ditto, FedRep).

A method never touches Ray and the engine never branches on a method. A method states the extra
columns it writes (`client_columns`, `round_columns`, with their Arrow types). Methods are found
through harness/registry.py.
"""
from __future__ import annotations

from typing import Any, ClassVar, Generator

import pyarrow as pa
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.records import ClientResult, ClientSlot, ClientTask, Evaluation
from harness.training import LocalJob


class MethodParams(BaseModel):
    """Parameters every method has; a method's own Params subclass this."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every float parameter finite
    clip_grad_norm: float | None = Field(None, description="gradient-norm clipping in local training")

    @field_validator("clip_grad_norm")
    @classmethod
    def _positive(cls, v):  # a validator, not Field(gt=0): it holds where a method redefines the default
        if v is not None and not v > 0:
            raise ValueError("must be positive (or null: no clipping)")
        return v


class Client:
    """The client half of a method. `bench`: the process's Workbench (the context a client may read);
    `params`: the method's parameters."""

    def __init__(self, bench, params: BaseModel):
        self.bench = bench
        self.params = params

    def work(self, broadcast: Any, task: ClientTask) -> Generator[LocalJob | list[LocalJob], None, ClientResult]:
        """The client's round: yields the jobs to train (the engine writes their outputs into them and
        resumes) and returns the result. Default: one job, `local_job` then `local_result`."""
        job = self.local_job(broadcast, task)
        yield job
        return self.local_result(broadcast, task, job)

    def local_job(self, broadcast: Any, task: ClientTask) -> LocalJob:
        raise NotImplementedError

    def local_result(self, broadcast: Any, task: ClientTask, job: LocalJob) -> ClientResult:
        raise NotImplementedError


class Strategy:
    Client: ClassVar[type[Client]] = Client  # the method's client half
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

    @classmethod
    def client(cls, bench, params: BaseModel) -> Client:
        """The client half, as every engine builds it in the process that runs client work."""
        return cls.Client(bench, params)
