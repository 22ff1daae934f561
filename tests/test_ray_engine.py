"""The Ray engine: same numbers as the serial engine on any pool size, fractional quotas, faults."""
import os
import signal
import threading
import time

import pandas as pd
import pytest

from harness.errors import UserError
from harness.experiment import Experiment
from harness.ray_engine import RayEngine
from harness.results import ROUNDS
from harness.workbench import Workbench

IGNORE = [c for c in ROUNDS.names if c.startswith("wall")] + ["experiment"]


def read(cfg):
    folder = f"{cfg.out}/{cfg.name}"
    rounds = pd.read_parquet(f"{folder}/rounds.parquet").drop(columns=IGNORE)
    clients = pd.read_parquet(f"{folder}/clients.parquet").drop(columns=["experiment"])
    return rounds, clients


def assert_same(a, b):
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])


def test_serial_and_ray_pools_of_1_and_4_give_identical_rows(ray_session, config):
    base = {"rounds": 2, "clients.per_round": 6}
    serial = config(name="serial", **base, **{"engine.backend": "serial"})
    Experiment(serial).run()
    for n in (1, 4):  # (pools of 2: every method, below)
        cfg = config(name=f"ray{n}", **base, **{"engine.backend": "ray", "engine.executors": n})
        Experiment(cfg).run()
        assert_same(read(serial), read(cfg))


METHODS = {
    "fedprox": {"method.name": "fedprox", "method.mu": 0.5, "method.partial_work": "tier"},
    "heterofl": {"method.name": "heterofl"},
    "fedrolex": {"method.name": "fedrolex"},
    "prunefl": {"method.name": "prunefl", "method.interval": 1, "method.initial_samples": 20,
                "method.initial_interval": 2, "method.initial_max_rounds": 4},
    "fedlps-paper": {"method.name": "fedlps"},
    "fedlps-reference": {"method.name": "fedlps", "method.variant": "reference"},
    "perfedavg-hf": {"method.name": "perfedavg", "method.version": "hf"},
    "ditto": {"method.name": "ditto"},
    "ditto-reference": {"method.name": "ditto", "method.variant": "reference"},
    "fedrep": {"method.name": "fedrep", "method.head_epochs": 2},
}  # Per-FedAvg and FedRep (reference): one by one == batched and resumes in tests/test_personalised.py


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_gives_identical_rows_serially_and_on_ray_pools(ray_session, config, method):
    """The executors' copies of the strategy (built there from the config) behave as the driver's
    (pools of other sizes: the test above, on FedAvg)."""
    base = {"rounds": 2, "clients.per_round": 6, **METHODS[method]}
    serial = config(name=f"{method}-serial", **base, **{"engine.backend": "serial"})
    Experiment(serial).run()
    cfg = config(name=f"{method}-ray", **base, **{"engine.backend": "ray", "engine.executors": 2})
    Experiment(cfg).run()
    assert_same(read(serial), read(cfg))


def test_fractional_logical_gpus_all_run_at_once(ray_session, config):
    cfg = config(**{"engine.backend": "ray", "engine.executors": 4, "engine.cpus_per_executor": 0.5,
                    "engine.gpus_per_executor": 0.25})
    engine = RayEngine(cfg.engine)
    engine.start(Workbench(cfg))
    try:
        assert len(engine.executor_info) == 4  # all four are up together on one logical GPU
        assert ray_session.available_resources().get("GPU", 0) == 0
        assert {e["device"] for e in engine.executor_info} == {"cpu"}  # no CUDA device behind the logical GPU
        assert {e["threads"] for e in engine.executor_info} == {1}
    finally:
        engine.close()


def test_an_oversized_pool_fails_fast_with_one_line(ray_session, config):
    for overrides, asked in [({"engine.executors": 8}, "ask for 8 CPUs"),
                             ({"engine.executors": 2, "engine.gpus_per_executor": 1}, "2 GPUs")]:
        cfg = config(**{"engine.backend": "ray", **overrides})
        engine = RayEngine(cfg.engine)
        start = time.monotonic()
        with pytest.raises(UserError) as e:
            engine.start(Workbench(cfg))
        assert time.monotonic() - start < 10
        assert asked in str(e.value) and "the cluster has 4 CPUs, 1 GPUs" in str(e.value)
        assert "\n" not in str(e.value)


