"""Nothing lost, nothing silently wrong, nothing stuck: one writer per folder, inputs checked for what
they mean, failures that cannot hide, damaged files reported, configs compared key by key."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.cli import main

TINY = """\
name: tiny
rounds: 2
data: {dataset: mnist-5k, split: {kind: shards, shards_per_client: 2, shard_size: 20}}
clients: {total: 10, per_round: 2}
model: {name: cnn}
engine: {backend: serial}
"""


def tiny(tmp_path, text=TINY, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedbench: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


# -- one writer per output folder --------------------------------------------------------------------


def live_lease(folder: Path, pid: int = 1, host: str | None = None, renewed: float | None = None):
    """A lease of another live process (pid 1 runs as long as this machine does)."""
    import time

    import psutil

    folder.mkdir(parents=True, exist_ok=True)
    started = psutil.Process(pid).create_time() if psutil.pid_exists(pid) else 123.0
    (folder / ".fedbench-lease.json").write_text(json.dumps(
        {"host": host or socket.gethostname(), "pid": pid, "started": started, "command": "fedbench sweep other.yaml",
         "token": "x", "taken": time.time(), "renewed": renewed or time.time()}))


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_held_folder_stops_a_second_writer_at_once(tmp_path, capsys, command):
    out = tmp_path / "out"
    live_lease(out)
    before = sorted(p.name for p in out.iterdir())
    assert main([command, tiny(tmp_path), "--out", str(out)] + (["--quiet"] if command == "run" else [])) == 2
    one_line_error(capsys, "in use by `fedbench sweep other.yaml` (pid 1 on")
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, the lease left alone


def test_a_dead_owners_lease_is_taken_over_and_released(tmp_path, caplog):
    out = tmp_path / "out"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live_lease(out, pid=gone.pid)  # this host, a process that has ended
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet"]) == 0
    assert "taking over the lease of `fedbench sweep other.yaml`" in caplog.text
    assert not (out / ".fedbench-lease.json").exists()
    assert (out / "tiny_seed1" / "summary.parquet").exists()


def test_a_lease_from_another_host_holds_until_it_expires(tmp_path, capsys):
    import time

    from harness import storage

    out = tmp_path / "out"
    live_lease(out, host="elsewhere", renewed=time.time() - 10)
    with pytest.raises(storage.FolderHeld, match="on elsewhere"):
        storage.Lease(storage.resolve(out), "test").acquire()
    live_lease(out, host="elsewhere", renewed=time.time() - storage.LEASE_TTL_S - 1)
    with storage.Lease(storage.resolve(out), "test"):
        assert json.loads((out / ".fedbench-lease.json").read_text())["pid"] == os.getpid()
    assert not (out / ".fedbench-lease.json").exists()


def test_a_lease_on_an_object_store_is_written_and_read_back(tmp_path, monkeypatch):
    """The object-store path (no exclusive create): a filesystem that is not pyarrow's local one."""
    import pyarrow.fs as pafs

    from harness import storage

    monkeypatch.setattr(storage, "_TAKEOVER_SETTLE_S", 0.0)
    remote = storage.Location(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "out", "mem://out")
    assert not remote.local
    with storage.Lease(remote, "first"):
        assert (tmp_path / "out" / ".fedbench-lease.json").exists()
        mine = storage._HELD.pop(remote.uri)  # as if another process came
        try:
            with pytest.raises(storage.FolderHeld, match="`first`"):
                storage.Lease(remote, "second").acquire()
        finally:
            storage._HELD[remote.uri] = mine
    assert not (tmp_path / "out" / ".fedbench-lease.json").exists()


