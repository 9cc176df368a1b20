"""CR, FPQ and BR: loss formulas by hand, gradient routing, attach/detach hygiene, shared FP forward,
short W2A2 training runs on digits, and the config registry.

The QAT models are W2A2 ``prepare_qat`` copies (eager and FX) of the trained reference models of
conftest; every test that changes a model works on a deep copy.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat_plugins as qp
from qat_plugins.models import SmallCNN, SmallResNet
from qat_plugins.quant.step_size import activation_quantizers, weight_quantizers
from qat_plugins.regularizers import NonFiniteLossError, Regularizer, StepContext, build_regularizers
from qat_plugins.regularizers._losses import channel_standardize, csd_distance, feature_mse, kd_kl, sigmoid_rampup
from qat_plugins.taps import FeatureTap

KINDS = ["cr", "fpq", "br"]
NAMES = ["resnet", "cnn"]
MODES = ["eager", "fx"]
BLOCKS = {"resnet": ["layer1", "layer2", "layer3"], "cnn": ["conv2", "conv3"]}
# the FP module that reads each block's output (forward guidance check)
NEXT = {"resnet": {"layer1": "layer2", "layer2": "layer3", "layer3": "pool"},
        "cnn": {"conv2": "conv3", "conv3": "pool"}}


@pytest.fixture(scope="module")
def fps(fp_resnet, fp_cnn):
    return {"resnet": fp_resnet, "cnn": fp_cnn}


@pytest.fixture(scope="module")
def qats(fps, batch):
    """(name, mode) -> W2A2 QAT model prepared from the trained FP model, quantizers initialised."""
    x, _ = batch
    out = {}
    for name in NAMES:
        for mode in MODES:
            torch.manual_seed(0)
            q = qp.prepare_qat(fps[name], weight_bits=2, act_bits=2, mode=mode, example_inputs=(x,))
            q(x)
            out[name, mode] = q
    return out


def make(kind: str, name: str, **kw) -> Regularizer:
    if kind == "cr":
        return qp.ConsistencyRegularizer(**kw)
    if kind == "fpq":
        return qp.FeaturePerturbationRegularizer(**kw)
    return qp.BlockReplacementRegularizer(BLOCKS[name], **kw)


def pair(qats, fps, name, mode):
    """Fresh deep copies of the QAT model and of its FP model (train mode, one frozen param)."""
    q = copy.deepcopy(qats[name, mode]).train()
    fp = copy.deepcopy(fps[name]).train()
    next(fp.parameters()).requires_grad_(False)  # mixed flags: restored exactly on detach
    return q, fp


def hooks(model: nn.Module) -> dict[str, tuple]:
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._forward_hooks_with_kwargs))
            for n, m in model.named_modules()}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def flags(model: nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


class Counter:
    """Counts forward calls of a model (and records its training flag at each call)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[bool] = []
        self.handle = model.register_forward_pre_hook(lambda m, a: self.calls.append(m.training))

    def remove(self) -> None:
        self.handle.remove()


# ================================================================================================
# loss formulas by hand
# ================================================================================================
S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_ = [[0.5, 1.5, 1.0], [2.0, 0.0, 1.0]]


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _kl_by_hand(t_rows, s_rows, temp):
    total = 0.0
    for t, s in zip(t_rows, s_rows):
        pt = _softmax([v / temp for v in t])
        ps = _softmax([v / temp for v in s])
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    return total / len(t_rows)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kd_kl_by_hand(temp):
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T_, requires_grad=True)
    loss = kd_kl(s, t, temp)
    assert float(loss) == pytest.approx(temp * temp * _kl_by_hand(T_, S, temp), rel=1e-5)
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


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_cr_teacher_none_loss_by_hand(qats, batch, temp):
    """teacher="none": T^2 KL(student(v1) || student(v2)) + feature_weight * MSE(f(v2), f(v1)), with the
    weak view v1 (the training forward) as a target without gradient and the strong view v2 = augment(v1)
    as the learner."""
    x, y = batch
    q = copy.deepcopy(qats["cnn", "eager"]).train()
    ref = copy.deepcopy(qats["cnn", "eager"]).train()
    views = []

    def augment(t):
        views.append(t.flip(-1) + 0.1)
        return views[-1]

    reg = qp.ConsistencyRegularizer(teacher="none", temperature=temp, feature_weight=0.5, augment=augment,
                                    rampup_steps=0).attach(q)
    loss = reg.loss(x, y, q(x))
    assert len(views) == 1 and not reg.ema
    # by hand on an identical copy (same forward order, so the same BN batch statistics)
    # (our own hook and KL, not the package's FeatureTap / kd_kl)
    fc_in = []
    h = ref.fc.register_forward_pre_hook(lambda m, a: fc_in.append(a[0]))
    weak = ref(x)
    strong = ref(views[0])
    h.remove()
    weak_f, strong_f = fc_in
    p_t = F.softmax(weak.detach() / temp, dim=1)
    kl = (p_t * (torch.log(p_t) - F.log_softmax(strong / temp, dim=1))).sum(1).mean() * temp * temp
    expected = kl + 0.5 * ((strong_f - weak_f.detach()) ** 2).mean()
    # same ops on identical copies, only the summation order of the KL differs: float32 rounding
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    kl_rows = _kl_by_hand(weak.tolist(), strong.tolist(), temp) * temp * temp
    assert float(kd_kl(strong, weak, temp)) == pytest.approx(kl_rows, rel=1e-4)
    # gradient only through the strong view: identical to the hand version with an explicit detach
    loss.backward()
    expected.backward()
    for n in ("fc.weight", "conv2.weight", "conv1.weight_fake_quant.scale", "conv3.activation_post_process.scale"):
        torch.testing.assert_close(q.get_parameter(n).grad, ref.get_parameter(n).grad, rtol=1e-4, atol=1e-7)
    reg.detach()


