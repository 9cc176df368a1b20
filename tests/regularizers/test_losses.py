"""The regularizers' loss formulas (``qat_plugins.regularizers._losses``) against hand computations on
small tensors: KD's KL, CSD's channel standardization and distance (value and gradient), feature MSE,
the consistency ramp-up."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loss_by_hand import kl_by_hand
from qat_plugins.regularizers._losses import channel_standardize, csd_distance, feature_mse, kd_kl, sigmoid_rampup

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_ = [[0.5, 1.5, 1.0], [2.0, 0.0, 1.0]]


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kdkl_by_hand(temp):
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T_, requires_grad=True)
    loss = kd_kl(s, t, temp)
    assert float(loss) == pytest.approx(temp * temp * kl_by_hand(T_, S, temp), rel=1e-5)
    loss.backward()
    assert t.grad is None  # the teacher side gets no gradient
    # d/ds T^2 KL(p_t || p_s) = T (p_s - p_t) / N
    p_s, p_t = F.softmax(s.detach() / temp, -1), F.softmax(t.detach() / temp, -1)
    torch.testing.assert_close(s.grad, temp * (p_s - p_t) / 2)
    assert float(kd_kl(s, s.detach(), temp)) == pytest.approx(0.0, abs=1e-7)


def test_channel_standardize_by_hand():
    z = torch.tensor([[[[1.0, 3.0]], [[0.0, 10.0]]],
                      [[[5.0, 7.0]], [[2.0, 4.0]]]])  # (N=2, C=2, H=1, W=2)
    out = channel_standardize(z, eps=1e-5)
    # channel 0: values 1, 3, 5, 7 -> mean 4, biased var 5; channel 1: 0, 10, 2, 4 -> mean 4, var 14
    c0 = [(v - 4) / math.sqrt(5 + 1e-5) for v in (1, 3, 5, 7)]
    c1 = [(v - 4) / math.sqrt(14 + 1e-5) for v in (0, 10, 2, 4)]
    torch.testing.assert_close(out[:, 0].flatten(), torch.tensor(c0))
    torch.testing.assert_close(out[:, 1].flatten(), torch.tensor(c1))
    # works on (N, C) features too; a constant channel maps to 0, not NaN
    flat = channel_standardize(torch.tensor([[1.0, 2.0], [1.0, 4.0]]))
    torch.testing.assert_close(flat, torch.tensor([[0.0, -1.0], [0.0, 1.0]]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"\(N, C, \.\.\.\)"):
        channel_standardize(torch.ones(3))


def test_csd_distance_mean_and_sum_by_hand():
    torch.manual_seed(0)
    a = torch.randn(4, 3, 2, 2, requires_grad=True)
    b = torch.randn(4, 3, 2, 2, requires_grad=True)
    # standardized by hand: per channel over (batch, h, w), biased variance, eps 1e-5
    def std_by_hand(t):
        out = torch.empty_like(t)
        for c in range(t.shape[1]):
            v = t[:, c]
            out[:, c] = (v - v.mean()) / math.sqrt(float(((v - v.mean()) ** 2).mean()) + 1e-5)
        return out

    d = (std_by_hand(a.detach()) - std_by_hand(b.detach())) ** 2
    mean = d.mean()
    per_channel = [d[:, c].mean() for c in range(3)]
    # F.batch_norm vs the explicit loop: float32 rounding only
    torch.testing.assert_close(csd_distance(a, b), mean, rtol=1e-5, atol=1e-6)  # default: mean
    torch.testing.assert_close(csd_distance(a, b, reduction="sum"), sum(per_channel), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(csd_distance(a, b, reduction="sum"), 3 * mean, rtol=1e-5, atol=1e-6)
    csd_distance(a, b).backward()
    assert b.grad is None and a.grad is not None and a.grad.abs().sum() > 0
    # the fused backward against numerical differentiation (float64), both reductions
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double()
    for red in ("mean", "sum"):
        assert torch.autograd.gradcheck(lambda z: csd_distance(z, b64, reduction=red), (a64,), eps=1e-6, atol=1e-7)
    # invariant to per-channel affine changes of either feature
    scaled = b.detach() * torch.tensor([2.0, 0.5, 3.0]).reshape(1, 3, 1, 1) + 7.0
    torch.testing.assert_close(csd_distance(a, scaled), csd_distance(a, b), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="same architecture"):
        csd_distance(a, torch.randn(4, 5, 2, 2))
    with pytest.raises(ValueError, match="reduction"):
        csd_distance(a, b, reduction="max")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_csd_distance_compiled_matches_eager(reduction):
    """FPQ's default CSD path (``torch.compile`` of the written-out formula) against the eager
    batch-norm kernels and the hand computation: value and gradient, two shapes (the second one
    compiles a dynamic-shape kernel), float32 and the gradient in float64."""
    torch.manual_seed(0)
    for shape in [(8, 3, 4, 4), (6, 5, 3, 2)]:
        a = torch.randn(shape, requires_grad=True)
        b = torch.randn(shape) * 3 + 1
        a_eager = a.detach().clone().requires_grad_()
        fast = csd_distance(a, b, reduction=reduction, compiled=True)
        slow = csd_distance(a_eager, b, reduction=reduction)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
        fast.backward()
        slow.backward()
        torch.testing.assert_close(a.grad, a_eager.grad, rtol=1e-4, atol=1e-6)
    a64 = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b64 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: csd_distance(z, b64, reduction=reduction, compiled=True), (a64,),
                                    eps=1e-6, atol=1e-7)


def _csd_by_hand_64(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean over elements of (standardized a - standardized b)^2, two-pass statistics in float64;
    differentiable in ``a`` when ``a`` is a float64 leaf that requires grad."""
    b = b.detach().double()
    a = a if a.dtype == torch.float64 else a.detach().double()
    dims = (0, 2, 3)
    za = (a - a.mean(dims, keepdim=True)) / (a.var(dims, keepdim=True, correction=0) + eps).sqrt()
    zb = (b - b.mean(dims, keepdim=True)) / (b.var(dims, keepdim=True, correction=0) + eps).sqrt()
    return ((za - zb) ** 2).mean()