def test_a_raising_client_is_recorded_and_the_round_goes_on(ray_session, config):
    cfg = config(name="faulty", rounds=2, **{"engine.backend": "ray", "engine.executors": 2,
                                             "method.name": "tests.faulty:FailingFedAvg",
                                             "method.fail_clients": list(range(1, 20, 2))})
    Experiment(cfg).run()
    rounds, clients = read(cfg)
    failed = clients[clients.status == "error"]
    assert len(failed) >= 1 and failed["error"].str.contains("broke on purpose").all()
    assert failed["flops"].isna().all()
    assert (clients[clients.status == "ok"]["flops"] > 0).all()
    assert rounds["clients_failed"].sum() == len(failed)
    assert (rounds["clients_ok"] + rounds["clients_failed"] == 5).all()


def test_a_killed_executor_is_replaced_and_results_do_not_change(ray_session, config):
    base = {"rounds": 2, "clients.per_round": 6, "train.epochs": 10}
    reference = config(name="undisturbed", **base, **{"engine.backend": "serial"})
    Experiment(reference).run()

    cfg = config(name="killed", **base, **{"engine.backend": "ray", "engine.executors": 2})
    engine = RayEngine(cfg.engine)
    original_run = engine.run
    victims = []

    def run_and_kill(broadcast, tasks):
        if tasks[0].round == 1:  # kill executor 0's process while it trains its share of the round
            pid = engine.executor_info[0]["pid"]
            threading.Timer(0.1, os.kill, (pid, signal.SIGKILL)).start()
            victims.append(pid)
        return original_run(broadcast, tasks)

    engine.run = run_and_kill
    try:
        Experiment(cfg, engine=engine).run()
        pids = ray_session.get([a.ready.remote() for a in engine.actors])
    finally:
        engine.close()
    assert victims and victims[0] not in {p["pid"] for p in pids}  # replaced by a new process
    assert_same(read(reference), read(cfg))


def test_shares_are_balanced_by_work_and_keep_task_order():
    from harness.ray_engine import balanced_shares

    assert balanced_shares([5, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]
    assert balanced_shares([2, 2, 2, 2], 2) == [[0, 2], [1, 3]]
    assert balanced_shares([3], 4) == [[0], [], [], []]


def test_pools_per_tier_group_by_hand():
    from harness.config import EngineConfig
    from harness.ray_engine import plan_pools

    weak = {"tiers": ["e", "d"], "executors": 2, "cpus_per_executor": 0.5}
    pools = plan_pools(EngineConfig(groups=[weak]), list("edcba"), cpus=4, gpus=0)
    assert [(p.tiers, p.executors, p.cpus) for p in pools] == [(frozenset("ed"), 2, 0.5), (None, 3, 1.0)]
    everyone = [weak, {"tiers": ["c", "b", "a"], "executors": 1, "cpus_per_executor": 2}]
    assert [p.tiers for p in plan_pools(EngineConfig(groups=everyone), list("edcba"), 4, 0)] == [
        frozenset("ed"), frozenset("cba")]  # no main pool: every tier has a group


def test_tier_groups_run_weak_tiers_on_their_own_smaller_executors(ray_session, config):
    base = {"rounds": 2, "clients.per_round": 8}
    serial = config(name="serial_g", **base, **{"engine.backend": "serial"})
    Experiment(serial).run()
    groups = [{"tiers": ["e", "d"], "executors": 2, "cpus_per_executor": 0.5}]
    cfg = config(name="groups", **base, **{"engine.backend": "ray", "engine.executors": 1, "engine.groups": groups})
    engine = RayEngine(cfg.engine)
    try:
        Experiment(cfg, engine=engine).run()
        assert [(p.executors, p.cpus) for p in engine.pools] == [(2, 0.5), (1, 1.0)]
        assert ray_session.available_resources().get("CPU", 0) == pytest.approx(2.0)  # 4 - 2 x 0.5 - 1
        assert engine.pool_of_tier["e"] is engine.pools[0] and engine.pool_of_tier["a"] is engine.pools[1]
    finally:
        engine.close()
    assert_same(read(serial), read(cfg))  # one torch thread everywhere: the same numbers


def test_group_tiers_must_exist(config):
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="engine.groups.0.tiers: unknown tier 'z'"):
        config(**{"engine.groups": [{"tiers": ["z"]}]})