def test_cr_ema_teacher_starts_as_the_student_and_averages(qats, batch):
    x, y = batch
    q = copy.deepcopy(qats["cnn", "eager"]).train()
    # torch.ao's fused conv-bn QAT modules fold bn.running_var into the weights before quantizing them,
    # even in train mode; the EMA copies buffers after the student's forward updated them. Freeze the
    # running statistics so that the step-0 teacher computes exactly what the student computed.
    for m in q.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    twin = copy.deepcopy(q)
    aug = lambda t: t.flip(-1)  # noqa: E731 - deterministic strong view
    ema = qp.ConsistencyRegularizer(teacher="ema", ema_decay=0.9, augment=aug).attach(q)
    none = qp.ConsistencyRegularizer(teacher="none", augment=aug).attach(twin)
    # step 0: the EMA is a copy of the student, so the target equals the student's own weak view
    torch.testing.assert_close(ema.loss(x, y, q(x)), none.loss(x, y, twin(x)), rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in ema.ema.parameters()]
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.01)
    ema.loss(x, y, q(x))  # the EMA is updated at the start of each step
    for old, new, cur in zip(before, ema.ema.parameters(), q.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * cur.detach())
    assert not any(p.requires_grad for p in ema.ema.parameters())
    state = ema.state_dict()
    assert state["steps"] == 2 and set(state["ema"]) == set(ema.ema.state_dict())
    ema.detach()
    none.detach()


