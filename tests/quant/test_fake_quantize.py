"""Fake quantizers and QConfigs: bit-width validation, grid values and LSQ gradients against hand
computations on small tensors, scale initialisation (MSE, min/max over calibration samples, LSQ's
``2 mean|x| / sqrt(Q_P)``), toggles and state dicts."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch.ao.quantization import FakeQuantizeBase, QConfig, QConfigMapping

import qat_plugins as qp
from qat_plugins.models import SmallCNN
from qat_plugins.quant import LSQFakeQuantize, MinMaxFakeQuantize, fake_quantize, quant_range
from host_reads import HostReads

BAD_BITS = [(0, ValueError), (1, ValueError), (9, ValueError), ("four", TypeError), (True, TypeError),
            (4.0, TypeError)]


def _initialized(fq: FakeQuantizeBase, scale, zero_point=0.0) -> FakeQuantizeBase:
    """Set qparams by hand and mark the quantizer initialised (no first-batch calibration)."""
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    zp = torch.as_tensor(zero_point, dtype=torch.float32).reshape(-1).expand_as(scale).clone()
    fq._resize_to(scale.numel())
    with torch.no_grad():
        fq.scale.copy_(scale)
        fq.zero_point.copy_(zp)
    fq.initialized.fill_(1)
    return fq


def _lsq_grad_scale(fq: LSQFakeQuantize, numel: int) -> float:
    # LSQ (Esser et al. 2020): g = 1 / sqrt(N * Q_P), Q_P the largest positive level = quant_max
    return 1.0 / math.sqrt(numel / fq.scale.numel() * fq.quant_max)


# --- quant_range and bit-width validation ------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_quant_range_every_supported_width(bits):
    assert quant_range(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert quant_range(bits, False) == (0, 2**bits - 1)
    fq = LSQFakeQuantize(bits=bits, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    assert (fq.bits, fq.quant_min, fq.quant_max) == (bits, *quant_range(bits, True))
    mm = MinMaxFakeQuantize(bits=bits)
    assert (mm.bits, mm.quant_min, mm.quant_max) == (bits, 0, 2**bits - 1)
    assert isinstance(qp.qconfig(bits, bits), QConfig)


@pytest.mark.parametrize("bits,exc", BAD_BITS)
def test_bad_bits_rejected_with_clear_message(bits, exc):
    for call in (lambda: quant_range(bits, True), lambda: LSQFakeQuantize(bits=bits),
                 lambda: MinMaxFakeQuantize(bits=bits), lambda: qp.qconfig(bits, 8), lambda: qp.qconfig(8, bits),
                 lambda: qp.qconfig_mapping(weight_bits=bits)):
        with pytest.raises(exc, match="2 to 8"):
            call()


@pytest.mark.parametrize("bits,exc", BAD_BITS[:5])
def test_prepare_qat_rejects_bad_bits(bits, exc):
    for kw in ({"weight_bits": bits}, {"act_bits": bits}):
        with pytest.raises(exc, match="2 to 8"):
            qp.prepare_qat(SmallCNN(width=4), **kw)


def test_bad_quantizer_arguments():
    with pytest.raises(ValueError, match="2\\^b levels"):
        LSQFakeQuantize(quant_min=0, quant_max=5)  # 6 levels
    with pytest.raises(ValueError, match="2\\^b levels"):
        LSQFakeQuantize(quant_min=0, quant_max=1)  # 1 bit
    with pytest.raises(ValueError, match="does not fit dtype"):
        LSQFakeQuantize(quant_min=-2, quant_max=1, dtype=torch.quint8)
    with pytest.raises(ValueError, match="init must be one of"):
        LSQFakeQuantize(bits=4, init="percentile")
    with pytest.raises(ValueError, match="dtype"):
        LSQFakeQuantize(bits=4, dtype=torch.float16)
    with pytest.raises(ValueError, match="dynamic"):
        LSQFakeQuantize(bits=4, is_dynamic=True)
    with pytest.raises(ValueError, match="averaging_constant"):
        MinMaxFakeQuantize(bits=4, averaging_constant=0.0)


# --- grid values by hand ------------------------------------------------------------------------
def test_lsq_grid_per_tensor_signed_by_hand():
    fq = _initialized(LSQFakeQuantize(bits=3, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric), 0.5)
    assert (fq.quant_min, fq.quant_max) == (-4, 3)
    x = torch.tensor([-3.0, -1.2, -0.26, 0.0, 0.24, 0.76, 1.4, 5.0])
    # x/s = [-6, -2.4, -0.52, 0, 0.48, 1.52, 2.8, 10] -> clamp(round) = [-4, -2, -1, 0, 0, 2, 3, 3]
    expected = torch.tensor([-4, -2, -1, 0, 0, 2, 3, 3]) * 0.5
    torch.testing.assert_close(fq(x), expected, rtol=0, atol=0)
    # the functional form gives the same grid
    torch.testing.assert_close(fake_quantize(x, torch.tensor([0.5]), torch.zeros(1), -4, 3), expected, rtol=0, atol=0)


def test_lsq_grid_per_channel_signed_by_hand():
    fq = LSQFakeQuantize(bits=2, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    _initialized(fq, [0.5, 0.1])
    x = torch.tensor([[-2.0, -0.3, 0.2, 0.4, 3.0],
                      [-2.0, -0.13, 0.04, 0.07, 3.0]])
    # channel 0: x/0.5 = [-4, -0.6, 0.4, 0.8, 6]   -> [-2, -1, 0, 1, 1]
    # channel 1: x/0.1 = [-20, -1.3, 0.4, 0.7, 30] -> [-2, -1, 0, 1, 1]
    q = torch.tensor([[-2, -1, 0, 1, 1], [-2, -1, 0, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(fq(x), q * torch.tensor([[0.5], [0.1]]))
    # ch_axis=1: the same scales now apply along columns
    fq1 = LSQFakeQuantize(bits=2, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=1)
    _initialized(fq1, [0.5, 0.1])
    torch.testing.assert_close(fq1(x.t().contiguous()), (q * torch.tensor([[0.5], [0.1]])).t())


def test_lsq_grid_unsigned_with_zero_point_by_hand():
    fq = _initialized(LSQFakeQuantize(bits=2, dtype=torch.quint8, qscheme=torch.per_tensor_affine), 0.25, 1.0)
    assert (fq.quant_min, fq.quant_max) == (0, 3)
    x = torch.tensor([-1.0, -0.3, 0.1, 0.3, 0.6, 2.0])
    # x/s + z = [-3, -0.2, 1.4, 2.2, 3.4, 9] -> clamp(round) = [0, 0, 1, 2, 3, 3]; x_hat = (q - 1) * 0.25
    expected = (torch.tensor([0, 0, 1, 2, 3, 3]) - 1) * 0.25
    torch.testing.assert_close(fq(x), expected.float())


def test_asymmetric_minmax_init_zero_point_by_hand():
    fq = LSQFakeQuantize(bits=2, dtype=torch.quint8, qscheme=torch.per_tensor_affine, init="minmax")
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.2, 3.0])
    out = fq(x)
    # s = (3 - (-1)) / 3 = 4/3, z = round(0 - (-1) / s) = round(0.75) = 1; grid {-4/3, 0, 4/3, 8/3}
    torch.testing.assert_close(fq.scale.detach(), torch.tensor([4 / 3]))
    torch.testing.assert_close(fq.zero_point, torch.tensor([1.0]))
    assert int(fq.initialized) == 1
    s = 4 / 3
    torch.testing.assert_close(out.detach(), torch.tensor([-s, 0.0, 0.0, s, 2 * s, 2 * s]))
    scale, zp = fq.calculate_qparams()
    assert zp.dtype == torch.int32 and int(zp) == 1 and scale.dtype == torch.float32


def test_clamping_to_the_grid_ends():
    for signed in (True, False):
        qmin, qmax = quant_range(4, signed)
        fq = _initialized(LSQFakeQuantize(bits=4, dtype=torch.qint8 if signed else torch.quint8,
                                          qscheme=torch.per_tensor_symmetric if signed else torch.per_tensor_affine),
                          0.1)
        out = fq(torch.tensor([-1e6, -100.0, 100.0, 1e6]))
        torch.testing.assert_close(out, torch.tensor([qmin, qmin, qmax, qmax]) * 0.1)
        # every output lies on the grid
        y = fq(torch.randn(1000) * 3)
        q = y / 0.1
        assert torch.allclose(q, q.round(), atol=1e-4) and q.min() >= qmin and q.max() <= qmax


# --- gradients ---------------------------------------------------------------------------------
def _grad_setup(per_channel: bool, signed: bool, zp: float = 0.0):
    torch.manual_seed(0)
    if per_channel:
        fq = LSQFakeQuantize(bits=3, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
        _initialized(fq, [0.3, 0.7])
        x = torch.randn(2, 40) * torch.tensor([[1.0], [2.0]])
    else:
        dtype = torch.qint8 if signed else torch.quint8
        qs = torch.per_tensor_symmetric if signed else torch.per_tensor_affine
        fq = _initialized(LSQFakeQuantize(bits=3, dtype=dtype, qscheme=qs), 0.4, zp)
        x = torch.randn(80) * 1.5
    # keep x/s + z away from rounding ties and the clamp boundaries (derivatives are one-sided there)
    s = fq.scale.detach().reshape(-1, *([1] * (x.dim() - 1))) if per_channel else fq.scale.detach()
    v = x / s + fq.zero_point.reshape(s.shape)
    frac = v - v.floor()
    bad = ((frac - 0.5).abs() < 0.05) | ((v - fq.quant_min).abs() < 0.05) | ((v - fq.quant_max).abs() < 0.05)
    x = torch.where(bad, x + 0.11 * s, x)
    return fq, x, s


@pytest.mark.parametrize("per_channel,signed,zp", [(False, True, 0.0), (False, False, 2.0), (True, True, 0.0)],
                         ids=["tensor-signed", "tensor-unsigned-zp2", "channel-signed"])
def test_lsq_step_size_and_input_gradient_closed_form(per_channel, signed, zp):
    fq, x, s = _grad_setup(per_channel, signed, zp)
    z = fq.zero_point.reshape(s.shape) if per_channel else fq.zero_point
    x = x.clone().requires_grad_(True)
    w = torch.randn_like(x)  # upstream gradient
    (fq(x) * w).sum().backward()

    v = x.detach() / s
    below, above = v + z < fq.quant_min, v + z > fq.quant_max
    inside = ~(below | above)
    assert below.any() and above.any() and inside.any()
    d = torch.where(inside, v.round() - v,
                    torch.where(below, fq.quant_min - z, fq.quant_max - z).expand_as(v))
    g = _lsq_grad_scale(fq, x.numel())
    if per_channel:
        expected = (w * d).sum(1) * g
    else:
        expected = (w * d).sum().reshape(1) * g
    torch.testing.assert_close(fq.scale.grad, expected, rtol=1e-4, atol=1e-6)
    # straight-through estimator: 1 inside the clamp range, 0 outside
    torch.testing.assert_close(x.grad, torch.where(inside, w, torch.zeros_like(w)))


def test_lsq_step_size_gradient_vs_finite_differences():
    """Where the function is differentiable (no element crosses a rounding step within +-h), its
    derivative with the rounding held fixed is round(x/s) inside and qmin/qmax - z outside. LSQ's
    gradient is that minus x/s inside (the STE term) and identical outside, times g."""
    fq, x, s = _grad_setup(False, False, 1.0)
    w = torch.randn_like(x)
    fq.scale.grad = None
    (fq(x) * w).sum().backward()
    g = _lsq_grad_scale(fq, x.numel())

    def f(scale: float) -> torch.Tensor:
        with torch.no_grad():
            return fake_quantize(x.double(), torch.tensor([scale], dtype=torch.float64),
                                 fq.zero_point.double(), fq.quant_min, fq.quant_max)

    s0, h = float(fq.scale.detach()), 1e-6
    per_elem_fd = (f(s0 + h) - f(s0 - h)) / (2 * h)
    v = x.double() / s0 + float(fq.zero_point)
    inside = (v >= fq.quant_min) & (v <= fq.quant_max)
    outside = ~inside
    # outside the range the function is exactly linear in s: FD == LSQ's gradient (before scaling by g)
    expected_outside = torch.where(v < fq.quant_min, fq.quant_min - 1.0, fq.quant_max - 1.0).double()
    torch.testing.assert_close(per_elem_fd[outside], expected_outside[outside], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_elem_fd[inside], (x.double() / s0).round()[inside], rtol=1e-5, atol=1e-5)
    lsq_from_fd = per_elem_fd - torch.where(inside, x.double() / s0, torch.zeros_like(v))
    torch.testing.assert_close(fq.scale.grad.double(), (w.double() * lsq_from_fd).sum().reshape(1) * g,
                               rtol=1e-4, atol=1e-6)
    # an all-outside tensor: the autograd gradient is g * the plain finite difference
    fq.scale.grad = None
    xo = torch.tensor([-5.0, -3.0, 4.0, 9.0])
    (fq(xo)).sum().backward()
    fd = ((fake_quantize(xo, torch.tensor([s0 + 1e-3]), fq.zero_point, 0, 7).sum()
           - fake_quantize(xo, torch.tensor([s0 - 1e-3]), fq.zero_point, 0, 7).sum()) / 2e-3)
    torch.testing.assert_close(fq.scale.grad, fd.reshape(1) * _lsq_grad_scale(fq, 4), rtol=1e-3, atol=1e-6)


def test_learn_scale_false_and_minmax_have_no_scale_gradient():
    fq = _initialized(LSQFakeQuantize(bits=4, learn_scale=False), 0.1)
    assert not fq.scale.requires_grad
    x = torch.randn(10, requires_grad=True)
    fq(x).sum().backward()
    assert fq.scale.grad is None and x.grad is not None
    mm = MinMaxFakeQuantize(bits=4)
    assert "scale" not in dict(mm.named_parameters()) and "scale" in dict(mm.named_buffers())


def test_fake_quant_and_observer_toggles():
    fq = LSQFakeQuantize(bits=2)
    fq.disable_observer()
    x = torch.randn(20)
    out = fq(x)  # not initialised, but observer disabled: quantizes with the default scale 1
    assert int(fq.initialized) == 0 and float(fq.scale.detach()) == 1.0
    # torch's reference op on the 2-bit unsigned grid [0, 3], scale 1: identical rounding (half to even)
    ref = torch.fake_quantize_per_tensor_affine(x, 1.0, int(fq.zero_point), 0, 3)
    assert torch.equal(out, ref)
    fq.disable_fake_quant()
    assert torch.equal(fq(x), x)


# --- initialisation ---------------------------------------------------------------------------
def test_init_methods_give_sensible_scales():
    torch.manual_seed(0)
    x = torch.randn(4096)
    errs, scales = {}, {}
    for init in ("mse", "minmax", "lsq"):
        fq = LSQFakeQuantize(bits=4, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, init=init)
        out = fq(x).detach()
        scales[init] = float(fq.scale.detach())
        errs[init] = float((out - x).pow(2).mean())
    amax = float(x.abs().max())
    assert scales["minmax"] == pytest.approx(amax / 8, rel=1e-6)  # max(|qmin|, qmax) = 8 levels
    assert scales["lsq"] == pytest.approx(2 * float(x.abs().mean()) / math.sqrt(7), rel=1e-6)  # Q_P = 7
    assert 0.2 * scales["minmax"] - 1e-6 <= scales["mse"] <= scales["minmax"] + 1e-6
    # MSE init minimises the reconstruction error among shrunk ranges: no worse than min/max
    assert errs["mse"] <= errs["minmax"] + 1e-9
    # all three land in a sensible band for N(0, 1) at 4 bits (optimal clipping ~2.5-3 sigma -> s ~ 0.35)
    for init, s in scales.items():
        assert 0.15 < s < 0.6, (init, s)
    assert all(e < 0.05 for e in errs.values()), errs


def test_init_per_channel_and_unsigned():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).float().reshape(6, 1, 1, 1)
    fq = LSQFakeQuantize(bits=4, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0, init="minmax")
    fq(w)
    assert fq.scale.shape == (6,) and fq.zero_point.shape == (6,)
    torch.testing.assert_close(fq.scale.detach(), w.abs().amax((1, 2, 3)) / 8)
    assert fq.scale[-1] > 3 * fq.scale[0]  # the 6x wider channel gets a much larger step
    relu = torch.rand(1000) * 6.0  # non-negative activations
    act = LSQFakeQuantize(bits=2, dtype=torch.quint8, qscheme=torch.per_tensor_affine, init="minmax")
    act(relu)
    assert float(act.zero_point) == 0.0
    assert float(act.scale.detach()) == pytest.approx(float(relu.max()) / 3, rel=1e-6)


def test_init_happens_once_and_only_with_observer_enabled():
    fq = LSQFakeQuantize(bits=4, init="minmax")
    fq(torch.tensor([0.0, 3.0]))
    s = float(fq.scale.detach())
    fq(torch.tensor([0.0, 300.0]))
    assert float(fq.scale.detach()) == s  # later batches do not re-initialise (the scale is learned)


@pytest.mark.parametrize("cls", [LSQFakeQuantize, MinMaxFakeQuantize])
def test_flags_are_read_from_the_device_only_after_they_change(cls):
    """Issue 11, item 5: a steady-state forward reads no flag buffer (no host sync); every way of
    changing a flag is still seen: torch.ao's toggles, a direct write, load_state_dict, a copy."""
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    fq = cls(bits=4).train()
    fq(x)  # initialises (writes `initialized`)
    with HostReads() as reads:
        fq(x)
    assert reads.syncs == 1  # the changed `initialized`, once
    with HostReads() as reads:
        y = fq(x)
    assert reads.syncs == 0, reads.where
    assert not torch.equal(y, x)

    torch.ao.quantization.disable_fake_quant(fq)
    with HostReads() as reads:
        assert fq(x) is x
    assert reads.syncs == 1  # only the flag that changed is read again
    fq.fake_quant_enabled.fill_(1)  # a direct write (as training/bn.py restores observer_enabled)
    assert torch.equal(fq(x), y)

    # a copy made after a change that no forward has seen yet: the copy's tensors restart their
    # version counters (at 1 in torch 2.13), so it must not take the original's cached values
    other = cls(bits=4).train()
    other(x)
    torch.ao.quantization.disable_fake_quant(other)  # fake_quant_enabled at version 1
    assert other(x) is x  # cached: disabled, at version 1
    torch.ao.quantization.enable_fake_quant(other)  # version 2, not seen by a forward
    for copied in (copy.deepcopy(other), pickle.loads(pickle.dumps(other))):
        assert torch.equal(copied(x), other(x))

    fresh = cls(bits=4).state_dict()  # initialized = 0
    fq.load_state_dict(fresh)
    torch.manual_seed(1)
    x2 = 3 * torch.randn(64, 3)
    fq(x2)  # re-initialises from x2: the load was seen
    ref = cls(bits=4).train()
    ref(x2)
    assert torch.equal(fq.scale.detach(), ref.scale.detach())


