import copy
import math

import pytest
import torch

from d2d.errors import D2DError
from d2d.nn.moe import Router
from d2d.routers import router_metrics, train_router_set
from d2d.stages import TrainRoutersConfig


def test_router_training_reduces_loss_and_learns_norms():
    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    w = torch.randn(16, 6)
    y = (x @ w).abs()  # a learnable non-negative target
    router = Router(16, 6, hidden=32)
    with torch.no_grad():
        before = float(((router(x) - y) ** 2).mean())
    cfg = TrainRoutersConfig(steps=400, batch_size=256, lr=3e-3)
    train_router_set({"0": router}, {"0": (x, y)}, cfg)
    with torch.no_grad():
        after = float(((router(x) - y) ** 2).mean())
        met = router_metrics(router(x), y)
    assert after < 0.2 * before
    assert met["r2"] > 0.7 and met["capture_25"] > 0.8


def test_router_metrics_perfect_and_useless():
    y = torch.rand(100, 8)
    assert router_metrics(y, y)["r2"] == 1.0 and router_metrics(y, y)["capture_25"] == 1.0
    bad = router_metrics(-y, y)
    assert bad["r2"] < 0 and bad["capture_25"] < 1.0


def test_router_output_is_non_negative():
    r = Router(8, 4, 8)
    assert (r(torch.randn(50, 8) * 100) >= 0).all()


def test_routers_trained_together_equal_routers_trained_alone():
    """The loop sums the layers' losses; routers share no parameters, so each ends where it
    would have alone (same seed, same data order)."""
    torch.manual_seed(0)
    x1, x2 = torch.randn(512, 16), torch.randn(512, 16)
    y1, y2 = (x1 @ torch.randn(16, 6)).abs(), (x2 @ torch.randn(16, 6)).abs()
    a, b = Router(16, 6, hidden=8), Router(16, 6, hidden=8)
    alone = copy.deepcopy(a)
    cfg = TrainRoutersConfig(steps=50, batch_size=64, lr=3e-3)
    both = train_router_set({"0": a, "1": b}, {"0": (x1, y1), "1": (x2, y2)}, cfg)
    one = train_router_set({"0": alone}, {"0": (x1, y1)}, cfg)
    assert both["0"] == pytest.approx(one["0"], rel=1e-5)
    for p, q in zip(a.parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_log_loss_by_hand_and_it_learns_the_small_norms():
    from d2d.routers import router_loss

    pred, true = torch.tensor([[1.0, 0.1]]), torch.tensor([[2.0, 0.1]])
    want = ((math.log(1.01) - math.log(2.01)) ** 2 + 0.0) / 2
    assert router_loss(pred, true, "log", 0.01).item() == pytest.approx(want, rel=1e-5)
    assert router_loss(pred, true, "mse").item() == pytest.approx(0.5)
    # a target whose experts differ 100-fold in scale: MSE fits the large one, the log loss
    # ranks the small ones too
    torch.manual_seed(0)
    x = torch.randn(4096, 16)
    y = (x @ torch.randn(16, 8)).abs() * torch.tensor([100.0] + [1.0] * 7)
    small = slice(1, 8)
    caps = {}
    for kind in ("mse", "log"):
        torch.manual_seed(0)
        r = Router(16, 8, hidden=32)
        cfg = TrainRoutersConfig(steps=300, batch_size=256, lr=3e-3, loss=kind)
        train_router_set({"0": r}, {"0": (x, y)}, cfg)
        with torch.no_grad():
            caps[kind] = router_metrics(r(x)[:, small], y[:, small])["capture_25"]
    assert caps["log"] > caps["mse"]
    with pytest.raises(D2DError, match="loss must be one of"):
        TrainRoutersConfig(loss="hinge")
