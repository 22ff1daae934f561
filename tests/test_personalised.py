"""Per-FedAvg, Ditto and FedRep: their local steps against numbers worked out by hand, their uploads,
personal state and costs, one by one == batched, and a run cut at a checkpoint that resumes with the
uninterrupted rows; the 10th-percentile accuracy column."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from baselines.fedrep import head_names
from baselines.perfedavg import PerFedAvgRule, hvp_flops_per_sample, step_batch_sizes
from harness.columns import accuracies
from harness.cost import training_flops
from harness.experiment import Experiment
from harness.state import dumps, loads
from conftest import client_of, local_update, local_update_batch, round_tasks, started
from test_batched import precision  # noqa: F401 - the fixture: float32 at 1e-5, float64 at 1e-9

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"clients.total": 20, "clients.per_round": 5, "train.epochs": 2, "train.batch_size": 10}


# -- the 10th percentile ----------------------------------------------------------------------------
def test_p10_of_ten_known_client_accuracies():
    acc = np.array([0.5, 0.9, 0.7, 0.2, 1.0, 0.8, 0.6, 0.3, 0.4, 0.95])
    dense = acc - 0.1
    row = accuracies({"mirrored": acc, "authors": np.r_[acc[:9], np.nan]},
                     {"mirrored": dense, "authors": dense})
    # sorted: 0.2, 0.3, ...; position 0.1 x (10 - 1) = 0.9 between the first two: 0.2 + 0.9 x 0.1
    assert row["acc_clients_p10"] == pytest.approx(0.29)
    assert row["acc_global_clients_p10"] == pytest.approx(0.19)
    # nine clients with test images (NaN: none): position 0.1 x 8 = 0.8: 0.2 + 0.8 x 0.1
    assert row["acc_clients_p10_authors_tests"] == pytest.approx(0.28)
    assert row["acc_clients_mean"] == pytest.approx(acc.mean())


# -- Per-FedAvg ----------------------------------------------------------------------------------------
class QuadraticOps:
    """StepOps of the 2-parameter model f(w; (x, y)) = (w1 x + w2 - y)^2 / 2, plain SGD at `beta`."""

    def __init__(self, beta):
        self.beta = beta

    @staticmethod
    def loss(params, batch):
        x, y = batch
        return (params["w1"] * x + params["w2"] - y) ** 2 / 2

    def grad(self, params, batch):
        return dict(zip(params, torch.func.grad(lambda p: self.loss(p, batch))(params).values()))

    def hvp(self, params, batch, vector):
        g = lambda p: torch.func.grad(lambda q: self.loss(q, batch))(p)  # noqa: E731
        return torch.func.jvp(g, (params,), (vector,))[1]

    def sgd(self, params, grads, lr=None):
        return {n: params[n] - self.beta * grads[n] for n in params}


def test_per_fedavg_fo_and_hf_steps_by_hand():
    w = {"w1": torch.tensor(1.0, dtype=torch.float64), "w2": torch.tensor(0.0, dtype=torch.float64)}
    batches = [(1.0, 0.0), (2.0, 1.0), (3.0, 5.0)]
    # D = (1, 0): residual 1, gradient (1, 1); w~ = w - 0.1 (1, 1) = (0.9, -0.1).
    # D' = (2, 1): residual 0.9 x 2 - 0.1 - 1 = 0.7, gradient (1.4, 0.7).
    # FO: w - 0.5 (1.4, 0.7) = (0.3, -0.35).
    fo = PerFedAvgRule(alpha=0.1, hessian_free=False).step(QuadraticOps(0.5), dict(w), batches)
    assert (float(fo["w1"]), float(fo["w2"])) == pytest.approx((0.3, -0.35))
    # HF: D'' = (3, .): Hessian [[9, 3], [3, 1]]; H (1.4, 0.7) = (14.7, 4.9);
    # (1.4, 0.7) - 0.1 (14.7, 4.9) = (-0.07, 0.21); w - 0.5 (-0.07, 0.21) = (1.035, -0.105).
    hf = PerFedAvgRule(alpha=0.1, hessian_free=True).step(QuadraticOps(0.5), dict(w), batches)
    assert (float(hf["w1"]), float(hf["w2"])) == pytest.approx((1.035, -0.105))


@pytest.mark.parametrize("version", ["fo", "hf"])
def test_per_fedavg_one_harness_step_equals_autograd_by_hand(config, version):
    """One step of a real client through the harness (functional program) against torch.autograd on
    the CNN: w~ = w - alpha grad(w; D), g' = grad(w~; D'), FO: w - beta g', HF: w - beta (g' - alpha
    Hess(w; D'') g')."""
    cfg = config(**SMALL, **{"method.name": "perfedavg", "method.version": version, "method.alpha": 0.05,
                             "train.lr": 0.1})
    bench, strategy = started(cfg)
    broadcast, tasks = round_tasks(bench, strategy, 0, [3])
    job = client_of(strategy).local_job(broadcast, tasks[0])
    job.max_steps = 1
    order = torch.randperm(len(job.y), generator=bench.generator(0, 3))  # the job's first epoch
    d, d2, d3 = order[:10], order[10:20], order[20:30]
    from harness.batched.groups import train_single
    train_single(job, bench)
    model = bench.build()
    names = [n for n, _ in model.named_parameters()]
    w = [broadcast[n].clone().requires_grad_(True) for n in names]

    def loss(params, idx):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, params)), (job.x[idx],)), job.y[idx])

    g = torch.autograd.grad(loss(w, d), w)
    adapted = [p - 0.05 * gi for p, gi in zip(w, g)]
    outer = [t.detach() for t in torch.autograd.grad(loss(adapted, d2), adapted)]
    if version == "hf":
        curvature = torch.autograd.grad(torch.autograd.grad(loss(w, d3), w, create_graph=True), w, grad_outputs=outer)
        outer = [o - 0.05 * h for o, h in zip(outer, curvature)]
    for n, p, o in zip(names, w, outer):
        expected = p.detach() - 0.1 * (o + cfg.train.weight_decay * p.detach())
        assert torch.allclose(job.trained[n], expected, atol=1e-6), n
    assert job.stats.steps == 1 and job.stats.samples == (20 if version == "fo" else 30)


