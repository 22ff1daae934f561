"""Bad input: exit status 2, one line on stderr naming the field or file, nothing written."""
import textwrap

import pytest

from harness.cli import main
from harness.config import expand, parse_override

GOOD = textwrap.dedent("""\
    name: bad
    rounds: 2
    data: {dataset: mnist-5k, split: {kind: shards, shards_per_client: 2, shard_size: 20}}
    clients: {total: 20, per_round: 5}
    model: {name: cnn}
    train: {epochs: 1}
    method: {name: fedavg}
""")


def run_cli(tmp_path, text, *args):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    return main(["run", str(cfg), "--out", str(out), "--quiet", *args]), out


@pytest.mark.parametrize("text, args, field", [
    (GOOD + "colour: red\n", [], "colour: unknown key"),
    (GOOD, ["--set", "rounds=many"], "rounds"),
    (GOOD, ["--set", "rounds=0"], "rounds"),
    (GOOD, ["--set", "clients.total=-3"], "clients.total"),
    (GOOD, ["--set", "clients.per_round=50"], "clients"),
    (GOOD, ["--set", "data.dataset=imagenet"], "data.dataset"),
    (GOOD, ["--set", "model.name=transformer"], "model.name"),
    (GOOD, ["--set", "method.name=fedbogus"], "method.name"),
    (GOOD, ["--set", "method.lambda_=2"], "method.lambda_: unknown key"),
    (GOOD, ["--set", "train.lr=-0.1"], "train.lr"),
    (GOOD, ["--set", "train.batch_size=2.5"], "train.batch_size"),
    (GOOD, ["--set", "data.split.shard_size=400"], "data.split"),
    (GOOD, ["--set", "devices.tiers=[{name: a, cap: 2, compute_mflops: 1}]"], "devices.tiers.0.cap"),
    (GOOD, ["--set", "devices.assignment=sometimes"], "devices.assignment"),
    (GOOD, ["--set", "engine.backend=spark"], "engine.backend"),
    (GOOD, ["--set", "data.dataset=npz:/nonexistent/file.npz"], "data.dataset: file not found"),
    (GOOD, ["--set", "devices.trace=/nonexistent/trace.csv"], "devices.trace"),
    (GOOD, ["--set", "noequals"], "--set"),
    (GOOD + "data: [1, 2\n", [], "c.yaml: not valid YAML"),
    ("- just\n- a list\n", [], "c.yaml: the top level must be a mapping"),
    (GOOD + "a: b: c\n", [], "c.yaml: not valid YAML line 8"),
    (GOOD, ["--set", "method.name=heterofl", "--set", "method.clip_grad_norm=-2"], "method.clip_grad_norm"),
    (GOOD, ["--set", "method.name=fedrolex", "--set", "method.clip_grad_norm=0"], "method.clip_grad_norm"),
    (GOOD, ["--set", "method.name=prunefl", "--set", "method.dense_layers=[fc9.weight]"], "method.dense_layers"),
])
def test_bad_input_is_one_line_naming_the_field(tmp_path, capsys, text, args, field):
    code, out = run_cli(tmp_path, text, *args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith("fedbench: error: ")
    assert field in err, err
    assert not out.exists(), "nothing may be written for bad input"


def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "model.pt"
    cfg.write_bytes(bytes(range(256)) * 4)
    assert main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.pt: not a text file" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("labels, problem", [([0, 1, -1], "y_train holds labels outside 0..classes-1"),
                                             ([0.0, 1.5, 2.0], "y_train must be a 1-D array of integer")])
