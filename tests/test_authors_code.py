"""FedLPS (reference) against the FedLPS authors' code itself, run unchanged: github sunnyxuejj/FedLPS
at 35fafba2171fac0b0de374ffcd2a85eb40bc975e, checked out where FEDLPS_AUTHORS_CODE points (skipped
otherwise; it needs torchvision, which their modules import):

    git clone https://github.com/sunnyxuejj/FedLPS /tmp/FedLPS && git -C /tmp/FedLPS checkout 35fafba
    FEDLPS_AUTHORS_CODE=/tmp/FedLPS python -m pytest tests/test_authors_code.py -q

Nothing of theirs is copied here: their modules are imported, and the few lines of FedLPS.py's round
loop that credit the bandit (a script, not importable) are read from that file and executed as they
are."""
import os
import random
import re
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import local_update, make_config, started, tier
from fedlps.masks import reference_score_masks
from fedlps.pucbv import ReferencePUCBV, utility
from fedlps.reference_cost import MNIST, ReferenceRewardCost
from harness.records import ClientTask

CODE = Path(os.environ.get("FEDLPS_AUTHORS_CODE", "/nonexistent"))
pytestmark = [pytest.mark.skipif(not (CODE / "Hetero_Client.py").exists(),
                                 reason="FEDLPS_AUTHORS_CODE does not point to sunnyxuejj/FedLPS at 35fafba"),
              pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Using a target size")]  # their MSELoss broadcast, mirrored


@pytest.fixture(scope="module")
def authors():
    pytest.importorskip("torchvision")
    sys.path.insert(0, str(CODE))
    try:
        import Hetero_Client
        import Models
        from utils import main_flops_counter
    finally:
        sys.path.remove(str(CODE))
    loop = (CODE / "FedLPS.py").read_text()
    credit = re.search(r"^( +)action_index = 0\n.*?\.append\(reward\.item\(\)\)\n", loop, re.S | re.M)
    assert credit, "FedLPS.py's crediting lines are not where 35fafba has them"
    return types.SimpleNamespace(client=Hetero_Client, models=Models, flops=main_flops_counter,
                                 credit=compile(textwrap.dedent(credit.group(0)), "FedLPS.py", "exec"))


def test_pucbv_decides_and_credits_as_their_code(authors):
    for seed in range(50):
        random.seed(seed)  # their P_UCBV draws from the random module
        theirs = object.__new__(authors.client.Hetero_Client)
        theirs.args = types.SimpleNamespace(rounds=100, nusers=100, frac=0.1)
        edges = np.linspace(0.5, 1, 6)  # as Hetero_Client.__init__ sets the bandit up
        theirs.mab_arms = [[edges[i], edges[i + 1]] for i in range(5)]
        theirs.arms_reward = {arm[0]: [0.0] for arm in theirs.mab_arms}
        theirs.pull_times, theirs.selected_times = np.ones(5), 0
        ours = ReferencePUCBV.new(seed=0, horizon=10.0)
        ours.rng = random.Random(seed)
        gen = np.random.default_rng(seed)
        best = 0.0
        for _ in range(12):
            action, _ = theirs.P_UCBV()
            theirs.selected_times += 1
            assert ours.decide().ratio == action
            theirs.mask_rate = min(float(gen.choice([0.0625, 0.125, 0.25, 0.5, 1.0])), action)
            acc, seconds = float(gen.uniform(0, 1)), float(gen.uniform(0.1, 5))
            reward = np.float64((utility(acc) - utility(best)) / seconds)
            exec(authors.credit, {"client": theirs, "reward": reward})
            ours.observe(theirs.mask_rate, acc, seconds)
            best = max(best, acc)
        assert [[float(x) for x in arm] for arm in theirs.mab_arms] == ours.arms
        assert theirs.pull_times.tolist() == ours.pulls
        assert [[float(k), v] for k, v in theirs.arms_reward.items()] == [[k, pytest.approx(v, rel=1e-12)]
                                                                          for k, v in ours.rewards]


def test_masks_as_their_weight_layer(authors):
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        n, rho = int(torch.randint(1, 80, (), generator=gen)), float(torch.rand((), generator=gen))
        layer = authors.models.WeightLayer(n, "cpu")
        layer.w.data = 3 * torch.randn(n, 1, generator=gen)
        *_, label = layer(torch.randn(n, 3, generator=gen), rho)
        assert torch.equal(label.flatten(), reference_score_masks({"g": layer.w.detach().flatten()}, rho)["g"])


def test_flops_and_upload_bits_as_their_counters(authors):
    args = types.SimpleNamespace(mask=True, learnable=True, dataset="mnist", local_bs=32, device="cpu",
                                 mask_weight_indicator=["conv1.weight", "conv2.weight", "fc1.weight"])
    net = authors.models.MNISTNet(args, "cpu")
    from harness.models import build_model

    with torch.device("meta"):
        model = build_model("cnn", 10, (1, 28, 28))
    cost = ReferenceRewardCost(model, (1, 28, 28), model.full_widths, 32, MNIST)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        kept = {g: int(torch.randint(0, n + 1, (), generator=gen)) for g, n in model.full_widths.items()}
        with torch.no_grad():
            for g, k in kept.items():  # the trained model: masked rows are zero
                w = getattr(net, g).weight
                w.copy_(torch.randn(w.shape, generator=gen))
                w[torch.randperm(w.shape[0], generator=gen)[k:]] = 0
        # their count is a float32 tensor: equal up to its rounding
        theirs = float(authors.flops.count_training_flops(net, args))
        assert theirs == pytest.approx(3 * cost.forward_flops(kept), rel=1e-6)
        assert float(net.stat_param_sizes()) == cost.upload_bits(kept)


@pytest.mark.parametrize("rho", [0.5, 1 / 16])
def test_a_clients_update_as_their_training(authors, tmp_path, rho):
    """Three full-batch steps (the data order cannot matter) from the same weights and scores."""
    from torch.utils.data import TensorDataset

    from fedlps.strategy import FedLPSClient

    epochs, batch = 3, 64
    cfg = make_config(tmp_path, **{"method.name": "fedlps", "method.variant": "reference",
                                   "method.keep_ratio_policy": "rcr", "train.epochs": epochs, "train.batch_size": batch})
    bench, strategy = started(cfg)
    g = strategy.global_state
    x, y = bench.train_data(3)
    assert len(y) <= batch
    scores = {grp: torch.sort(torch.randn(n, generator=torch.Generator().manual_seed(7)), descending=True).values
              for grp, n in bench.full_widths.items()}
    original = FedLPSClient._initial_scores
    FedLPSClient._initial_scores = lambda self, task, state, gen: {k: v.clone() for k, v in scores.items()}
    try:
        ours = local_update(strategy, g, ClientTask(3, 0, tier(1.0), {"keep_ratio": rho}))
    finally:
        FedLPSClient._initial_scores = original

    t = bench.cfg.train
    args = types.SimpleNamespace(lr=t.lr, local_ep=epochs, dataset="mnist", local_bs=batch, optimizer="sgd",
                                 lr_decay=t.lr_decay, momentum=0, wdecay=t.weight_decay, mask=True, fedprox=False,
                                 clip=0, wd=1.0, learnable=True, mask_rate_list=[0.0625, 0.125, 0.25, 0.5, 1],
                                 device="cpu", mask_weight_indicator=["conv1.weight", "conv2.weight", "fc1.weight"])
    net = authors.models.MNISTNet(args, "cpu")
    net.load_state_dict({k: v.clone() for k, v in g.items()})
    data = TensorDataset(x, y)
    client = authors.client.Hetero_Client(args, "cpu", 3, data, data, data, net, rho)
    draw = client.local_net.initialize_mask

    def with_our_scores():
        draw()
        for name in args.mask_weight_indicator:
            layer = client.local_net.mask_layer_dict[name.replace(".", "_")]
            layer.w.data = scores[name.split(".")[0]].view(-1, 1).clone()

    client.local_net.initialize_mask = with_our_scores
    theirs = client.update_weights_leanable(w_server={k: v.clone() for k, v in g.items()}, round=0)
    assert theirs["acc"] == ours.train_acc
    for k in g:  # float32 sums in another order: a few ulps of the largest update (~0.1)
        assert torch.allclose(theirs["state"][k], ours.payload[k], rtol=0, atol=1e-6), k
