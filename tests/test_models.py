"""Models expose their units correctly: measured FLOPs, and submodels built from index sets compute
exactly what the full model computes with the other units masked off."""
import pytest
import torch

from harness.cost import FlopMeter
from harness.models import build_model, prefix_width
from harness.submodel import coordinate_masks, extract, rolling_index_sets


def test_cnn_flops_match_a_hand_count():
    # conv1: 24*24*10 outputs x 25 MACs; conv2: 8*8*20 x 250; fc1: 320*50; fc2: 50*10; 2 FLOPs per MAC
    hand = 2 * (24 * 24 * 10 * 25 + 8 * 8 * 20 * 250 + 320 * 50 + 50 * 10)
    assert hand == 961_000
    meter = FlopMeter("cnn", 10, (1, 28, 28))
    assert meter.forward() == hand
    # half width: conv1 5, conv2 10, fc1 25
    half = 2 * (24 * 24 * 5 * 25 + 8 * 8 * 10 * 125 + 160 * 25 + 25 * 10)
    assert meter.forward({"conv1": 5, "conv2": 10, "fc1": 25}) == half
    assert meter.per_weight()["fc1.weight"] == 32_000


@pytest.mark.parametrize("name, shape", [("cnn", (1, 28, 28)), ("vgg11", (3, 32, 32)),
                                         ("vgg13", (3, 32, 32)), ("resnet18", (3, 32, 32))])
def test_submodel_equals_masked_full_model(name, shape):
    torch.manual_seed(0)
    full = build_model(name, 10, shape)
    full.eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in full.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    index_sets = rolling_index_sets(full.full_widths, {g: prefix_width(n, 0.4) for g, n in full.full_widths.items()},
                                    start=3)
    widths = {g: len(i) for g, i in index_sets.items()}
    sub = build_model(name, 10, shape, widths)
    sub.load_state_dict(extract(full.state_dict(), full.layout, index_sets), strict=True)
    sub.eval()
    masks = {g: torch.zeros(n).index_fill_(0, index_sets[g], 1.0) for g, n in full.full_widths.items()}
    full.unit_masks = masks
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.allclose(sub(x), full(x), atol=1e-4)
    # every parameter is described by the layout, and coordinate masks count the submodel exactly
    assert set(full.state_dict()) - {k for k in full.state_dict() if k.endswith("num_batches_tracked")} == set(full.layout)
    shapes = {k: v.shape for k, v in full.state_dict().items() if k in full.layout}
    cmasks = coordinate_masks(full.layout, shapes, masks)
    kept = sum(int(cmasks[k].sum()) if k in cmasks else shapes[k].numel() for k in shapes)
    assert kept == sum(v.numel() for k, v in sub.state_dict().items() if k in sub.layout)


def test_small_client_trains_a_small_model():
    meter = FlopMeter("cnn", 10, (1, 28, 28))
    widths = {g: prefix_width(n, 1 / 16) for g, n in {"conv1": 10, "conv2": 20, "fc1": 50}.items()}
    assert widths == {"conv1": 1, "conv2": 2, "fc1": 4}
    assert meter.forward(widths) < meter.forward() / 10
