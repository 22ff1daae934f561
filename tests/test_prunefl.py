"""PruneFL: the reconfiguration rule by hand, masked training, and a short run read back from Parquet."""
import io

import pandas as pd
import pytest
import torch
import torch.nn as nn

from baselines.prunefl import PruneFL, density, drop_fraction, drop_lowest, greedy_readd, reconfigure
from conftest import local_update
from harness.config import TrainConfig
from harness.cost import sparse_bytes
from harness.experiment import Experiment
from harness.records import ClientTask
from harness.training import LocalJob, train_alone


def train_masked(model, masks, x, y, train, lr, generator) -> LocalJob:
    """PruneFL's local training of `model` (in place) as a job: weight masks with importance."""
    job = LocalJob(None, {}, x, y, train, lr, generator, weight_masks=masks, importance=True)
    train_alone(job, model)
    return job


def test_greedy_readd_by_hand():
    gain = torch.tensor([8.0, 1.0, 6.0, 3.0])
    cost = torch.tensor([2.0, 1.0, 1.0, 1.0])  # ratios 4, 1, 6, 3
    # running ratio 10/5 = 2: #2 (6 > 2) -> 16/6; #0 (4 > 2.67) -> 24/8 = 3; #3 (3 > 3 fails) stops,
    # although 3 beat the starting ratio
    assert greedy_readd(gain, cost, kept_gain=10.0, kept_cost=5.0).tolist() == [2, 0]
    # equal ratios come back in list order; a high starting ratio refuses everything
    assert greedy_readd(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 1.0]), 0.0, 1.0).tolist() == [0, 1, 2]
    assert greedy_readd(gain, cost, kept_gain=100.0, kept_cost=1.0).tolist() == []
    assert greedy_readd(torch.zeros(0), torch.zeros(0), 1.0, 1.0).tolist() == []


def test_drop_lowest_takes_the_smallest_weights_in_use():
    w = torch.tensor([[0.5, -0.1, 0.3], [-0.05, 0.9, 0.2]])
    mask = torch.tensor([[True, True, True], [False, True, True]])
    kept, dropped = drop_lowest(w, mask, 0.5)  # 5 in use -> floor(2.5) = 2 go: -0.1 and 0.2, not pruned -0.05
    assert dropped.nonzero().tolist() == [[0, 1], [1, 2]]
    assert kept.nonzero().tolist() == [[0, 0], [0, 2], [1, 1]]
    kept, dropped = drop_lowest(torch.tensor([0.2, -0.1, 0.1, 0.3]), torch.ones(4, dtype=torch.bool), 0.3)
    assert dropped.nonzero().flatten().tolist() == [1]  # |w| ties: the lower index goes first
    assert drop_fraction(0, 0.3, 10000) == 0.3 and drop_fraction(10000, 0.3, 10000) == pytest.approx(0.15)


def test_reconfigure_by_hand_and_density():
    weights = {"a": torch.tensor([[0.9, 0.1], [0.5, -0.2]]), "b": torch.tensor([0.3, -0.8, 0.05, 0.6])}
    masks = {"a": torch.ones(2, 2, dtype=torch.bool), "b": torch.tensor([True, True, False, True])}
    importance = {"a": torch.tensor([[1.0, 4.0], [1.0, 0.5]]), "b": torch.tensor([1.2, 2.0, 3.0, 1.0])}
    # drop half: a loses 0.1 and -0.2, b (3 in use) loses 0.3. Kept G = 3 (dense) + 2 + 3, kept time =
    # c0 1 + 2 x 1 + 2 x 0.5: ratio 8/4. Candidates by G/t: b2 6, a1 4, b0 2.4, a3 0.5.
    # b2 -> 11/4.5; a1 (4 > 2.44) -> 15/5.5; b0 (2.4 < 2.73) stops (without the dense G it would pass).
    new = reconfigure(weights, masks, importance, {"a": 1.0, "b": 0.5}, 0.5, c0=1.0, dense_importance=3.0)
    assert new["a"].tolist() == [[True, True], [True, False]]
    assert new["b"].tolist() == [False, True, True, True]
    assert density(new) == 6 / 8
    assert masks["b"].tolist() == [True, True, False, True]  # inputs untouched


