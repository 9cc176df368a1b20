"""Isolation of combined regularizers, SFP noise amplitude on residual models, BR's prefix cache, KD,
CR's ramp-up and option validation (issue 11)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat_plugins as qp
from qat_plugins.quant.step_size import input_quantizer, step_size
from qat_plugins.taps import FeatureTap, TapSite, conv_layers

KINDS = ("cr", "fpq", "br", "kd")


def _shift(x: torch.Tensor) -> torch.Tensor:
    """A deterministic strong view (no RNG), so CR's term does not depend on the RNG state."""
    return torch.roll(x, 1, dims=-1) * 0.9


def _make(kind: str, p: float = 0.0):
    if kind == "cr":
        return qp.ConsistencyRegularizer(augment=_shift, rampup_steps=0)
    if kind == "fpq":
        return qp.FeaturePerturbationRegularizer(p=p)
    if kind == "br":
        return qp.BlockReplacementRegularizer(["layer1", "layer2", "layer3"], sample="all")
    return qp.KnowledgeDistillationRegularizer(temperature=2.0)


@pytest.fixture(scope="module")
def setups(fp_resnet, batch):
    x, _ = batch
    out = {}
    for mode in ("eager", "fx"):
        torch.manual_seed(0)
        q = qp.prepare_qat(fp_resnet, weight_bits=4, act_bits=4, mode=mode, example_inputs=(x,))
        q(x)  # initialise the quantizers
        out[mode] = q
    return out


def _terms(q0, fp0, kinds, x, y, p=0.0, seed=0):
    """Each regularizer's unweighted term for one step from a fresh copy of the same model state."""
    q, fp = copy.deepcopy(q0).train(), copy.deepcopy(fp0)
    regs = [_make(k, p) for k in kinds]
    with qp.attach(q, regs, fp_model=fp) as rs:
        torch.manual_seed(seed)  # the training forward's SFP coin and noise
        out = q(x)
        rs.loss(x, y, out)
        perturbed = [r.last_perturbed for r in regs if r.name == "fpq"]
        terms = {r.name: r.last_loss for r in regs}
    return terms, perturbed


@pytest.mark.parametrize("mode", ["eager", "fx"])
def test_each_term_in_any_order_equals_its_term_alone(setups, fp_resnet, batch, mode):
    """CR's strong view, BR's mixed forwards and the FP forward must not change what FPQ and BR read
    from the training forward (and vice versa): every term of every order of [cr, fpq, br, kd] equals
    the term of the regularizer alone. FPQ's p=0 keeps the training forward itself identical."""
    x, y = batch
    q0 = setups[mode]
    alone = {k: _terms(q0, fp_resnet, [k], x, y)[0][k] for k in KINDS}
    assert all(float(v) > 0 for v in alone.values())
    for order in itertools.permutations(KINDS):
        terms, _ = _terms(q0, fp_resnet, list(order), x, y)
        for k in KINDS:
            # the same ops on the same values in the same order: bit-identical
            torch.testing.assert_close(terms[k], alone[k], rtol=0, atol=0, msg=f"{k} in {order}")


