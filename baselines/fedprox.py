"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020).

FedAvg with two changes, both on the client:
1. Proximal term: the local objective is F_k(w) + mu/2 ||w - w^t||^2, where w^t is the global
   model the client received (`ProximalRule`: the penalty, with w^t as the job's anchor).
2. Partial work: a client may return an inexact solution, so a straggler's fewer local steps still
   count (the paper's systems heterogeneity). `partial_work` chooses who does less:
   - `none`: every client runs all `train.epochs` epochs;
   - `tier`: the device tier sets it: a client runs ceil(S x c / c_max) of its S local steps, c its
     tier's compute speed and c_max the fastest tier's, so that a slower device computes about as
     long as the fastest one;
   - `random` (the paper's experiments, as the official code draws it): round(q x (1 - stragglers))
     of the q sampled clients run all E epochs, the others a uniformly random number of epochs in
     1..E-1 (numpy's randint(1, E); 1 when E = 1); drawn per (seed, round).
   The server decides (it sees the round's clients and tiers) and sends each client the fraction
   of its local steps to run.
The server takes the sample-weighted mean of the client models, as FedAvg (the paper's Algorithm 2
averages the received models; its experiments weight by samples).

Official code: github.com/litian96/FedProx (TensorFlow; `flearn/optimizer/pgd.py` PerturbedGradientDescent
adds mu x (w - w^t) to the gradient, `flearn/trainers/fedprox.py` draws the stragglers' epochs), commit
d2a4501f319f1594b732d88315c5ca1a72855f50. Its optimizer adds mu x (w - w^t) to the gradient, which is
the gradient of the penalty here; the paper's mu grid is {0.001, 0.01, 0.1, 0.5, 1}.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from baselines.fedavg import FedAvg, FedAvgClient
from harness.records import ClientTask
from harness.seeding import rng
from harness.strategy import MethodParams
from harness.training import LocalJob, LocalRule


class ProximalRule(LocalRule):
    """Local SGD on the cross-entropy plus mu/2 ||w - anchor||^2 over the anchored tensors."""

    def __init__(self, mu: float):
        self.mu = mu

    def penalty(self, params, anchor):
        return self.mu / 2 * sum(((params[n] - anchor[n]) ** 2).sum() for n in anchor)


class FedProxParams(MethodParams):
    mu: float = Field(0.01, ge=0, allow_inf_nan=False, description="weight of the proximal term")
    partial_work: Literal["none", "tier", "random"] = Field("none", description="who runs fewer local steps")
    stragglers: float = Field(0.5, ge=0, le=1, allow_inf_nan=False,
                              description="`random`: the fraction of sampled clients that straggle")


class FedProxClient(FedAvgClient):
    def local_job(self, global_state, task: ClientTask) -> LocalJob:
        bench, p = self.bench, self.params
        anchor = {k: v.to(bench.device) for k, v in global_state.items()}
        job = bench.job(task, global_state, clip_grad_norm=p.clip_grad_norm, rule=ProximalRule(p.mu),
                        anchor=anchor)
        work = task.instruction
        if work is not None and work < 1:
            steps = job.train.epochs * math.ceil(len(job.y) / job.train.batch_size)
            job.max_steps = max(1, math.ceil(steps * work - 1e-9))
        return job


class FedProx(FedAvg):
    Client = FedProxClient
    Params = FedProxParams
    title = "FedProx"

    def configure(self, rnd, clients):
        """The global model, and per client the fraction of its local steps to run (None: all)."""
        p = self.params
        work: list[float | None] = [None] * len(clients)
        if p.partial_work == "tier":
            fastest = max(t.compute_mflops for t in self.bench.cfg.devices.tiers)
            work = [s.tier.compute_mflops / fastest for s in clients]
        elif p.partial_work == "random":
            epochs = self.bench.cfg.train.epochs
            gen = rng(self.bench.cfg.seed, "fedprox-stragglers", rnd)
            full = set(gen.choice(len(clients), round(len(clients) * (1 - p.stragglers)), replace=False).tolist())
            work = [None if k in full else int(gen.integers(1, max(epochs, 2))) / epochs for k in range(len(clients))]
        return self.global_state, work
