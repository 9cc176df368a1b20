"""The frozen FP model while regularizers are attached (``qat_plugins.regularizers.frozen_fp``): BatchNorm
folded into the convs with the same outputs, shared by every attached regularizer, restored exactly."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import qat_plugins as qp
from qat_plugins.models import SmallResNet
from qat_plugins.regularizers.frozen_fp import FrozenFP

BLOCKS = ["layer1", "layer2", "layer3"]


def _fp_model() -> nn.Module:
    """A SmallResNet with BN statistics and affine parameters away from their init, one scale negative."""
    torch.manual_seed(0)
    fp = SmallResNet(width=8)
    with torch.no_grad():
        for m in fp.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        fp.bn1.weight[0] = -0.7
    return fp.train()  # attach puts it in eval mode; detach must put it back in train mode


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_frozen_fp_folds_batchnorm_with_the_same_outputs_and_restores_exactly(batch):
    x, y = batch
    fp = _fp_model()
    ref = copy.deepcopy(fp).eval()
    before = _snapshot(fp)
    grads_before = {n: p.requires_grad for n, p in fp.named_parameters()}
    q = qp.prepare_qat(fp, weight_bits=4, act_bits=4, example_inputs=(x,))
    q(x)
    regs = qp.attach(q.train(), [qp.KnowledgeDistillationRegularizer(), qp.FeaturePerturbationRegularizer(),
                                 qp.BlockReplacementRegularizer(BLOCKS, sample="all")], fp_model=fp)
    try:
        folded = {n for n, m in fp.named_modules() if isinstance(m, nn.BatchNorm2d) and "forward" in vars(m)}
        assert folded == {n for n, m in fp.named_modules() if isinstance(m, nn.BatchNorm2d)}  # every conv-bn pair
        assert not fp.training and not any(p.requires_grad for p in fp.parameters())
        with torch.no_grad():
            torch.testing.assert_close(fp(x), ref(x), rtol=1e-5, atol=1e-5)
        # the folded conv's output times pre_bn_scale is the pre-BN feature up to a per-channel constant
        seen: dict[str, torch.Tensor] = {}
        h1 = fp.conv1.register_forward_hook(lambda m, a, o: seen.__setitem__("folded", o))
        h2 = ref.conv1.register_forward_hook(lambda m, a, o: seen.__setitem__("pre_bn", o))
        with torch.no_grad():
            fp(x), ref(x)
        h1.remove(), h2.remove()
        scale = regs.regularizers[1].fp_pre_bn_scale("conv1")
        mapped = seen["folded"] * scale.reshape(1, -1, 1, 1)
        offset = (mapped - seen["pre_bn"]).mean((0, 2, 3), keepdim=True)
        torch.testing.assert_close(mapped - offset, seen["pre_bn"], rtol=1e-4, atol=1e-4)
        assert float(scale[0]) < 0  # the negative BN scale: mirrored
        out = q(x)
        (F.cross_entropy(out, y) + regs.loss(x, y, out)).backward()  # BR's FP suffix backward through folded convs
    finally:
        regs.detach()
    assert not any("forward" in vars(m) for m in fp.modules())
    assert fp.training
    assert {n: p.requires_grad for n, p in fp.named_parameters()} == grads_before
    after = fp.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
        assert after[k].is_contiguous(), k


def test_frozen_fp_is_shared_and_the_last_detach_restores(batch):
    """Two regularizers attached one after the other share one freeze; detaching the first keeps the
    folded model (computing what the unfolded one computes) for the second, the second restores it."""
    x, y = batch
    fp = _fp_model()
    ref = copy.deepcopy(fp).eval()
    q = qp.prepare_qat(fp, weight_bits=4, act_bits=4, example_inputs=(x,))
    q(x)
    q.train()
    kd = qp.KnowledgeDistillationRegularizer().attach(q, fp_model=fp)
    br = qp.BlockReplacementRegularizer(BLOCKS, sample="all").attach(q, fp_model=fp)
    try:
        frozen = FrozenFP.acquire(fp)
        assert frozen.users == 3
        frozen.release()
        kd.detach()
        assert frozen.users == 1 and "forward" in vars(fp.bn1) and not fp.training
        with torch.no_grad():
            torch.testing.assert_close(fp(x), ref(x), rtol=1e-5, atol=1e-5)
        out = q(x)
        (F.cross_entropy(out, y) + br.loss(x, y, out)).backward()
    finally:
        kd.detach()
        br.detach()
    assert frozen.users == 0
    assert not any("forward" in vars(m) for m in fp.modules()) and fp.training


def test_frozen_fp_leaves_watched_and_untraceable_models_unfolded(batch):
    """A conv or BN someone hooks keeps its own computation (the hook sees what it saw before);
    a model ``torch.fx`` cannot trace is not folded at all (no guessing of the BN's input)."""
    x, _ = batch
    fp = _fp_model().eval()
    handle = fp.bn1.register_forward_hook(lambda m, a, o: None)
    frozen = FrozenFP.acquire(fp)
    try:
        assert "forward" not in vars(fp.bn1) and "forward" not in vars(fp.conv1)
        assert frozen.pre_bn_scale("conv1") is None
        assert frozen.pre_bn_scale("layer1.conv1") is not None
    finally:
        frozen.release()
        handle.remove()

    class Untraceable(SmallResNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.sum()) > 1e9:  # data-dependent control flow: symbolic tracing fails
                return x
            return super().forward(x)

    torch.manual_seed(0)
    model = Untraceable(width=8).eval()
    frozen = FrozenFP.acquire(model)
    try:
        assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)))
        with torch.no_grad():
            assert model(x).shape == (x.shape[0], 10)
    finally:
        frozen.release()


