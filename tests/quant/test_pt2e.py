"""PT2E (torchao) QAT with the package's LSQ / min-max fake quantizers.

Preparing a model with batch norm costs ~10 s (torchao traces its conv-bn patterns), so the two
reference models are prepared once per module; checks that need a fresh model use small BN-free
models, which prepare in about a second. ``convert_pt2e`` of a model *with* batch norm spends ~1 min
in torchao's conv-bn folding (96 pattern traces), so that check is marked ``slow``.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchao")

# deep copies of exported GraphModules trigger a torch-internal pytree deprecation notice
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

from qat_plugins.data import load_digits_split  # noqa: E402
from qat_plugins.models import SmallCNN, SmallResNet  # noqa: E402
from qat_plugins.quant.fake_quantize import LSQFakeQuantize, MinMaxFakeQuantize  # noqa: E402
from qat_plugins.quant.prepare import prepare_qat  # noqa: E402
from qat_plugins.quant.pt2e import (  # noqa: E402
    TORCHAO_INSTALL_HINT,
    LowBitQuantizer,
    prepare_qat_pt2e_model,
    pt2e_fake_quantizers,
    pt2e_module_name,
    pt2e_module_output,
)

AT = torch.ops.aten
Q_OPS = {"quantized_decomposed.quantize_per_tensor.default",
         "quantized_decomposed.quantize_per_channel.default"}
DQ_PER_CHANNEL = "quantized_decomposed.dequantize_per_channel.default"
DQ_PER_TENSOR = "quantized_decomposed.dequantize_per_tensor.default"


# --- small BN-free models (fast to prepare) ----------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + x)


class TinyRes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.block = Block(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # Python branch on a tensor value: torch.export cannot capture it
            return self.fc(x)
        return -self.fc(x)


# --- helpers ----------------------------------------------------------------------------------
def _fq_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module:
    assert node.op == "call_module", f"{node} is not quantized"
    return gm.get_submodule(str(node.target))


def _anchor_bits(gm: torch.fx.GraphModule) -> dict[str, tuple[int, int]]:
    """``{module of each conv/linear: (bits of its input fake quantizer, bits of its weight's)}``."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (AT.conv2d.default, AT.linear.default):
            out[pt2e_module_name(n)] = (_fq_of(gm, n.args[0]).bits, _fq_of(gm, n.args[1]).bits)
    return out


def _targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                 lr: float = 3e-3, batch: int = 64) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_xy():
    d = load_digits_split()
    return d.train.tensors


@pytest.fixture(scope="module")
def resnet(digits_xy):
    """SmallResNet, 4-bit weights / 3-bit activations, first/last layer 8 bit, via ``prepare_qat``."""
    torch.manual_seed(0)
    x, _ = digits_xy
    return prepare_qat(SmallResNet(), weight_bits=4, act_bits=3, mode="pt2e", example_inputs=(x[:32],))


@pytest.fixture(scope="module")
def cnn(digits_xy):
    torch.manual_seed(0)
    x, _ = digits_xy
    return prepare_qat(SmallCNN(), weight_bits=4, act_bits=3, mode="pt2e", example_inputs=x[:32])


# --- tests --------------------------------------------------------------------------------------
def test_bits_and_schemes_carried_into_quantizers(resnet):
    fqs = pt2e_fake_quantizers(resnet)
    assert fqs and all(type(m) is LSQFakeQuantize for m, _ in fqs.values())
    assert all(name.startswith("activation_post_process_") for name in fqs)
    convs = ["conv1"] + [f"layer{i}.conv{j}" for i in (1, 2, 3) for j in (1, 2)] + \
        ["layer2.shortcut.0", "layer3.shortcut.0"]
    weights = {owner: m for m, owner in fqs.values() if m.dtype == torch.int8}
    assert {k: m.bits for k, m in weights.items()} == {k: 8 if k in ("conv1", "fc") else 4
                                                         for k in convs + ["fc"]}
    for m in weights.values():
        assert m.qscheme == torch.per_channel_symmetric and m.ch_axis == 0
        assert (m.quant_min, m.quant_max) == ((-8, 7) if m.bits == 4 else (-128, 127))
    acts = [m for m, _ in fqs.values() if m.dtype != torch.int8]
    assert all(m.dtype == torch.uint8 and m.qscheme == torch.per_tensor_affine for m in acts)
    assert {(m.bits, m.quant_min, m.quant_max) for m in acts} == {(8, 0, 255), (3, 0, 7)}
    # keep_first_last_8bit (prepare_qat's default): conv1 / fc have 8-bit weights and outputs;
    # conv1 reads the image through an 8-bit quantizer, fc reads the pooled features at the 3 bits
    # they were quantized to (no redundant 8-bit re-quantizer), and layer1.conv1 reads the stem's
    # 8-bit output through its own 3-bit quantizer
    expected = {k: (3, 4) for k in convs[1:]} | {"conv1": (8, 8), "fc": (3, 8)}
    assert _anchor_bits(resnet) == expected
    fc = next(n for n in resnet.graph.nodes if n.target == AT.linear.default)
    pool = next(n for n in resnet.graph.nodes if n.target == AT.adaptive_avg_pool2d.default)
    # fc reads the pooled features through the pool's own 3-bit quantizer (not layer3's: a mean of
    # values on one grid would land on .5 ties, docs/onnx_export.md)
    pooled = _fq_of(resnet, next(iter(pool.users)))
    assert _fq_of(resnet, fc.args[0]) is pooled and pooled.bits == 3
    assert pooled is not _fq_of(resnet, pt2e_module_output(resnet, "layer3"))
    assert _fq_of(resnet, next(iter(fc.users))).bits == 8  # the logits
    # per-channel scales get their length (output channels) at the first forward
    m = copy.deepcopy(resnet)
    m(torch.randn(4, 1, 8, 8))
    w = {owner: mod for mod, owner in pt2e_fake_quantizers(m).values() if mod.dtype == torch.int8}
    assert w["layer2.conv1"].scale.shape == (32,) and w["fc"].scale.shape == (10,)


def test_lsq_step_sizes_get_gradients(resnet, digits_xy):
    m = copy.deepcopy(resnet)
    x, y = digits_xy
    F.cross_entropy(m(x[:64]), y[:64]).backward()
    fqs = pt2e_fake_quantizers(m)
    for name, (fq, owner) in fqs.items():
        assert fq.scale.requires_grad and fq.scale.grad is not None, name
        assert fq.scale.grad.abs().sum() > 0, f"{name} ({owner}) got a zero step-size gradient"
    # the step sizes are parameters of the prepared model, so optimizers pick them up
    params = {id(p) for p in m.parameters()}
    assert all(id(fq.scale) in params for fq, _ in fqs.values())


@pytest.mark.parametrize("which", ["resnet", pytest.param("cnn", marks=pytest.mark.slow)])
def test_training_reduces_loss(which, request, digits_xy):
    model = copy.deepcopy(request.getfixturevalue(which))
    x, y = digits_xy
    torch.manual_seed(0)
    xb, yb = x[:256], y[:256]
    with torch.no_grad():
        before = F.cross_entropy(model(xb), yb).item()
    _train_steps(model, x, y, steps=8)
    with torch.no_grad():
        after = F.cross_entropy(model(xb), yb).item()
    print(f"{which}: loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.02, (before, after)


def test_dynamic_batch_and_train_eval_switch(resnet, digits_xy):
    m = copy.deepcopy(resnet)  # deep copies keep the train/eval switch (deepcopy hook)
    x, y = digits_xy
    assert m.training
    _train_steps(m, x, y, steps=1, batch=32)
    m.eval()
    assert not m.training and all(not q.training for q, _ in pt2e_fake_quantizers(m).values())
    bn = [n for n in m.graph.nodes if n.target == AT.batch_norm.default]
    assert bn and all(n.args[5] is False for n in bn)  # batch norm uses running statistics
    with torch.no_grad():
        out7 = m(x[:7])
        out1 = m(x[7:8])
    assert out7.shape == (7, 10) and out1.shape == (1, 10)
    with torch.no_grad():  # eval is deterministic: same sample, same output whatever the batch
        torch.testing.assert_close(m(x[:8])[7:], out1)
    m.train()
    assert m.training and all(n.args[5] is True for n in m.graph.nodes if n.target == AT.batch_norm.default)
    _train_steps(m, x, y, steps=1, batch=16)
    assert resnet.training  # the fixture was not touched


def test_keep_8bit_covers_submodules_and_residual_add():
    torch.manual_seed(0)
    m = prepare_qat_pt2e_model(TinyRes(), (torch.randn(8, 1, 8, 8),), weight_bits=4, act_bits=4,
                               keep_8bit=["block"])
    # inside "block": 8-bit weights and outputs; block.conv1 reads the stem's 4-bit output as is,
    # while fc (4 bit) reads the block's 8-bit output through its own 4-bit quantizer
    assert _anchor_bits(m) == {"stem": (4, 4), "block.conv1": (4, 8), "block.conv2": (8, 8),
                               "fc": (4, 4)}
    add = next(n for n in m.graph.nodes if n.target == AT.add.Tensor)
    assert pt2e_module_name(add) == "block"
    # residual add: the block's conv2 output at 8 bit, the skip branch as the stem quantized it
    assert [_fq_of(m, a).bits for a in add.args] == [8, 4]
    out = pt2e_module_output(m, "block")
    assert out.op == "call_module" and _fq_of(m, out).bits == 8
    assert pt2e_module_name(out) == "block.relu2"


def test_module_names_and_block_output(resnet):
    gm = resnet
    names = {n.name: pt2e_module_name(n) for n in gm.graph.nodes}
    conv_names = {pt2e_module_name(n) for n in gm.graph.nodes if n.target == AT.conv2d.default}
    assert {"conv1", "layer1.conv1", "layer1.conv2", "layer2.shortcut.0"} <= conv_names
    adds = [pt2e_module_name(n) for n in gm.graph.nodes if n.target == AT.add.Tensor
            and isinstance(n.args[1], torch.fx.Node)]
    assert adds == ["layer1", "layer2", "layer3"]
    assert any(v == "layer1.conv1" for k, v in names.items() if k.endswith("weight"))  # get_attr
    assert names["x"] is None and names["output"] is None

    m = copy.deepcopy(gm)
    out = pt2e_module_output(m, "layer1")
    assert out.op == "call_module" and str(out.target).startswith("activation_post_process_")
    assert pt2e_module_name(out) == "layer1.relu2"
    assert {pt2e_module_name(u).split(".")[0] for u in out.users} == {"layer2"}
    seen = []
    m.get_submodule(str(out.target)).register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    with torch.no_grad():
        m(torch.randn(2, 1, 8, 8))
    assert seen == [torch.Size([2, 16, 8, 8])]
    with pytest.raises(KeyError, match="layer9"):
        pt2e_module_output(gm, "layer9")


def test_convert_pt2e_without_bn():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    m = prepare_qat_pt2e_model(TinyNet(), (x[:16],), weight_bits=4, act_bits=4, keep_8bit=["fc"])
    _train_steps(m, x, y, steps=3, batch=16)
    m.eval()
    converted = convert_pt2e(copy.deepcopy(m))
    targets = _targets(converted)
    assert not [n for n in converted.graph.nodes if str(n.target).startswith("activation_post_process_")]
    assert sum(t in Q_OPS for t in targets) >= 3
    dq_ranges = {(n.args[-3], n.args[-2]) for n in converted.graph.nodes
                 if str(n.target) in (DQ_PER_CHANNEL, DQ_PER_TENSOR)}
    assert {(-8, 7), (0, 15), (-128, 127), (0, 255)} <= dq_ranges  # 4-bit conv, 8-bit fc
    with torch.no_grad():
        torch.testing.assert_close(converted(x[:5]), m(x[:5]), atol=1e-5, rtol=1e-4)
    assert any(str(n.target).startswith("activation_post_process_") for n in m.graph.nodes)


@pytest.mark.slow
def test_convert_pt2e_folds_bn(cnn, digits_xy):
    """~1-2 min: torchao's _fold_conv_bn_qat traces 96 patterns."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    m = copy.deepcopy(cnn)
    x, y = digits_xy
    _train_steps(m, x, y, steps=3)
    m.eval()
    converted = convert_pt2e(copy.deepcopy(m))
    targets = _targets(converted)
    assert "aten.batch_norm.default" not in targets
    assert targets.count(DQ_PER_CHANNEL) == 4  # conv1..3, fc
    with torch.no_grad():
        torch.testing.assert_close(converted(x[:16]), m(x[:16]), atol=1e-4, rtol=1e-3)


def test_minmax_baseline_and_fake_quant_kwargs():
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    m = prepare_qat_pt2e_model(TinyNet(), (x,), weight_bits=3, act_bits=5, learnable=False,
                               per_channel=False)
    fqs = [fq for fq, _ in pt2e_fake_quantizers(m).values()]
    assert fqs and all(type(fq) is MinMaxFakeQuantize for fq in fqs)
    assert {fq.bits for fq in fqs} == {3, 5}
    assert all(fq.qscheme == torch.per_tensor_symmetric for fq in fqs if fq.bits == 3)
    assert not any(isinstance(fq.scale, nn.Parameter) for fq in fqs)
    m(x)
    m.eval()
    ranges = [fq.max_val.clone() for fq in fqs]
    m(3 * x)  # eval: min/max quantizers keep their ranges
    assert all(torch.equal(r, fq.max_val) for r, fq in zip(ranges, fqs))

    # extra constructor arguments travel through torchao's PartialWrapper
    m2 = prepare_qat_pt2e_model(TinyNet(), (x,), weight_bits=4, act_bits=4,
                                fake_quant_kwargs={"init": "minmax"})
    fqs2 = [fq for fq, _ in pt2e_fake_quantizers(m2).values()]
    assert fqs2 and all(type(fq) is LSQFakeQuantize and fq.init == "minmax" for fq in fqs2)


def test_prepare_qat_pt2e_needs_example_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        prepare_qat(SmallCNN(), mode="pt2e")


def test_export_failure_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"torch\.export could not capture DataDependent.*mode='eager'"):
        prepare_qat_pt2e_model(DataDependent(), (torch.randn(4, 4),), weight_bits=4, act_bits=4)


def test_missing_torchao_raises_import_error_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantize_pt2e", None)
    with pytest.raises(ImportError) as info:
        prepare_qat(TinyNet(), mode="pt2e", example_inputs=torch.randn(2, 1, 8, 8))
    assert str(info.value) == TORCHAO_INSTALL_HINT == "install torchao==0.18.0: pip install 'qat-plugins[pt2e]'"


def test_quantizer_argument_checks():
    with pytest.raises(ValueError, match="bits"):
        LowBitQuantizer(9, 4)
    with pytest.raises(TypeError, match="keep_8bit"):
        LowBitQuantizer(4, 4, keep_8bit=[""])
    q = LowBitQuantizer(2, 3, keep_8bit="fc")
    assert q.keep_8bit == ("fc",)
    assert (q.config.weight.quant_min, q.config.weight.quant_max) == (-2, 1)
    assert (q.config.input_activation.quant_min, q.config.input_activation.quant_max) == (0, 7)
    assert q.config.weight.observer_or_fake_quant_ctr is LSQFakeQuantize
    assert q.config_8bit.weight.quant_max == 127


def test_unknown_keep_8bit_name_warns():
    with pytest.warns(UserWarning, match="keep_8bit entries \\['conv9'\\]"):
        m = prepare_qat_pt2e_model(TinyNet(), (torch.randn(4, 1, 8, 8),), weight_bits=4, act_bits=4,
                                   keep_8bit=["conv9", "fc"])
    assert _anchor_bits(m) == {"conv": (4, 4), "fc": (4, 8)}


def test_example_batch_of_one_still_gives_a_dynamic_batch():
    g = torch.Generator().manual_seed(0)
    m = prepare_qat_pt2e_model(TinyNet(), torch.randn(1, 1, 8, 8, generator=g), weight_bits=4, act_bits=4)
    x5 = torch.randn(5, 1, 8, 8, generator=g)
    m(x5)  # calibrate on a batch of five: the batch size traced from the example (1) does not bind
    m.eval()
    with torch.no_grad():
        whole = m(x5)
        rows = torch.cat([m(x5[i:i + 1]) for i in range(5)])
    # BN-free model in eval mode: each sample's output is independent of the batch it came in; only
    # float summation order may differ (a rounding tie flipping one 4-bit step is ~1e-1, far above this)
    torch.testing.assert_close(whole, rows, rtol=1e-5, atol=1e-5)