def test_a_run_with_a_bad_input_leaves_no_folder_for_its_lease(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet", "--set", "train.lr=.inf"]) == 2
    assert not out.exists()
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet"]) == 2  # exists: refused, lease gone again
    assert sorted(p.name for p in out.iterdir()) == ["tiny_seed1"]


def test_a_finished_experiment_is_never_cleared_by_a_rerun(tmp_path):
    from conftest import make_config
    from harness.experiment import Experiment

    cfg = make_config(tmp_path, rounds=1)
    Experiment(cfg).run()
    before = (tmp_path / "t_seed1" / "summary.parquet").read_bytes()
    with pytest.raises(RuntimeError, match="holds a finished experiment"):
        Experiment(cfg).run()
    assert (tmp_path / "t_seed1" / "summary.parquet").read_bytes() == before


# -- inputs validated to what they mean ----------------------------------------------------------------


@pytest.mark.parametrize("override, field", [
    ("train.lr=.inf", "train.lr"), ("train.weight_decay=.inf", "train.weight_decay"), ("train.lr=.nan", "train.lr"),
    ("train.momentum=.nan", "train.momentum"), ("clients.overselect=.inf", "clients.overselect"),
    ("clients.deadline_s=.inf", "clients.deadline_s"), ("devices.down_mb_s=.inf", "devices.down_mb_s"),
    ("devices.tiers=[{name: a, cap: 1, compute_mflops: 1, proportion: .inf}]", "devices.tiers.0.proportion"),
    ("devices.tiers=[{name: a, cap: 1, compute_mflops: .inf}]", "devices.tiers.0.compute_mflops"),
    ("devices.availability={e: .nan}", "devices.availability.e"),
    ("seed=18446744073709551616", "seed"), ("name=" + "n" * 200, "name"),
])
def test_a_value_outside_its_meaning_is_one_line_exit_2_nothing_written(tmp_path, capsys, override, field):
    out = tmp_path / "out"
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet", "--set", override]) == 2
    one_line_error(capsys, f"error: {field}: ")
    assert not out.exists()


def test_duplicate_yaml_keys_and_grid_points_are_refused(tmp_path, capsys):
    assert main(["run", tiny(tmp_path, TINY + "rounds: 3\n"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    one_line_error(capsys, "duplicate key 'rounds'")
    grid = TINY + "grid:\n  method: [{name: fedavg}, {name: heterofl}, {name: fedavg}]\n"
    assert main(["run", tiny(tmp_path, grid), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    one_line_error(capsys, "grid.method", "appears twice")
    grid = TINY + "grid:\n  train.lr: [0.1, 0.10]\n"
    assert main(["run", tiny(tmp_path, grid), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    one_line_error(capsys, "grid.train.lr", "appears twice")
    assert not (tmp_path / "o").exists()


def npz(path: Path, x_train, x_test=None, n_test=20, **replace):
    gen = np.random.default_rng(0)
    arrays = dict(x_train=x_train, y_train=np.arange(len(x_train)) % 10,
                  x_test=x_test if x_test is not None else gen.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                  y_test=np.arange(n_test) % 10)
    arrays.update(replace)
    np.savez(path, **arrays)
    return path


NPZ_RUN = """\
name: n
rounds: 1
data: {{dataset: "npz:{path}", split: {{kind: iid}}}}
clients: {{total: 4, per_round: 2}}
model: {{name: cnn}}
engine: {{backend: serial}}
"""


def test_float_pixels_in_0_1_are_converted_on_purpose(tmp_path, caplog):
    from harness.data import _npz

    gen = np.random.default_rng(1)
    x = gen.random((40, 28, 28)).astype(np.float32)
    data = _npz(str(npz(tmp_path / "f.npz", x, x_test=x[:20])))
    assert data.x_train.dtype.is_floating_point is False
    np.testing.assert_array_equal(data.x_train[:, 0].numpy(), np.rint(x * 255).astype(np.uint8))
    assert int(data.x_train.max()) > 200  # not all zeros, as a plain cast would make them
    assert "float pixels in [0, 1] are converted to uint8" in caplog.text


@pytest.mark.parametrize("make, needle", [
    (lambda g: dict(x_train=g.integers(0, 300, (40, 28, 28)).astype(np.int16)), "must be uint8"),
    (lambda g: dict(x_train=g.random((40, 28, 28)) * 255), "must lie in [0, 1]"),
    (lambda g: dict(x_train=g.integers(0, 256, (40, 28, 28), dtype=np.uint8),
                    x_test=g.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)), "test images have shape"),
    (lambda g: dict(x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros(0, np.int64)), "x_train holds no samples"),
    (lambda g: dict(x_train=g.integers(0, 256, (40, 28, 28), dtype=np.uint8), x_test=np.zeros((0, 28, 28), np.uint8),
                    y_test=np.zeros(0, np.int64)), "x_test holds no samples"),
])
def test_npz_pixels_and_shapes_are_checked(tmp_path, capsys, make, needle):
    arrays = make(np.random.default_rng(0))
    path = npz(tmp_path / "d.npz", **arrays)
    out = tmp_path / "out"
    assert main(["run", tiny(tmp_path, NPZ_RUN.format(path=path)), "--out", str(out), "--quiet"]) == 2
    one_line_error(capsys, "data.dataset", needle)
    assert not out.exists()


def test_a_truncated_or_foreign_npz_is_named_for_what_it_is(tmp_path, capsys):
    good = npz(tmp_path / "d.npz", np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:-300])
    assert main(["run", tiny(tmp_path, NPZ_RUN.format(path=cut)), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    one_line_error(capsys, "damaged or truncated")
    text = tmp_path / "text.npz"
    text.write_text("not numbers")
    assert main(["run", tiny(tmp_path, NPZ_RUN.format(path=text)), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = one_line_error(capsys, "is not an npz file")
    assert "pickled" not in err


def test_device_trace_rows_for_clients_or_rounds_that_do_not_exist_are_refused(tmp_path, capsys):
    for rows, needle in (("client_id,tier\n99,a\n", "row client 99"), ("client_id,round,tier\n1,-1,a\n", "round -1"),
                         ("client_id,round,tier\n1,5,a\n", "names round 5")):
        trace = tmp_path / "trace.csv"
        trace.write_text(rows)
        assert main(["run", tiny(tmp_path), "--out", str(tmp_path / "o"), "--quiet", "--set", f"devices.trace={trace}",
                     "--set", "devices.tiers=[{name: a, cap: 1, compute_mflops: 1000}]"]) == 2
        one_line_error(capsys, "devices.trace", needle)


def test_leaderboard_output_that_is_a_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(out), "-o", str(tmp_path)]) == 2
    one_line_error(capsys, "-o: ", "is a folder")


def test_an_output_folder_that_is_a_file_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", tiny(tmp_path), "--out", str(blocker), "--quiet"]) == 2
    one_line_error(capsys)
    assert blocker.read_text() == "x"


# -- failures cannot hide ---------------------------------------------------------------------------------


def test_a_bug_in_a_methods_code_stops_the_experiment_with_its_traceback(tmp_path, capsys):
    out = tmp_path / "out"
    bug = ["--set", "method.name=tests.faulty:BuggyFedAvg", "--set", "method.bug_round=1"]
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet", *bug]) == 1
    err = capsys.readouterr().err
    assert "raised builtins.TypeError on client" in err and "in round 1" in err
    assert "Traceback (most recent call last)" in err and "faulty.py" in err and "a bug on purpose" in err
    assert not (out / "tiny_seed1" / "summary.parquet").exists()


def test_a_bug_on_a_ray_executor_stops_the_experiment_with_the_executors_traceback(ray_session, config):
    from harness.experiment import ClientCodeError, Experiment

    cfg = config(name="bug", rounds=2, **{"engine.backend": "ray", "engine.executors": 2,
                                          "method.name": "tests.faulty:BuggyFedAvg", "method.bug_round": 1})
    with pytest.raises(ClientCodeError) as caught:
        Experiment(cfg).run()
    message = str(caught.value)
    assert "raised builtins.TypeError" in message and "in round 1" in message
    assert "Traceback (most recent call last)" in message and "in local_job" in message and "faulty.py" in message
    assert caught.value.result.code_error and caught.value.result.error_type == "builtins.TypeError"
    assert not (Path(cfg.out) / "bug_seed1" / "summary.parquet").exists()


@pytest.mark.parametrize("fail, status, code", [
    ([], "completed", 0),
    ([4], "degraded", 0),  # client 4 is sampled in round 1 only: 1 of 5 = 0.2, not above the limit
    ([4, 5], "failed", 1),  # sampled in round 1, not in round 0: 2 of 5
])
def test_client_failures_are_counted_and_end_the_run_failed_above_the_limit(tmp_path, capsys, fail, status, code):
    out = tmp_path / "out"
    run = TINY.replace("clients: {total: 10, per_round: 2}", "clients: {total: 10, per_round: 5}").replace(
        "rounds: 2", "rounds: 3")
    sampled = _sampled(run, tmp_path)
    assert {4, 5} <= sampled[1] - sampled[0] and 4 not in sampled[2]
    args = ["--set", "method.name=tests.faulty:FailingFedAvg", "--set", f"method.fail_clients={fail}"]
    assert main(["run", tiny(tmp_path, run), "--out", str(out), "--quiet", *args]) == code
    summary = pd.read_parquet(out / "tiny_seed1" / "summary.parquet").iloc[0]
    assert summary["status"] == status
    rounds = pd.read_parquet(out / "tiny_seed1" / "rounds.parquet")
    if status == "failed":
        assert "2 of 5 clients failed in round 1" in summary["status_note"]
        assert rounds["round"].tolist() == [0, 1]  # stopped after the round that went over the limit
        capsys.readouterr()
        assert main(["leaderboard", str(out)]) == 2
        one_line_error(capsys, "no completed experiment here: left out 1 failed run: tiny_seed1 (2 of 5")
    elif status == "degraded":
        assert "1 client tasks failed in 1 rounds" in summary["status_note"]
        from harness import leaderboard

        board = leaderboard.build(out)
        assert board["degraded_runs"].tolist() == [1]


def _sampled(text, tmp_path):
    from harness.config import expand, read_yaml
    from harness.seeding import rng

    path = tiny(tmp_path, text, "probe.yaml")
    cfg = expand(read_yaml(path))[0][0]
    return [set(rng(cfg.seed, "sample", r).choice(cfg.clients.total, cfg.clients.per_round, replace=False).tolist())
            for r in range(cfg.rounds)]


def test_any_failure_in_round_0_fails_the_run_and_the_board_says_why(tmp_path, capsys):
    out = tmp_path / "out"
    first = sorted(_sampled(TINY, tmp_path)[0])
    args = ["--set", "method.name=tests.faulty:FailingFedAvg", "--set", f"method.fail_clients=[{first[0]}]"]
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet", *args]) == 1
    err = capsys.readouterr().err
    assert "experiment tiny_seed1 failed: 1 of 2 clients failed in round 0 (round 0 allows none)" in err
    assert main(["leaderboard", str(out)]) == 2
    one_line_error(capsys, "no completed experiment here", "left out 1 failed run: tiny_seed1 (1 of 2 clients")


def test_a_run_where_no_client_trained_is_failed(tmp_path, capsys):
    out = tmp_path / "out"
    trace = tmp_path / "offline.csv"
    trace.write_text("client_id,start_round,end_round\n" + "".join(f"{c},100,100\n" for c in range(10)))
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet", "--set", f"devices.availability_trace={trace}"]) == 1
    summary = pd.read_parquet(out / "tiny_seed1" / "summary.parquet").iloc[0]
    assert summary["status"] == "failed" and "no client trained" in summary["status_note"]


def test_a_run_whose_training_diverges_fails_and_says_so(tmp_path, capsys):
    """A client whose local loss is not finite is a failed client: its update would spread NaN."""
    out = tmp_path / "out"
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet", "--set", "train.lr=1e30"]) == 1
    summary = pd.read_parquet(out / "tiny_seed1" / "summary.parquet").iloc[0]
    assert summary["status"] == "failed" and "training diverged: the local loss is not finite" in summary["status_note"]
    clients = pd.read_parquet(out / "tiny_seed1" / "clients.parquet")
    assert (clients["status"] == "error").all() and clients["train_loss"].isna().all()
    assert "training diverged" in capsys.readouterr().err


# -- damaged files ------------------------------------------------------------------------------------------


def test_the_leaderboard_names_a_corrupt_or_foreign_file_and_makes_the_rest(tmp_path, capsys, caplog):
    import shutil

    out = tmp_path / "out"
    assert main(["run", tiny(tmp_path), "--out", str(out), "--quiet"]) == 0
    for name in ("broken_seed1", "foreign_seed1"):
        shutil.copytree(out / "tiny_seed1", out / name)
    summary = out / "broken_seed1" / "summary.parquet"
    summary.write_bytes(summary.read_bytes()[:40])
    pd.DataFrame({"a": [1]}).to_parquet(out / "foreign_seed1" / "rounds.parquet")
    capsys.readouterr()
    assert main(["leaderboard", str(out)]) == 0
    err = caplog.text
    assert "broken_seed1 (summary.parquet is damaged" in err and "foreign_seed1 (rounds.parquet is not fedbench's" in err
    assert err.count("left out") == 1
    assert pd.read_csv(out / "leaderboard.csv")["seeds"].tolist() == [1]


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_then_to_round_0(tmp_path, caplog):
    from conftest import make_config
    from harness import storage
    from harness.experiment import Experiment
    from harness.state import dumps
    from harness.sweep import resume_experiment

    cfg = make_config(tmp_path, rounds=3, checkpoint_every=1)
    states = []
    done = Experiment(cfg)
    done.on_round = lambda row, state: states.append(dumps(state()))
    done.run()
    clean = pd.read_parquet(tmp_path / "t_seed1" / "rounds.parquet").filter(regex="^(?!wall)")
    folder = storage.resolve(tmp_path / "t_seed1")
    for name in ("summary.parquet", "clients.parquet"):
        (folder / name).delete()
    ckpt, prev = storage.resolve(tmp_path / "c.pt"), storage.resolve(tmp_path / "c.prev.pt")
    prev.write_bytes(states[0])
    ckpt.write_bytes(states[1][: len(states[1]) // 2])  # truncated
    exp = resume_experiment(cfg, [ckpt, prev])
    assert "c.pt is not usable" in caplog.text and exp.next_round == 1
    exp.run()
    again = pd.read_parquet(tmp_path / "t_seed1" / "rounds.parquet").filter(regex="^(?!wall)")
    pd.testing.assert_frame_equal(again, clean)

    for name in ("summary.parquet", "clients.parquet"):
        (folder / name).delete()
    prev.write_bytes(b"")  # both damaged: from round 0, saying so
    exp = resume_experiment(cfg, [ckpt, prev])
    assert exp.next_round == 0 and "starts again from round 0" in caplog.text


def test_a_damaged_client_part_falls_back_to_a_checkpoint_before_it(tmp_path, caplog, monkeypatch):
    from conftest import make_config
    from harness import experiment as experiment_module
    from harness import storage
    from harness.experiment import Experiment
    from harness.state import dumps
    from harness.sweep import resume_experiment

    monkeypatch.setattr(experiment_module, "FLUSH_EVERY_S", -1.0)  # a client part after every round
    cfg = make_config(tmp_path, rounds=3, checkpoint_every=1)
    states = []
    first = Experiment(cfg)
    first.on_round = lambda row, state: states.append(dumps(state()) if len(states) < 2 else None)
    original = first.run
    with pytest.raises(RuntimeError, match="stop"):
        def stop_before_merge(*a, **k):
            raise RuntimeError("stop")
        monkeypatch.setattr(storage, "merge_parquet", stop_before_merge)
        original()
    monkeypatch.undo()
    parts = sorted((tmp_path / "t_seed1" / "_clients").iterdir())
    assert len(parts) == 3
    parts[0].write_bytes(parts[0].read_bytes()[:30])  # the client rows of round 0: damaged
    ckpt, prev = storage.resolve(tmp_path / "c.pt"), storage.resolve(tmp_path / "c.prev.pt")
    prev.write_bytes(states[0])  # taken after round 0, before its part was written: counts none
    ckpt.write_bytes(states[1])  # after round 1: counts part 0
    exp = resume_experiment(cfg, [ckpt, prev])
    assert exp.next_round == 1 and "part-000000.parquet are damaged" in caplog.text
    exp.run()
    clients = pd.read_parquet(tmp_path / "t_seed1" / "clients.parquet")
    assert clients["round"].tolist() == sorted(clients["round"].tolist()) and set(clients["round"]) == {0, 1, 2}


# -- resume across versions -----------------------------------------------------------------------------


def test_a_folder_made_before_an_option_was_added_resumes_and_a_changed_value_stops_it(tmp_path):
    from pydantic import Field

    from conftest import make_config
    from harness import config as schema
    from harness.experiment import Experiment, config_changes
    from harness.sweep import plan
    from harness import storage

    old_cfg = make_config(tmp_path, rounds=2)
    old_state = Experiment(old_cfg).state()

    class NewTrain(schema.TrainConfig):
        clip_norm: float = Field(0.0, ge=0)  # an option added to fedbench after the folder was made

    class NewExperiment(schema.ExperimentConfig):
        train: NewTrain = NewTrain()

    new_cfg = NewExperiment.model_validate(old_cfg.model_dump())
    assert "clip_norm" in new_cfg.model_dump(mode="json")["train"]
    assert "clip_norm" not in old_state["config"]["train"]
    assert config_changes(old_state["config"], new_cfg.model_dump(mode="json"), NewExperiment) is None
    Experiment(new_cfg).restore(old_state)  # resumes

    changed = NewExperiment.model_validate({**old_cfg.model_dump(), "train": {**old_cfg.train.model_dump(), "clip_norm": 1.0}})
    why = config_changes(old_state["config"], changed.model_dump(mode="json"), NewExperiment)
    assert why is not None and "train.clip_norm: 0.0 -> 1.0" in why
    with pytest.raises(ValueError, match="train.clip_norm"):
        Experiment(changed).restore(old_state)

    # the sweep's record: made with the old schema, planned with the new one
    out = storage.resolve(tmp_path / "sweep")
    home = out / "_tune" / "s"
    trial = {"t_seed1": old_cfg.model_dump(mode="json")}
    _, manifest = plan(home, out, "s", trial, resume=False)
    (home / "sweep.json").write_bytes(json.dumps(manifest).encode())
    todo, _ = plan(home, out, "s", {"t_seed1": new_cfg.model_dump(mode="json")}, resume=False, schema=NewExperiment)
    assert todo == ["t_seed1"]
    with pytest.raises(Exception, match="the config of t_seed1 changed.*train.clip_norm"):
        plan(home, out, "s", {"t_seed1": changed.model_dump(mode="json")}, resume=False, schema=NewExperiment)


def test_a_changed_data_file_stops_a_sweep_rerun(tmp_path):
    from conftest import make_config, write_tiny_rgb
    from harness import storage
    from harness.sweep import plan

    data = write_tiny_rgb(tmp_path / "d.npz", 40)
    cfg = make_config(tmp_path, **{"data.dataset": data, "data.split.kind": "iid", "model.name": "cnn"})
    out = storage.resolve(tmp_path / "sweep")
    home = out / "_tune" / "s"
    trial = {cfg.name: cfg.model_dump(mode="json")}
    _, manifest = plan(home, out, "s", trial, resume=False)
    (home / "sweep.json").write_bytes(json.dumps(manifest).encode())
    assert plan(home, out, "s", trial, resume=False)[0] == [cfg.name]
    write_tiny_rgb(tmp_path / "d.npz", 42)  # same path, other contents
    with pytest.raises(Exception, match="data.dataset: the contents of this file changed"):
        plan(home, out, "s", trial, resume=False)


def test_a_sweep_does_not_take_a_run_overwrite_as_its_own(tmp_path):
    from conftest import make_config
    from harness import storage
    from harness.config import portable
    from harness.results import write_yaml
    from harness.sweep import plan

    cfg = make_config(tmp_path / "sweep", rounds=1)
    out = storage.resolve(tmp_path / "sweep")
    home = out / "_tune" / "s"
    trial = {cfg.name: cfg.model_dump(mode="json")}
    _, manifest = plan(home, out, "s", trial, resume=False)
    (home / "sweep.json").write_bytes(json.dumps(manifest).encode())
    from harness.experiment import Experiment

    other = cfg.model_copy(update={"rounds": 1, "train": cfg.train.model_copy(update={"lr": 0.05})})
    Experiment(other).run()  # what `fedbench run --overwrite` of another config leaves in the sweep's folder
    with pytest.raises(Exception, match="holds results of another config"):
        plan(home, out, "s", trial, resume=False)
    write_yaml(out / cfg.name / "config.yaml", portable(cfg))
    assert plan(home, out, "s", trial, resume=False)[0] == []  # the sweep's own config: finished


def test_a_damaged_sweep_record_is_one_line_and_rebuilt_with_resume(tmp_path):
    from conftest import make_config
    from harness import storage
    from harness.errors import UserError
    from harness.experiment import Experiment
    from harness.sweep import plan

    cfg = make_config(tmp_path / "sweep", rounds=1)
    Experiment(cfg).run()
    out = storage.resolve(tmp_path / "sweep")
    trial = {cfg.name: cfg.model_dump(mode="json")}
    (tmp_path / "sweep" / "_tune" / "s").mkdir(parents=True)
    (tmp_path / "sweep" / "_tune" / "s" / "sweep.json").write_text('{"sweep": "s", "out"')
    with pytest.raises(UserError, match="sweep.json: is damaged .* add --resume to rebuild it"):
        plan(out / "_tune" / "s", out, "s", trial, resume=False)
    todo, manifest = plan(out / "_tune" / "s", out, "s", trial, resume=True)
    assert todo == [] and list(manifest["experiments"]) == [cfg.name]  # its finished experiment, adopted


# -- a local Ray: loopback only, a private token, nothing left behind -----------------------------------

DRIVER = """
import json, os, sys, time
import psutil, ray
from harness.ray_engine import connect
os.umask(0o022)
connect()
@ray.remote
def pid():
    return os.getpid()
ray.get([pid.remote() for _ in range(2)])
me = psutil.Process()
procs = [{"pid": p.pid, "start": p.create_time(), "name": p.name()} for p in me.children(recursive=True)]
ours = {p["pid"] for p in procs} | {me.pid}
listening = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in ours]
print(json.dumps({"procs": procs, "listening": listening}), flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_a_local_ray_listens_on_loopback_keeps_its_token_private_and_dies_with_its_driver(tmp_path):
    import signal
    import stat
    import time

    import psutil

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
                                                             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(repo), RAY_AUTH_MODE="token")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    procs = []
    try:
        line = driver.stdout.readline()
        assert line, "the driver ended before it reported"
        info = json.loads(line)
        procs = info["procs"]
        names = {p["name"] for p in procs}
        assert "gcs_server" in names and "raylet" in names and len(procs) >= 5
        loopback = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
        outside = [(ip, port) for ip, port, _ in info["listening"] if ip not in loopback]
        assert len(info["listening"]) >= 5 and not outside, outside
        token = tmp_path / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 20
    def alive():
        return [p for p in procs if psutil.pid_exists(p["pid"]) and psutil.Process(p["pid"]).create_time() == p["start"]]
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive()
    for p in left:  # clean up after a failure: only the processes this test's driver started
        os.kill(p["pid"], signal.SIGKILL)
    assert not left, [p["name"] for p in left]


def test_method_parameters_are_finite(config):
    """A method's own float parameters are refused when infinite or NaN, naming the field."""
    from harness.errors import ConfigError
    from harness.spec import resolve

    for overrides, field in (({"method.name": "fedprox", "method.mu": float("inf")}, "method.mu"),
                             ({"method.name": "fedlps", "method.lam": float("nan")}, "method.lam")):
        with pytest.raises(ConfigError, match=field):
            resolve(config(**overrides))
