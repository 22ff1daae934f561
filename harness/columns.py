"""The rows of the results, as typed records, and the accuracy columns, made in one place.

Accuracy is recorded per evaluation view and per test-set construction:
- views: `clients` (the model each client uses: its personal model for personalised methods, the
  global model otherwise) and `global_clients` (the global model, on each client's test set);
- test sets: `mirrored` (no suffix) and `authors` (`_authors_tests`), see harness/data.py;
- statistics over the clients: `mean`, `std` (client view only) and `p10` (the 10th percentile:
  personalisation is meant to lift the worst clients).
`accuracy_column("clients", "mean", "authors")` is `acc_clients_mean_authors_tests`. The leaderboard,
plots and reports read these names from here. The Arrow schemas of rounds.parquet, clients.parquet
and summary.parquet derive from the records below; a method's own columns (Strategy.client_columns,
round_columns) follow them.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, get_type_hints

import numpy as np
import pyarrow as pa

TEST_SETS = ("mirrored", "authors")  # the constructions of per-client test sets every run evaluates on
TEST_SET_SUFFIX = {"mirrored": "", "authors": "_authors_tests"}
VIEWS = {"clients": "the model each client uses", "global_clients": "the global model, on each client's test set"}
STATS = {"clients": ("mean", "std", "p10"), "global_clients": ("mean", "p10")}


def accuracy_column(view: str, stat: str = "mean", test_set: str = "mirrored") -> str:
    return f"acc_{view}_{stat}{TEST_SET_SUFFIX[test_set]}"


ACCURACY_COLUMNS = [accuracy_column(view, stat, kind) for kind in TEST_SETS for view in VIEWS for stat in STATS[view]]


def accuracies(clients: dict[str, np.ndarray], global_clients: dict[str, np.ndarray] | None) -> dict[str, float]:
    """The round's accuracy columns from per-client accuracies (NaN: a client without test images),
    per test-set construction; `global_clients` None: the same as `clients` (global methods)."""
    row = {}
    for kind in TEST_SETS:
        per_view = {"clients": clients[kind], "global_clients": (global_clients or clients)[kind]}
        for view, acc in per_view.items():
            acc = np.asarray(acc, dtype=float)
            acc = acc[~np.isnan(acc)]
            values = {"mean": np.mean(acc), "std": np.std(acc), "p10": np.percentile(acc, 10)} if len(acc) else {}
            row.update({accuracy_column(view, stat, kind): float(values.get(stat, np.nan)) for stat in STATS[view]})
    return row


# -- the records --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Identity:
    experiment: str
    setting: str
    setting_title: str
    method: str
    method_label: str
    method_title: str
    dataset: str
    model: str
    seed: int


@dataclasses.dataclass
class RoundCounts:
    round: int
    acc_global: Optional[float]  # the global model on the whole test set (None: the method reports none)
    train_loss: Optional[float]
    train_acc: Optional[float]
    clients_ok: int
    clients_failed: int
    clients_late: int
    clients_not_kept: int
    clients_offline_short: int
    keep_ratio_mean: Optional[float]
    sim_round_s: float
    sim_total_s: float
    flops: float
    flops_total: float
    bytes_up: int
    bytes_down: int
    bytes_up_total: int
    bytes_down_total: int
    flops_dropped: float
    bytes_dropped: int
    wall_s: float
    wall_total_s: float


RoundRow = dataclasses.make_dataclass(
    "RoundRow", [(name, float) for name in ACCURACY_COLUMNS], bases=(RoundCounts, Identity))
RoundRow.__doc__ = "One evaluated round: identity, counts and costs, and every accuracy column."


@dataclasses.dataclass
class ClientRow(Identity):
    round: int
    client_id: int
    tier: str
    cap: float
    num_samples: int
    status: str
    error: Optional[str] = None
    keep_ratio: Optional[float] = None
    flops: Optional[float] = None
    bytes_up: Optional[int] = None
    bytes_down: Optional[int] = None
    sim_s: Optional[float] = None
    sim_down_s: Optional[float] = None
    sim_compute_s: Optional[float] = None
    sim_up_s: Optional[float] = None
    train_acc: Optional[float] = None
    train_loss: Optional[float] = None


@dataclasses.dataclass
class SummaryRow(Identity):
    rounds: int
    status: str  # completed, degraded or failed (harness/experiment.py, Experiment.status)
    status_note: Optional[str]  # why, where it is not completed
    final_acc: Optional[float]  # None: no round was evaluated (a run that failed in round 0)
    best_acc: Optional[float]
    final_acc_global: Optional[float]
    final_acc_global_clients: Optional[float]
    sim_total_s: float
    flops_total: float
    bytes_up_total: int
    bytes_down_total: int
    wall_total_s: float
    cpu_model: str  # where the run's numbers were computed (float results differ across CPU kinds)
    torch_cpu_capability: str


ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string()}


def schema(record: type) -> pa.Schema:
    """The Arrow schema of a record: its fields in order, Optional[T] as T (nullable)."""
    hints = get_type_hints(record)
    fields = []
    for f in dataclasses.fields(record):
        kind = hints[f.name]
        kind = next((a for a in getattr(kind, "__args__", ()) if a is not type(None)), kind)
        fields.append(pa.field(f.name, ARROW[kind]))
    return pa.schema(fields)


def machine() -> dict[str, str]:
    """The CPU model and torch's CPU capability (the kernels it picked: default, avx2, avx512, ...)."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu_model": model, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def row(record: type, **values) -> dict:
    """A row of `record` as a dict, checked: every field given (or defaulted), no other key."""
    return dataclasses.asdict(record(**values))
