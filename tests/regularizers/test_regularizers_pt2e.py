"""CR and BR on a torchao PT2E graph: their terms equal hand computations from the graph's outputs.

The PT2E model is prepared once per module (~10 s with batch norm) from a copy of the shared
``fp_resnet``; each test works on deep copies. The block features BR replaces are read with our own
hooks on the fake quantizer that the next block reads (located through the graph).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchao")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

import qat_plugins as qp  # noqa: E402
from qat_plugins.quant.pt2e import pt2e_module_output  # noqa: E402

BLOCKS = ["layer1", "layer2", "layer3"]


@pytest.fixture(scope="module")
def pt2e(fp_resnet, digits):
    x = digits.train.tensors[0][:64]
    g = torch.Generator().manual_seed(0)
    q = qp.prepare_qat(copy.deepcopy(fp_resnet), weight_bits=4, act_bits=4, mode="pt2e", example_inputs=(x,))
    q(x[torch.randperm(64, generator=g)])  # calibrate the quantizers
    return q


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """T^2 KL(softmax(teacher/T) || softmax(student/T)), batch mean, written out."""
    p = F.softmax(teacher_logits.detach() / t, dim=1)
    return t * t * (p * (torch.log(p) - F.log_softmax(student_logits / t, dim=1))).sum(1).mean()


def test_cr_on_a_pt2e_graph_equals_the_hand_computation(pt2e, batch):
    x, y = batch
    q, ref = copy.deepcopy(pt2e), copy.deepcopy(pt2e)
    assert q.training and isinstance(q, torch.fx.GraphModule)
    views = []

    def augment(t):  # deterministic strong view, recorded
        views.append(t.flip(-1) + 0.1)
        return views[-1]

    reg = qp.ConsistencyRegularizer(["output"], temperature=2.0, rampup_steps=0, augment=augment).attach(q)
    try:
        loss = reg.loss(x, y, q(x))
    finally:
        reg.detach()
    # by hand on an identical copy, same forward order (so the same BN batch statistics)
    weak = ref(x)
    strong = ref(views[0])
    expected = _kl(weak, strong, 2.0)
    # identical graphs and inputs, only the KL's summation order differs: float32 rounding
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert float(loss) > 1e-4  # the strong view does move the logits: the term is not trivially 0
    # gradient only through the strong view, as in the hand version
    loss.backward()
    expected.backward()
    grads = [(n, p.grad, dict(ref.named_parameters())[n].grad) for n, p in q.named_parameters() if p.grad is not None]
    assert len(grads) >= 10
    # a step-size gradient sums over every element of its activation (up to 64x8x8x8 = 32768 terms);
    # a different float32 summation order moves it by ~eps*sqrt(N) ~ 1e-5 of its size, more where its
    # terms cancel (measured 6e-6 on one machine, 6e-5 on an AVX-512 machine without AMX)
    for n, a, b in grads:
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-9, n


def test_br_on_a_pt2e_graph_equals_the_hand_computation(pt2e, fp_resnet, batch):
    x, y = batch
    q, ref = copy.deepcopy(pt2e), copy.deepcopy(pt2e)
    fp = copy.deepcopy(fp_resnet)
    reg = qp.BlockReplacementRegularizer(BLOCKS, sample="all", seed=0).attach(q, fp_model=fp)
    try:
        loss = reg.loss(x, y, q(x))
    finally:
        reg.detach()
    assert not fp.training  # detach restored the FP copy's mode (it was in eval mode)

    # by hand: the quantized block outputs are what the next block reads in the PT2E graph
    calls, handles, which = {}, [], {}
    for b in BLOCKS:
        node = pt2e_module_output(ref, b)
        # a quantizer module may be called at several graph nodes: FX runs them in graph order
        which[b] = (str(node.target), [n for n in ref.graph.nodes if n.target == node.target].index(node))
    for target in {t for t, _ in which.values()}:
        handles.append(ref.get_submodule(target).register_forward_hook(
            lambda m, a, o, t=target: calls.setdefault(t, []).append(o)))
    try:
        out = ref(x)
    finally:
        for h in handles:
            h.remove()
    feats = {b: calls[t][i] for b, (t, i) in which.items()}
    with torch.no_grad():
        fp_logits = fp.eval()(x)

    def fp_suffix(b: str, h: torch.Tensor) -> torch.Tensor:  # F_{k+1..n} of SmallResNet, written out
        for later in BLOCKS[BLOCKS.index(b) + 1:]:
            h = fp.get_submodule(later)(h)
        return fp.fc(torch.flatten(fp.pool(h), 1))

    mixed = {b: fp_suffix(b, feats[b]) for b in BLOCKS}
    branch = sum(F.cross_entropy(mixed[b], y) + _kl(fp_logits, mixed[b]) for b in BLOCKS) / len(BLOCKS)
    expected = _kl(fp_logits, out) + branch
    # same ops on identical copies; the mixed forwards run the same FP modules: float32 rounding
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # the mixed models differ from the FP model (they read quantized features) and from each other
    assert all(not torch.allclose(mixed[b], fp_logits) for b in BLOCKS)