def test_npz_labels_must_be_class_indices(tmp_path, capsys, labels, problem):
    import numpy as np

    path = tmp_path / "bad.npz"
    n = len(labels)
    np.savez(path, x_train=np.zeros((n, 28, 28), np.uint8), y_train=np.array(labels),
             x_test=np.zeros((n, 28, 28), np.uint8), y_test=np.zeros(n, np.int64))
    code, out = run_cli(tmp_path, GOOD, "--set", f"data.dataset=npz:{path}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and problem in err and "bad.npz" in err, err
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.yaml: cannot read file" in err


def test_unknown_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "x.yaml", "--frobnicate"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_overrides_parse_yaml_values():
    assert parse_override("rounds=5") == ("rounds", 5)
    assert parse_override("train.lr=1e-2") == ("train.lr", 0.01)
    assert parse_override("method.name=fedavg") == ("method.name", "fedavg")
    assert parse_override("name=inf") == ("name", "inf")
    assert parse_override("method.clip_grad_norm=null") == ("method.clip_grad_norm", None)


def test_grid_expands_and_set_on_an_axis_replaces_it():
    raw = {"name": "g", "method": {"name": "fedavg"},
           "grid": {"seed": [1, 2], "train.lr": [0.1, 0.05]}}
    exps, _ = expand(raw)
    assert [(e.seed, e.train.lr) for e in exps] == [(1, 0.1), (1, 0.05), (2, 0.1), (2, 0.05)]
    assert len({e.name for e in exps}) == 4
    exps, _ = expand(raw, [("seed", 7)])
    assert [(e.seed, e.train.lr) for e in exps] == [(7, 0.1), (7, 0.05)]
    assert [e.name for e in exps] == ["g_0.1_seed7", "g_0.05_seed7"]


def test_a_seed_list_replaces_the_seed_axis_and_names_carry_the_seed():
    from harness.config import load

    exps, _ = load("sweeps/paper_mnist.yaml", ["seed=[4,5,6]"])
    assert sorted({e.seed for e in exps}) == [4, 5, 6] and len(exps) == 25 * 3  # 25 method variants
    assert [e.name for e in exps[:4]] == ["mnist_fedavg_seed4", "mnist_fedavg_seed5", "mnist_fedavg_seed6",
                                          "mnist_fedavg-variant-reference_seed4"]
    assert len({e.name for e in exps}) == len(exps)
    # the names of one seed do not depend on which other seeds run with it: seed 1 alone or among 1-3
    alone, _ = load("sweeps/paper_mnist.yaml", ["seed=1"])
    among, _ = load("sweeps/paper_mnist.yaml")
    assert [e.name for e in alone] == [e.name for e in among if e.seed == 1]
    # a config without a seed axis: the list makes one; a single experiment is named with its seed
    exps, _ = expand({"name": "one", "method": {"name": "fedavg"}}, [("seed", [2, 3])])
    assert [(e.name, e.seed) for e in exps] == [("one_seed2", 2), ("one_seed3", 3)]
    assert expand({"name": "one"})[0][0].name == "one_seed1"
    assert expand({"name": "one_seed1", "seed": 4})[0][0].name == "one_seed4"  # a result's config.yaml, reseeded


def test_a_list_for_a_field_holding_a_list_stays_one_value():
    tiers = [{"name": "a", "cap": 1, "compute_mflops": 1}]
    raw = {"name": "g", "grid": {"method": [{"name": "fedavg"}, {"name": "prunefl"}]}}
    exps, _ = expand(raw, [("method.name", "prunefl"), ("method.dense_layers", ["fc2.weight"]),
                           ("devices.tiers", tiers)])
    assert [(e.method.params(), len(e.devices.tiers)) for e in exps] == [({"dense_layers": ["fc2.weight"]}, 1)]
    exps, _ = expand({"name": "g"}, [("method.name", "tests.faulty:FailingFedAvg"), ("method.fail_clients", [1, 3])])
    assert [e.method.params() for e in exps] == [{"fail_clients": [1, 3]}]  # a strategy given by import path
    exps, _ = expand(raw, [("method.name", ["fedavg", "prunefl", "fedlps"])])  # keeps the entries named
    assert [e.method.name for e in exps] == ["fedavg", "prunefl"]


@pytest.mark.parametrize("value, message", [("[]", "seed: an empty list"), ("[1, 1]", "seed: the list [1, 1] repeats"),
                                            ("[1, x]", "seed: Input should be a valid integer")])
def test_bad_seed_lists_are_one_line(tmp_path, capsys, value, message):
    code, out = run_cli(tmp_path, GOOD, "--set", f"seed={value}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_set_inside_a_dict_axis_keeps_the_matching_entries():
    raw = {"name": "g", "grid": {"data.split": [{"kind": "shards", "shard_size": 20}, {"kind": "iid"}]}}
    assert len(expand(raw)[0]) == 2
    exps, _ = expand(raw, [("data.split.kind", "iid"), ("rounds", 3)])
    assert len(exps) == 1 and exps[0].data.split.kind == "iid" and exps[0].rounds == 3
    exps, _ = expand(raw, [("data.split.kind", "dirichlet")])  # no entry matches: set in every entry
    assert [e.data.split.kind for e in exps] == ["dirichlet", "dirichlet"]


def test_set_selects_grid_entries_before_setting_their_parameters():
    raw = {"name": "g", "grid": {"method": [{"name": "fedavg"}, {"name": "prunefl"}, {"name": "fedlps", "variant": "paper"},
                                            {"name": "fedlps", "variant": "reference"}]}}
    for order in ([("method.interval", 2), ("method.name", "prunefl")], [("method.name", "prunefl"), ("method.interval", 2)]):
        exps, _ = expand(raw, order)
        assert [(e.method.name, e.method.params()) for e in exps] == [("prunefl", {"interval": 2})]
    exps, _ = expand(raw, [("method.name", "fedlps")])
    assert [e.method.params()["variant"] for e in exps] == ["paper", "reference"]
    exps, _ = expand(raw, [("method.name", "fedlps"), ("method.variant", "reference")])
    assert [e.name for e in exps] == ["g_seed1"]


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path("sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_validates(path):
    from harness.config import load

    experiments, _ = load(path)
    assert experiments and len({e.name for e in experiments}) == len(experiments)


def test_set_reaches_the_tune_settings():
    exps, sweep = expand({"name": "g", "grid": {"seed": [1, 2]}}, [("tune.max_concurrent_trials", 2)])
    assert sweep.tune.max_concurrent_trials == 2 and len(exps) == 2