def test_set_computes_extra_student_forwards_last_and_reports_in_the_given_order(setups, fp_resnet, batch):
    """CR (an extra student forward whose graph lives until backward) is computed after the FP-side
    terms, whatever the order given, so the FP forward's memory is freed before CR's graph exists;
    ``last_losses`` and the sum keep the given order."""
    x, y = batch
    q, fp = copy.deepcopy(setups["eager"]).train(), copy.deepcopy(fp_resnet)
    regs = [_make(k) for k in ("cr", "kd", "fpq", "br")]
    calls: list[str] = []
    for r in regs:
        def recorded(*args, _r=r, _inner=r._loss):
            calls.append(_r.name)
            return _inner(*args)
        r._loss = recorded  # instance attribute: records when each term is computed
    with qp.attach(q, regs, fp_model=fp) as rs:
        out = q(x)
        total = rs.loss(x, y, out)
        assert calls == ["kd", "fpq", "br", "cr"]
        assert list(rs.last_losses) == ["cr", "kd", "fpq", "br"]
        expected = sum((r.weight * r.last_loss for r in regs), torch.zeros(()))
        torch.testing.assert_close(total.detach(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["eager", "fx"])
def test_fpq_with_noise_term_unchanged_by_others_and_extra_forwards_unperturbed(setups, fp_resnet, batch, mode):
    """p=1: the training forward is perturbed on every conv (same seed -> same noise); CR's strong view
    and BR's mixed forwards are not perturbed, and FPQ's CSD term is the same alone and combined."""
    x, y = batch
    q0 = setups[mode]
    n_convs = len(conv_layers(q0))
    alone, pert = _terms(q0, fp_resnet, ["fpq"], x, y, p=1.0)
    assert pert == [n_convs]
    for order in (["cr", "fpq", "br", "kd"], ["kd", "br", "fpq", "cr"]):
        terms, pert = _terms(q0, fp_resnet, order, x, y, p=1.0)
        assert pert == [n_convs]  # only the training forward, not CR's view or BR's branches
        torch.testing.assert_close(terms["fpq"], alone["fpq"], rtol=0, atol=0)  # same ops, same values


class _Block(nn.Module):
    """A user-style residual block: plain ``+`` on the shortcut, ReLU after the add (``relu="module"``:
    its own ``nn.ReLU``; ``"functional"``: ``F.relu``; ``"shared"``: torchvision's one in-place ``relu``
    module used after bn1 and after the add)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, relu: str = "module") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)
        self.relu = nn.ReLU(inplace=relu == "shared")
        self.mode = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.relu if self.mode == "shared" else self.relu1
        out = self.bn2(self.conv2(first(self.bn1(self.conv1(x)))))
        out = out + (x if self.down is None else self.down(x))
        return F.relu(out) if self.mode == "functional" else self.relu(out)


class _PlainResNet(nn.Module):
    def __init__(self, relu: str = "module") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = _Block(8, 8, relu=relu)
        self.b2 = _Block(8, 16, 2, relu=relu)
        self.b3 = _Block(16, 16, relu=relu)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.b3(self.b2(self.b1(self.stem(x))))), 1))


def _on_grid(v: torch.Tensor, q: nn.Module) -> bool:
    s, z = q.calculate_qparams()
    k = v / s.reshape(()) + z.reshape(()).float()
    return bool((k - k.round()).abs().max() < 1e-3)


@pytest.mark.parametrize("relu", ["module", "functional", "shared"])
@pytest.mark.parametrize("mode", ["eager", "fx"])
def test_sfp_noise_is_half_the_input_grid_step_on_every_conv(batch, mode, relu):
    """Every conv input of a residual model (plain ``+``, ReLU after the add) lies on the grid of the
    quantizer found for it, and with p=1 the SFP noise on it spans [-s/2, s/2] of that grid's step."""
    x, _ = batch
    torch.manual_seed(0)
    q = qp.prepare_qat(_PlainResNet(relu), weight_bits=4, act_bits=4, mode=mode, example_inputs=(x,))
    q(x)
    convs = conv_layers(q)
    quantizers = {n: input_quantizer(q, n) for n in convs}
    assert all(v is not None for v in quantizers.values()), quantizers
    reg = qp.FeaturePerturbationRegularizer(p=1.0, distill=False).attach(q)
    # each conv's input before SFP (a tap placed ahead of SFP's hook) and after it, in one forward
    before = FeatureTap(q, [f"{n}:input" for n in convs], prepend=True)
    after = FeatureTap(q, [f"{n}:input" for n in convs])
    try:
        torch.manual_seed(1)
        q(x)
        assert reg.perturbed == len(convs) and reg.fallback_layers == []
        for n in convs:
            clean = before.features[f"{n}:input"].detach()
            assert _on_grid(clean, quantizers[n]), n  # the conv input is on its quantizer's grid
            s = float(step_size(quantizers[n]).detach())
            delta = after.features[f"{n}:input"].detach() - clean
            # U[-s/2, s/2): bounded by s/2 and spread over the interval (>= 1000 samples per conv)
            assert float(delta.abs().max()) <= s / 2 * (1 + 1e-5), n
            assert float(delta.max()) > 0.45 * s and float(delta.min()) < -0.45 * s, n
            assert abs(float(delta.std()) - s / math.sqrt(12)) < 0.1 * s / math.sqrt(12), n
    finally:
        before.remove()
        after.remove()
        reg.detach()


@pytest.mark.parametrize("relu", ["module", "functional", "shared"])
def test_eager_prepare_keeps_the_model_and_quantizes_residual_adds(batch, relu):
    """With fake quantization off, the eager QAT model computes the float model (a shared ReLU must not
    be fused away); every block's residual add gets exactly one output quantizer."""
    x, _ = batch
    torch.manual_seed(0)
    fp = _PlainResNet(relu).train()
    q = qp.prepare_qat(fp, weight_bits=4, act_bits=4)
    q.apply(torch.ao.quantization.disable_fake_quant)
    # same float ops, BN on batch statistics in both; fused conv-bn reassociates: float rounding only
    torch.testing.assert_close(q(x), fp(x), rtol=1e-4, atol=1e-4)
    where = {"module": "{}.relu", "functional": "{}", "shared": "{}"}[relu]
    for b in ("b1", "b2", "b3"):
        assert hasattr(q.get_submodule(where.format(b)), "activation_post_process"), b
    assert not hasattr(q.get_submodule("b1.relu"), "activation_post_process") or relu == "module"


def test_sfp_fallback_warns_naming_the_conv():
    class NoQuant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    with pytest.warns(UserWarning, match=r"FPQ: no activation quantizer produces the input of \['conv'\]"):
        reg = qp.FeaturePerturbationRegularizer(distill=False).attach(NoQuant().train())
    assert reg.fallback_layers == ["conv"]
    reg.detach()


@pytest.mark.parametrize("mode", ["eager", "fx"])
def test_br_suffix_forward_equals_the_full_fp_forward_with_the_block_replaced(fp_resnet, batch, mode):
    """The prefix cache changes cost, not the value: the mixed logits equal a full FP forward whose
    block output is replaced by a forward hook."""
    x, _ = batch
    q = qp.prepare_qat(fp_resnet, weight_bits=4, act_bits=4, mode=mode, example_inputs=(x,))
    q(x)
    fp = copy.deepcopy(fp_resnet)
    reg = qp.BlockReplacementRegularizer(["layer1", "layer2", "layer3"]).attach(q, fp_model=fp)
    tap = FeatureTap(q, ["layer1", "layer2", "layer3"])
    try:
        q(x)
        qp.regularizers.StepContext(x, fp, reg.fp_taps).fp_forward()
        for b, skipped in (("layer1", ["conv1", "bn1", "relu"]), ("layer2", ["conv1", "bn1", "relu", "layer1"]),
                           ("layer3", ["conv1", "bn1", "relu", "layer1", "layer2"])):
            mixed = reg._mixed_forward(x, b, tap.features[b])
            assert reg.last_skipped == skipped
            h = fp.get_submodule(b).register_forward_hook(lambda m, a, o, f=tap.features[b]: f)
            with torch.no_grad():
                ref = fp(x)
            h.remove()
            torch.testing.assert_close(mixed, ref, rtol=0, atol=0)  # the same ops on the same values
    finally:
        tap.remove()
        reg.detach()
    assert not any("forward" in vars(m) for m in fp.modules())


def test_kd_term_by_hand(fp_resnet, batch):
    x, y = batch
    q = qp.prepare_qat(fp_resnet, weight_bits=4, act_bits=4)
    q(x)
    reg = qp.KnowledgeDistillationRegularizer(weight=0.5, temperature=3.0).attach(q, fp_model=fp_resnet)
    out = q(x[:4])
    loss = reg.loss(x[:4], y[:4], out)
    with torch.no_grad():
        t = fp_resnet(x[:4])
    expected = 0.0
    for s_row, t_row in zip(out.tolist(), t.tolist()):  # T^2 sum_i p_t (log p_t - log p_s), by hand
        ls = [v / 3.0 for v in s_row]
        lt = [v / 3.0 for v in t_row]
        zs, zt = math.log(sum(math.exp(v) for v in ls)), math.log(sum(math.exp(v) for v in lt))
        expected += sum(math.exp(b - zt) * ((b - zt) - (a - zs)) for a, b in zip(ls, lt))
    assert float(loss.detach()) == pytest.approx(0.5 * 9.0 * expected / 4, rel=1e-4)  # float32 softmax
    loss.backward()
    assert all(p.grad is None for p in fp_resnet.parameters())
    reg.detach()
    assert qp.regularizers.REGISTRY["kd"] is qp.KnowledgeDistillationRegularizer


def test_cr_weight_ramps_up_by_default(fp_resnet, batch):
    """Default schedule: w(t) = exp(-5 (1 - t/200)^2) for t < 200, then 1 (t counts loss calls)."""
    x, y = batch
    q = qp.prepare_qat(fp_resnet, weight_bits=4, act_bits=4)
    q(x)
    reg = qp.ConsistencyRegularizer(augment=_shift)
    assert reg.rampup_steps == 200
    reg.attach(q)
    factors = []
    state = copy.deepcopy(q.state_dict())  # fused ConvBn scales weights by BN running stats: reset them
    for t in (0, 100, 199, 200, 500):
        reg.steps = t
        factors.append(reg.rampup())
        q.load_state_dict(state)
        w = float(reg.loss(x, y, q(x)).detach())
        reg.rampup_steps, reg.steps = 0, t
        q.load_state_dict(state)
        full = float(reg.loss(x, y, q(x)).detach())
        reg.rampup_steps = 200
        assert w == pytest.approx(factors[-1] * full, rel=1e-4)
    reg.detach()
    assert factors == pytest.approx([math.exp(-5), math.exp(-5 * 0.25), math.exp(-5 * (1 / 200) ** 2), 1.0, 1.0])


@pytest.mark.parametrize("kind,option,value,match", [
    ("kd", "temperature", float("nan"), r"regularizers\[1\]\.temperature: must be a finite number > 0, got nan"),
    ("cr", "temperature", float("inf"), r"regularizers\[1\]\.temperature: must be a finite number > 0, got inf"),
    ("fpq", "p", "0.5", r"regularizers\[1\]\.p: must be a finite number >= 0 and <= 1, got '0.5' \(str\)"),
    ("fpq", "eps", float("nan"), r"regularizers\[1\]\.eps: must be a finite number > 0, got nan"),
    ("fpq", "eps", 0, r"regularizers\[1\]\.eps: must be a finite number > 0, got 0"),
    ("fpq", "distill", 1, r"regularizers\[1\]\.distill: must be true or false, got 1"),
    ("fpq", "reduction", "max", r"regularizers\[1\]\.reduction: must be one of \['mean', 'sum'\]"),
    ("br", "temperature", float("nan"), r"regularizers\[1\]\.temperature: must be a finite number > 0, got nan"),
    ("br", "seed", 1.5, r"regularizers\[1\]\.seed: must be an integer >= 0, got 1.5"),
    ("br", "ce_weight", True, r"regularizers\[1\]\.ce_weight: must be a finite number >= 0, got True \(bool\)"),
    ("cr", "rampup_steps", 10.0, r"regularizers\[1\]\.rampup_steps: must be an integer >= 0, got 10.0"),
    ("cr", "ema_decay", -0.1, r"regularizers\[1\]\.ema_decay: must be a finite number >= 0 and < 1, got -0.1"),
    ("cr", "feature_weight", float("nan"), r"regularizers\[1\]\.feature_weight: must be a finite number >= 0"),
    ("kd", "weight", "1", r"regularizers\[1\]\.weight: must be a finite number >= 0, got '1' \(str\)"),
])
def test_every_option_is_validated_with_its_field_path(kind, option, value, match):
    spec = {"name": kind, option: value}
    if kind == "br":
        spec["blocks"] = ["layer1"]
    with pytest.raises(ValueError, match=match):
        qp.build_regularizers([{"name": "cr"}, spec])


def test_fpq_on_a_pt2e_graph(fp_resnet, batch):
    """PT2E convs are aten ops: FPQ splices identities into the graph edges. The noise on each conv
    input spans [-s/2, s/2] of its input quantizer's step; at W8A8 the student's pre-BN features match
    the FP model's after standardization (CSD term near 0, far below a W2A2 student's); detach
    restores the graph code and state_dict keys exactly."""
    pytest.importorskip("torchao")
    x, y = batch
    terms = {}
    for bits in (8, 2):
        torch.manual_seed(0)
        q = qp.prepare_qat(fp_resnet, weight_bits=bits, act_bits=bits, mode="pt2e", example_inputs=(x,))
        q(x)
        code, keys = q.code, set(q.state_dict())
        reg = qp.FeaturePerturbationRegularizer(p=1.0 if bits == 8 else 0.0).attach(q, fp_model=copy.deepcopy(fp_resnet))
        assert reg.fallback_layers == [] and len(reg._names) == 9
        sfp = [s.module for s in reg._splices[0::2]]  # (conv input, pre-BN) per conv
        before = FeatureTap(q, (), sites=[TapSite(n, m, 0, "input") for n, m in zip(reg._names, sfp)])
        after = FeatureTap(q, (), sites=[TapSite(n, m, 0, "output") for n, m in zip(reg._names, sfp)])
        out = q(x)
        terms[bits] = float(reg.loss(x, y, out).detach())
        if bits == 8:
            for n in reg._names:
                s = float(step_size(input_quantizer(q, n)).detach())
                delta = after.features[n].detach() - before.features[n].detach()
                assert float(delta.abs().max()) <= s / 2 * (1 + 1e-5) and float(delta.max()) > 0.45 * s, n
        before.remove()
        after.remove()
        reg.detach()
        assert q.code == code and set(q.state_dict()) == keys
    assert terms[8] < 0.05 * terms[2], terms
