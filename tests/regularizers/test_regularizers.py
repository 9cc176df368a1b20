"""CR, FPQ and BR: loss formulas by hand, gradient routing, attach/detach hygiene, shared FP forward,
short W2A2 training runs on digits, and the config registry.

The QAT models are W2A2 ``prepare_qat`` copies (eager and FX) of the trained reference models of
conftest; every test that changes a model works on a deep copy.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat_plugins as qp
from qat_plugins.models import SmallResNet
from host_reads import HostReads
from loss_by_hand import kl_by_hand
from qat_plugins.quant.step_size import activation_quantizers, weight_quantizers
from qat_plugins.regularizers import NonFiniteLossError, Regularizer, build_regularizers
from qat_plugins.regularizers._losses import kd_kl
from reg_models import BLOCKS, KINDS, MODES, NAMES, Counter, flags, hooks, layouts, make, pair, same_state, state


# ================================================================================================
# loss formulas by hand: tests/regularizers/test_losses.py; CR's terms on a model
# ================================================================================================
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
    kl_rows = kl_by_hand(weak.tolist(), strong.tolist(), temp) * temp * temp
    assert float(kd_kl(strong, weak, temp)) == pytest.approx(kl_rows, rel=1e-4)
    # gradient only through the strong view: identical to the hand version with an explicit detach
    # (float32 rounding of the differently ordered KL sum: up to ~3e-7 absolute on a per-tensor LSQ
    # scale gradient, seen on an AVX-512 machine without AMX)
    loss.backward()
    expected.backward()
    for n in ("fc.weight", "conv2.weight", "conv1.weight_fake_quant.scale", "conv3.activation_post_process.scale"):
        torch.testing.assert_close(q.get_parameter(n).grad, ref.get_parameter(n).grad, rtol=1e-4, atol=1e-6)
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


def test_frozen_fp_model_computes_in_channels_last_from_its_stem():
    """While attached, every conv of the frozen FP model reads and writes channels_last, the stem with one
    input channel included (its weight's strides are ambiguous: ``contiguous(memory_format=...)`` left them
    NCHW, the stem ran in NCHW and the next conv converted its input); detach restores standard strides."""
    torch.manual_seed(0)
    fp = SmallResNet(width=8).eval()
    x, y = torch.randn(16, 1, 14, 14), torch.randint(0, 10, (16,))
    before = layouts(fp)
    q = qp.prepare_qat(copy.deepcopy(fp), weight_bits=4, act_bits=4, example_inputs=(x[:2],))
    q(x)
    q.train()
    regs = qp.attach(q, [qp.KnowledgeDistillationRegularizer()], fp_model=fp)
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (i[0].shape, o.stride())))
               for n, m in fp.named_modules() if isinstance(m, nn.Conv2d)]
    out = q(x)
    regs.loss(x, y, out).backward()
    for h in handles:
        h.remove()
    assert len(seen) == 9 and seen["conv1"][0][1] == 1
    assert all(stride[1] == 1 for _, stride in seen.values()), seen  # channels_last outputs, stem included
    regs.detach()
    assert layouts(fp) == before


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
    fp_layout = layouts(fp)
    q.eval()
    with torch.no_grad():
        ref = q(x)
    q.train()
    # 1) attach + detach: everything identical, values included
    reg = make(kind, name).attach(q, fp_model=fp)
    assert hooks(q) != q_hooks
    if reg.fp_model is not None:  # the frozen FP model runs in channels_last while attached
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fp.parameters() if p.dim() == 4)
    reg.detach()
    assert hooks(q) == q_hooks and hooks(fp) == fp_hooks and layouts(fp) == fp_layout
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
    assert same_state(state(fp), fp_state) and fp.training and flags(fp) == fp_flags and layouts(fp) == fp_layout
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


@pytest.mark.parametrize("mode", MODES)
def test_loss_reads_the_device_once_and_last_losses_reuses_it(qats, fps, batch, mode):
    """Issue 11, item 5: the finite check is the set's one host sync; logging adds none; with
    ``check_finite=False`` the caller's own read goes through ``record``."""
    x, y = batch
    q = copy.deepcopy(qats["resnet", mode]).train()
    regs = [qp.ConsistencyRegularizer(), qp.FeaturePerturbationRegularizer(),
            qp.BlockReplacementRegularizer(list(BLOCKS["resnet"])), qp.KnowledgeDistillationRegularizer()]
    with qp.attach(q, regs, fp_model=copy.deepcopy(fps["resnet"])) as rs:
        torch.manual_seed(0)
        rs.loss(x, y, q(x))  # first step: CSD compiles, quantizer flags settle
        for check in (None, False):
            torch.manual_seed(1)
            out = q(x)
            with HostReads() as reads:
                total = rs.loss(x, y, out, check_finite=check)
                logged = rs.last_losses
            assert reads.syncs == 1, reads.where  # the check's read, or last_losses' when unchecked
            assert list(logged) == ["cr", "fpq", "br", "kd"]
            assert sum(logged.values()) == pytest.approx(float(total), rel=1e-6)
        with HostReads() as reads:
            rs.loss(x, y, q(x), check_finite=False)
        assert reads.syncs == 0, reads.where
        with pytest.raises(NonFiniteLossError, match="'br' \\(#2\\)"):
            rs.record([0.5, 0.25, float("nan"), float("inf")])  # the first non-finite term is named
        kept = rs.last_losses  # the recorded values, as read by the caller
        assert kept["cr"] == 0.5 and kept["fpq"] == 0.25 and math.isnan(kept["br"]) and kept["kd"] == math.inf
        with pytest.raises(ValueError, match="4 values"):
            rs.record([0.5])


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