def test_per_fedavg_costs(config):
    cfg = config(**SMALL, **{"method.name": "perfedavg", "method.version": "hf"})
    bench, strategy = started(cfg)
    broadcast, tasks = round_tasks(bench, strategy, 0, [0])
    r = local_update(strategy, broadcast, tasks[0])
    n = bench.clients[0].num_samples
    steps = step_batch_sizes(n, 10, 2, 3)
    hvp = hvp_flops_per_sample(bench.model_name, bench.num_classes, bench.image_shape)
    assert hvp > 2 * bench.flops.forward()  # a Hessian-vector product costs more than a gradient
    assert r.flops == training_flops(bench.flops.forward(), sum(s[0] + s[1] for s in steps)) + \
        hvp * sum(s[2] for s in steps)
    assert step_batch_sizes(25, 10, 2, 2) == [[10, 10], [5, 10], [10, 5]]
    reference = config(**SMALL, **{"method.name": "perfedavg", "method.variant": "reference"})
    bench, strategy = started(reference)
    broadcast, tasks = round_tasks(bench, strategy, 0, [0])
    r = local_update(strategy, broadcast, tasks[0])
    assert r.flops == 2 * training_flops(bench.flops.forward(), 2 * n)  # the authors' two passes per batch
    assert set(r.metrics) == {"acc_personal", "acc_personal_authors_tests"}


def test_per_fedavg_evaluates_the_adapted_global_model(config):
    cfg = config(**SMALL, **{"method.name": "perfedavg", "method.alpha": 0.5})
    bench, strategy = started(cfg)
    ev = strategy.evaluate(0)
    assert not np.allclose(ev.clients["mirrored"], ev.global_clients["mirrored"], equal_nan=True)
    strategy.params = strategy.params.model_copy(update={"alpha": 1e-12})  # no adaptation: the global model
    ev = strategy.evaluate(0)
    np.testing.assert_allclose(ev.clients["mirrored"], ev.global_clients["mirrored"])


# -- Ditto ----------------------------------------------------------------------------------------------
def ditto_round(config, lam, personal, **options):
    cfg = config(**SMALL, **{"method.name": "ditto", "method.lam": lam, "train.lr": 0.01, **options})
    bench, strategy = started(cfg)
    broadcast, tasks = round_tasks(bench, strategy, 0, [2])
    task = tasks[0]
    task.state = {"personal": personal(broadcast)}
    return bench, strategy, broadcast, task, local_update(strategy, broadcast, task)