# ================================================================================================
# gradient routing and FP-model freezing (eager and FX, both models)
# ================================================================================================
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_qat_weights_and_step_sizes_not_fp(qats, fps, batch, kind, name, mode):
    x, y = batch
    q, fp = pair(qats, fps, name, mode)
    fp_flags, fp_state = flags(fp), state(fp)
    reg = make(kind, name)
    reg.attach(q, fp_model=fp)
    counter = Counter(fp)
    try:
        out = q(x)
        loss = reg.loss(x, y, out)
        assert loss.dim() == 0 and torch.isfinite(loss) and float(loss) > 0
        loss.backward()
    finally:
        counter.remove()
    # FP model: frozen and in eval mode while attached, untouched by backward
    assert (kind == "cr") == (counter.calls == [])  # CR never runs the FP model
    assert all(training is False for training in counter.calls)
    assert not fp.training and not any(flags(fp))
    assert all(p.grad is None for p in fp.parameters())
    reg.detach()
    assert fp.training and flags(fp) == fp_flags and same_state(state(fp), fp_state)
    # QAT model: every conv/linear weight and its LSQ weight step size get gradient (FPQ's CSD acts on
    # conv outputs only, so the classifier gets none from it), and so do activation step sizes
    for n, p in q.named_parameters():
        if n.endswith("weight") and ".bn." not in n and not (kind == "fpq" and n.startswith("fc.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    wq = [(n, m) for n, m in weight_quantizers(q) if not (kind == "fpq" and n.startswith("fc."))]
    assert wq and all(m.scale.grad is not None and m.scale.grad.abs().sum() > 0 for _, m in wq), \
        [n for n, m in wq if m.scale.grad is None or m.scale.grad.abs().sum() == 0]
    acts = activation_quantizers(q)
    no_grad = [n for n, m in acts if m.scale.grad is None or m.scale.grad.abs().sum() == 0]
    if kind == "fpq" and mode == "eager":
        # CSD's terms are pre-BN conv outputs: only the quantizers after the last conv (its output, the
        # residual add, the classifier's) are on no path to a term
        tail = ("layer3.conv2.", "layer3.shortcut.", "layer3.add.", "fc.") if name == "resnet" else ("conv3.", "fc.")
        assert all(n.startswith(tail) for n in no_grad), no_grad
    elif kind == "fpq":  # FX names its quantizers by number: the same tail, counted (measured 6 / 4)
        assert len(no_grad) <= {"resnet": 6, "cnn": 4}[name], no_grad
    else:  # CR (logits + fc input) and BR (logits) terms lie after every activation quantizer; in FX the
        # classifier's 8-bit input quantizer re-quantizes the pooled 4-bit grid losslessly at init (zero LSQ
        # gradient), and in the FX ResNet one more (a single shared one) is not reached by CR
        allowed = 0 if mode == "eager" else (2 if (kind, name) == ("cr", "resnet") else 1)
        assert len(no_grad) <= allowed, no_grad


def test_br_backward_guidance_reaches_only_the_quantized_prefix(qats, fps, batch):
    """Branch loss only (no KD on the QAT output): the FP suffix carries gradient back into the
    quantized blocks up to the replaced one, and nothing after it or in the FP model."""
    x, y = batch
    q, fp = pair(qats, fps, "resnet", "eager")
    reg = qp.BlockReplacementRegularizer(["layer1"], distill_backbone=False).attach(q, fp_model=fp)
    loss = reg.loss(x, y, q(x))
    loss.backward()
    reg.detach()
    for n in ("conv1.weight", "layer1.conv1.weight", "layer1.conv2.weight", "layer1.conv1.weight_fake_quant.scale"):
        assert q.get_parameter(n).grad.abs().sum() > 0, n
    for n in ("layer2.conv1.weight", "layer3.conv2.weight", "fc.weight", "fc.weight_fake_quant.scale"):
        assert q.get_parameter(n).grad is None, n
    assert all(p.grad is None for p in fp.parameters())


# ================================================================================================
# detach hygiene, state_dict, double attach
# ================================================================================================
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_detach_leaves_models_exactly_as_before(qats, fps, batch, kind, name, mode):
    x, y = batch
    q, fp = pair(qats, fps, name, mode)
    q_hooks, fp_hooks, q_state, fp_state, fp_flags = hooks(q), hooks(fp), state(q), state(fp), flags(fp)
    q.eval()
    with torch.no_grad():
        ref = q(x)
    q.train()
    # 1) attach + detach: everything identical, values included
    reg = make(kind, name).attach(q, fp_model=fp)
    assert hooks(q) != q_hooks
    reg.detach()
    assert hooks(q) == q_hooks and hooks(fp) == fp_hooks
    assert same_state(state(q), q_state) and same_state(state(fp), fp_state)
    assert fp.training and flags(fp) == fp_flags and q.training
    q.eval()
    with torch.no_grad():
        assert torch.equal(q(x), ref)
    # 2) attach, a training step, detach: the hooks are gone; the model computes what an
    #    un-attached copy with the same weights computes
    q.train()
    reg.attach(q, fp_model=fp)
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    out = q(x)
    (F.cross_entropy(out, y) + reg.loss(x, y, out)).backward()
    opt.step()
    trained = state(q)
    reg.detach()
    assert not reg.attached and reg.model is None and reg.fp_model is None
    assert hooks(q) == q_hooks and hooks(fp) == fp_hooks
    assert same_state(state(q), trained)
    assert same_state(state(fp), fp_state) and fp.training and flags(fp) == fp_flags
    twin = copy.deepcopy(qats[name, mode])
    twin.load_state_dict(trained)
    q.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(q(x), twin(x))
    if kind == "cr":
        assert reg.ema is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_hooks_survive_state_dict_save_and_load(qats, fps, batch, kind, mode):
    x, y = batch
    q, fp = pair(qats, fps, "resnet", mode)
    reg = make(kind, "resnet").attach(q, fp_model=fp)
    try:
        out = q(x)
        first = reg.loss(x, y, out)
        buf = io.BytesIO()
        torch.save(q.state_dict(), buf)
        buf.seek(0)
        q.load_state_dict(torch.load(buf))
        for _ in range(2):
            out = q(x)
            loss = reg.loss(x, y, out)
            assert torch.isfinite(loss) and float(loss) > 0
        assert reg.steps == 3 and float(first) > 0
    finally:
        reg.detach()


def test_attach_errors(qats, fps, batch):
    x, y = batch
    q, fp = pair(qats, fps, "resnet", "eager")
    before = hooks(q)
    reg = qp.FeaturePerturbationRegularizer().attach(q, fp_model=fp)
    with pytest.raises(RuntimeError, match="already attached; call detach"):
        reg.attach(q, fp_model=fp)
    with pytest.raises(ValueError, match="listed twice"):
        qp.attach(q, [reg, reg], fp_model=fp)
    reg.detach()
    assert hooks(q) == before
    with pytest.raises(RuntimeError, match="not attached"):
        reg.loss(x, y, q(x))
    with pytest.raises(ValueError, match="needs the full-precision model"):
        qp.BlockReplacementRegularizer(["layer1"]).attach(q)
    with pytest.raises(ValueError, match="separate full-precision copy"):
        qp.FeaturePerturbationRegularizer().attach(q, fp_model=q)
    with pytest.raises(TypeError, match="Regularizer instances"):
        qp.attach(q, ["cr"])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        qp.ConsistencyRegularizer().attach("model")
    assert hooks(q) == before
    # a regularizer can be re-attached after detach
    reg.attach(q, fp_model=fp)
    reg.detach()
    assert hooks(q) == before


@pytest.mark.parametrize("kind,layers,close", [
    ("fpq", ["conv4"], "conv1"),
    ("cr", ["layer4:input"], "layer1"),
    ("br", ["layer4"], "layer1"),
    ("fpq", ["layer1.conv3"], "layer1.conv1"),
])
def test_unknown_layer_name_lists_close_matches(qats, fps, kind, layers, close):
    q, fp = pair(qats, fps, "resnet", "eager")
    q_hooks, fp_hooks, fp_flags = hooks(q), hooks(fp), flags(fp)
    reg = qp.BlockReplacementRegularizer(layers) if kind == "br" else make(kind, "resnet", layers=layers)
    with pytest.raises(ValueError, match=f"not found.*did you mean.*'{close}'"):
        reg.attach(q, fp_model=fp)
    # a failed attach leaves nothing behind
    assert not reg.attached and hooks(q) == q_hooks and hooks(fp) == fp_hooks
    assert fp.training and flags(fp) == fp_flags
    # ... also inside attach() with several regularizers: the ones attached before are detached
    with pytest.raises(ValueError, match="did you mean"):
        qp.attach(q, [qp.ConsistencyRegularizer(), reg], fp_model=fp)
    assert hooks(q) == q_hooks and hooks(fp) == fp_hooks


# ================================================================================================
# attach() as a context manager; one clean FP forward per step for several regularizers
# ================================================================================================
@pytest.mark.parametrize("mode", MODES)
def test_attach_context_manager_and_shared_fp_forward(qats, fps, batch, mode):
    x, y = batch
    q, fp = pair(qats, fps, "resnet", mode)
    q_hooks, fp_hooks, fp_flags = hooks(q), hooks(fp), flags(fp)
    regs_list = [qp.ConsistencyRegularizer(), qp.FeaturePerturbationRegularizer(),
                 qp.FeaturePerturbationRegularizer(["layer1.conv1"], reduction="sum"),
                 qp.BlockReplacementRegularizer(BLOCKS["resnet"], seed=0)]
    counter = Counter(fp)
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    with qp.attach(q, regs_list, fp_model=fp) as regs:
        assert len(regs) == 4 and all(r.attached for r in regs)
        for _ in range(3):
            counter.calls.clear()
            out = q(x)
            loss = F.cross_entropy(out, y) + regs.loss(x, y, out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            # one shared clean FP forward for FPQ, FPQ and BR, plus BR's one mixed-precision forward
            assert len(regs_list[3].last_blocks) == 1
            assert len(counter.calls) == 2 and counter.calls == [False, False]
            assert set(regs.last_losses) == {"cr", "fpq", "fpq2", "br"}
            assert all(math.isfinite(v) and v > 0 for v in regs.last_losses.values())
            assert float(loss) > float(F.cross_entropy(out, y))
    counter.remove()
    assert not any(r.attached for r in regs_list)
    assert hooks(q) == q_hooks and hooks(fp) == fp_hooks and fp.training and flags(fp) == fp_flags


def test_context_manager_detaches_on_error(qats, fps, batch):
    x, _ = batch
    q, fp = pair(qats, fps, "cnn", "eager")
    q_hooks = hooks(q)
    reg = qp.FeaturePerturbationRegularizer()
    with pytest.raises(KeyError):
        with qp.attach(q, reg, fp_model=fp):
            q(x)
            raise KeyError("boom")
    assert not reg.attached and hooks(q) == q_hooks and fp.training


def test_non_finite_term_is_named(qats, batch):
    x, y = batch

    class Broken(Regularizer):
        name = "broken"

        def _attach(self):
            pass

        def _loss(self, inputs, targets, outputs, ctx):
            return outputs.sum() * float("nan")

    q = copy.deepcopy(qats["cnn", "eager"]).train()
    with qp.attach(q, [qp.FeaturePerturbationRegularizer(distill=False), Broken()]) as regs:
        with pytest.raises(NonFiniteLossError, match="'broken' \\(#1\\)"):
            regs.loss(x, y, q(x))


# ================================================================================================
# eval mode / no_grad: zero loss, outputs of the un-attached model
# ================================================================================================
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_inactive_under_no_grad_and_in_eval(qats, fps, batch, kind, name, mode):
    x, y = batch
    plain, _ = pair(qats, fps, name, mode)
    q, fp = pair(qats, fps, name, mode)
    reg = make(kind, name, **({"p": 1.0} if kind == "fpq" else {}))
    reg.attach(q, fp_model=fp)
    counter = Counter(fp)
    try:
        for train in (False, True):
            q.train(train)
            plain.train(train)
            with torch.no_grad():
                out = q(x)
                assert torch.equal(out, plain(x))  # BN batch statistics too: no perturbation, no swap
                loss = reg.loss(x, y, out)
            assert loss.dim() == 0 and float(loss) == 0.0
        q.eval()
        plain.eval()
        out = q(x)  # eval mode with grad enabled
        assert torch.equal(out, plain(x))
        assert float(reg.loss(x, y, out)) == 0.0
        assert counter.calls == [] and reg.steps == 0  # no extra work either
    finally:
        counter.remove()
        reg.detach()


# ================================================================================================
# short W2A2 training runs on digits
# ================================================================================================
RUNS = [("resnet", "eager"), ("cnn", "fx")]


@pytest.fixture(scope="module")
def history(qats, fps, digits):
    """Lazily run (kind, name, mode) for 40 Adam steps (batch 64) on CE + regularizer; cache the
    regularizer term and the CE of every step."""
    _histories: dict = {}

    def run(kind, name, mode):
        key = (kind, name, mode)
        if key not in _histories:
            torch.manual_seed(0)
            q = copy.deepcopy(qats[name, mode]).train()
            # BR: all blocks every step, so each step's term has the same composition
            reg = make(kind, name, **({"sample": "all"} if kind == "br" else {"rampup_steps": 0} if kind == "cr" else {}))
            xs, ys = digits.train.tensors
            g = torch.Generator().manual_seed(0)
            opt = torch.optim.Adam(q.parameters(), 1e-3)
            terms, ces = [], []
            with qp.attach(q, [reg], fp_model=copy.deepcopy(fps[name])) as regs:  # never the shared model
                for _ in range(40):
                    idx = torch.randint(0, len(xs), (64,), generator=g)
                    xb, yb = xs[idx], ys[idx]
                    out = q(xb)
                    ce = F.cross_entropy(out, yb)
                    loss = ce + regs.loss(xb, yb, out)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    terms.append(float(reg.last_loss))
                    ces.append(float(ce))
            _histories[key] = (terms, ces, q)
        return _histories[key]

    return run


@pytest.mark.parametrize("name,mode", RUNS)
@pytest.mark.parametrize("kind", KINDS)
def test_short_w2a2_run_is_finite(history, fps, digits, kind, name, mode):
    terms, ces, q = history(kind, name, mode)
    assert len(terms) == 40 and all(math.isfinite(v) for v in terms + ces)
    assert all(torch.isfinite(p).all() for p in q.parameters())
    q = copy.deepcopy(q).eval()
    x, y = digits.test.tensors  # held-out images, eval mode (BN running statistics)
    with torch.no_grad():
        acc = (q(x).argmax(1) == y).float().mean().item()
        fp_acc = (fps[name](x).argmax(1) == y).float().mean().item()
    # measured gaps to FP after 40 W2A2 steps: 0.4-7.8 points (6 cases); an eval-mode collapse (BN
    # statistics lagging the weights) or a broken regularizer gradient shows as 10-55 % accuracy
    assert acc >= fp_acc - 0.12, (acc, fp_acc)


@pytest.mark.parametrize("name,mode", RUNS)
@pytest.mark.parametrize("kind", KINDS)
def test_short_w2a2_run_regularizer_loss_decreases(history, kind, name, mode):
    terms, _, _ = history(kind, name, mode)
    first, last = sum(terms[:5]) / 5, sum(terms[-5:]) / 5
    assert last < first, (first, last)


# ================================================================================================
# FPQ specifics
# ================================================================================================
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_fpq_p1_perturbs_every_listed_conv_input(qats, fps, batch, name, mode):
    x, y = batch
    q, fp = pair(qats, fps, name, mode)
    convs = [n for n, m in fps[name].named_modules() if isinstance(m, nn.Conv2d)]
    reg = qp.FeaturePerturbationRegularizer(p=1.0).attach(q, fp_model=fp)
    try:
        out = q(x)
        assert reg.perturbed == len(convs)
        reg.loss(x, y, out)
        assert reg.perturbed == 0  # reset per step
        with torch.no_grad():
            q(x)
        assert reg.perturbed == 0
    finally:
        reg.detach()
    sub = qp.FeaturePerturbationRegularizer(convs[1:3], p=1.0).attach(q, fp_model=fp)
    q(x)
    assert sub.perturbed == 2
    sub.detach()
    none = qp.FeaturePerturbationRegularizer(p=0.0).attach(q, fp_model=fp)
    q(x)
    assert none.perturbed == 0
    none.detach()


def test_fpq_noise_is_bounded_by_half_the_feeding_step(qats, fps, batch):
    """Eager SmallCNN: each conv's input comes straight from an activation fake quantizer (the input
    QuantStub's for conv1); the noise is U[-s/2, s/2] with that quantizer's step s, not the fallback."""
    x, y = batch
    q, fp = pair(qats, fps, "cnn", "eager")
    feeders = {"conv1": q.qat_input_quant.activation_post_process,
               "conv2": q.conv1.activation_post_process, "conv3": q.conv2.activation_post_process}
    clean, perturbed, handles = {}, {}, []
    for n in feeders:  # registered before FPQ's hook: sees the clean input
        handles.append(q.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: clean.__setitem__(n, a[0].detach().clone())))
    reg = qp.FeaturePerturbationRegularizer(p=1.0).attach(q, fp_model=fp)
    for n in feeders:  # registered after FPQ's hook: sees the perturbed input
        handles.append(q.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: perturbed.__setitem__(n, a[0].detach().clone())))
    try:
        for _ in range(2):  # the step sizes are looked up afresh in every forward
            out = q(x)
            for n, fq in feeders.items():
                s = float(fq.scale.detach())
                delta = perturbed[n] - clean[n]
                half = s / 2 * (1 + 1e-5) + 1e-6 * clean[n].abs().max()
                biggest = float(delta.abs().max())
                assert biggest <= half, (n, biggest, s)
                assert biggest >= 0.45 * s, (n, biggest, s)  # ~s/2 over thousands of draws
                # not the fallback scale 0.1 * std(input), whose noise would peak near fallback / 2
                fallback = 0.1 * float(clean[n].std())
                assert not 0.45 * fallback <= biggest <= 0.5 * fallback * (1 + 1e-5), (n, biggest, fallback)
                assert abs(float(delta.mean())) < 0.05 * s  # zero-mean noise
            reg.loss(x, y, out)
    finally:
        reg.detach()
        for h in handles:
            h.remove()


def test_fpq_csd_matches_hand_computation(qats, fps, batch):
    x, y = batch
    q, fp = pair(qats, fps, "cnn", "eager")
    layers = ["conv2", "conv3"]
    reg = qp.FeaturePerturbationRegularizer(layers, p=0.0, reduction="sum").attach(q, fp_model=fp)
    # our own recordings of the pre-BN features: QAT conv-bn's bn input, FP conv output
    feats_q, feats_fp, handles = {}, {}, []
    for n in layers:
        handles.append(q.get_submodule(n).bn.register_forward_pre_hook(
            lambda m, a, n=n: feats_q.__setitem__(n, a[0].detach())))
        handles.append(fp.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: feats_fp.__setitem__(n, o.detach())))
    try:
        loss = reg.loss(x, y, q(x))
    finally:
        reg.detach()
        for h in handles:
            h.remove()
    def standardized(t):  # by hand: per channel over (N, H, W), biased variance, eps 1e-5
        mu = t.mean((0, 2, 3), keepdim=True)
        return (t - mu) / torch.sqrt(((t - mu) ** 2).mean((0, 2, 3), keepdim=True) + 1e-5)

    # reduction="sum": the per-channel means of the squared differences, summed over channels
    expected = sum(((standardized(feats_q[n]) - standardized(feats_fp[n])) ** 2).mean((0, 2, 3)).sum()
                   for n in layers)
    # F.batch_norm inside the package vs explicit ops here: float32 rounding of a sum of ~30 terms
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_fpq_with_a_different_width_fp_model_fails_clearly(qats, batch):
    x, y = batch
    q = copy.deepcopy(qats["cnn", "eager"]).train()
    reg = qp.FeaturePerturbationRegularizer().attach(q, fp_model=SmallCNN(width=4))
    try:
        with pytest.raises(ValueError, match="same architecture"):
            reg.loss(x, y, q(x))
    finally:
        reg.detach()


