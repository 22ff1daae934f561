"""Availability, deadlines and over-selection (harness/availability.py): by hand, then through the
round loop, on both engines."""
import numpy as np
import pandas as pd
import pytest

from harness.availability import Availability, round_outcome, sample_size
from harness.config import expand
from harness.errors import ConfigError
from harness.experiment import Experiment
from conftest import run_serial

pytestmark = pytest.mark.usefixtures("one_thread")


def devices(**settings):
    return expand({"devices": settings})[0][0].devices


def test_a_trace_of_five_clients_by_hand(tmp_path):
    trace = tmp_path / "online.csv"
    trace.write_text("client_id,start_round,end_round\n0,0,1\n0,4,4\n1,2,3\n2,0,9\n3,5,5\n")
    avail = Availability(devices(availability_trace=str(trace)), num_clients=5, seed=1)
    tiers = np.zeros(5, dtype=int)
    online = {r: np.flatnonzero(avail.online(r, tiers)).tolist() for r in range(7)}
    # client 4 is not in the trace: always online; intervals include both ends
    assert online == {0: [0, 2, 4], 1: [0, 2, 4], 2: [1, 2, 4], 3: [1, 2, 4], 4: [0, 2, 4], 5: [2, 3, 4], 6: [2, 4]}
    periodic = Availability(devices(availability_trace=str(trace), availability_period=4), 5, 1)
    assert np.flatnonzero(periodic.online(5, tiers)).tolist() == [0, 2, 4]  # round 5 is looked up as round 1


def test_per_tier_probabilities_are_drawn_per_round_and_client():
    d = devices(availability={"e": 0.0, "a": 0.5})
    avail = Availability(d, num_clients=2000, seed=3)
    tier_of = np.array([0] * 1000 + [4] * 1000)  # tier e, then tier a (the paper's tiers e..a)
    online = avail.online(7, tier_of)
    assert not online[:1000].any() and 0.45 < online[1000:].mean() < 0.55
    assert np.array_equal(online, Availability(d, 2000, 3).online(7, tier_of))  # a function of (seed, round)
    assert not np.array_equal(online, avail.online(8, tier_of))


@pytest.mark.parametrize("text, problem", [
    ("client,start\n0,1\n", "lacks column"),
    ("client_id,start_round,end_round\n0,3,1\n", "start_round <= end_round"),
    ("client_id,start_round,end_round\n99,0,1\n", "0 <= client_id < 5"),
    ("client_id,start_round,end_round\nx,0,1\n", "must be integers"),
])
def test_bad_traces_are_one_line_errors(tmp_path, text, problem):
    trace = tmp_path / "t.csv"
    trace.write_text(text)
    with pytest.raises(ConfigError, match="devices.availability_trace") as e:
        Availability(devices(availability_trace=str(trace)), 5, 1)
    assert problem in str(e.value)


def test_deadline_and_overselection_by_hand():
    times = {1: 0.5, 2: 0.2, 3: 0.9, 4: 0.2, 5: 0.4}
    tiebreak = {1: 0.1, 2: 0.9, 3: 0.5, 4: 0.3, 5: 0.2}
    # no deadline, keep 3 of 5: the first three to finish (2 and 4 tie at 0.2: 4 first by its draw)
    out = round_outcome(times, 3, None, tiebreak)
    assert (out.kept, out.late, out.not_kept, out.duration_s) == ([2, 4, 5], [], [1, 3], 0.4)
    # a deadline that client 3 misses, all five wanted: the round waits until the deadline
    out = round_outcome(times, 5, 0.8, tiebreak)
    assert (out.kept, out.late, out.not_kept, out.duration_s) == ([1, 2, 4, 5], [3], [], 0.8)
    # enough on time: the late one is not waited for
    out = round_outcome(times, 2, 0.8, tiebreak)
    assert (out.kept, out.late, out.not_kept, out.duration_s) == ([2, 4], [3], [1, 5], 0.2)
    assert sample_size(10, 1.3) == 13 and sample_size(10, 1.0) == 10 and sample_size(7, 1.5) == 11


def test_overselection_that_exceeds_the_clients_is_a_config_error():
    with pytest.raises(ConfigError, match="clients.overselect"):
        expand({"clients": {"total": 12, "per_round": 10, "overselect": 1.3}})


SLOW_TIER_DEADLINE = {  # a FedAvg client (36 images, dense CNN) takes 0.00926 s on tier e, 0.00717 s on tier a
    "clients.deadline_s": 0.008,
    "devices.tiers": [{"name": "e", "cap": 0.0625, "compute_mflops": 46528}, {"name": "a", "cap": 1.0, "compute_mflops": 744448}],
}


