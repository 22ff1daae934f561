"""What the personalised baselines (Per-FedAvg, Ditto, FedRep) share: their per-client accuracy
columns and evaluation, and the FedLPS authors' per-client initial models (github sunnyxuejj/FedLPS at
35fafba2171fac0b0de374ffcd2a85eb40bc975e) that their `reference` variants mirror.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from harness.columns import TEST_SET_SUFFIX, TEST_SETS
from harness.records import ClientResult, Evaluation
from harness.seeding import seed_of

# The accuracy of a client's personal model on its test sets, measured by the client after training.
PERSONAL_COLUMNS = {f"acc_personal{TEST_SET_SUFFIX[kind]}": pa.float64() for kind in TEST_SETS}


def personal_metrics(accuracies: dict[str, float]) -> dict[str, float]:
    """The PERSONAL_COLUMNS of one client from `Workbench.accuracy_on_client`."""
    return {f"acc_personal{TEST_SET_SUFFIX[kind]}": accuracies[kind] for kind in TEST_SETS}


class PersonalAccuracies:
    """The latest accuracy of every evaluated client's personal model (`eval_ids`, the clients every
    evaluation reports), per test set, as its clients reported it (a personal model changes only when
    its client trains, so the accuracy it measured then holds until its next training); `fallback`
    (per test set, in eval_ids order) where a client has none."""

    def __init__(self, eval_ids: np.ndarray):
        self.eval_ids = np.asarray(eval_ids)
        self.acc = {kind: np.full(len(self.eval_ids), np.nan) for kind in TEST_SETS}

    def record(self, results: list[ClientResult]) -> None:
        for r in results:
            k = int(np.searchsorted(self.eval_ids, r.client_id))  # eval_ids are sorted
            if not r.trained or k == len(self.eval_ids) or self.eval_ids[k] != r.client_id:
                continue
            for kind in TEST_SETS:
                value = r.metrics.get(f"acc_personal{TEST_SET_SUFFIX[kind]}", math.nan)
                if not math.isnan(value):
                    self.acc[kind][k] = value

    def evaluation(self, fallback: dict[str, np.ndarray], global_view: Evaluation) -> Evaluation:
        clients = {kind: np.where(np.isnan(self.acc[kind]), fallback[kind], self.acc[kind]) for kind in TEST_SETS}
        return Evaluation(clients=clients, global_clients=global_view.clients, acc_global=global_view.acc_global)

    def state_dict(self) -> dict[str, list[float]]:
        return {kind: a.tolist() for kind, a in self.acc.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.acc = {kind: np.asarray(a, dtype=float) for kind, a in state.items()}


# -- the FedLPS authors' ports (their aggregation noise: baselines.fedavg.with_authors_noise) ----------
def own_initial_model(bench, client_id: int) -> dict[str, torch.Tensor]:
    """The authors' clients each build their own model (`Client(local_net=all_models[...](...))`), a
    fresh random initialisation that a client keeps until it trains: drawn here from (seed, client)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(bench.cfg.seed, "authors-client-init", client_id))
        model = bench.build(device="cpu")
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def cohort_accuracies(bench, prepare, fallback: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per test set, in eval_ids order, each evaluated client's accuracy with the model that
    `prepare(model, client_id)` puts into one model of the experiment's spec; where it returns False
    (no model of its own), the client's value in `fallback` (NaN without one)."""
    eval_ids = bench.clients.eval_ids
    out = {kind: np.full(len(eval_ids), np.nan) for kind in TEST_SETS}
    model = bench.build()
    for k, cid in enumerate(map(int, eval_ids)):
        if prepare(model, cid):
            for kind, acc in bench.accuracy_on_client(model, cid).items():
                out[kind][k] = acc
        elif fallback is not None:
            for kind in TEST_SETS:
                out[kind][k] = fallback[kind][k]
    return out


def own_initial_accuracies(bench, state_of=None) -> dict[str, np.ndarray]:
    """Every evaluated client's accuracy with its own initial model (`state_of(client_id, initial)`
    may replace parts of it, e.g. FedRep's body), per test set, in eval_ids order."""
    def prepare(model, cid):
        state = own_initial_model(bench, cid)
        bench.load(model, state if state_of is None else state_of(cid, state))
        return True

    return cohort_accuracies(bench, prepare)
