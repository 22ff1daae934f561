"""The configuration schema: the pydantic models of an experiment, a sweep file's grid and Tune
settings, and the device tiers. It imports nothing of the harness (nor torch), so anything can load
it; harness/config.py reads files, applies overrides, expands grids and validates methods'
parameters against it.
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATASETS = ("mnist-5k", "mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic")
MODELS = ("auto", "cnn", "vgg11", "vgg13", "resnet18", "mlr", "mlp")


def sample_size(per_round: int, overselect: float) -> int:
    """ceil(overselect x per_round) (the epsilon keeps 1.3 x 10 at 13)."""
    return math.ceil(overselect * per_round - 1e-9)


class Tier(BaseModel):
    """A device tier: keep-ratio cap, compute speed and how often it is drawn."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    name: str
    cap: float = Field(gt=0, le=1)
    compute_mflops: float = Field(gt=0)
    proportion: float = Field(1.0, ge=0)


class Strict(BaseModel):
    # Every float setting is finite: inf and NaN are refused wherever a number is expected.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SplitConfig(Strict):
    kind: Literal["shards", "dirichlet", "iid", "natural"] = "shards"
    shards_per_client: int = Field(2, gt=0)
    shard_size: int = Field(20, gt=0)
    alpha: float = Field(0.5, gt=0)
    val_fraction: float = Field(0.1, ge=0, lt=1)


class DataConfig(Strict):
    dataset: str = "mnist-5k"
    root: str = "~/.cache/fedbench/data"
    download: bool = False
    split: SplitConfig = SplitConfig()
    # Synthetic(alpha, beta) (harness/synthetic.py): each client's data generated from (seed, client)
    alpha: float = Field(0.0, ge=0, description="synthetic: spread of the clients' models (u_k ~ N(0, alpha))")
    beta: float = Field(0.0, ge=0, description="synthetic: spread of the clients' feature means (B_k ~ N(0, beta))")
    iid: bool = Field(False, description="synthetic: one model and one feature distribution for all clients")
    eval_clients: int = Field(1000, gt=0, description="synthetic: size of the fixed, seeded cohort of clients "
                                                      "every evaluation reports (all clients if fewer)")

    @model_validator(mode="after")
    def _synthetic_split(self):
        if self.dataset == "synthetic" and self.split.kind == "natural":
            raise ValueError("split.kind: natural needs an npz data set with client ids; synthetic clients are "
                             "generated, not split")
        return self

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        if v in DATASETS or v.startswith("npz:"):
            return v
        raise ValueError(f"unknown dataset {v!r}; expected one of {', '.join(DATASETS)} or npz:<path>")


class ClientsConfig(Strict):
    total: int = Field(100, gt=0)
    per_round: int = Field(10, gt=0)
    deadline_s: float | None = Field(None, gt=0, description="simulated seconds: a client slower than this is "
                                                              "late, its update lost (harness/availability.py)")
    overselect: float = Field(1.0, ge=1, description="sample ceil(overselect x per_round) clients, keep the first "
                                                     "per_round to finish")

    @model_validator(mode="after")
    def _fits(self):
        if self.per_round > self.total:
            raise ValueError(f"per_round ({self.per_round}) exceeds total ({self.total})")
        return self


class ModelConfig(Strict):
    name: Literal[MODELS] = "auto"  # type: ignore[valid-type]
    norm: Literal["bn", "sbn", "batch"] = "bn"


class TrainConfig(Strict):
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(10, gt=0)
    lr: float = Field(0.1, gt=0)
    lr_decay: float = Field(0.998, gt=0, le=1)
    weight_decay: float = Field(1.2e-6, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)


PAPER_TIERS = [
    Tier(name="e", cap=1 / 16, compute_mflops=46528),
    Tier(name="d", cap=1 / 8, compute_mflops=93056),
    Tier(name="c", cap=1 / 4, compute_mflops=186112),
    Tier(name="b", cap=1 / 2, compute_mflops=372224),
    Tier(name="a", cap=1.0, compute_mflops=744448),
]


class DevicesConfig(Strict):
    tiers: list[Tier] = Field(default_factory=lambda: [t.model_copy() for t in PAPER_TIERS], min_length=1)
    down_mb_s: float = Field(110.6, gt=0, description="download bandwidth, megabytes per second")
    up_mb_s: float = Field(14.0, gt=0, description="upload bandwidth, megabytes per second")
    assignment: Literal["dynamic", "fixed"] = "dynamic"
    trace: str | None = Field(None, description="CSV with client_id[,round],tier overriding the drawn tiers")
    availability: str | dict[str, float] = Field(
        "always", description="'always', or per tier the probability of being online in a round (tiers not "
                              "named: 1)")
    availability_trace: str | None = Field(None, description="CSV client_id,start_round,end_round of online "
                                                             "intervals (both ends inclusive)")
    availability_period: int | None = Field(None, gt=0, description="repeat the availability trace every so "
                                                                    "many rounds")

    @model_validator(mode="after")
    def _tiers(self):
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if sum(t.proportion for t in self.tiers) <= 0:
            raise ValueError("tier proportions must not all be zero")
        a = self.availability
        if isinstance(a, str) and a != "always":
            raise ValueError(f"availability: expected 'always' or a mapping of tier to probability, got {a!r}")
        if isinstance(a, dict):
            unknown = set(a) - set(names)
            if unknown:
                raise ValueError(f"availability: unknown tier(s) {', '.join(sorted(unknown))} (tiers: {', '.join(names)})")
            outside = {t: p for t, p in a.items() if not 0 <= p <= 1}
            if outside:
                raise ValueError(f"availability: probabilities must lie in [0, 1], got {outside}")
        return self