def test_masked_training_ignores_pruned_weights_but_keeps_dense_gradients():
    torch.manual_seed(0)  # this test's own data and model; the method never uses global RNGs
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    models = [nn.Sequential(nn.Linear(4, 3)) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False
    masks = {"0.weight": mask}
    with torch.no_grad():
        models[0][0].weight[1, 2] = 5.0
        models[1][0].weight[1, 2] = -3.0

    # by hand: the pruned weight plays no part in the forward pass, yet its gradient is nonzero
    reference = models[2]
    with torch.no_grad():
        reference[0].weight.mul_(mask)
    nn.functional.cross_entropy(reference(x), y).backward()
    grad = reference[0].weight.grad
    assert grad[1, 2] != 0
    one_step = train_masked(models[0], masks, x, y, TrainConfig(epochs=1, batch_size=8), 0.1,
                            torch.Generator().manual_seed(3))
    assert torch.allclose(one_step.grad_importance["0.weight"], grad.pow(2) * 8)  # grad^2 x batch size
    assert one_step.dense_importance == pytest.approx(float(reference[0].bias.grad.pow(2).sum() * 8), rel=1e-5)

    # two models that differ only in the pruned value train identically
    models[0].load_state_dict(models[1].state_dict())
    with torch.no_grad():
        models[0][0].weight[1, 2] = 5.0
    job0, job1 = [
        train_masked(m, masks, x, y, TrainConfig(epochs=2, batch_size=4), 0.1, torch.Generator().manual_seed(3))
        for m in models[:2]]
    assert job0.stats.loss == job1.stats.loss
    assert torch.equal(models[0][0].weight, models[1][0].weight) and models[0][0].weight[1, 2] == 0
    assert job0.grad_importance["0.weight"][1, 2] > 0


# CNN forward FLOPs per sample of each layer, and its biases (90 floats), from test_cost's numbers
LAYER_FLOPS = {"conv1.weight": 288_000, "conv2.weight": 640_000, "fc1.weight": 32_000}
DENSE_FLOPS, DENSE_REST_BYTES = 961_000, 4 * (90 + 500)  # fc2 kept dense here: 500 weights


def test_run_reconfigures_every_interval_and_resumes_exactly(config):
    params = {"method.name": "prunefl", "method.interval": 2, "method.dense_layers": ["fc2.weight"],
              "method.initial_samples": 20, "method.initial_interval": 2, "method.initial_max_rounds": 6}
    cfg = config(name="whole", rounds=5, **params)
    experiment = Experiment(cfg)
    experiment.run()
    out = f"{cfg.out}/{cfg.name}"
    rounds, clients = pd.read_parquet(f"{out}/rounds.parquet"), pd.read_parquet(f"{out}/clients.parquet")
    strategy = experiment.strategy
    assert isinstance(strategy, PruneFL) and sorted(strategy.masks) == sorted(LAYER_FLOPS)
    assert strategy.initial_rounds == 6 and strategy.reconfigurations == 2  # at the start of rounds 2 and 4

    d = rounds.set_index("round")["density"]
    assert d[0] == d[1] and d[2] == d[3] and d[4] != d[3] and (d < 1).all()
    assert d[4] == density(strategy.masks)
    for rnd, group in clients.groupby("round"):
        assert (group["density"] == d[rnd]).all() and (group["keep_ratio"] == d[rnd]).all()
    # the cost rule, by hand, in the last round
    kept = {n: int(m.sum()) for n, m in strategy.masks.items()}
    forward = DENSE_FLOPS - sum(f * (1 - kept[n] / strategy.masks[n].numel()) for n, f in LAYER_FLOPS.items())
    nbytes = DENSE_REST_BYTES + sum(sparse_bytes(kept[n], strategy.masks[n].numel()) for n in LAYER_FLOPS)
    last = clients[clients["round"] == 4]
    assert last["flops"].tolist() == pytest.approx((3 * forward * last["num_samples"]).tolist())
    assert (last["bytes_up"] == nbytes).all() and (last["bytes_down"] == nbytes).all()
    per_round = clients.groupby("round")
    assert rounds["sim_round_s"].tolist() == pytest.approx(per_round["sim_s"].max().tolist())
    assert rounds["sim_total_s"].tolist() == pytest.approx(per_round["sim_s"].max().cumsum().tolist())
    assert (rounds["flops"] < 3 * DENSE_FLOPS * per_round["num_samples"].sum().values).all()

    # pruned coordinates keep their stale (nonzero) value, so evaluation must apply the mask
    broadcast, _ = strategy.configure(5, [None, None])
    before = {n: strategy.global_state[n].clone() for n in strategy.masks}
    strategy.aggregate(5, [local_update(strategy, broadcast, ClientTask(c, 5, cfg.devices.tiers[0])) for c in (3, 7)], [])
    for n, m in strategy.masks.items():
        assert torch.equal(strategy.global_state[n][~m], before[n][~m])
        assert not torch.equal(strategy.global_state[n][m], before[n][m])
        assert (strategy.masked_state()[n][~m] == 0).all()
    assert any(v[~strategy.masks[n]].abs().sum() > 0 for n, v in before.items())

    # interrupted after round 2 (a reconfiguration round), restored, continued: the same numbers;
    # round 4 reconfigures with the importance of rounds 2 and 3, so round 2's must survive
    cut = config(name="cut", rounds=5, checkpoint_every=3, **params)
    checkpoints = []

    class Interrupt(Exception):
        pass

    def on_round(row, checkpoint):
        if checkpoint is not None:
            checkpoints.append(checkpoint())
            raise Interrupt

    with pytest.raises(Interrupt):
        Experiment(cut, on_round=on_round).run()
    saved = checkpoints[0]["strategy"]
    assert checkpoints[0]["next_round"] == 3 and saved["accumulated"] == 5
    buf = io.BytesIO()
    torch.save(checkpoints[0], buf)  # checkpoints go through torch.save
    buf.seek(0)
    resumed = Experiment(cut)
    resumed.restore(torch.load(buf, weights_only=False))
    assert resumed.strategy.initial_done and resumed.strategy.accumulated == 5
    for n, g in saved["importance"].items():
        assert g.sum() > 0 and torch.equal(resumed.strategy.importance[n], g)
    resumed.run()
    a = pd.read_parquet(f"{cut.out}/{cut.name}/rounds.parquet").drop(columns=["experiment", "wall_s", "wall_total_s"])
    pd.testing.assert_frame_equal(a, rounds.drop(columns=["experiment", "wall_s", "wall_total_s"]))
    assert torch.equal(resumed.strategy.masks["fc1.weight"], experiment.strategy.masks["fc1.weight"])
