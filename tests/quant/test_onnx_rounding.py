"""The fake quantizers round as ONNX ``QuantizeLinear`` does (``round(x/s) + z``), checked in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qat_plugins.quant import fake_quantize


def _ort_qdq(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]), helper.make_tensor("z", TensorProto.UINT8, [], [zero_point])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("zero_point", [0, 1, 77, 78, 128])
def test_fake_quantize_equals_onnx_quantize_linear(zero_point):
    g = torch.Generator().manual_seed(zero_point)
    scale = 0.0371
    # exact .5 ties (odd and even), values next to ties, and random values across the clamp range
    k = torch.arange(-zero_point - 3, 256 - zero_point + 3, dtype=torch.float32)
    ties = (k + 0.5) * scale
    x = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1),
                   (torch.rand(4096, generator=g) * 300 - zero_point - 20) * scale])
    ours = fake_quantize(x, torch.tensor(scale), torch.tensor(float(zero_point)), 0, 255)
    ref = _ort_qdq(x.numpy(), scale, zero_point)
    assert np.array_equal(ours.numpy(), ref)
    # the old formula round(x/s + z) disagrees on ties for odd zero points
    if zero_point % 2:
        old = (torch.clamp(torch.round(x / scale + zero_point), 0, 255) - zero_point) * scale
        assert not np.array_equal(old.numpy(), ref)
