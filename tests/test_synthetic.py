"""Cross-device populations: Synthetic(alpha, beta) generated per client, natural partitions from
files, LEAF conversion, and rounds that cost nothing per client that is not sampled."""
import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from harness.availability import Availability, sample_clients
from harness.config import DevicesConfig, SplitConfig
from harness.cost import DeviceAssigner
from harness.data import natural_partition
from harness.errors import ConfigError, UserError
from harness.synthetic import SyntheticClients, SyntheticData


def digest(x, y) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes()).hexdigest()


def test_the_same_client_in_another_process_gets_the_same_samples():
    data = SyntheticData(alpha=0.5, beta=0.5, iid=False, seed=3)
    here = [digest(*data.client(c)) for c in (0, 7, 123_456_789)]
    code = ("from harness.synthetic import SyntheticData; from tests.test_synthetic import digest; "
            "d = SyntheticData(alpha=0.5, beta=0.5, iid=False, seed=3); "
            "print(' '.join(digest(*d.client(c)) for c in (123_456_789, 7, 0)))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert there[::-1] == here


def test_different_clients_and_seeds_differ():
    data = SyntheticData(alpha=1, beta=1, iid=False, seed=1)
    clients = {digest(*data.client(c)) for c in range(20)}
    assert len(clients) == 20
    assert digest(*SyntheticData(alpha=1, beta=1, iid=False, seed=2).client(0)) != digest(*data.client(0))
    models = [data.client_model(c) for c in range(20)]
    assert len({float(m["W"][0, 0]) for m in models}) == 20


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.5, 1.0), (1.0, 0.5)])
def test_client_models_and_feature_means_spread_as_alpha_and_beta_say(alpha, beta):
    data = SyntheticData(alpha=alpha, beta=beta, iid=False, seed=1)
    models = [data.client_model(c) for c in range(400)]
    u, B = np.array([m["u"] for m in models]), np.array([m["B"] for m in models])
    # u_k ~ N(0, alpha), B_k ~ N(0, beta) (std); W_k ~ N(u_k, 1) entrywise, v_k ~ N(B_k, 1)
    w_mean = np.array([m["W"].mean() for m in models])  # = u_k + N(0, 1/610)
    v_mean = np.array([m["v"].mean() for m in models])  # = B_k + N(0, 1/60)
    assert np.std(w_mean) == pytest.approx(np.sqrt(alpha ** 2 + 1 / 610), rel=0.15)
    assert np.std(v_mean) == pytest.approx(np.sqrt(beta ** 2 + 1 / 60), rel=0.15)
    assert np.abs(w_mean - u).max() < 5 / np.sqrt(610) and np.abs(v_mean - B).max() < 5 / np.sqrt(60)
    within = np.array([np.std(m["W"] - m["u"]) for m in models])
    assert within.mean() == pytest.approx(1.0, rel=0.05)


def test_samples_follow_the_client_model():
    data = SyntheticData(alpha=1, beta=1, iid=False, seed=4)
    c = next(c for c in range(100) if data.num_samples(c) > 2000)  # a large client, for the statistics
    x, y = data.client(c)
    m = data.client_model(c)
    assert len(y) == data.num_samples(c) and x.shape == (len(y), 60) and x.dtype == np.float32
    assert np.array_equal(y, np.argmax(x.astype(np.float64) @ m["W"] + m["b"], axis=1))
    sd = np.arange(1, 61) ** -0.6  # Sigma_jj = j^-1.2
    assert np.abs(x.mean(0) - m["v"]).max() < 5 * sd.max() / np.sqrt(len(y))
    assert x.std(0) == pytest.approx(sd, rel=0.15)
    counts = np.array([data.num_samples(c) for c in range(400)])
    assert counts.min() >= 50 and np.median(counts - 50) == pytest.approx(np.exp(4), rel=0.25)  # lognormal(4, 2)


def test_iid_clients_share_one_model_and_feature_distribution():
    data = SyntheticData(alpha=1, beta=1, iid=True, seed=1)
    a, b = data.client_model(0), data.client_model(5)
    assert np.array_equal(a["W"], b["W"]) and not a["v"].any()


def test_a_population_of_synthetic_clients():
    clients = SyntheticClients(SyntheticData(0.5, 0.5, False, seed=1), total=10**7, eval_clients=20)
    assert len(clients) == 10**7 and len(clients.eval_ids) == 20 and clients.eval_ids.max() < 10**7
    c = 9_999_999
    x, y = clients.train_data(c)
    xv, yv = clients.val_data(c)
    xt, yt = clients.test_data("mirrored", c)
    n = len(y) + len(yv) + len(yt)
    assert len(y) + len(yv) == int(0.9 * n) and len(yv) == round(0.1 * int(0.9 * n)) > 0  # split.val_fraction 0.1
    assert len(y) == clients.num_samples(c) == clients[c].num_samples
    all_x, _ = clients.data.client(c)
    assert torch.equal(torch.cat([x, xv, xt]), torch.from_numpy(all_x))  # train, validation, test: disjoint
    assert torch.equal(clients.classes(c) if isinstance(clients.classes(c), torch.Tensor) else
                       torch.as_tensor(clients.classes(c)), torch.unique(y))
    ev = clients.eval_set()
    assert [len(ev.index["mirrored"][k]) for k in range(20)] == [len(clients.test_data("authors", int(i))[1])
                                                                 for i in clients.eval_ids]
    with pytest.raises(IndexError):
        clients[10**7]


