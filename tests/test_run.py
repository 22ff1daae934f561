"""End to end through the round loop and the CLI, read back from Parquet."""
import pandas as pd
import pytest

from harness.cli import main
from harness.experiment import Experiment
from harness.registry import declared_columns
from harness.results import CLIENTS, ROUNDS
from harness.state import dumps, loads

WALL = [c for c in ROUNDS.names if c.startswith("wall")]


def run(cfg):
    Experiment(cfg).run()
    out = f"{cfg.out}/{cfg.name}"
    return pd.read_parquet(f"{out}/rounds.parquet"), pd.read_parquet(f"{out}/clients.parquet")


def test_same_config_same_numbers(config, tmp_path):
    r1, c1 = run(config(name="a"))
    r2, c2 = run(config(name="a", out=str(tmp_path / "again")))
    pd.testing.assert_frame_equal(r1.drop(columns=WALL), r2.drop(columns=WALL))
    pd.testing.assert_frame_equal(c1, c2)
    r3, _ = run(config(name="a", seed=2))
    assert not r1["acc_clients_mean"].equals(r3["acc_clients_mean"])


def test_records_follow_the_cost_model(config):
    rounds, clients = run(config(rounds=3, eval_every=2))
    assert rounds["round"].tolist() == [1, 2]  # evaluated rounds only, and always the last
    # the harness's columns, then those of every registered method (one schema for every method)
    assert list(rounds.columns) == ROUNDS.names + list(declared_columns("round", "fedavg"))
    assert list(clients.columns) == CLIENTS.names + list(declared_columns("client", "fedavg"))
    assert {"density", "arm_low", "acc_personal"} <= set(clients.columns) and clients["density"].isna().all()
    per_round = clients.groupby("round")
    assert per_round["sim_s"].max().loc[[1, 2]].tolist() == pytest.approx(rounds["sim_round_s"].tolist())
    assert rounds["sim_total_s"].iloc[-1] == pytest.approx(per_round["sim_s"].max().sum())
    assert rounds["flops_total"].iloc[-1] == pytest.approx(clients["flops"].sum())
    assert (clients["sim_s"] == clients["sim_down_s"] + clients["sim_compute_s"] + clients["sim_up_s"]).all()
    assert (clients["status"] == "ok").all() and len(clients) == 3 * 5
    # FedAvg trains the dense CNN: 3 x 961000 FLOPs per sample processed (1 epoch)
    assert (clients["flops"] == 3 * 961_000 * clients["num_samples"]).all()
    assert rounds["acc_global"].notna().all() and rounds["acc_clients_mean"].between(0, 1).all()


def test_cli_quickstart_contract(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main(["run", "sweeps/quickstart.yaml", "--set", "rounds=2", "--set", "method.name=fedavg",
                 "--set", "engine.backend=serial", "--set", "clients.per_round=3", "--out", str(out), "--quiet"])
    assert code == 0
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["quickstart_seed1", "quickstart_seed2", "quickstart_seed3"]  # the method axis reduced to FedAvg
    for folder in folders:
        for name in ("rounds.parquet", "clients.parquet", "summary.parquet", "config.yaml"):
            assert (out / folder / name).exists()
        assert not list((out / folder).glob(".*")), "no temporary files left behind"
    printed = capsys.readouterr().out
    assert "final acc %" in printed and "fedavg" in printed


@pytest.mark.parametrize("flush_every_s", [10.0, 0.0])
def test_restored_experiment_ends_with_the_uninterrupted_numbers(config, tmp_path, monkeypatch, flush_every_s):
    import harness.experiment

    monkeypatch.setattr(harness.experiment, "FLUSH_EVERY_S", flush_every_s)  # 0: a part of clients every round
    whole = config(name="whole", rounds=4)
    Experiment(whole).run()
    checkpoints = []
    first = config(name="cut", rounds=4, checkpoint_every=2)

    class Interrupt(Exception):
        pass

    def on_round(row, checkpoint):
        if checkpoints:
            raise Interrupt  # the driver dies a round after its first checkpoint
        if checkpoint is not None:  # through bytes that torch.load(weights_only=True) reads
            checkpoints.append(loads(dumps(checkpoint())))

    with pytest.raises(Interrupt):
        Experiment(first, on_round=on_round).run()
    assert checkpoints[0]["next_round"] == 2
    parts = list((tmp_path / first.name / "_clients").glob("part-*.parquet"))
    assert len(parts) == (2 if flush_every_s == 0 else 0)  # round 2's part was written after the checkpoint
    assert checkpoints[0]["client_parts"] == (1 if flush_every_s == 0 else 0)
    resumed = Experiment(first)
    resumed.restore(checkpoints[0])
    resumed.run()
    a = pd.read_parquet(f"{whole.out}/{whole.name}/rounds.parquet").drop(columns=WALL + ["experiment"])
    b = pd.read_parquet(f"{first.out}/{first.name}/rounds.parquet").drop(columns=WALL + ["experiment"])
    pd.testing.assert_frame_equal(a, b)
    ca = pd.read_parquet(f"{whole.out}/{whole.name}/clients.parquet").drop(columns=["experiment"])
    cb = pd.read_parquet(f"{first.out}/{first.name}/clients.parquet").drop(columns=["experiment"])
    pd.testing.assert_frame_equal(ca, cb)
    assert not (tmp_path / first.name / "_clients").exists()  # the parts became clients.parquet


def test_disk_state_store_gives_the_memory_store_numbers(config, tmp_path):
    from harness.state import MemoryStore

    memory = config(name="mem", rounds=3, **{"method.name": "fedlps"})
    disk = config(name="disk", rounds=3, **{"method.name": "fedlps", "engine.state_store": "disk"})
    r_mem, c_mem = run(memory)
    checkpoints = []
    experiment = Experiment(disk, on_round=lambda row, state: state and checkpoints.append(state()))
    experiment.run()
    r_disk = pd.read_parquet(tmp_path / disk.name / "rounds.parquet")
    pd.testing.assert_frame_equal(r_mem.drop(columns=WALL + ["experiment"]), r_disk.drop(columns=WALL + ["experiment"]))
    assert not (tmp_path / disk.name / "client_state.sqlite").exists()  # in a temporary folder of its own
    assert not experiment.store.folder.exists()  # removed when the run ended
    rows = checkpoints[-1]["store"]  # and carried by the checkpoint
    assert {ns for ns, _, _ in rows} == {"client", "bandit"} and len(rows) > 5
    copy = MemoryStore()
    copy.restore(rows)
    assert copy.export() == rows
