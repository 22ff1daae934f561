"""FedProx, written in its module alone on the client rules: the proximal step worked out by hand,
partial work, and the same numbers one by one and batched."""
import math

import pytest
import torch

from baselines.fedprox import ProximalRule
from harness.batched.groups import train_single
from conftest import client_of, local_update, local_update_batch, round_tasks, started

pytestmark = pytest.mark.usefixtures("one_thread")


def tiered_tasks(bench, strategy, clients):
    """configure() and the round's tasks, client k on tier k mod 5 (a, b, c, d, e)."""
    from harness.records import ClientSlot, ClientTask

    tiers = bench.cfg.devices.tiers
    slots = [ClientSlot(c, tiers[k % len(tiers)], bench.clients[c].num_samples) for k, c in enumerate(clients)]
    broadcast, instructions = strategy.configure(0, slots)
    return broadcast, [ClientTask(s.client_id, 0, s.tier, i) for s, i in zip(slots, instructions)]


def trained(strategy, broadcast, task, steps):
    job = client_of(strategy).local_job(broadcast, task)
    job.max_steps = steps
    train_single(job, strategy.bench)
    return job.trained


def test_the_proximal_term_by_hand(config):
    """Step 1 starts at the anchor, where the penalty's gradient is 0: FedProx's first step is
    FedAvg's. Step 2 adds lr x mu x (w1 - w_global) with w1 - w_global = -lr x (gradient + wd x w0),
    the first step's move: w2(prox) - w2(avg) = -lr x mu x (w1 - w_global)."""
    torch.set_default_dtype(torch.float64)
    try:
        from harness.data import Dataset
        real = Dataset.normalize
        Dataset.normalize = lambda self, x: real(self, x).double()
        mu = 0.7
        _, prox = started(config(**{"method.name": "fedprox", "method.mu": mu}))
        _, avg = started(config(**{"method.name": "fedavg"}))
        broadcast, tasks = round_tasks(prox.bench, prox, 0, [3])
        assert all(torch.equal(broadcast[k], avg.global_state[k]) for k in broadcast)
        lr = prox.bench.lr(0)
        one_prox, one_avg = trained(prox, broadcast, tasks[0], 1), trained(avg, broadcast, tasks[0], 1)
        two_prox, two_avg = trained(prox, broadcast, tasks[0], 2), trained(avg, broadcast, tasks[0], 2)
        for k, w0 in broadcast.items():
            assert torch.allclose(one_prox[k], one_avg[k], atol=1e-12)
            expected = two_avg[k] - lr * mu * (one_avg[k] - w0)
            assert torch.allclose(two_prox[k], expected, atol=1e-10), k
        assert not torch.allclose(two_prox["fc1.weight"], two_avg["fc1.weight"], atol=1e-6)
    finally:
        Dataset.normalize = real
        torch.set_default_dtype(torch.float32)


def test_the_penalty():
    rule = ProximalRule(0.5)
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    anchor = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.0])}
    assert float(rule.penalty(params, anchor)) == pytest.approx(0.25 * (1 + 1 + 4))
    assert rule.key() != ProximalRule(0.1).key() and rule.key() == ProximalRule(0.5).key()


def test_partial_work_by_tier(config):
    bench, prox = started(config(**{"method.name": "fedprox", "method.partial_work": "tier", "train.epochs": 2}))
    tiers = bench.cfg.devices.tiers
    fastest = max(t.compute_mflops for t in tiers)
    broadcast, tasks = tiered_tasks(bench, prox, [0, 1, 2, 3, 4])
    client = client_of(prox)
    for task in tasks:
        job = client.local_job(broadcast, task)
        steps = 2 * math.ceil(len(job.y) / job.train.batch_size)
        want = None if task.instruction >= 1 else max(1, math.ceil(steps * task.instruction - 1e-9))
        assert job.max_steps == want
        train_single(job, bench)
        assert job.stats.steps == (want or steps)
    assert [t.instruction for t in tasks] == [t.compute_mflops / fastest for t in tiers]


def test_partial_work_at_random_as_the_official_code(config):
    bench, prox = started(config(**{"method.name": "fedprox", "method.partial_work": "random",
                                    "method.stragglers": 0.5, "train.epochs": 5}))
    from harness.records import ClientSlot

    slots = [ClientSlot(i, bench.cfg.devices.tiers[0], bench.clients[i].num_samples) for i in range(10)]
    _, work = prox.configure(3, slots)
    assert sum(w is None for w in work) == 5  # round(10 x (1 - 0.5)) run every epoch
    assert all(w in {1 / 5, 2 / 5, 3 / 5, 4 / 5} for w in work if w is not None)
    assert prox.configure(3, slots)[1] == work  # drawn from (seed, round)


def test_one_by_one_equals_batched(config):
    bench, prox = started(config(**{"method.name": "fedprox", "method.mu": 1.0, "method.partial_work": "tier",
                                    "clients.total": 100, "data.split.kind": "dirichlet", "data.split.alpha": 1.0}))
    broadcast, tasks = tiered_tasks(bench, prox, [0, 1, 2, 3, 4, 5])
    alone = [local_update(prox, broadcast, t) for t in tasks]
    together = local_update_batch(prox, broadcast, tasks)
    for a, b in zip(alone, together):
        assert a.ok and b.ok and a.flops == b.flops
        for k in a.payload:
            assert torch.allclose(a.payload[k], b.payload[k], atol=1e-6), k