# ================================================================================================
# BR specifics
# ================================================================================================
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_br_fp_suffix_consumes_the_quantized_block_output(qats, fps, batch, name, mode):
    x, y = batch
    q, fp = pair(qats, fps, name, mode)
    blocks = BLOCKS[name]
    reg = qp.BlockReplacementRegularizer(blocks, sample="all").attach(q, fp_model=fp)
    ours = FeatureTap(q, blocks)  # what the QAT model's blocks produced in this forward
    reads = {b: [] for b in blocks}
    handles = [fp.get_submodule(NEXT[name][b]).register_forward_pre_hook(
        lambda m, a, b=b: reads[b].append(a[0].detach().clone())) for b in blocks]
    counter = Counter(fp)
    try:
        out = q(x)
        qfeats = {b: t.detach().clone() for b, t in ours.features.items()}
        reg.loss(x, y, out)
    finally:
        for h in handles:
            h.remove()
        counter.remove()
        ours.remove()
        reg.detach()
    assert reg.last_blocks == blocks
    assert len(counter.calls) == 1 + len(blocks)  # clean + one mixed forward per block
    for k, b in enumerate(blocks):
        # FP forward 0 is the clean one; forward k+1 replaces block b
        clean, mixed = reads[b][0], reads[b][k + 1]
        assert torch.equal(mixed, qfeats[b]), b
        assert not torch.equal(clean, qfeats[b]), b
        for j in range(k + 1):  # earlier blocks' mixed forwards fed this reader FP (or mixed) features
            assert not torch.equal(reads[b][j], qfeats[b])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_br_mixed_forward_of_an_8bit_model_matches_the_fp_model(fps, batch, name, mode):
    """At W8A8 the quantized blocks are almost the FP blocks, so each mixed model's prediction is
    close to the FP model's (a mismatched replacement point, e.g. BN applied twice, is not)."""
    x, y = batch
    fp = copy.deepcopy(fps[name])
    q = qp.prepare_qat(fp, weight_bits=8, act_bits=8, mode=mode, example_inputs=(x,))
    q(x)
    reg = qp.BlockReplacementRegularizer(BLOCKS[name], sample="all").attach(q, fp_model=fp)
    tap = FeatureTap(q, BLOCKS[name])
    try:
        q(x)
        with torch.no_grad():
            fp_logits = fp(x)
            for b in BLOCKS[name]:
                StepContext(x, fp, reg.fp_taps).fp_forward()  # the clean FP forward fills BR's prefix cache
                mixed = reg._mixed_forward(x, b, tap.features[b])
                assert kd_kl(mixed, fp_logits) < 0.2, b
                assert (mixed.argmax(1) == fp_logits.argmax(1)).float().mean() >= 0.9, b
    finally:
        tap.remove()
        reg.detach()