# -- natural partitions -------------------------------------------------------------------------------
def write_natural(path, owners_train, owners_test):
    gen = np.random.default_rng(0)
    np.savez(path, x_train=gen.integers(0, 256, (len(owners_train), 8, 8), dtype=np.uint8),
             y_train=np.arange(len(owners_train)) % 4, x_test=gen.integers(0, 256, (len(owners_test), 8, 8), dtype=np.uint8),
             y_test=np.arange(len(owners_test)) % 4, client_train=np.asarray(owners_train),
             client_test=np.asarray(owners_test))
    return path


def test_natural_partition_follows_the_files_client_ids(tmp_path):
    owners_train = [9, 5, 9, 2, 5, 9, 2, 2, 9, 5, 9, 9]
    owners_test = [2, 9, 9, 5, 7]  # client 7 has no training data: not a client
    path = write_natural(tmp_path / "nat.npz", owners_train, owners_test)
    y_train, y_test = np.arange(12) % 4, np.arange(5) % 4
    part = natural_partition(str(path), y_train, y_test, SplitConfig(kind="natural", val_fraction=0.2), 3, seed=1)
    assert len(part) == 3
    for c, owner in enumerate([2, 5, 9]):  # the distinct ids in increasing order
        own = np.sort(np.concatenate([part[c].train, part[c].val]))
        assert np.array_equal(own, np.flatnonzero(np.array(owners_train) == owner))
        assert np.array_equal(part[c].tests["mirrored"], np.flatnonzero(np.array(owners_test) == owner))
        assert np.array_equal(part[c].tests["authors"], part[c].tests["mirrored"])
        assert set(part[c].classes) == set(y_train[own]) and part.num_samples(c) == len(part[c].train)
    assert len(part[2].val) == round(0.2 * 6)
    two = natural_partition(str(path), y_train, y_test, SplitConfig(kind="natural"), 2, seed=1)
    assert np.array_equal(np.sort(np.concatenate([two[1].train, two[1].val])), [1, 4, 9])  # client id 5
    with pytest.raises(ConfigError, match="clients.total: 4 clients, but nat.npz holds 3"):
        natural_partition(str(path), y_train, y_test, SplitConfig(kind="natural"), 4, seed=1)


def test_natural_split_needs_client_ids(tmp_path, config):
    from harness.validation import validate

    path = tmp_path / "plain.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.arange(4) % 2,
             x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.arange(2))
    cfg = config(**{"data.dataset": f"npz:{path}", "data.split.kind": "natural", "clients.total": 2,
                    "clients.per_round": 1, "model.name": "mlr"})
    with pytest.raises(ConfigError, match="data.split.kind: natural needs arrays client_train and client_test"):
        validate(cfg)


# -- LEAF -----------------------------------------------------------------------------------------------
def write_leaf(folder, test_users=("f0", "f1", "f2")):
    gen = np.random.default_rng(0)

    def part(users, counts):
        data = {u: {"x": gen.random((n, 16)).round(3).tolist(), "y": [int(v) for v in gen.integers(0, 3, n)]}
                for u, n in zip(users, counts)}
        return {"users": list(users), "num_samples": list(counts), "user_data": data}

    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    (folder / "train" / "a.json").write_text(json.dumps(part(["f0", "f1"], [3, 5])))
    (folder / "train" / "b.json").write_text(json.dumps(part(["f2"], [4])))
    (folder / "test" / "a.json").write_text(json.dumps(part(test_users, [1, 2, 1][:len(test_users)])))
    return folder


def test_leaf2npz_converts_three_users(tmp_path, capsys):
    from harness.cli import main

    leaf = write_leaf(tmp_path / "leaf")
    out = tmp_path / "femnist.npz"
    assert main(["data", "leaf2npz", str(leaf), str(out)]) == 0
    assert "3 clients, 12 training and 4 test samples" in capsys.readouterr().out
    train = json.loads((leaf / "train" / "a.json").read_text())["user_data"]
    with np.load(out) as d:
        assert d["x_train"].shape == (12, 4, 4) and d["x_train"].dtype == np.uint8
        assert d["client_train"].tolist() == [0] * 3 + [1] * 5 + [2] * 4 and d["client_test"].tolist() == [0, 1, 1, 2]
        assert d["users"].tolist() == ["f0", "f1", "f2"]
        assert np.array_equal(d["x_train"][3], np.rint(np.array(train["f1"]["x"][0]) * 255).reshape(4, 4))
        assert d["y_train"][3:8].tolist() == train["f1"]["y"]
        y_train, y_test = d["y_train"], d["y_test"]
    part = natural_partition(str(out), y_train, y_test, SplitConfig(kind="natural", val_fraction=0), 3, seed=1)
    assert [part.num_samples(c) for c in range(3)] == [3, 5, 4]


