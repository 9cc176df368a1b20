"""Feature taps: name resolution on float / eager / FX models, recording rules, hook hygiene."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qat_plugins as qp
from qat_plugins.models import SmallCNN, SmallResNet
from qat_plugins.quant import LSQFakeQuantize
from qat_plugins.taps import (
    _OUR_HOOK_IDS,
    FeatureTap,
    TapSite,
    conv_layers,
    default_feature_layers,
    find_site,
    preact_site,
    strip_hooks,
    unwrap,
)


@pytest.fixture(scope="module")
def x(digits):
    return digits.train.tensors[0][:32]


class _Copies(dict):
    """name -> a deep copy of the module-scoped model, made on first access in a test: tests run
    train-mode forwards (BN statistics, quantizer state) and attach hooks, so none sees another's."""

    def __init__(self, originals: dict) -> None:
        super().__init__()
        self._originals = originals

    def __missing__(self, key):
        self[key] = copy.deepcopy(self._originals[key])
        return self[key]


@pytest.fixture
def models(_built_models):
    return _Copies(_built_models)


@pytest.fixture(scope="module")
def _built_models(x):
    """name -> model: float, eager-prepared and FX-prepared SmallResNet / SmallCNN (W4A4)."""
    torch.manual_seed(0)
    out = {}
    for key, cls in (("resnet", SmallResNet), ("cnn", SmallCNN)):
        fp = cls(width=8)
        out[f"{key}-float"] = fp
        for mode in ("eager", "fx"):
            q = qp.prepare_qat(fp, weight_bits=4, act_bits=4, mode=mode, example_inputs=(x,))
            q(x)  # initialise the quantizers
            out[f"{key}-{mode}"] = q
    return out


def hook_snapshot(model: nn.Module) -> dict[str, tuple]:
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._forward_hooks_with_kwargs))
            for n, m in model.named_modules()}


def _capture(module: nn.Module, side: str, store: list):
    if side == "input":
        return module.register_forward_pre_hook(lambda m, a: store.append(a[0].detach().clone()))
    return module.register_forward_hook(lambda m, a, o: store.append(o.detach().clone()))


# --- find_site ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["float", "eager", "fx"])
def test_find_site_leaf_names(models, kind):
    for key in ("resnet", "cnn"):
        m = models[f"{key}-{kind}"]
        for name in ("conv1", "fc"):
            site = find_site(m, name)
            assert isinstance(site, TapSite)
            assert site.module is m.get_submodule(name) and site.side == "output" and site.occurrence == 0
            assert site.name == name
        site = find_site(m, "fc:input")
        assert site.module is m.get_submodule("fc") and site.side == "input" and site.name == "fc:input"
        assert find_site(m, "fc", side="input").side == "input"
        out = find_site(m, "output")
        assert out.module is m and out.side == "output"


@pytest.mark.parametrize("kind", ["float", "eager"])
def test_find_site_container_in_module_tree(models, kind):
    m = models[f"resnet-{kind}"]
    site = find_site(m, "layer1")
    assert site.module is m.layer1 and site.side == "output"
    assert find_site(m, "layer2:input").module is m.layer2
    assert find_site(m, "layer2:input").side == "input"


def test_find_site_container_in_fx_graph_is_the_fake_quantizer_after_the_block(models, x):
    gm = models["resnet-fx"]
    assert isinstance(gm, torch.fx.GraphModule)
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert "layer1" not in called  # the block is inlined: no module call to hook
    for block, nxt in (("layer1", "layer2.conv1"), ("layer2", "layer3.conv1")):
        site = find_site(gm, block)
        assert isinstance(site.module, LSQFakeQuantize) and site.side == "output"
        # the recorded feature is exactly what the next block reads
        seen, read = [], []
        h1 = _capture(site.module, "output", seen)
        h2 = _capture(gm.get_submodule(nxt), "input", read)
        try:
            gm(x)
        finally:
            h1.remove()
            h2.remove()
        assert torch.equal(seen[site.occurrence], read[0])
        # it is on the 4-bit activation grid
        s = float(site.module.scale.detach())
        q = seen[site.occurrence] / s + site.module.zero_point
        assert torch.allclose(q, q.round(), atol=1e-3) and q.max() <= 15
    # ":input" of an inlined block: the input of its first module
    site = find_site(gm, "layer1:input")
    assert site.module is gm.get_submodule("layer1.conv1") and site.side == "input"


def test_find_site_on_wrapped_model(models):
    m = models["resnet-eager"]
    wrapped = nn.DataParallel(m)  # CPU only: a plain wrapper with ``.module``
    assert unwrap(wrapped) is m
    assert find_site(wrapped, "layer1.conv1").module is m.layer1.conv1


@pytest.mark.parametrize("kind", ["float", "eager", "fx"])
def test_unknown_name_lists_close_matches(models, kind):
    m = models[f"resnet-{kind}"]
    with pytest.raises(ValueError, match=r"'layer4' not found.*did you mean.*'layer[123]'") as e:
        find_site(m, "layer4")
    msg = str(e.value)
    assert "layer1" in msg and "known:" in msg
    with pytest.raises(ValueError, match="did you mean.*'layer1.conv1'"):
        find_site(m, "layer1.conv9")
    with pytest.raises(ValueError, match="side must be"):
        find_site(m, "conv1", side="middle")
    with pytest.raises(ValueError, match="not found"):
        FeatureTap(m, ["nonexistent_module_xyz"])