def test_a_deadline_that_one_tier_misses(config):
    rounds, clients = run_serial(config(rounds=3, **SLOW_TIER_DEADLINE))
    slow = clients["tier"] == "e"
    assert slow.any() and (clients.loc[slow, "status"] == "late").all() and (clients.loc[~slow, "status"] == "ok").all()
    assert (clients.loc[slow, "sim_s"] > 0.008).all() and (clients.loc[~slow, "sim_s"] <= 0.008).all()
    per_round = clients.groupby("round")
    assert rounds["clients_late"].tolist() == per_round["status"].apply(lambda s: (s == "late").sum()).tolist()
    assert rounds["clients_ok"].tolist() == per_round["status"].apply(lambda s: (s == "ok").sum()).tolist()
    # a round with a late client lasts the deadline; the cost columns count kept clients only
    late_rounds = rounds["clients_late"] > 0
    assert late_rounds.any() and (rounds.loc[late_rounds, "sim_round_s"] == 0.008).all()
    kept, lost = clients[clients["status"] == "ok"], clients[clients["status"] == "late"]
    assert rounds["flops"].sum() == pytest.approx(kept["flops"].sum())
    assert rounds["flops_dropped"].sum() == pytest.approx(lost["flops"].sum())
    assert rounds["bytes_dropped"].sum() == (lost["bytes_up"] + lost["bytes_down"]).sum()


def test_overselection_keeps_the_fastest(config):
    cfg = config(rounds=2, **{"clients.overselect": 1.6, "method.name": "heterofl"})  # sample 8, keep 5
    rounds, clients = run_serial(cfg)
    for _, group in clients.groupby("round"):
        assert len(group) == 8 and (group["status"] == "ok").sum() == 5 and (group["status"] == "not_kept").sum() == 3
        assert group.loc[group["status"] == "ok", "sim_s"].max() <= group.loc[group["status"] == "not_kept", "sim_s"].min()
    assert (rounds["clients_not_kept"] == 3).all()
    assert rounds["sim_round_s"].tolist() == clients[clients["status"] == "ok"].groupby("round")["sim_s"].max().tolist()


def test_too_few_online_clients_are_recorded(config, tmp_path):
    trace = tmp_path / "online.csv"
    trace.write_text("client_id,start_round,end_round\n" + "".join(f"{c},1,1\n" for c in range(17)))
    rounds, clients = run_serial(config(rounds=2, **{"devices.availability_trace": str(trace)}))
    # round 0: only the 3 clients the trace does not name (17, 18, 19) are online
    assert sorted(clients.loc[clients["round"] == 0, "client_id"]) == [17, 18, 19]
    assert rounds["clients_offline_short"].tolist() == [2, 0]


def test_the_defaults_leave_every_row_as_it_was(config):
    plain, _ = run_serial(config(name="plain", rounds=2))
    spelled, _ = run_serial(config(name="spelled", rounds=2, **{"devices.availability": "always", "clients.overselect": 1.0}))
    cols = [c for c in plain.columns if not c.startswith("wall") and c != "experiment"]
    pd.testing.assert_frame_equal(plain[cols], spelled[cols])
    assert (plain[["clients_late", "clients_not_kept", "clients_offline_short", "flops_dropped"]] == 0).all().all()


@pytest.mark.slow
def test_identical_rows_on_both_engines(ray_session, config):
    settings = {"rounds": 2, "clients.overselect": 1.4, "devices.availability": {"e": 0.5},
                "method.name": "fedlps", **SLOW_TIER_DEADLINE}
    serial = config(name="serial", **settings, **{"engine.backend": "serial"})
    ray = config(name="ray", **settings, **{"engine.backend": "ray", "engine.executors": 2})
    for cfg in (serial, ray):
        Experiment(cfg).run()
    read = lambda c, t: pd.read_parquet(f"{c.out}/{c.name}/{t}.parquet").drop(columns=["experiment"])  # noqa: E731
    a, b = read(serial, "clients"), read(ray, "clients")
    pd.testing.assert_frame_equal(a, b)
    assert set(a["status"]) >= {"ok", "not_kept"}
    wall = [c for c in read(serial, "rounds").columns if c.startswith("wall")]
    pd.testing.assert_frame_equal(read(serial, "rounds").drop(columns=wall), read(ray, "rounds").drop(columns=wall))