class ExecutorGroup(Strict):
    """Executors of their own, with their own quota, for the clients of some tiers (Ray engine)."""

    tiers: list[str] = Field(min_length=1)
    executors: int = Field(1, gt=0)
    cpus_per_executor: float = Field(1.0, gt=0)
    gpus_per_executor: float = Field(0.0, ge=0)


class EngineConfig(Strict):
    backend: Literal["serial", "ray"] = "ray"
    executors: int | Literal["auto"] = "auto"
    cpus_per_executor: float = Field(1.0, gt=0)
    gpus_per_executor: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    state_store: Literal["memory", "disk"] = "memory"
    include_dashboard: bool = False
    start_timeout_s: float = Field(60.0, gt=0)
    max_failed_fraction: float = Field(0.2, ge=0, le=1, description="the experiment fails when more than this "
                                       "fraction of a round's clients fail (any failure in round 0)")
    batch_clients: Literal["auto", True, False] = Field(
        "auto", description="train the clients of a call that share a model shape as one batched program "
                            "(harness/batched.py; same results as one by one); auto: on where the executor's "
                            "device is CUDA, off on CPU")
    cuda_graphs: Literal["auto", True, False] = Field(
        "auto", description="replay the batched local step from a captured CUDA graph; auto and true: on where "
                            "the device is CUDA (and batch_clients is on), never on CPU")
    groups: list[ExecutorGroup] = Field(
        default_factory=list, description="per-tier executor groups: a weak tier gets a smaller share of the "
                                          "machine; clients of other tiers use the main pool")

    @field_validator("executors")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be a positive integer or 'auto'")
        return v


class MethodConfig(BaseModel):
    """`name` picks the strategy; every other key is one of that strategy's parameters."""

    model_config = ConfigDict(extra="allow")
    name: str = "fedavg"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ExperimentConfig(Strict):
    name: str = "experiment"
    seed: int = Field(1, ge=0, le=2**32 - 1, description="numpy's seed range")
    rounds: int = Field(20, gt=0)
    eval_every: int = Field(1, gt=0)
    checkpoint_every: int = Field(10, ge=0, description="rounds between checkpoints in sweeps; 0: none")
    data: DataConfig = DataConfig()
    clients: ClientsConfig = ClientsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    devices: DevicesConfig = DevicesConfig()
    method: MethodConfig = MethodConfig()
    engine: EngineConfig = EngineConfig()
    out: str = "results/runs"

    @model_validator(mode="after")
    def _overselection_fits(self):
        c = self.clients
        wanted = sample_size(c.per_round, c.overselect)
        if wanted > c.total:
            raise ValueError(f"clients.overselect: {c.overselect:g} x per_round {c.per_round} = {wanted} clients, "
                             f"more than clients.total ({c.total})")
        return self

    @model_validator(mode="after")
    def _groups_name_tiers(self):
        known = {t.name for t in self.devices.tiers}
        seen: set[str] = set()
        for i, group in enumerate(self.engine.groups):
            for tier in group.tiers:
                if tier not in known:
                    raise ValueError(f"engine.groups.{i}.tiers: unknown tier {tier!r} (tiers: {', '.join(sorted(known))})")
                if tier in seen:
                    raise ValueError(f"engine.groups.{i}.tiers: tier {tier!r} is in two groups")
                seen.add(tier)
        return self

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        return check_name(v)


MAX_NAME = 120  # a folder name, leaving room for the temporary and checkpoint names made from it


def check_name(v: str) -> str:
    """A name that is one folder of its own under the output folder: not '.', '..', nor a name
    starting with '_' or '.' (Tune's `_tune`, running experiments' parts, hidden files)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", v):
        raise ValueError("use letters, digits, '.', '_' and '-' only")
    if len(v) > MAX_NAME:
        raise ValueError(f"{len(v)} characters is too long for a folder name with its files (at most {MAX_NAME})")
    if v.startswith((".", "_")):
        raise ValueError(f"{v!r} is reserved: a name must not start with '.' or '_'")
    return v


class TuneConfig(Strict):
    """How `fedbench sweep` runs the grid on Ray Tune: each trial reserves a driver bundle and one
    bundle per executor."""

    max_concurrent_trials: int = Field(1, gt=0)
    executors_per_trial: int = Field(1, gt=0)
    cpus_per_executor: float = Field(1.0, gt=0)
    gpus_per_executor: float = Field(0.0, ge=0)
    driver_cpus: float = Field(0.25, gt=0, description="the trial's own process: aggregation and evaluation")
    max_failures: int = Field(2, ge=0, description="retries of a failed trial (from its last checkpoint), e.g. "
                                                   "after its node died")
    verbose: int = Field(1, ge=0, le=3)


class SweepFile(Strict):
    """A config file: the base experiment plus optional grid and Tune settings."""

    grid: dict[str, list[Any]] = Field(default_factory=dict)
    tune: TuneConfig = TuneConfig()
