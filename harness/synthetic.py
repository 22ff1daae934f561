"""Synthetic(alpha, beta), the federated data set of the FedProx paper (Li et al., MLSys 2020; also
q-FFL and Ditto), generated per client on demand: any population size costs no storage.

Client k (as the authors' generator, litian96/FedProx `data/synthetic_*/generate_niid.py`, where
N(m, s) takes s as the standard deviation):
- model: u_k ~ N(0, alpha); W_k (60 x 10) and b_k (10) have entries ~ N(u_k, 1);
- features: B_k ~ N(0, beta); v_k (60) ~ N(B_k, 1); x ~ N(v_k, Sigma), Sigma diagonal with
  Sigma_jj = j^-1.2;
- labels: y = argmax(softmax(W_k^T x + b_k));
- samples: n_k = floor(lognormal(4, 2)) + 50 (the generator's power law), the first 90 % for
  training and the rest for testing (the generator's 9:1 split). As on every data set, the last
  `data.split.val_fraction` of the training samples are the client's validation samples, never
  trained on (the methods that prune by validation accuracy read them).
`iid` (FedProx's Synthetic IID): one W, b ~ N(0, 1) for all clients and v_k = 0.

Everything of client k is drawn from its own stream, rng(seed, "synthetic", k), in a fixed order
(n_k first, so a client's sample count costs one draw), so the same (seed, client) gives the same
samples in any process and on any engine. The iid model comes from rng(seed, "synthetic", "iid").

Evaluation: every client has its own test samples, so the per-client accuracy of a population of
millions cannot be computed every round. Every evaluation reports a fixed cohort: the
`data.eval_clients` clients (default 1000; all clients if fewer) drawn once from (seed,
"eval-cohort"); their test samples are generated once, in the process that evaluates. The global
accuracy (`acc_global`) is over the cohort's test samples pooled. A personalised method (FedLPS)
reports, for a cohort member, its personalised model's accuracy once the client has trained (else
the global model's), as on partitioned data.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from harness.data import TEST_SETS, EvalSet, Ragged, validation_count
from harness.seeding import rng

FEATURES, CLASSES = 60, 10
TRAIN_FRACTION = 0.9


@dataclass(frozen=True)
class SyntheticData:
    """The generator of Synthetic(alpha, beta) for one seed. It stands where a Dataset stands (what the
    driver ships to executors: four numbers)."""

    alpha: float
    beta: float
    iid: bool
    seed: int

    name = "synthetic"
    num_classes = CLASSES
    image_shape = (FEATURES,)

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return x  # features are generated as they are used

    @functools.cached_property
    def _iid_model(self) -> tuple[np.ndarray, np.ndarray]:
        gen = rng(self.seed, "synthetic", "iid")
        return gen.normal(0, 1, (FEATURES, CLASSES)), gen.normal(0, 1, CLASSES)

    def num_samples(self, client: int) -> int:
        """All samples of the client (training and test)."""
        return int(rng(self.seed, "synthetic", client).lognormal(4, 2)) + 50

    def client_model(self, client: int) -> dict[str, np.ndarray]:
        """The client's u, B, W, b and v (u, B: NaN when iid)."""
        return self._draw(client, with_samples=False)[0]

    def client(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """All the client's samples: features (float32, n x 60) and labels (int64, n)."""
        return self._draw(client, with_samples=True)[1]

    def _draw(self, client: int, with_samples: bool):
        gen = rng(self.seed, "synthetic", client)
        n = int(gen.lognormal(4, 2)) + 50
        if self.iid:
            (W, b), v, u, B = self._iid_model, np.zeros(FEATURES), np.nan, np.nan
        else:
            u, B = gen.normal(0, self.alpha), gen.normal(0, self.beta)
            v = gen.normal(B, 1, FEATURES)
            W, b = gen.normal(u, 1, (FEATURES, CLASSES)), gen.normal(u, 1, CLASSES)
        model = dict(u=u, B=B, W=W, b=b, v=v)
        if not with_samples:
            return model, None
        x = v + gen.standard_normal((n, FEATURES)) * np.arange(1, FEATURES + 1) ** -0.6  # std = sqrt(j^-1.2)
        y = np.argmax(x @ W + b, axis=1)  # softmax is monotone: its argmax is the logits' argmax
        return model, (x.astype(np.float32), y.astype(np.int64))


@dataclass(frozen=True)
class SyntheticClient:
    """One client's data, generated when asked for (`SyntheticClients[c]`)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_samples(self) -> int:
        return len(self.y_train)

    @property
    def classes(self) -> np.ndarray:
        return np.unique(self.y_train.numpy())

    @property
    def tests(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {kind: (self.x_test, self.y_test) for kind in TEST_SETS}


class SyntheticClients:
    """A population of `total` Synthetic clients: nothing is held per client; a client's data is
    generated from (seed, client) each time it is needed. The interface of harness.data.Partition."""

    def __init__(self, data: SyntheticData, total: int, eval_clients: int, val_fraction: float = 0.1):
        self.data, self.total, self.val_fraction = data, total, val_fraction
        self._eval_set: EvalSet | None = None
        if total <= eval_clients:
            self.eval_ids = np.arange(total)
        else:  # numpy's choice is O(eval_clients) for a large population
            self.eval_ids = np.sort(rng(data.seed, "eval-cohort").choice(total, eval_clients, replace=False))

    def __len__(self) -> int:
        return self.total

    def _check(self, c: int) -> int:
        if not 0 <= c < self.total:
            raise IndexError(f"client {c} of {self.total}")
        return int(c)

    def __getitem__(self, c: int) -> SyntheticClient:
        x, y = self.data.client(self._check(c))
        train, fit = self._train_val_counts(len(y))
        t = torch.from_numpy
        return SyntheticClient(t(x[:train]), t(y[:train]), t(x[train:fit]), t(y[train:fit]), t(x[fit:]), t(y[fit:]))

    def _train_val_counts(self, n: int) -> tuple[int, int]:
        """Of n samples: how many train, and where the validation samples end (the test samples start)."""
        fit = int(TRAIN_FRACTION * n)
        val = validation_count(fit, self.val_fraction)
        return fit - val, fit

    def num_samples(self, c: int) -> int:
        return self._train_val_counts(self.data.num_samples(self._check(c)))[0]

    def mean_num_samples(self) -> float:
        """Over the evaluation cohort (the population's is not computed)."""
        return float(np.mean([self.num_samples(c) for c in self.eval_ids]))

    def classes(self, c: int) -> np.ndarray:
        return self[c].classes

    def train_data(self, c: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        client = self[c]
        return client.x_train.to(device), client.y_train.to(device)

    def val_data(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        client = self[c]
        return client.x_val, client.y_val

    def test_data(self, kind: str, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        client = self[c]
        return client.x_test, client.y_test

    def eval_set(self) -> EvalSet:
        """The cohort's test samples pooled, and each cohort member's as a range of them (built once)."""
        if self._eval_set is None:
            self._eval_set = self._build_eval_set()
        return self._eval_set

    def _build_eval_set(self) -> EvalSet:
        xs, ys, index, start = [], [], [], 0
        for c in self.eval_ids:
            client = self[int(c)]
            xs.append(client.x_test)
            ys.append(client.y_test)
            index.append(np.arange(start, start + len(client.y_test)))
            start += len(client.y_test)
        return EvalSet(torch.cat(xs), torch.cat(ys), self.data.normalize, {kind: Ragged(index) for kind in TEST_SETS})

    def training_batches(self, batch_size: int = 500):
        """The cohort's training samples, in batches (static BN statistics)."""
        for c in self.eval_ids:
            x = self[int(c)].x_train
            for start in range(0, len(x), batch_size):
                yield x[start:start + batch_size]