def test_ditto_lambda_zero_is_plain_local_sgd_from_the_personal_model(config):
    far = lambda g: {k: v + 0.05 for k, v in g.items()}  # noqa: E731
    bench, strategy, broadcast, task, r = ditto_round(config, 0.0, far)
    plain = bench.job(task, task.state["personal"])  # plain local SGD, the same data order
    from harness.training import train_one
    train_one(plain, bench.loaded)
    for k, v in r.state["personal"].items():
        assert torch.allclose(v, plain.trained[k], atol=1e-5), k
    # the upload is the global update, FedAvg's local SGD from the global model
    fedavg = bench.job(task, broadcast)
    train_one(fedavg, bench.loaded)
    for k, v in r.payload.items():
        assert torch.allclose(v, fedavg.trained[k], atol=1e-6), k
    assert r.flops == 2 * training_flops(bench.flops.forward(), 2 * len(plain.y))


def test_ditto_large_lambda_stays_at_the_global_model(config):
    same = lambda g: {k: v.clone() for k, v in g.items()}  # noqa: E731
    *_, broadcast, _, free = ditto_round(config, 0.0, same)
    *_, broadcast, _, tied = ditto_round(config, 100.0, same)  # lr x lam = 1: v = w - lr grad F(v) each step
    moved = max(float((free.state["personal"][k] - broadcast[k]).abs().max()) for k in broadcast)
    stayed = max(float((tied.state["personal"][k] - broadcast[k]).abs().max()) for k in broadcast)
    assert moved > 1e-2 and stayed < moved / 5


def test_ditto_reference_starts_from_the_trained_local_model_and_doubles_the_global(config):
    cfg = config(**SMALL, **{"method.name": "ditto", "method.variant": "reference"})
    bench, strategy = started(cfg)
    broadcast, tasks = round_tasks(bench, strategy, 0, [1, 2])
    results = [local_update(strategy, broadcast, t) for t in tasks]
    assert all(r.state is None for r in results)  # nothing persists across rounds
    before = {k: v.clone() for k, v in strategy.global_state.items()}
    strategy.aggregate(0, results, [])
    mean = (results[0].payload["fc1.weight"] + results[1].payload["fc1.weight"]) / 2
    delta = strategy.global_state["fc1.weight"] - (mean + before["fc1.weight"])
    assert float(delta.std()) == pytest.approx(0.001, rel=0.05)  # the authors' aggregation noise


# -- FedRep ---------------------------------------------------------------------------------------------
def test_fedrep_uploads_the_body_and_keeps_its_head(config):
    cfg = config(**SMALL, **{"method.name": "fedrep", "method.head_epochs": 2, "method.body_epochs": 1})
    bench, strategy = started(cfg)
    head = head_names(bench, reference=False)
    assert head == ("fc2.weight", "fc2.bias")
    broadcast, tasks = round_tasks(bench, strategy, 0, [4])
    r = local_update(strategy, broadcast, tasks[0])
    assert not set(r.payload) & set(head) and set(r.payload) == set(broadcast["body"])
    assert r.bytes_up == r.bytes_down == sum(v.numel() * 4 for v in broadcast["body"].values())
    assert set(r.state["head"]) == set(head)
    assert not torch.equal(r.state["head"]["fc2.weight"], broadcast["initial_head"]["fc2.weight"])
    n = bench.clients[4].num_samples
    head_forward = bench.flops.per_weight()["fc2.weight"]
    assert r.flops == (bench.flops.forward() + 2 * head_forward) * 2 * n + training_flops(bench.flops.forward(), n)
    strategy.aggregate(0, [r], [])
    assert torch.equal(strategy.global_state["fc2.weight"], broadcast["initial_head"]["fc2.weight"])
    assert torch.allclose(strategy.global_state["conv1.weight"], r.payload["conv1.weight"])


