"""The minibatches of a group of stacked clients, step by step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.training import LocalJob, minibatches


@dataclass
class Schedule:
    """Per step s and client k: the sample indices (into the group's concatenated data), the sample
    weights (1 real, 0 padding) and whether the client is still training."""

    index: torch.Tensor  # (S, K, B) int64
    weight: torch.Tensor  # (S, K, B)
    active: torch.Tensor  # (S, K) bool
    samples: list[int]
    steps: list[int]


def schedule(jobs: list[LocalJob], dtype: torch.dtype) -> Schedule:
    """Every client's minibatches, drawn from its generator as training it alone draws them."""
    train = jobs[0].train
    bs = train.batch_size
    sizes = [len(j.y) for j in jobs]
    steps = [train.epochs * math.ceil(n / bs) for n in sizes]
    total = max(steps)
    index = torch.zeros(total, len(jobs), bs, dtype=torch.int64)
    weight = torch.zeros(total, len(jobs), bs, dtype=dtype)
    active = torch.zeros(total, len(jobs), dtype=torch.bool)
    offset = 0
    for k, (job, n) in enumerate(zip(jobs, sizes)):
        for s, batch in enumerate(minibatches(n, bs, train.epochs, job.generator)):
            index[s, k, :len(batch)] = batch + offset
            index[s, k, len(batch):] = batch[0] + offset  # padding: any real sample, weight 0
            weight[s, k, :len(batch)] = 1
            active[s, k] = True
        # After its last step a client computes on real samples of its own (so that nothing in the
        # discarded computation is degenerate), and the `active` flag drops the result.
        index[steps[k]:, k] = torch.arange(bs) % n + offset
        weight[steps[k]:, k] = 1
        offset += n
    return Schedule(index, weight, active, [train.epochs * n for n in sizes], steps)