@pytest.mark.parametrize("scale", [0.0, float("nan")])
def test_frozen_fp_does_not_fold_a_batchnorm_that_erases_its_input(batch, scale):
    """A BN scale of zero (a channel the BN maps to a constant) would lose the pre-BN feature CSD needs."""
    fp = _fp_model().eval()
    with torch.no_grad():
        fp.layer1.bn1.weight[1] = scale
    frozen = FrozenFP.acquire(fp)
    try:
        assert frozen.pre_bn_scale("layer1.conv1") is None and "forward" not in vars(fp.layer1.bn1)
        assert frozen.pre_bn_scale("layer1.conv2") is not None
    finally:
        frozen.release()


def test_fp_recordings_are_released_after_each_step(batch):
    """The FP features a step records (FPQ's CSD teacher, BR's prefix cache) are dropped once the losses
    are computed and the backward ran: kept until the next step, they raised that step's memory (the
    allocator returned it to the OS and faulted it back in, BENCHMARKS.md "Cost")."""
    x, y = batch
    fp = _fp_model().eval()
    q = qp.prepare_qat(fp, weight_bits=4, act_bits=4, example_inputs=(x,))
    q(x)
    regs = qp.attach(q.train(), [qp.FeaturePerturbationRegularizer(), qp.BlockReplacementRegularizer(BLOCKS),
                                 qp.KnowledgeDistillationRegularizer()], fp_model=fp)
    recorded: list[weakref.ref] = []
    handle = fp.layer1.conv1.register_forward_hook(lambda m, a, o: recorded.append(weakref.ref(o)))
    try:
        out = q(x)
        loss = F.cross_entropy(out, y) + regs.loss(x, y, out)
        assert all(not getattr(t, "features", None) and not getattr(t, "outputs", None)
                   for r in regs for t in r.fp_taps)
        loss.backward()
        del out, loss
        gc.collect()
        assert recorded and all(ref() is None for ref in recorded)
    finally:
        handle.remove()
        regs.detach()


class _MixedLayouts(TorchDispatchMode):
    """Records the aten ops that get 4-d tensors (more than one channel and position) in both the
    contiguous and the ``channels_last`` layout: CPU kernels take a slow elementwise path there."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        flat = [a for a in args if isinstance(a, torch.Tensor)]
        flat += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        layouts = {"nchw" if t.is_contiguous() else "nhwc" if t.is_contiguous(memory_format=torch.channels_last)
                   else "strided" for t in flat if t.dim() == 4 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1}
        if {"nchw", "nhwc"} <= layouts:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_frozen_fp_suffix_and_its_gradient_keep_one_layout(batch):
    """BR's FP suffix runs in channels_last on a contiguous QAT block output: the block output enters
    the FP model converted and its gradient returns contiguous, and the global average pool's backward
    keeps channels_last, so no op of the step mixes the two layouts (before, the ReLU backward before the
    pool and the QAT block's backward did: a slow elementwise path, BENCHMARKS.md "Cost"). The pool
    computes the same values."""
    x, y = batch
    fp = _fp_model().eval()
    ref = copy.deepcopy(fp)
    q = qp.prepare_qat(fp, weight_bits=4, act_bits=4, example_inputs=(x,))
    q(x)
    regs = qp.attach(q.train(), [qp.FeaturePerturbationRegularizer(), qp.BlockReplacementRegularizer(BLOCKS,
                                 sample="all"), qp.KnowledgeDistillationRegularizer()], fp_model=fp)
    try:
        assert "forward" in vars(fp.pool)
        feat = torch.randn(4, 8, 3, 3).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(fp.pool(feat), ref.pool(feat), rtol=1e-6, atol=1e-6)
        block_out = torch.randn(4, 8, 3, 3, requires_grad=True)
        moved = FrozenFP.lookup(fp).feature_for(block_out)
        assert moved.is_contiguous(memory_format=torch.channels_last) and torch.equal(moved, block_out)
        weights = torch.arange(float(moved.numel())).reshape(moved.shape)
        (moved * weights).sum().backward()
        assert block_out.grad.is_contiguous() and torch.equal(block_out.grad, weights)
        out = q(x)
        mixed = _MixedLayouts()
        with mixed:
            loss = F.cross_entropy(out, y) + regs.loss(x, y, out)
            loss.backward()
        assert regs.regularizers[1].last_blocks == BLOCKS
        assert mixed.ops == []
    finally:
        regs.detach()
    assert "forward" not in vars(fp.pool)