def test_fedrep_reference_heads_learn_only_in_the_first_round(config):
    cfg = config(**SMALL, **{"method.name": "fedrep", "method.variant": "reference"})
    bench, strategy = started(cfg)
    assert head_names(bench, reference=True) == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    broadcast, tasks = round_tasks(bench, strategy, 0, [4])
    first = local_update(strategy, broadcast, tasks[0])
    assert set(first.payload) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    broadcast, tasks = round_tasks(bench, strategy, 1, [4])
    tasks[0].state = first.state
    second = local_update(strategy, broadcast, tasks[0])
    for k, v in first.state["head"].items():
        assert torch.equal(second.state["head"][k], v), k  # the second round's head epochs change nothing
    assert not torch.equal(second.payload["conv1.weight"], broadcast["body"]["conv1.weight"])


# -- one by one == batched, for every method ------------------------------------------------------------
VARIANTS = {
    "perfedavg-fo": {"method.name": "perfedavg"},
    "perfedavg-hf": {"method.name": "perfedavg", "method.version": "hf"},
    "perfedavg-reference": {"method.name": "perfedavg", "method.variant": "reference"},
    "ditto": {"method.name": "ditto"},
    "ditto-reference": {"method.name": "ditto", "method.variant": "reference"},
    "fedrep": {"method.name": "fedrep", "method.head_epochs": 2},
    "fedrep-reference": {"method.name": "fedrep", "method.variant": "reference"},
}


def tensors_of(result):
    out = {f"payload.{k}": v for k, v in result.payload.items()}
    for part, values in (result.state or {}).items():
        out.update({f"state.{part}.{k}": v for k, v in values.items()})
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_by_one_equals_batched(config, variant, precision):
    cfg = config(**{**SMALL, "clients.total": 40, "data.split.kind": "dirichlet", "data.split.alpha": 1.0,
                    **precision.settings}, **VARIANTS[variant])
    bench, strategy = started(cfg)
    clients = [0, 1, 2, 3, 5]
    broadcast, tasks = round_tasks(bench, strategy, 0, clients)
    alone = [local_update(strategy, broadcast, t) for t in tasks]
    together = local_update_batch(strategy, broadcast, tasks)
    for a, b in zip(alone, together):
        assert a.ok and b.ok, (a.error, b.error)
        assert (a.client_id, a.flops, a.bytes_up, a.bytes_down, a.num_samples) == \
               (b.client_id, b.flops, b.bytes_up, b.bytes_down, b.num_samples)
        assert b.train_loss == pytest.approx(a.train_loss, rel=precision.tol, abs=precision.tol)
        assert a.metrics == pytest.approx(b.metrics, abs=0.02)  # a sample's prediction may flip at 1e-6
        ta, tb = tensors_of(a), tensors_of(b)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            tol = precision.tol
            assert torch.allclose(ta[k], tb[k], atol=tol, rtol=tol), (k, (ta[k] - tb[k]).abs().max())


# -- resuming ---------------------------------------------------------------------------------------------
WALL = ["wall_s", "wall_total_s"]


@pytest.mark.parametrize("variant", ["perfedavg-reference", "ditto", "fedrep"])
def test_a_run_cut_at_its_checkpoint_resumes_with_the_same_rows(config, variant):
    """Personal models and heads live in the client store, personal accuracies in the server state:
    both travel in the checkpoint."""
    options = {**SMALL, "train.epochs": 1, **VARIANTS[variant]}
    whole = config(name="whole", rounds=4, **options)
    Experiment(whole).run()
    cut = config(name="cut", rounds=4, checkpoint_every=2, **options)
    saved = []

    class Interrupt(Exception):
        pass

    def on_round(row, checkpoint):
        if saved:
            raise Interrupt
        if checkpoint is not None:
            saved.append(loads(dumps(checkpoint())))

    with pytest.raises(Interrupt):
        Experiment(cut, on_round=on_round).run()
    resumed = Experiment(cut)
    resumed.restore(saved[0])
    resumed.run()
    for table in ("rounds", "clients"):
        a = pd.read_parquet(f"{whole.out}/{whole.name}/{table}.parquet").drop(columns=["experiment"])
        b = pd.read_parquet(f"{cut.out}/{cut.name}/{table}.parquet").drop(columns=["experiment"])
        a, b = (t.drop(columns=[c for c in WALL if c in t]) for t in (a, b))
        pd.testing.assert_frame_equal(a, b)
    rounds = pd.read_parquet(f"{whole.out}/{whole.name}/rounds.parquet")
    assert not math.isnan(rounds["acc_clients_p10"].iloc[-1])
