"""FedAvg (McMahan et al., AISTATS 2017), the reference method.

Every sampled client trains the dense global model (device caps are ignored, as in the FedLPS
authors' code); the server takes the sample-weighted mean of the client models (`weighting:
uniform`: the plain mean, an ablation; Ditto, Per-FedAvg and FedRep, whose parameters extend these,
take it too).

Variants (`variant`):
- `official` (the default): the above.
- `reference`: the FedLPS authors' FedAvg (sunnyxuejj/FedLPS at 35fafba2171fac0b0de374ffcd2a85eb40bc975e,
  FedAvg.py, whose aggregation is agg/avg.py `average_weights`): the same mean plus Gaussian noise of
  std `--dp` = 0.001 on every coordinate of the aggregate (`with_authors_noise`), which their FedLPS
  adds too (agg/avg.py `avg`). The code draws it from torch's global generator; here from
  (seed, method, round).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from harness.cost import training_flops
from harness.records import ClientResult, ClientTask
from harness.seeding import rng
from harness.strategy import Client, MethodParams, Strategy
from harness.submodel import Contribution, aggregate, state_bytes
from harness.training import LocalJob

AUTHORS_NOISE = 0.001  # utils/options.py: --dp 0.001


def with_authors_noise(state: dict[str, torch.Tensor], seed: int, method: str, rnd: int,
                       std: float = AUTHORS_NOISE) -> dict[str, torch.Tensor]:
    """agg/avg.py (`avg`, `average_weights`): std x N(0, 1) added to every coordinate of every
    floating-point tensor of the aggregate (BN statistics included), drawn from (seed, method, round)."""
    gen = rng(seed, f"{method}-authors-noise", rnd)
    return {k: v + std * torch.from_numpy(gen.standard_normal(tuple(v.shape))).to(v.dtype) if v.is_floating_point()
            else v for k, v in state.items()}


class FedAvgParams(MethodParams):
    variant: Literal["official", "reference"] = "official"
    reference_noise: float = Field(AUTHORS_NOISE, ge=0,
                                   description="reference variant: std of the Gaussian noise added to the aggregate")
    weighting: Literal["samples", "uniform"] = Field(
        "samples", description="the server's weight of a client model: its sample count, or 1 (the plain mean)")


class FedAvgClient(Client):
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        return self.bench.job(task, global_state, clip_grad_norm=self.params.clip_grad_norm)

    def local_result(self, global_state, task: ClientTask, job: LocalJob) -> ClientResult:
        trained = {k: v.cpu() for k, v in job.trained.items() if k in global_state}
        size = state_bytes(trained)
        return ClientResult(
            task.client_id, task.round, payload=trained, num_samples=len(job.y), train_loss=job.stats.loss,
            train_acc=job.stats.accuracy, keep_ratio=1.0,
            flops=training_flops(self.bench.flops.forward(), job.stats.samples), bytes_up=size, bytes_down=size)


class FedAvg(Strategy):
    Client = FedAvgClient
    Params = FedAvgParams
    title = "FedAvg"

    def setup(self, store):
        super().setup(store)
        self.global_state = self.bench.init_global_state()

    def configure(self, rnd, clients):
        return self.global_state, [None] * len(clients)

    def aggregate(self, rnd, kept, dropped):
        """Dropped clients' updates are lost; they change nothing."""
        p = self.params
        uniform = getattr(p, "weighting", "samples") == "uniform"  # FedProx's parameters have no weighting
        contributions = [Contribution(r.payload, weight=1.0 if uniform else r.num_samples) for r in kept]
        self.global_state = aggregate(self.global_state, self.bench.layout, contributions)
        # (FedProx, a subclass, has no variant)
        if getattr(p, "variant", "official") == "reference" and kept and p.reference_noise > 0:
            # Reference quirk (agg/avg.py `average_weights`): noise on the aggregate. A round whose
            # clients all dropped changes nothing, as the code has no such round.
            self.global_state = with_authors_noise(self.global_state, self.bench.cfg.seed, "fedavg", rnd,
                                                   p.reference_noise)
        return {}

    def evaluate(self, rnd):
        return self.bench.evaluate_global(self.global_state)

    def state_dict(self):
        return {"global_state": self.global_state}

    def load_state_dict(self, state):
        self.global_state = state["global_state"]