def test_br_block_missing_in_fp_model(qats, batch):
    q = copy.deepcopy(qats["resnet", "eager"]).train()
    fp = SmallCNN(width=8)  # no layer1..3
    with pytest.raises(ValueError, match="block 'layer1' is not in the FP model"):
        qp.BlockReplacementRegularizer(["layer1"]).attach(q, fp_model=fp)
    with pytest.raises(ValueError, match="did you mean"):
        qp.BlockReplacementRegularizer(["layer9"]).attach(q, fp_model=SmallResNet(width=8))


@pytest.mark.parametrize("name", NAMES)
def test_br_fp_model_of_a_different_width(qats, batch, name):
    x, y = batch
    q = copy.deepcopy(qats[name, "eager"]).train()
    other = (SmallResNet if name == "resnet" else SmallCNN)(width=4)
    reg = qp.BlockReplacementRegularizer(BLOCKS[name], sample="all").attach(q, fp_model=other)
    try:
        with pytest.raises(ValueError, match="same architecture"):
            reg.loss(x, y, q(x))
        # the failed mixed forward left no FP module patched
        assert not any("forward" in vars(m) for m in other.modules())
        with torch.no_grad():
            assert other(x).shape == (64, 10)
    finally:
        reg.detach()


def test_br_sample_one_is_seeded_and_covers_the_blocks(qats, fps, batch):
    x, y = batch
    q, fp = pair(qats, fps, "resnet", "eager")
    picks = []
    for _ in range(2):
        reg = qp.BlockReplacementRegularizer(BLOCKS["resnet"], seed=3).attach(q, fp_model=fp)
        seq = []
        for _ in range(12):
            reg.loss(x, y, q(x))
            seq.append(reg.last_blocks[0])
        reg.detach()
        picks.append(seq)
    assert picks[0] == picks[1] and set(picks[0]) == set(BLOCKS["resnet"])


