"""FPQ and BR specifics: SFP noise on every conv input, CSD by hand, BR's FP suffix and block sampling.

The QAT models are W2A2 ``prepare_qat`` copies (eager and FX) of the trained reference models of
conftest; every test that changes a model works on a deep copy.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import qat_plugins as qp
from qat_plugins.models import SmallCNN, SmallResNet
from qat_plugins.regularizers import StepContext
from qat_plugins.regularizers._losses import kd_kl
from qat_plugins.taps import FeatureTap
from reg_models import BLOCKS, MODES, NAMES, NEXT, Counter, pair


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


@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "inplace_relu"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_fpq_csd_matches_hand_computation(qats, fps, batch, inplace, compiled):
    """CSD against the pre-BN features recorded by hand: the student's from its QAT conv-bn's ``bn``
    input, the teacher's from an *unattached* copy of the FP model (while attached, the FP model runs
    with its BatchNorms folded into the convs). One channel's BN scale is negative, where the folded
    conv's post-BN output is the pre-BN feature mirrored. With ``ReLU(inplace=True)`` in the FP model
    the folded BN returns the conv output itself and the ReLU then rewrites it: the teacher is still
    the pre-ReLU feature, and the backward still finds what CSD saved unchanged."""
    x, y = batch
    q, fp = pair(qats, fps, "cnn", "eager")
    for m in fp.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = inplace
    with torch.no_grad():
        fp.bn2.weight[0] = -fp.bn2.weight[0].abs()
    fp_ref = copy.deepcopy(fp).eval()  # as the attached FP model runs
    layers = ["conv2", "conv3"]
    reg = qp.FeaturePerturbationRegularizer(layers, p=0.0, reduction="sum", compiled=compiled).attach(q, fp_model=fp)
    assert reg.fp_pre_bn_scale("conv2") is not None  # folded: the test exercises the mapping back
    feats_q, feats_fp, handles = {}, {}, []
    for n in layers:
        handles.append(q.get_submodule(n).bn.register_forward_pre_hook(
            lambda m, a, n=n: feats_q.__setitem__(n, a[0].detach())))
        handles.append(fp_ref.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: feats_fp.__setitem__(n, o.detach())))
    try:
        loss = reg.loss(x, y, q(x))
        loss.backward()
        with torch.no_grad():
            fp_ref(x)
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
    # per-channel moments inside the package vs explicit ops here: float32 rounding of a sum of ~30 terms
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ["fpq first", "br first"])
def test_fpq_distills_each_fp_feature_as_it_is_produced_and_keeps_none(qats, fps, batch, mode, order):
    """CSD's term of a layer is computed inside the shared clean FP forward, as the FP model produces
    the teacher feature, whichever regularizer runs that forward: no FP conv output is alive once it
    returns (only CSD's own copy in the student's layout, for the backward), and the term equals the
    one of a step where FPQ runs the FP forward itself."""
    x, y = batch
    q, fp = pair(qats, fps, "resnet", mode)
    q_ref, fp_ref = copy.deepcopy(q), copy.deepcopy(fp)
    regs = [qp.FeaturePerturbationRegularizer(p=0.0), qp.BlockReplacementRegularizer(BLOCKS["resnet"], seed=0)]
    regs = qp.attach(q, regs if order == "fpq first" else regs[::-1], fp_model=fp)
    ref = qp.FeaturePerturbationRegularizer(p=0.0).attach(q_ref, fp_model=fp_ref)
    produced: list[weakref.ref] = []
    alive_at_end: list[list[bool]] = []  # per FP forward: which conv outputs are still alive as it returns

    def at_end(m: nn.Module, a: tuple, o: torch.Tensor) -> None:
        gc.collect()
        alive_at_end.append([r() is not None for r in produced])

    # conv1's output is also bn1's (folded: the BN returns its input), which BR's prefix cache keeps
    convs = [n for n, m in fp.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]
    handles = [fp.get_submodule(n).register_forward_hook(lambda m, a, o: produced.append(weakref.ref(o)))
               for n in convs]
    handles.append(fp.register_forward_hook(at_end))
    try:
        out = q(x)
        regs.loss(x, y, out)
        assert len(alive_at_end[0]) == len(convs) == 8  # the first FP forward is the clean one
        assert not any(alive_at_end[0])
        fpq = next(r for r in regs if r.name == "fpq")
        torch.testing.assert_close(fpq.last_loss, ref.loss(x, y, q_ref(x)).detach(), rtol=1e-6, atol=1e-7)
    finally:
        for h in handles:
            h.remove()
        regs.detach()
        ref.detach()


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
    attached_forwards = {name: vars(m).get("forward") for name, m in other.named_modules()}  # folded BN
    try:
        with pytest.raises(ValueError, match="same architecture"):
            reg.loss(x, y, q(x))
        # the failed mixed forward left no FP module patched (only the attach's BatchNorm folding)
        assert {name: vars(m).get("forward") for name, m in other.named_modules()} == attached_forwards
        with torch.no_grad():
            assert other(x).shape == (64, 10)
    finally:
        reg.detach()
    assert not any("forward" in vars(m) for m in other.modules())


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