def test_leaf2npz_refuses_a_per_user_split(tmp_path):
    from harness.cli import main

    leaf = write_leaf(tmp_path / "leaf", test_users=("g9",))
    out = tmp_path / "x.npz"
    assert main(["data", "leaf2npz", str(leaf), str(out)]) == 2
    assert not out.exists()
    from harness.leaf import leaf_to_npz

    (tmp_path / "nothing" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="train: holds no LEAF .json file"):
        leaf_to_npz(tmp_path / "nothing", out)


# -- nothing per client that is not sampled --------------------------------------------------------------
def test_per_client_draws_equal_the_whole_populations():
    devices = DevicesConfig(availability={"a": 0.9, "b": 0.5, "e": 0.2})
    ids = np.array([0, 3, 17, 999, 5000, 4999])
    for assignment in ("fixed", "dynamic"):
        tiers = DeviceAssigner(devices.model_copy(update={"assignment": assignment}), 5000 + 1, seed=2)
        for rnd in (0, 4):
            assert np.array_equal(tiers.tiers_of(rnd, ids), tiers.tiers_for_round(rnd)[ids])
    availability = Availability(devices, 5001, seed=2)
    every = tiers.tiers_for_round(3)
    assert np.array_equal(availability.online(3, every[ids], ids), availability.online(3, every)[ids])


@pytest.mark.parametrize("total", [1000, 3_000_000])
def test_sampling_picks_online_clients_only(total):
    devices = DevicesConfig(availability={"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5, "e": 0.1})
    tiers, availability = DeviceAssigner(devices, total, seed=1), Availability(devices, total, seed=1)
    sampled, tier_of = sample_clients(2, 1, total, 50, availability, tiers)
    assert len(np.unique(sampled)) == 50 and np.array_equal(sampled, np.sort(sampled))
    assert availability.online(2, tier_of, sampled).all()
    assert np.array_equal(tier_of, tiers.tiers_of(2, sampled))
    again, _ = sample_clients(2, 1, total, 50, availability, tiers)
    other, _ = sample_clients(3, 1, total, 50, availability, tiers)
    assert np.array_equal(sampled, again) and not np.array_equal(sampled, other)


def test_ten_million_clients_for_three_rounds(config):
    """Nothing of the run grows with the population: after a warm-up run (imports, caches), numpy's
    and Python's traced allocations stay below one byte per client (10 MB for 10^7 clients)."""
    from harness.experiment import Experiment

    settings = {"data.dataset": "synthetic", "data.alpha": 1, "data.beta": 1, "data.eval_clients": 50,
                "clients.per_round": 10, "rounds": 3, "model.name": "mlr", "method.name": "fedlps",
                "method.variant": "paper", "train.lr": 0.05, "devices.availability": {"a": 0.8, "e": 0.5}}
    Experiment(config(**{**settings, "clients.total": 20, "rounds": 1, "name": "warm-up"})).run()
    tracemalloc.start()
    try:
        experiment = Experiment(config(**settings, **{"clients.total": 10**7}))
        summary = experiment.run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["status"] == "completed" and len(experiment.rounds) == 3
    assert all(r["clients_ok"] == 10 for r in experiment.rounds)
    assert len(experiment.bench.clients) == 10**7
    assert peak < 10**7, f"{peak / 1e6:.1f} MB traced: something holds a value per client"


# Per-FedAvg's adapted accuracies; the authors' initial models and PersonalAccuracies (the ported
# Ditto, as the ported Per-FedAvg); FedRep's evaluation (both variants)
@pytest.mark.parametrize("method, variant", [("perfedavg", "official"), ("ditto", "reference"),
                                             ("fedrep", "official"), ("fedrep", "reference")])
def test_personalised_methods_evaluate_the_cohort_not_the_population(config, method, variant):
    """Per-FedAvg, Ditto and FedRep report each client of the evaluation cohort, in eval_ids order,
    and never visit the clients outside it that did not train."""
    from harness.experiment import Experiment
    from harness.results import load

    experiment = Experiment(config(**{
        "data.dataset": "synthetic", "data.eval_clients": 20, "clients.total": 10**6, "clients.per_round": 5,
        "rounds": 2, "model.name": "mlp", "method.name": method, "method.variant": variant, "train.lr": 0.05}))
    visited = []
    accuracy_on_client = experiment.bench.accuracy_on_client
    experiment.bench.accuracy_on_client = lambda model, cid: visited.append(cid) or accuracy_on_client(model, cid)
    assert experiment.run()["status"] == "completed"
    evaluation = experiment.strategy.evaluate(2)
    eval_ids = set(experiment.bench.clients.eval_ids.tolist())
    assert all(len(a) == 20 and not np.isnan(a).any() for a in evaluation.clients.values())
    trained = set(load(experiment.cfg.out, "clients")["client_id"])
    assert set(visited) <= eval_ids | trained