# ================================================================================================
# registry
# ================================================================================================
def test_build_regularizers_valid():
    regs = build_regularizers([{"name": "cr", "weight": 0.5, "layers": ["output", "fc:input"]},
                               {"name": "fpq", "p": 0.2},
                               {"name": "br", "blocks": ["layer1", "layer2"], "sample": "all"}])
    assert [type(r) for r in regs] == [qp.ConsistencyRegularizer, qp.FeaturePerturbationRegularizer,
                                       qp.BlockReplacementRegularizer]
    assert regs[0].weight == 0.5 and regs[1].p == 0.2 and regs[2].blocks == ["layer1", "layer2"]
    assert regs[2].config()["sample"] == "all"
    assert build_regularizers(None) == [] and build_regularizers([]) == []


@pytest.mark.parametrize("specs,match", [
    ([{"name": "ko"}], r"regularizers\[0\]\.name: unknown regularizer 'ko'; known: \['br', 'cr', 'fpq', 'kd'\]"),
    ([{"weight": 1.0}], r"unknown regularizer None; known"),
    ([{"name": "cr"}, {"name": "fpq", "prob": 0.5}], r"regularizers\[1\]\.prob: unknown option for 'fpq'; allowed: \["),
    ([{"name": "cr", "augment": "flip"}], r"augment: unknown option"),
    ([{"name": "br"}], r"regularizers\[0\]\.blocks: required for 'br'"),
    ([{"name": "cr", "weight": -1}], r"regularizers\[0\]\.weight: must be a finite number >= 0, got -1"),
    ([{"name": "cr", "weight": True}], r"regularizers\[0\]\.weight: must be a finite number >= 0, got True \(bool\)"),
    ([{"name": "cr", "weight": "1"}], r"regularizers\[0\]\.weight: must be a finite number >= 0, got '1' \(str\)"),
    ([{"name": "cr", "layers": "fc:input"}], r"regularizers\[0\]\.layers: must be a list of module names"),
    ([{"name": "fpq", "layers": ["conv1", 3]}], r"layers: must be a list of module names"),
    ([{"name": "br", "blocks": "layer1"}], r"blocks: must be a list of module names"),
    ([{"name": "br", "blocks": []}], r"regularizers\[0\]\.blocks: must be a non-empty list"),
    ([{"name": "fpq", "p": 1.5}], r"regularizers\[0\]\.p: must be a finite number >= 0 and <= 1, got 1.5"),
    ([{"name": "cr", "teacher": "mean"}], r"regularizers\[0\]\.teacher: must be one of"),
    ([{"name": "cr", "ema_decay": 1.0}], r"regularizers\[0\]\.ema_decay: must be a finite number >= 0 and < 1"),
    ([["cr"]], r"regularizers\[0\]: must be a mapping"),
    ({"name": "cr"}, r"regularizers: must be a list of regularizer entries"),
    ("cr", r"regularizers: must be a list"),
])
def test_build_regularizers_errors(specs, match):
    with pytest.raises(ValueError, match=match):
        build_regularizers(specs)


def test_constructor_weight_validation():
    with pytest.raises(ValueError, match="finite number >= 0"):
        qp.FeaturePerturbationRegularizer(weight=-0.1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        qp.ConsistencyRegularizer(weight=float("inf"))
    with pytest.raises(ValueError, match="weight: must be a finite number >= 0, got None"):
        qp.BlockReplacementRegularizer(["layer1"], weight=None)

