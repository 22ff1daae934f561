"""Aggregation against numbers worked out by hand."""
import torch

from harness.models import CLASSES, Dim
from harness.submodel import Contribution, aggregate, extract

# A tiny two-layer model: hidden layer of 5 units over 2 inputs, classifier of 3 classes.
LAYOUT = {
    "h.weight": (Dim("h"), Dim(None)),
    "h.bias": (Dim("h"),),
    "out.weight": (Dim(CLASSES), Dim("h")),
    "out.bias": (Dim(CLASSES),),
}
GLOBAL = {"h.weight": torch.full((5, 2), 9.0), "h.bias": torch.full((5,), 9.0),
          "out.weight": torch.full((3, 5), 9.0), "out.bias": torch.full((3,), 9.0)}


def client(value, units):
    index_sets = {"h": torch.tensor(units)}
    state = {k: torch.full_like(v, float(value)) for k, v in extract(GLOBAL, LAYOUT, index_sets).items()}
    return state, index_sets


def test_index_set_aggregation_of_three_clients_by_hand():
    a, ia = client(1, [0, 1])
    b, ib = client(2, [0, 2])
    c, ic = client(3, [0, 1, 2, 3])
    new = aggregate(GLOBAL, LAYOUT, [
        Contribution(a, ia, class_rows=torch.tensor([True, False, False])),  # A only has class 0
        Contribution(b, ib),
        Contribution(c, ic),
    ])
    # hidden unit 0: A, B, C -> 2; unit 1: A, C -> 2; unit 2: B, C -> 2.5; unit 3: C -> 3; unit 4: nobody -> 9
    assert new["h.bias"].tolist() == [2.0, 2.0, 2.5, 3.0, 9.0]
    assert new["h.weight"][:, 0].tolist() == [2.0, 2.0, 2.5, 3.0, 9.0]
    # classifier: row 0 gets A, rows 1-2 do not; columns follow the hidden units held
    assert new["out.weight"].tolist() == [
        [2.0, 2.0, 2.5, 3.0, 9.0],
        [2.5, 3.0, 2.5, 3.0, 9.0],
        [2.5, 3.0, 2.5, 3.0, 9.0],
    ]
    assert new["out.bias"].tolist() == [2.0, 2.5, 2.5]


def test_fedavg_is_the_sample_weighted_mean():
    full = {"h": torch.arange(5)}
    states = [{k: torch.full_like(v, x) for k, v in GLOBAL.items()} for x in (1.0, 2.0, 4.0)]
    new = aggregate(GLOBAL, LAYOUT, [Contribution(s, full, weight=w) for s, w in zip(states, (10, 20, 30))])
    for v in new.values():  # (10*1 + 20*2 + 30*4) / 60
        assert torch.allclose(v, torch.full_like(v, 170 / 60))


def test_coordinate_masks_restrict_a_contribution():
    full = {"h": torch.arange(5)}
    s1 = {k: torch.full_like(v, 1.0) for k, v in GLOBAL.items()}
    s2 = {k: torch.full_like(v, 3.0) for k, v in GLOBAL.items()}
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    new = aggregate(GLOBAL, LAYOUT, [Contribution(s1, full, weight=1, coordinate_weights={"h.bias": mask}),
                                     Contribution(s2, full, weight=3, coordinate_weights={"h.bias": torch.zeros(5)})])
    assert new["h.bias"].tolist() == [1.0, 9.0, 1.0, 9.0, 9.0]
    assert torch.allclose(new["h.weight"], torch.full((5, 2), 2.5))


def test_fedavg_weighting_uniform_is_the_plain_mean():
    from types import SimpleNamespace

    from baselines.fedavg import FedAvg, FedAvgParams

    states = [{k: torch.full_like(v, x) for k, v in GLOBAL.items()} for x in (1.0, 2.0, 4.0)]
    kept = [SimpleNamespace(payload=s, num_samples=n) for s, n in zip(states, (10, 20, 30))]
    for weighting, expected in (("samples", 170 / 60), ("uniform", 7 / 3)):  # (1 + 2 + 4) / 3
        fedavg = FedAvg.__new__(FedAvg)
        fedavg.params, fedavg.global_state = FedAvgParams(weighting=weighting), GLOBAL
        fedavg.bench = SimpleNamespace(layout=LAYOUT)
        fedavg.aggregate(0, kept, [])
        for v in fedavg.global_state.values():
            assert torch.allclose(v, torch.full_like(v, expected))
