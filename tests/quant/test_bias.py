"""snap_biases: effective biases on the int32 grid ``s_in * s_w`` that ORT's integer kernels add."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qat_plugins as qp
from qat_plugins.export import compare_layers, export_onnx
from qat_plugins.quant.bias import snap_to_grid
from qat_plugins.quant.fold import fold_bn
from qat_plugins.quant.step_size import input_quantizer, step_size


def test_snap_to_grid_by_hand():
    bias = torch.tensor([0.123, -0.456])
    target = torch.tensor([1.0, 2.0])
    snap = snap_to_grid("conv", bias, torch.tensor(0.1), torch.tensor([0.05, 0.2]), target)
    # grid 0.1 * [0.05, 0.2] = [0.005, 0.02]: 0.123 -> 25 steps = 0.125, -0.456 -> -23 steps = -0.46
    assert torch.allclose(target, torch.tensor([1.002, 1.996]), atol=1e-6)
    assert snap.layer == "conv" and snap.max_shift_steps == pytest.approx(0.4, abs=1e-4)
    # a per-channel input grid runs in float in ORT: nothing to snap
    assert snap_to_grid("dw", bias, torch.tensor([0.1, 0.2]), torch.tensor(0.05), target) is None


def _prepared(fp, mode, x):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qp.prepare_qat(copy.deepcopy(fp), weight_bits=4, act_bits=4, mode=mode, example_inputs=(x[:2],))
    q.train()
    with torch.no_grad():
        q(x)  # calibration
    # BN statistics and beta off their fold-exact values, as after training
    g = torch.Generator().manual_seed(1)
    for name, t in q.state_dict().items():
        if name.endswith(("running_mean", "bn.bias")) or (".bn" in name and name.endswith(".bias")):
            t.add_(0.05 * torch.randn(t.shape, generator=g))
    return q.eval()


@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
def test_snapped_biases_are_on_the_grid_and_ort_matches(fp_resnet, digits, mode, tmp_path):
    x = digits.test.tensors[0][:128]
    q = _prepared(fp_resnet, mode, x)
    before = compare_layers(export_onnx(q, tmp_path / "a.onnx", x[:1]), q, x, tolerance=0)
    with torch.no_grad():
        out0 = q(x)
    snaps = qp.snap_biases(q, x[:2])
    assert len(snaps) >= 8 and all(s.max_shift_steps <= 0.5 + 1e-4 for s in snaps)
    assert any(s.max_shift_steps > 0.05 for s in snaps)  # the biases really were off the grid
    if mode != "pt2e":  # eager / FX: check the folded bias of every snapped layer by hand
        mods = dict(q.named_modules())
        for s in snaps:
            mod = mods[s.layer]
            grid = step_size(input_quantizer(q, s.layer)).reshape(()) * step_size(mod.weight_fake_quant).reshape(-1)
            k = fold_bn(mod)[1] / grid
            assert torch.allclose(k, k.round(), atol=2e-3), s.layer
    assert qp.snap_biases(q, x[:2]) and all(s.max_shift_steps < 2e-3 for s in qp.snap_biases(q, x[:2]))
    with torch.no_grad():
        assert (q(x) - out0).abs().max() < 0.5 * (out0.max() - out0.min())  # a small change of the model
    after = compare_layers(export_onnx(q, tmp_path / "b.onnx", x[:1]), q, x, tolerance=0)
    wrong = lambda c: sum(d.mismatch_fraction for d in c.layers)  # noqa: E731
    assert wrong(before) > 0  # ORT's int32 bias moved values before
    assert wrong(after) < wrong(before) / 10, (before.summary(), after.summary())
    # the first conv: only float-summation ties remain (~1e-5 of the elements)
    assert after.layers[0].mismatch_fraction == 0 and after.layers[1].mismatch_fraction < 1e-4
