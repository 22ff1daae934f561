"""Which jobs train together, and the fallback to one by one."""
from __future__ import annotations

import logging

from harness.batched.graphs import GraphCache
from harness.batched.program import StackedClients, run
from harness.batched.schedule import schedule
from harness.training import LocalJob, train_one

log = logging.getLogger(__name__)


def group_key(job: LocalJob) -> tuple:
    """Jobs with equal keys train as one program: the same model spec, unit-masked groups, data
    shape and device, training settings and options."""
    t = job.train
    return (job.spec, tuple(sorted(job.unit_masks or {})), str(job.x.device), tuple(job.x.shape[1:]), job.x.dtype,
            t.epochs, t.batch_size, t.weight_decay, t.momentum, job.clip_grad_norm, job.class_mask is not None,
            tuple(sorted(job.update_masks or {})), tuple(sorted(job.weight_masks or {})), job.importance,
            job.rule.key() if job.rule is not None else None, tuple(sorted(job.anchor or {})))


def train_group(jobs: list[LocalJob], bench, graphs: GraphCache | None = None) -> None:
    """Train jobs of one group (equal `group_key`) as one batched program."""
    if len({group_key(j) for j in jobs}) != 1:
        raise ValueError("train_group needs jobs of one group (equal group_key)")
    plan = schedule(jobs, jobs[0].x.dtype, jobs[0].rule.batches_per_step if jobs[0].rule else 1)
    rows = sum(len(j.y) for j in jobs)
    model, fresh = bench.model(jobs[0].spec)
    make = lambda capacity: StackedClients(jobs, model, fresh, capacity)  # noqa: E731
    if graphs is not None:
        program = graphs.program((group_key(jobs[0]), len(jobs)), rows, make)
        if program is not None:
            run(program, jobs, plan, graphed=True)
            return
    run(make(rows), jobs, plan)


def train_single(job: LocalJob, bench) -> None:
    """Train one job by itself: a job with a rule as a group of one of the functional program, any
    other on `bench.loaded(job)` (this process's model of the job's spec, loaded)."""
    if job.functional:
        train_group([job], bench)
    else:
        train_one(job, bench.loaded)


def train_jobs(jobs: list[LocalJob], bench, graphs: GraphCache | None = None,
               batch: bool = True) -> list[BaseException | None]:
    """Train every job, batched by group where possible (with `batch`), from captured graphs when a
    graph cache is given (executors on CUDA); per job the exception that stopped it (None: trained).
    Jobs with hooks or without data, and groups of one without graphs, train alone; a group whose
    batched program raises trains alone, client by client, so that only a faulty client fails."""
    errors: list[BaseException | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    alone: list[int] = []
    for i, job in enumerate(jobs):
        if batch and job.batchable:
            groups.setdefault(group_key(job), []).append(i)
        else:
            alone.append(i)
    for members in groups.values():
        if len(members) == 1 and graphs is None:
            alone.extend(members)
            continue
        # The batched program draws the clients' data orders from their generators; trained alone
        # after a failure, a client must draw them again from the same state.
        rng_states = [jobs[i].generator.get_state() for i in members]
        try:
            train_group([jobs[i] for i in members], bench, graphs)
        except Exception as e:  # noqa: BLE001 - retried client by client below
            log.warning("batched training of %d clients failed (%s: %s); training them one by one",
                        len(members), type(e).__name__, e)
            for i, state in zip(members, rng_states):
                jobs[i].generator.set_state(state)
            alone.extend(members)
    for i in sorted(alone):
        try:
            train_single(jobs[i], bench)
        except Exception as e:  # noqa: BLE001 - a client's failure is data
            errors[i] = e
    return errors
