"""The minibatches of a group of stacked clients, step by step."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.training import LocalJob, minibatches


@dataclass
class Schedule:
    """Per step s, client k and minibatch j of the step (a rule's `batches_per_step`): the sample
    indices (into the group's concatenated data), the sample weights (1 real, 0 padding) and whether
    the client is still training."""

    index: torch.Tensor  # (S, K, J, B) int64
    weight: torch.Tensor  # (S, K, J, B)
    active: torch.Tensor  # (S, K) bool
    samples: list[int]  # per client, samples processed (in every minibatch of its steps)
    steps: list[int]


def client_steps(job: LocalJob, per_step: int) -> list[list[torch.Tensor]]:
    """A client's steps, each a list of `per_step` minibatches, drawn from its generator as training
    it alone draws them: a step takes the next `per_step` minibatches of the epochs' permutations
    (minibatches left over at the end make no step), up to `job.max_steps`."""
    train = job.train
    batches = list(minibatches(len(job.y), train.batch_size, train.epochs, job.generator))
    steps = [batches[i:i + per_step] for i in range(0, len(batches) - per_step + 1, per_step)]
    return steps if job.max_steps is None else steps[:job.max_steps]


def schedule(jobs: list[LocalJob], dtype: torch.dtype, per_step: int = 1) -> Schedule:
    """Every client's minibatches, step by step."""
    bs = jobs[0].train.batch_size
    plans = [client_steps(job, per_step) for job in jobs]
    total = max([len(p) for p in plans] + [1])
    index = torch.zeros(total, len(jobs), per_step, bs, dtype=torch.int64)
    weight = torch.zeros(total, len(jobs), per_step, bs, dtype=dtype)
    active = torch.zeros(total, len(jobs), dtype=torch.bool)
    offset = 0
    samples = []
    for k, (job, plan) in enumerate(zip(jobs, plans)):
        n = len(job.y)
        for s, step in enumerate(plan):
            for j, batch in enumerate(step):
                index[s, k, j, :len(batch)] = batch + offset
                index[s, k, j, len(batch):] = batch[0] + offset  # padding: any real sample, weight 0
                weight[s, k, j, :len(batch)] = 1
            active[s, k] = True
        # After its last step a client computes on real samples of its own (so that nothing in the
        # discarded computation is degenerate), and the `active` flag drops the result.
        index[len(plan):, k] = torch.arange(bs) % n + offset
        weight[len(plan):, k] = 1
        samples.append(sum(len(b) for step in plan for b in step))
        offset += n
    return Schedule(index, weight, active, samples, [len(p) for p in plans])