def test_csd_distance_compiled_where_moments_are_ill_conditioned():
    """The compiled CSD works from per-channel moments (sum, sum of squares, cross sum). Against the
    two-pass float64 hand computation, value and gradient: channel means 10^3 times their spread
    (float32 moments would lose the variance), a student almost equal to its teacher (the value is a
    small difference of O(1) terms), and mixed memory layouts (e.g. a channels_last teacher from the
    FP model and an NCHW student)."""
    torch.manual_seed(0)
    base = torch.randn(8, 4, 5, 5)
    cases = {
        "large means": (base * 0.1 + 100.0, torch.randn(8, 4, 5, 5) * 0.1 - 100.0),
        "nearly equal": (base, base + 1e-3 * torch.randn(8, 4, 5, 5)),
    }
    for name, (a, b) in cases.items():
        a64 = a.double().requires_grad_()
        want = _csd_by_hand_64(a64, b)
        want.backward()
        assert float(want) > 0
        for teacher in (b, b.contiguous(memory_format=torch.channels_last)):
            for student in (a, a.contiguous(memory_format=torch.channels_last)):
                z = student.clone().requires_grad_()
                got = csd_distance(z, teacher, compiled=True)
                torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=0, msg=name)
                got.backward()
                torch.testing.assert_close(z.grad.double(), a64.grad, rtol=1e-3,
                                           atol=1e-4 * float(a64.grad.abs().max()), msg=name)


def test_feature_mse_by_hand():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    b = torch.tensor([[0.0, 2.0], [5.0, 1.0]], requires_grad=True)
    loss = feature_mse(a, b)
    assert float(loss) == pytest.approx((1 + 0 + 4 + 9) / 4)
    loss.backward()
    assert b.grad is None
    torch.testing.assert_close(a.grad, 2 * (a.detach() - b.detach()) / 4)
    a.grad = None
    feature_mse(a, b, stop_grad_b=False).backward()
    torch.testing.assert_close(b.grad, -2 * (a.detach() - b.detach()) / 4)
    with pytest.raises(ValueError, match="differ in shape"):
        feature_mse(a, torch.zeros(2, 3))


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(9, 10) == pytest.approx(math.exp(-5 * 0.01))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(50, 10) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    assert sigmoid_rampup(-4, 10) == pytest.approx(math.exp(-5))  # negative steps clamp to 0
    values = [sigmoid_rampup(t, 20) for t in range(21)]
    assert values == sorted(values)
