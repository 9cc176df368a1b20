"""The exporter table, the layer-by-layer ORT comparison, weight storage types and grid refinement,
INT4 deployment sessions, and PT2E models exported with integer weights."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import qat_plugins as qp
from qat_plugins.export import (compare_layers, cpu_info, decode_onnx_weights, export_onnx, ort_session,
                                register_exporter, registered_exporters, unregister_exporter, validate_onnx)
from qat_plugins.export.onnx_graph import dequantize_linear_inputs
from qat_plugins.models import SmallResNet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
EXPORT_DIR = Path(qp.__file__).parent / "export"


@pytest.fixture(scope="module")
def trained(digits):
    """SmallResNet(8) trained briefly on digits (float), and a W4A4 eager / FX / PT2E QAT copy each."""
    torch.manual_seed(0)
    x, y = digits.train.tensors
    fp = SmallResNet(width=8)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(fp.parameters(), 1e-2)
    for _ in range(80):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(fp(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    fp.eval()
    out = {"fp": fp}
    for mode in ("eager", "fx", "pt2e"):
        q = qp.prepare_qat(fp, weight_bits=4, act_bits=4, mode=mode, example_inputs=(x[:2],))
        q.train()
        with torch.no_grad():
            q(x[:128])
        out[mode] = q.eval()
    return out


def _run(path, x: torch.Tensor, **kw) -> np.ndarray:
    s = ort_session(path, num_threads=1, **kw)
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


# --- exporter table -------------------------------------------------------------------------------

class _Marked(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_registered_exporter_gets_the_model_and_options(tmp_path, digits):
    calls = []

    def export(model, path, inputs, *, weight_format, **options):
        calls.append((model, path, inputs, weight_format, options))
        path.write_bytes(b"x")
        return path

    register_exporter("test-marked", lambda m: isinstance(m, _Marked), export)
    try:
        assert "test-marked" in [e.name for e in registered_exporters()]
        m = _Marked()
        x = digits.test.tensors[0][:2]
        out = export_onnx(m, tmp_path / "m.onnx", x, weight_format="int4", custom=3)
        assert out == tmp_path / "m.onnx" and out.read_bytes() == b"x"
        (model, path, inputs, fmt, options), = calls
        assert model is m and fmt == "int4" and options == {"custom": 3}
        assert isinstance(inputs, tuple) and torch.equal(inputs[0], x)
        with pytest.raises(FileNotFoundError):  # the target is checked before the exporter runs
            export_onnx(m, tmp_path / "missing" / "m.onnx", x)
    finally:
        assert unregister_exporter("test-marked")
    assert not unregister_exporter("test-marked")
    with pytest.raises(TypeError, match="unexpected keyword arguments"):  # built-in path: no extra options
        export_onnx(_Marked(), tmp_path / "n.onnx", digits.test.tensors[0][:2], weight_format="fp32", custom=3)


def test_export_package_imports_no_higher_layer():
    """export/ sits on floor 2: nothing from integrations, training, regularizers, bench or the CLI."""
    banned = ("integrations", "training", "regularizers", "bench", "cli")
    for f in EXPORT_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module.split(".")
                assert not any(b in mod for b in banned), (f.name, node.module)


# --- layer-by-layer comparison --------------------------------------------------------------------

def test_compare_layers_names_the_node_where_ort_parts(trained, digits, tmp_path):
    q = trained["fx"]
    x = digits.test.tensors[0][:32]
    p = export_onnx(q, tmp_path / "m.onnx", x[:1])
    clean = compare_layers(p, q, x, optimize=False)
    assert clean.first_divergence is None and len(clean.layers) >= 10
    # corrupt the 2nd activation quantizer (the stem conv's output; its only input is the image, which
    # both sides quantize identically): its QuantizeLinear gets a zero point 3 higher than its
    # DequantizeLinear (ORT then differs there by exactly 3 steps, except where the grid clamps)
    m = onnx.load(str(p))
    inits = {t.name: t for t in m.graph.initializer}
    qnodes = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    target = qnodes[1]
    zp = numpy_helper.to_array(inits[target.input[2]])
    m.graph.initializer.append(numpy_helper.from_array((zp.astype(np.int16) + 3).astype(zp.dtype), "zp_plus3"))
    target.input[2] = "zp_plus3"
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    for optimize in (False, True):
        d = compare_layers(bad, q, x, optimize=optimize).first_divergence
        assert d is not None and d.index == 1 and d.onnx_node == target.name
        # 3 steps; the fused kernel may add its own 1-step requantization rounding on top
        assert d.max_step_diff == 3 if not optimize else 3 <= d.max_step_diff <= 4
    r = validate_onnx(bad, q, (x, digits.test.tensors[1][:32]), repeats=1)
    assert r.first_divergence is not None and r.first_divergence.startswith(target.name)
    assert r.cpu_isa == cpu_info()[1] and r.node_counts.get("QLinearConv", 0) > 0


# --- weight storage ----------------------------------------------------------------------------------

def _raw_weights(path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {n.input[0]: numpy_helper.to_array(t) for n, t in dequantize_linear_inputs(m.graph)}


def test_weight_types_and_grid_refinement(trained, digits, tmp_path):
    q = trained["eager"]
    x = digits.test.tensors[0]
    s8 = export_onnx(q, tmp_path / "s8.onnx", x[:1])
    u8 = export_onnx(q, tmp_path / "u8.onnx", x[:1], int8_weight_type="u8")
    plain = export_onnx(q, tmp_path / "plain.onnx", x[:1], refine_weight_grid=False)
    raw_s8, raw_u8, raw_plain = _raw_weights(s8), _raw_weights(u8), _raw_weights(plain)
    assert all(a.dtype == np.int8 for a in raw_s8.values()) and all(a.dtype == np.uint8 for a in raw_u8.values())
    # 4-bit layers: refined by 16 (q * 16 in [-128, 112]); 8-bit first/last layers: factor 1
    for name, a in raw_plain.items():
        factor = 16 if a.min() >= -8 and a.max() <= 7 else 1
        assert np.array_equal(raw_s8[name].astype(np.int16), a.astype(np.int16) * factor)
        assert np.array_equal(raw_u8[name].astype(np.int16) - 128, a.astype(np.int16) * factor)
    # the same weights in every form (decoded on the quantizer's own grid / dequantized)
    for other in (u8, plain):
        for k, v in decode_onnx_weights(s8).items():
            assert np.array_equal(v, decode_onnx_weights(other)[k])
            assert np.array_equal(decode_onnx_weights(s8, dequantize=True)[k],
                                  decode_onnx_weights(other, dequantize=True)[k])
    # the refinement only makes ORT's int32 bias more exact: agreement with PyTorch does not drop
    with torch.no_grad():
        t = q(x).argmax(1).numpy()
    agree = {p.stem: float((_run(p, x).argmax(1) == t).mean()) for p in (s8, u8, plain)}
    assert agree["s8"] >= agree["plain"] - 1 / len(x) and agree["s8"] >= 0.97, agree
    assert np.array_equal(_run(s8, x), _run(u8, x))  # U8S8 (VNNI) and U8U8 kernels: identical integers


def test_reduce_range_keeps_weights_within_64(digits, tmp_path):
    x = digits.train.tensors[0]
    q = qp.prepare_qat(SmallResNet(width=8), weight_bits=4, act_bits=8, reduce_range=True)
    q.train()
    with torch.no_grad():
        q(x[:64])
    q.eval()
    assert {(m.quant_min, m.quant_max) for n, m in q.named_modules() if n.endswith("weight_fake_quant")} \
        == {(-64, 63), (-8, 7)}  # 8-bit first/last layers trained on the 7-bit grid
    raw = _raw_weights(export_onnx(q, tmp_path / "rr.onnx", x[:1]))
    assert max(int(np.abs(a.astype(np.int16)).max()) for a in raw.values()) <= 64
    assert {int(np.abs(a.astype(np.int16)).max()) > 32 for a in raw.values()} == {True}  # 4-bit: q * 8


def test_int4_session_runs_fused_at_int8_values(trained, digits, tmp_path):
    q = trained["fx"]
    x = digits.test.tensors[0]
    p8 = export_onnx(q, tmp_path / "m8.onnx", x[:1], weight_format="int8")
    p4 = export_onnx(q, tmp_path / "m4.onnx", x[:1], weight_format="int4")
    assert np.array_equal(_run(p4, x), _run(p8, x))  # widened INT4 == the INT8 export, bit for bit
    assert p4.stat().st_size < 0.8 * p8.stat().st_size  # width 8: graph and scales weigh as much as weights


# --- PT2E with integer weights --------------------------------------------------------------------------

def test_pt2e_exports_integer_weights_with_bn_folded(trained, digits, tmp_path):
    q = trained["pt2e"]
    x, y = digits.test.tensors
    from qat_plugins.quant.pt2e import pt2e_fake_quantizers

    for fmt in ("int8", "int4"):
        p = export_onnx(q, tmp_path / f"{fmt}.onnx", x[:1], weight_format=fmt)
        m = onnx.load(str(p))
        ops = [n.op_type for n in m.graph.node]
        assert "BatchNormalization" not in ops and ops.count("Conv") == 9 and ops.count("Gemm") == 1
        w = decode_onnx_weights(p)
        assert sorted(w) == sorted(["conv1", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2",
                                    "layer2.shortcut.0", "layer3.conv1", "layer3.conv2", "layer3.shortcut.0", "fc"])
        for name, v in w.items():
            lim = 127 if name in ("conv1", "fc") else 7  # first / last layer kept at 8 bit
            assert v.dtype == np.int8 and v.min() >= -lim - 1 and v.max() <= lim
        if fmt == "int4":
            types = {t.name: t.data_type for t in m.graph.initializer}
            assert types["layer1.conv1.w.qweight_int4"] == onnx.TensorProto.INT4
    # dequantized weights == torch's own per-channel fake quantization of torchao's folded weight
    fqs = {path: mod for mod, path in pt2e_fake_quantizers(q).values()}
    fq = fqs["layer1.conv1"]
    bn = q.get_submodule("layer1.bn1")
    k = (bn.weight / torch.sqrt(bn.running_var + 1e-5)).detach()  # nn.BatchNorm2d's default eps
    wf = q.get_submodule("layer1.conv1").weight.detach() * k.reshape(-1, 1, 1, 1)
    s, _ = fq.calculate_qparams()
    ref = torch.fake_quantize_per_channel_affine(wf, s.detach().float(), torch.zeros_like(s, dtype=torch.int32), 0, -8, 7)
    deq = decode_onnx_weights(tmp_path / "int8.onnx", dequantize=True)["layer1.conv1"]
    assert np.array_equal(deq, ref.numpy())
    r = validate_onnx(tmp_path / "int8.onnx", q, (x, y), repeats=1)
    assert r.node_counts.get("QLinearConv") == 9 and r.top1_agreement >= 0.97
