"""``prepare_qat`` (eager and FX) on the two reference models (width 8) with real digits batches: bits,
fusion, first/last layers at 8 bit, the original left untouched, state dicts, torch.ao ``convert``,
and the errors. Prepared models are built once per module and deep-copied where a test changes them."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

import qat_plugins as qp
from qat_plugins.models import SmallCNN, SmallResNet
from qat_plugins.quant import LSQFakeQuantize, MinMaxFakeQuantize
from qat_plugins.quant.prepare import quantizable_layers
from qat_plugins.quant.step_size import activation_quantizers, weight_quantizers

FUSED_QAT = (torch.ao.nn.intrinsic.qat.ConvBn2d, torch.ao.nn.intrinsic.qat.ConvBnReLU2d)
MODELS = {"cnn": SmallCNN, "resnet": SmallResNet}


# --- prepare_qat --------------------------------------------------------------------------------
def _prepare(name, mode, x, **kw):
    return qp.prepare_qat(MODELS[name](width=8), mode=mode, example_inputs=(x,), **kw)


@pytest.fixture(scope="module")
def prepared(batch):
    """(model name, mode, keep_first_last_8bit) -> (float model, W2A4-prepared QAT model after one step)."""
    x, y = batch
    out = {}
    for name in MODELS:
        for mode in ("eager", "fx"):
            for keep in (True, False):
                torch.manual_seed(0)
                fp = MODELS[name](width=8)
                q = qp.prepare_qat(fp, weight_bits=2, act_bits=4, mode=mode, example_inputs=(x,),
                                   keep_first_last_8bit=keep)
                out[name, mode, keep] = (fp, q)
    return out


def _quantizer_of(q: nn.Module, mode: str, layer: str, kind: str) -> FakeQuantizeBase:
    """Weight quantizer of ``layer`` or the activation quantizer of its output."""
    mod = q.get_submodule(layer)
    if kind == "weight":
        return mod.weight_fake_quant
    if mode == "eager":
        return mod.activation_post_process
    node = next(n for n in q.graph.nodes if n.op == "call_module" and n.target == layer)
    user = next(iter(node.users))
    return q.get_submodule(str(user.target))


@pytest.mark.parametrize("mode", ["eager", "fx"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prepare_qat_forward_backward_bits_and_fusion(prepared, batch, name, mode):
    x, y = batch
    fp, q = prepared[name, mode, True]
    assert q.training
    out = q(x)
    assert out.shape == (64, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    layers = quantizable_layers(fp)
    first, last = layers[0], layers[-1]
    assert first == "conv1" and last == "fc"
    # every conv is a fused torch.ao.nn.intrinsic.qat conv-bn(-relu) module; fc a QAT linear
    convs = [n for n, m in fp.named_modules() if isinstance(m, nn.Conv2d)]
    for n in convs:
        assert isinstance(q.get_submodule(n), FUSED_QAT), (n, type(q.get_submodule(n)))
        assert q.get_submodule(n).weight.grad is not None
    assert isinstance(q.get_submodule("fc"), torch.ao.nn.qat.Linear)
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in q.named_modules() if not n.endswith(".bn"))
    # bit widths: first/last 8 bit (weights and outputs), every other weight 2 bit
    for layer in layers:
        wq = _quantizer_of(q, mode, layer, "weight")
        assert isinstance(wq, LSQFakeQuantize) and wq.dtype == torch.qint8
        assert wq.bits == (8 if layer in (first, last) else 2), layer
        assert wq.scale.grad is not None and wq.scale.grad.abs().sum() > 0, layer
        aq = _quantizer_of(q, mode, layer, "act")
        assert aq.bits == (8 if layer in (first, last) else 4), layer
    acts = activation_quantizers(q)
    assert {m.bits for _, m in acts} == {4, 8}
    assert all(m.dtype == torch.quint8 for _, m in acts)
    assert {m.bits for _, m in weight_quantizers(q)} == {2, 8}


@pytest.mark.parametrize("mode", ["eager", "fx"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prepare_qat_without_keep_first_last(prepared, batch, name, mode):
    x, _ = batch
    _, q = prepared[name, mode, False]
    q(x)
    for layer in ("conv1", "fc"):
        assert _quantizer_of(q, mode, layer, "weight").bits == 2
        assert _quantizer_of(q, mode, layer, "act").bits == 4
    assert {m.bits for _, m in weight_quantizers(q)} == {2}


def test_prepare_qat_min_max_and_per_tensor(batch):
    x, _ = batch
    q = qp.prepare_qat(SmallCNN(width=4), weight_bits=4, act_bits=4, learnable=False, per_channel=False)
    q(x)
    fqs = [m for m in q.modules() if isinstance(m, FakeQuantizeBase)]
    assert fqs and all(isinstance(m, MinMaxFakeQuantize) for m in fqs)
    assert all(m.qscheme == torch.per_tensor_symmetric for _, m in weight_quantizers(q))
    assert not [p for n, p in q.named_parameters() if n.endswith("scale")]


def _fingerprint(m: nn.Module):
    return ({k: v.clone() for k, v in m.state_dict().items()},
            [(n, type(mod), mod.training, dict(mod._forward_hooks), dict(mod._forward_pre_hooks))
             for n, mod in m.named_modules()])


@pytest.mark.parametrize("mode", ["eager", "fx"])
def test_prepare_qat_leaves_the_original_untouched(batch, mode):
    x, _ = batch
    fp = SmallResNet(width=8).eval()
    before_state, before_mods = _fingerprint(fp)
    with torch.no_grad():
        ref = fp(x)
    q = qp.prepare_qat(fp, weight_bits=4, act_bits=4, mode=mode, example_inputs=(x,))
    q(x)
    after_state, after_mods = _fingerprint(fp)
    assert before_mods == after_mods and not fp.training
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert not any(p is fq for p in fp.parameters() for fq in q.parameters())
    with torch.no_grad():
        assert torch.equal(fp(x), ref)


@pytest.mark.parametrize("mode", ["eager", "fx"])
@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_round_trip(prepared, batch, digits, name, mode):
    x, y = batch
    _, q = prepared[name, mode, True]
    q = copy.deepcopy(q).train()
    opt = torch.optim.SGD(q.parameters(), 0.05)
    for i in range(3):
        xb, yb = digits.train.tensors[0][64 * i:64 * (i + 1)], digits.train.tensors[1][64 * i:64 * (i + 1)]
        loss = F.cross_entropy(q(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    fresh = _prepare(name, mode, x, weight_bits=2, act_bits=4)  # never run: per-channel scales still length 1
    fresh.load_state_dict(torch.load(buf))
    q.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(q(x), fresh(x))
    sd, fsd = q.state_dict(), fresh.state_dict()
    assert sd.keys() == fsd.keys() and all(torch.equal(sd[k], fsd[k]) for k in sd)


@contextlib.contextmanager
def _engine(name: str):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def _convert(q: nn.Module, mode: str) -> nn.Module:
    if mode == "eager":
        return torch.ao.quantization.convert(copy.deepcopy(q))
    from torch.ao.quantization.quantize_fx import convert_fx

    return convert_fx(copy.deepcopy(q))


def _fx_quantizer_after(fx: nn.Module, module: str) -> FakeQuantizeBase:
    node = next(n for n in fx.graph.nodes if n.op == "call_module" and n.target == module)
    return fx.get_submodule(str(next(iter(node.users)).target))


@pytest.mark.parametrize("learnable", [True, False])
def test_eager_add_then_relu_is_quantized_after_the_relu(batch, learnable):
    """A ``FloatFunctional`` add followed by a ReLU gets a grid from 0 up and the block outputs FX's
    add-relu gives (torch.ao's own placement fitted it before the ReLU: zero point 1 of [0, 3])."""
    x, _ = batch
    torch.manual_seed(0)
    fp = SmallResNet(width=8)
    eager = qp.prepare_qat(fp, weight_bits=2, act_bits=2, learnable=learnable)
    fx = qp.prepare_qat(fp, weight_bits=2, act_bits=2, learnable=learnable, mode="fx", example_inputs=(x,))
    eager(x)
    fx(x)
    blocks = ("layer1", "layer2", "layer3")
    outs = {}
    hooks = []
    for b in blocks:
        fq = eager.get_submodule(f"{b}.add.activation_post_process")
        assert int(fq.zero_point) == fq.quant_min == 0
        # the same grid as FX's quantizer after the block's add-relu (same weights, same first batch)
        fx_fq = _fx_quantizer_after(fx, f"{b}.relu2")
        torch.testing.assert_close(fq.scale.detach(), fx_fq.scale.detach())
        hooks.append(eager.get_submodule(f"{b}.relu2").register_forward_hook(
            lambda m, a, o, b=b: outs.setdefault(("eager", b), o)))
        hooks.append(fx_fq.register_forward_hook(lambda m, a, o, b=b: outs.setdefault(("fx", b), o)))
    # and the same block outputs: the eager model quantizes where FX does
    with torch.no_grad():
        eager(x)
        fx(x)
    for h in hooks:
        h.remove()
    for b in blocks:
        torch.testing.assert_close(outs["eager", b], outs["fx", b])


@pytest.mark.parametrize("mode", ["eager", "fx"])
@pytest.mark.parametrize("name", list(MODELS))
def test_convert_accepts_prepared_models(request, batch, digits, name, mode):
    x, _ = batch
    fp = request.getfixturevalue(f"fp_{name}")  # trained: logits well separated
    q = qp.prepare_qat(fp, weight_bits=8, act_bits=8, mode=mode, example_inputs=(x,))
    for i in range(3):  # calibrate on a few batches
        q(digits.train.tensors[0][64 * i:64 * (i + 1)])
    q.eval()
    with torch.no_grad():
        ref = q(x)
    converted = _convert(q, mode)  # default engine (x86 / fbgemm)
    kinds = {type(m).__module__ for m in converted.modules()}
    assert any(k.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")) for k in kinds)
    assert not any(isinstance(m, FakeQuantizeBase) for m in converted.modules())
    with torch.no_grad():
        out = converted(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape and torch.isfinite(out).all()
    # The int8 model computes the fake-quantized model's function up to requantization rounding: both
    # outputs lie on the same 8-bit output grid and differ by at most a step or two. Checked on qnnpack:
    # the x86/fbgemm (and onednn) u8*s8 kernels saturate int16 pair sums with full-range (0..255, no
    # reduce_range) activations, which the package's 8-bit qconfig uses (up to ~60 output steps off).
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        return
    with _engine("qnnpack"):
        converted = _convert(q, mode)
        with torch.no_grad():
            out = converted(x)
    step = float(_quantizer_of(q, mode, "fc", "act").scale.detach())
    assert (out - ref).abs().max() <= 2 * step + 1e-6
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent Python control flow: not FX-traceable
            x = torch.relu(x)
        return self.fc(x.mean((2, 3)))


def test_prepare_qat_errors(batch):
    x, _ = batch
    with pytest.raises(ValueError, match=r"unknown mode 'tflite'.*eager.*fx"):
        qp.prepare_qat(SmallCNN(width=4), mode="tflite")
    with pytest.raises(ValueError, match="needs example_inputs"):
        qp.prepare_qat(SmallCNN(width=4), mode="fx")
    with pytest.raises(ValueError, match=r"FX cannot trace _DataDependent.*mode='eager'.*control flow"):
        qp.prepare_qat(_DataDependent(), mode="fx", example_inputs=(x,))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        qp.prepare_qat(lambda t: t)
    # the untraceable model still prepares in eager mode
    fp = _DataDependent().eval()
    q = qp.prepare_qat(fp, mode="eager", weight_bits=4, act_bits=4)
    assert isinstance(q.conv.weight_fake_quant, LSQFakeQuantize) and isinstance(q.fc.weight_fake_quant, LSQFakeQuantize)
    q.eval()
    with torch.no_grad():
        quantized = q(x)
        q.apply(torch.ao.quantization.disable_fake_quant)
        # fake quantization off, the prepared copy computes exactly the float model it came from
        assert torch.equal(q(x), fp(x))
    assert not torch.equal(quantized, fp(x))  # and with it on, it does quantize
    # a bare tensor works as example_inputs
    assert qp.prepare_qat(SmallCNN(width=4), mode="fx", example_inputs=x)(x).shape == (64, 10)