def test_fx_fused_away_names_are_rejected_with_a_hint(models):
    # bn1 / relu1 vanish into the fused ConvBnReLU2d in the FX graph
    with pytest.raises(ValueError, match="did you mean.*'conv1'"):
        find_site(models["cnn-fx"], "bn1")


def test_conv_layers_default_feature_layers_and_preact_site(models):
    for kind in ("float", "eager", "fx"):
        m = models[f"cnn-{kind}"]
        assert conv_layers(m) == ["conv1", "conv2", "conv3"]
        assert default_feature_layers(m) == ["output", "fc:input"]
    q = models["cnn-eager"]
    site = preact_site(q, "conv2")  # fused ConvBnReLU2d: the pre-BN feature is the bn child's input
    assert site.module is q.conv2.bn and site.side == "input"
    fp = models["cnn-float"]
    assert preact_site(fp, "conv2").module is fp.conv2 and preact_site(fp, "conv2").side == "output"


# --- FeatureTap -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["eager", "fx"])
def test_tap_records_only_in_train_mode_with_grad(models, x, kind):
    m = copy.deepcopy(models[f"resnet-{kind}"])
    tap = FeatureTap(m, ["layer1", "fc:input", "output"])
    try:
        m.eval()
        m(x)
        assert tap.features == {}
        m.train()
        with torch.no_grad():
            m(x)
        assert tap.features == {}
        out = m(x)
        assert set(tap.features) == {"layer1", "fc:input", "output"}
        assert torch.equal(tap.features["output"], out)
        assert tap.features["fc:input"].shape == (32, 32)
        assert tap.features["layer1"].shape == (32, 8, 8, 8)
        assert tap.features["layer1"].requires_grad  # recorded with its graph: usable in a loss
        tap.clear()
        tap.enabled = False
        m(x)
        assert tap.features == {}
        always = FeatureTap(m, ["fc:input"], always=True)
        m.eval()
        with torch.no_grad():
            m(x)
        assert set(always.features) == {"fc:input"}
        always.remove()
    finally:
        tap.remove()


def test_tap_transform_rewrites_the_forward_and_respects_mode(models, x):
    m = copy.deepcopy(models["cnn-eager"])
    tap = FeatureTap(m, ["fc:input"], record=False, transform=lambda name, t: torch.zeros_like(t))
    try:
        m.train()
        out = m(x)
        # zero input to fc -> every row equals the (fake-quantized) bias
        assert torch.allclose(out, out[:1].expand_as(out))
        m.eval()
        with torch.no_grad():
            with_tap = m(x)  # inactive in eval mode
    finally:
        tap.remove()
    with torch.no_grad():
        assert torch.equal(with_tap, m(x))
    assert not torch.allclose(with_tap, with_tap[:1].expand_as(with_tap))


@pytest.mark.parametrize("kind", ["float", "eager", "fx"])
def test_remove_leaves_no_hooks(models, x, kind):
    m = models[f"resnet-{kind}"]
    before = hook_snapshot(m)
    ids_before = set(_OUR_HOOK_IDS)
    taps = [FeatureTap(m, ["layer1", "layer2:input", "fc:input", "output"]),
            FeatureTap(m, ["conv1"], record=False, transform=lambda n, t: t)]
    assert hook_snapshot(m) != before
    m.train()
    m(x)
    for t in taps:
        t.remove()
        t.remove()  # idempotent
    assert hook_snapshot(m) == before
    assert set(_OUR_HOOK_IDS) == ids_before
    assert taps[0].features == {}


def test_strip_hooks_removes_only_our_hooks(models, x):
    m = copy.deepcopy(models["resnet-eager"])
    theirs = []
    user_hook = m.layer1.register_forward_hook(lambda mod, a, o: theirs.append(1))
    before = hook_snapshot(m)  # includes prepare_qat's own input/output hooks and torch.ao observer hooks
    tap = FeatureTap(m, ["layer1", "fc:input"])
    copy_ = strip_hooks(copy.deepcopy(m))
    assert hook_snapshot(copy_) == before
    # the copy still quantizes its input/output (prepare_qat's hooks kept) and runs the user's hook
    copy_.eval()
    m.eval()
    with torch.no_grad():
        assert torch.equal(copy_(x), m(x))
    assert len(theirs) == 2
    # the original keeps its tap
    m.train()
    m(x)
    assert set(tap.features) == {"layer1", "fc:input"}
    tap.remove()
    user_hook.remove()


def test_occurrence_of_a_shared_quantizer_in_fx(models, x):
    """FX may call one activation quantizer several times (e.g. ``layer1.shortcut`` is an Identity whose
    output shares the stem's quantizer); a site counts calls so only the requested call is read."""
    gm = models["resnet-fx"]
    calls: dict[int, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            k = id(gm.get_submodule(str(n.target)))
            calls[k] = calls.get(k, 0) + 1
    shared = [k for k, c in calls.items() if c > 1]
    assert shared, "expected a quantizer called more than once in the FX graph"
    site = find_site(gm, "layer3")
    tap = FeatureTap(gm, ["layer3"])
    seen = []
    h = _capture(site.module, "output", seen)  # every call of the shared quantizer, in one forward
    try:
        gm.train()
        gm(x)
        got = tap.features["layer3"]
    finally:
        h.remove()
        tap.remove()
    assert len(seen) == calls[id(site.module)] >= 1
    # the tap holds exactly the requested call's output (layer3's), not another call's
    assert torch.equal(got, seen[site.occurrence])
    others = [t for i, t in enumerate(seen) if i != site.occurrence]
    assert all(t.shape != seen[site.occurrence].shape or not torch.equal(t, seen[site.occurrence]) for t in others)
