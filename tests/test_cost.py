"""The cost model and device tiers on hand examples."""
import numpy as np
import pytest

from harness.config import DevicesConfig, Tier
from harness.cost import DeviceAssigner, client_time, training_flops
from harness.errors import ConfigError


def test_client_time_by_hand():
    tier = Tier(name="x", cap=0.5, compute_mflops=1000)
    devices = DevicesConfig(tiers=[tier], down_mb_s=110.6, up_mb_s=14.0)
    t = client_time(tier, devices, flops=2e9, bytes_down=110.6e6, bytes_up=28e6)
    assert (t.down_s, t.compute_s, t.up_s) == pytest.approx((1.0, 2.0, 2.0))
    assert t.total_s == pytest.approx(5.0)
    assert training_flops(961_000, 100) == 3 * 961_000 * 100


def test_paper_tiers_are_the_default_and_drawn_evenly():
    devices = DevicesConfig()
    assert [(t.name, t.cap, t.compute_mflops) for t in devices.tiers] == [
        ("e", 1 / 16, 46528), ("d", 1 / 8, 93056), ("c", 1 / 4, 186112), ("b", 1 / 2, 372224), ("a", 1.0, 744448)]
    counts = np.bincount(DeviceAssigner(devices, 5000, seed=1).tiers_for_round(0), minlength=5)
    assert all(900 < c < 1100 for c in counts)


def test_fixed_versus_dynamic_assignment():
    fixed = DeviceAssigner(DevicesConfig(assignment="fixed"), 50, seed=1)
    dynamic = DeviceAssigner(DevicesConfig(assignment="dynamic"), 50, seed=1)
    assert np.array_equal(fixed.tiers_for_round(0), fixed.tiers_for_round(7))
    assert not np.array_equal(dynamic.tiers_for_round(0), dynamic.tiers_for_round(7))
    assert np.array_equal(dynamic.tiers_for_round(3), DeviceAssigner(DevicesConfig(), 50, seed=1).tiers_for_round(3))


def test_trace_overrides_tiers(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client_id,round,tier\n0,2,e\n1,2,a\n")
    a = DeviceAssigner(DevicesConfig(trace=str(trace)), 5, seed=1)
    assert a.tiers_for_round(2)[:2].tolist() == [0, 4]


def test_trace_rows_for_a_round_override_rows_for_every_round(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client_id,round,tier\n0,3,a\n0,,e\n1,,d\n")
    a = DeviceAssigner(DevicesConfig(trace=str(trace)), 5, seed=1)
    assert a.tiers_for_round(3)[:2].tolist() == [4, 1] and a.tiers_for_round(2)[:2].tolist() == [0, 1]
    trace.write_text("client_id,tier\nx,a\n")
    with pytest.raises(ConfigError, match="devices.trace: .* must be integers"):
        DeviceAssigner(DevicesConfig(trace=str(trace)), 5, seed=1)
