"""The records that travel between the round loop, the engines and the methods.

This module imports nothing of the harness but the schema, so every other module can use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.schema import Tier


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


OK, ERROR, LATE, NOT_KEPT = "ok", "error", "late", "not_kept"

# Exceptions that are mistakes in a method's code, not a client's bad luck: they stop the experiment
# at once (harness/experiment.py) instead of being counted as failed clients.
CODE_ERRORS = (TypeError, AttributeError, NameError, AssertionError, ImportError, NotImplementedError)


@dataclass
class ClientResult:
    client_id: int
    round: int
    status: str = OK  # ok; or why the update does not reach aggregation: error, late, not_kept
    error: str | None = None
    error_type: str | None = None  # the exception's class, as module.QualifiedName
    traceback: str | None = None  # formatted where it was raised (an executor process on Ray)
    code_error: bool = False  # one of CODE_ERRORS: a bug in the method's code
    payload: Any = None  # what the client uploads, in the method's own form
    num_samples: int = 0  # local training samples (the weight of sample-weighted means)
    train_loss: float = math.nan
    train_acc: float = math.nan
    keep_ratio: float = 1.0
    flops: float = 0.0  # training FLOPs actually spent
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # the method's own client columns
    state: Any = None  # new personal state; None keeps the stored one
    # Filled in by the round loop from the cost model:
    sim_down_s: float = math.nan
    sim_compute_s: float = math.nan
    sim_up_s: float = math.nan

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def trained(self) -> bool:
        """The client did its work (its update may still be dropped as late or not kept)."""
        return self.status != ERROR

    @property
    def sim_s(self) -> float:
        return self.sim_down_s + self.sim_compute_s + self.sim_up_s


@dataclass
class Evaluation:
    """Accuracies after a round. Per client (an array over the clients of `bench.clients.eval_ids`: all
    clients of a partition, a fixed cohort of synthetic ones; NaN for a client without test images), for
    each test-set construction (`mirrored`, `authors`):

    clients: with the model each client would use (its personalised model, or the global model);
    global_clients: with the global model (None: the same as `clients`, as for global methods).
    acc_global: the global model on the whole test set (None where the method reports none)."""

    clients: dict[str, np.ndarray]
    global_clients: dict[str, np.ndarray] | None = None
    acc_global: float | None = None