def test_minmax_fake_quantize_running_range():
    c = 0.25
    mm = MinMaxFakeQuantize(bits=2, dtype=torch.quint8, averaging_constant=c)
    mm.train()
    mm(torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(mm.min_val, torch.tensor([-1.0]))
    torch.testing.assert_close(mm.max_val, torch.tensor([2.0]))
    torch.testing.assert_close(mm.scale, torch.tensor([1.0]))  # (2 - (-1)) / 3
    mm(torch.tensor([-3.0, 6.0]))
    lo, hi = (1 - c) * -1.0 + c * -3.0, (1 - c) * 2.0 + c * 6.0
    torch.testing.assert_close(mm.min_val, torch.tensor([lo]))
    torch.testing.assert_close(mm.max_val, torch.tensor([hi]))
    torch.testing.assert_close(mm.scale, torch.tensor([(hi - lo) / 3]))
    torch.testing.assert_close(mm.zero_point, torch.tensor([float(round(-lo / ((hi - lo) / 3)))]))
    # eval mode: the range is frozen
    mm.eval()
    mm(torch.tensor([-100.0, 100.0]))
    torch.testing.assert_close(mm.max_val, torch.tensor([hi]))
    # per channel: one range per channel; state dict round trip resizes a fresh module
    pc = MinMaxFakeQuantize(bits=4, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    pc(torch.tensor([[-1.0, 0.5], [-0.2, 4.0]]))
    torch.testing.assert_close(pc.scale, torch.tensor([1 / 8, 4 / 8]))
    fresh = MinMaxFakeQuantize(bits=4, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    fresh.load_state_dict(pc.state_dict())
    torch.testing.assert_close(fresh.scale, pc.scale)
    torch.testing.assert_close(fresh.max_val, pc.max_val)


def test_lsq_state_dict_round_trip_per_channel():
    fq = LSQFakeQuantize(bits=4, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    fq(torch.randn(5, 7))
    fresh = LSQFakeQuantize(bits=4, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    fresh.load_state_dict(fq.state_dict())
    assert fresh.scale.shape == (5,) and int(fresh.initialized) == 1
    x = torch.randn(5, 7)
    assert torch.equal(fresh(x), fq(x))


# --- qconfig ----------------------------------------------------------------------------------
def test_qconfig_types():
    qc = qp.qconfig(3, 5)
    assert isinstance(qc, QConfig)
    act, wt = qc.activation(), qc.weight()
    assert isinstance(act, LSQFakeQuantize) and isinstance(wt, LSQFakeQuantize)
    assert (act.bits, act.dtype, act.qscheme, act.quant_min, act.quant_max) == (
        5, torch.quint8, torch.per_tensor_affine, 0, 31)
    assert (wt.bits, wt.dtype, wt.qscheme, wt.ch_axis, wt.quant_min, wt.quant_max) == (
        3, torch.qint8, torch.per_channel_symmetric, 0, -4, 3)
    qc2 = qp.qconfig(4, 4, per_channel=False, learnable=False)
    act2, wt2 = qc2.activation(), qc2.weight()
    assert isinstance(act2, MinMaxFakeQuantize) and isinstance(wt2, MinMaxFakeQuantize)
    assert wt2.qscheme == torch.per_tensor_symmetric
    mapping = qp.qconfig_mapping(2, 4, per_channel=False)
    assert isinstance(mapping, QConfigMapping)
    assert mapping.global_qconfig.weight().bits == 2 and mapping.global_qconfig.activation().bits == 4
    assert mapping.global_qconfig.weight().qscheme == torch.per_tensor_symmetric


def test_qconfig_bad_args():
    with pytest.raises(TypeError, match="bools"):
        qp.qconfig(4, 4, per_channel="yes")
    with pytest.raises(TypeError, match="bools"):
        qp.qconfig(4, 4, learnable=1)
    with pytest.raises(TypeError):
        qp.qconfig(4, 4, 8)  # keyword-only options
    with pytest.raises(TypeError):
        qp.qconfig_mapping(4, 4, bogus=True)


def test_lsq_minmax_init_over_calibration_samples_by_hand():
    """init="minmax", calib_samples=100 (FPQ's base QAT): the scale is (max - min) / (2^b - 1) over
    the first 100 rows, across batches, then fixed; "lsq": 2 mean|x| / sqrt(Q_P)."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(40, 3, generator=g) * k for k in (1.0, 3.0, 2.0)]
    q = LSQFakeQuantize(bits=4, init="minmax", calib_samples=100)
    q(xs[0])
    assert int(q.initialized) == 0  # 40 < 100 rows seen: still calibrating
    q(xs[1])
    q(xs[2])
    assert int(q.initialized) == 1
    lo, hi = 0.0, max(float(x.max()) for x in xs)  # unsigned grid: the range always includes 0
    assert float(q.scale) == pytest.approx((hi - lo) / 15, rel=1e-6)
    q(xs[2] * 10)  # calibrated: later batches do not move the scale
    assert float(q.scale) == pytest.approx((hi - lo) / 15, rel=1e-6)
    w = LSQFakeQuantize(bits=4, init="lsq", dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    v = torch.randn(64, generator=g)
    w(v)
    assert float(w.scale) == pytest.approx(2 * float(v.abs().mean()) / math.sqrt(7), rel=1e-6)  # Q_P = 7
    with pytest.raises(ValueError, match="calib_samples applies to init='minmax'"):
        LSQFakeQuantize(bits=4, init="mse", calib_samples=10)
