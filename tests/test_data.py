"""Partitions worked out by hand, and the datasets."""
import numpy as np
import pytest

from harness.config import SplitConfig
from harness.data import load_dataset, partition
from harness.config import DataConfig
from harness.errors import ConfigError


def labels(per_class, classes=10):
    return np.repeat(np.arange(classes), per_class)


def test_shards_by_hand():
    # 10 classes x 40 images, shards of 20: 20 shards, two per class; 5 clients draw 2 shards each.
    y_train, y_test = labels(40), labels(30)
    clients = partition(y_train, y_test, SplitConfig(kind="shards", shards_per_client=2, shard_size=20,
                                                     val_fraction=0.1), 5, seed=3)
    seen = np.concatenate([np.concatenate([c.train, c.val]) for c in clients])
    assert len(seen) == len(set(seen)) == 5 * 2 * 20  # disjoint, exactly two shards each
    for c in clients:
        own = np.sort(np.concatenate([c.train, c.val]))
        assert len(own) == 40 and len(c.val) == 4 and len(c.train) == 36
        # each shard is 20 consecutive label-sorted images, i.e. one class here
        assert len(np.unique(y_train[own])) <= 2
        assert set(np.unique(y_train[own])) == set(c.classes)
        counts = {k: int((y_train[own] == k).sum()) for k in c.classes}
        test_counts = {k: int((y_test[c.test] == k).sum()) for k in c.classes}
        assert counts == test_counts  # the test set mirrors the client's classes and their counts
        assert set(np.unique(y_test[c.test])) <= set(c.classes)


def test_split_is_a_pure_function_of_its_inputs():
    y_train, y_test = labels(100), labels(50)
    split = SplitConfig(kind="dirichlet", alpha=0.3)
    a = partition(y_train, y_test, split, 10, seed=5)
    b = partition(y_train, y_test, split, 10, seed=5)
    c = partition(y_train, y_test, split, 10, seed=6)
    assert all(np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test) for x, y in zip(a, b))
    assert not all(np.array_equal(x.train, y.train) for x, y in zip(a, c))


def test_dirichlet_and_iid_cover_the_data():
    y_train, y_test = labels(100), labels(50)
    for split in (SplitConfig(kind="dirichlet", alpha=0.5), SplitConfig(kind="iid")):
        clients = partition(y_train, y_test, split, 10, seed=1)
        owned = np.concatenate([np.concatenate([c.train, c.val]) for c in clients])
        assert np.array_equal(np.sort(owned), np.arange(1000))
    iid = partition(y_train, y_test, SplitConfig(kind="iid"), 10, seed=1)
    assert all(len(c.classes) == 10 for c in iid)


def test_unsatisfiable_shards_name_the_split():
    with pytest.raises(ConfigError, match="data.split: 30 clients x 2 shards of 20 need 60 shards"):
        partition(labels(40), labels(10), SplitConfig(shards_per_client=2, shard_size=20), 30, seed=1)


def test_embedded_mnist_5k():
    d = load_dataset(DataConfig(dataset="mnist-5k"))
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert np.bincount(d.y_test.numpy()).tolist() == [100] * 10  # stratified
    assert d.x_train.dtype.is_floating_point is False and int(d.x_train.max()) == 255
    x = d.normalize(d.x_train[:500])
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2


def test_npz_in_the_shared_format(shared_npz):
    path = shared_npz("mnist")
    d = load_dataset(DataConfig(dataset=f"npz:{path}"))
    assert d.x_train.shape == (60000, 1, 28, 28) and d.num_classes == 10
    assert abs(float(d.mean[0]) - 0.1307) < 1e-3
