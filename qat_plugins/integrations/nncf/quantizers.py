"""NNCF's fake quantizers: discovery, names, bit widths, range re-fits and LSQ's gradient scale.

NNCF keeps its quantizers under ``__nncf_hooks`` (weights: pre-hooks on port 1 of the op;
activations: post-hooks on the producing op). Reasoning and measurements: docs/nncf.md.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence, NamedTuple

import torch
from torch import nn

from ._compat import HOOKS_ATTR, check_bits, has_nncf_quantizers, hook_storage, is_nncf_model

__all__ = ["QuantizerInfo", "nncf_quantizers", "nncf_module_names", "resolve", "op_module_name",
           "set_quantizer_bits", "refit_weight_scale", "refit_activation_ranges", "quantizer_step",
           "install_lsq_grad_scale", "nncf_graph", "input_quantizer_map", "output_quantizer_map",
           "NNCFQuantizerFinder", "INPUT_MAP_ATTR"]

INPUT_MAP_ATTR = "qat_plugins_nncf_input_quantizers"  # {layer name: hook name} cached on the model


def op_module_name(op_name: str) -> str:
    """``"layer1/conv1/conv2d/0"`` -> ``"layer1.conv1"`` (module path of an NNCF op name)."""
    parts = op_name.split("/")
    return ".".join(parts[:-2]) if len(parts) > 2 else ""


def _decode(hook_key_path: str) -> tuple[str, str, int]:
    from nncf.torch.function_hook.hook_storage import decode_hook_name  # noqa: PLC0415

    return decode_hook_name(hook_key_path)


class QuantizerInfo(NamedTuple):
    """``(name, module)`` of one NNCF fake quantizer, plus derived facts as properties.

    ``name`` is the full module path (``model.get_submodule(name)`` works), e.g.
    ``"__nncf_hooks.pre_hooks.layer1/conv1/conv2d/0__1.0"``.
    """

    name: str
    module: nn.Module

    @property
    def hook_name(self) -> str:
        return self.name[len(HOOKS_ATTR) + 1:]

    @property
    def hook_type(self) -> str:
        return _decode(self.hook_name)[0]

    @property
    def op_name(self) -> str:
        return _decode(self.hook_name)[1]

    @property
    def port(self) -> int:
        return _decode(self.hook_name)[2]

    @property
    def module_name(self) -> str:
        """Original module the quantizer belongs to (weights: the layer; activations: the producer)."""
        return op_module_name(self.op_name)

    @property
    def kind(self) -> str:
        """``"weight"`` or ``"activation"``: weights are pre-hooks on port >= 1 whose spec forces a signed
        grid or has a per-channel scale (an ``add``'s second input is per-tensor and not sign-forced)."""
        if self.hook_type != "pre_hooks" or self.port < 1:
            return "activation"
        spec = self.module._qspec
        return "weight" if spec.signedness_to_force is True or len(tuple(spec.scale_shape)) > 1 else "activation"

    @property
    def num_bits(self) -> int:
        return int(self.module.num_bits)

    @property
    def level_low(self) -> int:
        return int(self.module.level_low)

    @property
    def level_high(self) -> int:
        return int(self.module.level_high)

    @property
    def levels(self) -> int:
        return self.level_high - self.level_low + 1

    @property
    def scheme(self) -> str:
        return "asymmetric" if type(self.module).__name__.startswith("Asymmetric") else "symmetric"

    @property
    def per_channel(self) -> bool:
        return bool(self.module.per_channel)

    @property
    def scale_params(self) -> list[nn.Parameter]:
        """Parameters holding the range (symmetric: scale; asymmetric: input_low, input_range)."""
        return [p for p in self.module.parameters(recurse=False) if p.is_floating_point()]

    @property
    def learnable(self) -> bool:
        ps = self.scale_params
        return bool(ps) and all(p.requires_grad for p in ps)


def nncf_quantizers(model: nn.Module) -> list[QuantizerInfo]:
    """All NNCF fake quantizers of ``model`` (:class:`QuantizerInfo`); shared modules listed once."""
    hs = hook_storage(model)
    from nncf.torch.quantization.layers import BaseQuantizer  # noqa: PLC0415

    return [QuantizerInfo(f"{HOOKS_ATTR}.{n}", m) for n, m in hs.named_hooks() if isinstance(m, BaseQuantizer)]


def nncf_module_names(model: nn.Module) -> list[str]:
    """Names of the user's modules in an NNCF model (the ``__nncf_hooks`` subtree left out)."""
    return [n for n, _ in model.named_modules() if n and n != HOOKS_ATTR and not n.startswith(HOOKS_ATTR + ".")]


def resolve(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name``: an original module name (``"layer2.conv1"``), an NNCF op name
    (``"layer2/conv1/conv2d/0"``) or a quantizer name. ``KeyError`` lists close matches."""
    if not isinstance(name, str):
        raise TypeError(f"module name must be a str, got {type(name).__name__}")
    mods = dict(model.named_modules())
    if name in mods:
        return mods[name]
    if "/" in name and not name.startswith(HOOKS_ATTR):
        mname = op_module_name(name)
        if mname in mods:
            return mods[mname]
    names = nncf_module_names(model)
    close = [n for n in names if name.split(".")[-1] in n.split(".")][:8] or names[:12]
    raise KeyError(f"no module {name!r} in {type(model).__name__}; modules include {close}")


def quantizer_step(q: nn.Module) -> torch.Tensor:
    """Grid step of an NNCF quantizer (keeps the gradient to its range parameters)."""
    if hasattr(q, "input_range"):
        return (q.input_range.abs() + q.eps) / (q.levels - 1)
    return (q.scale.abs() + q.eps) / max(1, int(q.level_high))


def set_quantizer_bits(info: QuantizerInfo | nn.Module, bits: int, *, weight: torch.Tensor | None = None) -> None:
    """Set one NNCF quantizer to ``bits`` (2..8), keeping its spec (and thus checkpoints) in sync.

    Weight quantizers below 8 bit use the full signed range ``[-2^(b-1), 2^(b-1)-1]`` (project choice,
    as the torch.ao path); pass ``weight`` to re-fit the per-channel scale by MSE. ``ValueError`` for
    other widths or for half-range (overflow-fix) quantizers.
    """
    check_bits(bits, "bits")
    q = info.module if isinstance(info, QuantizerInfo) else info
    is_weight = isinstance(info, QuantizerInfo) and info.kind == "weight"
    if getattr(q, "_half_range", False) and bits != q.num_bits:
        raise ValueError(
            f"quantizer {getattr(info, 'name', type(q).__name__)} uses NNCF's overflow fix (half range); "
            "cannot change its width; pass advanced_parameters with overflow_fix=OverflowFix.DISABLE")
    with torch.no_grad():
        if is_weight and bits < 8:
            q._narrow_range = False
            q._qspec.narrow_range = False
        q._qspec.num_bits = bits
        q.num_bits = bits  # the setter recomputes level_low / level_high
        if is_weight and weight is not None and bits < 8:
            refit_weight_scale(q, weight)


def _range_params(q: nn.Module) -> list[torch.Tensor]:
    """Storage tensors of the range: ``[scale]`` or ``[input_low, input_range]`` (linear storage only)."""
    if getattr(q, "_is_using_log_scale_storage", False):
        return []
    if hasattr(q, "_input_range_param_storage"):
        return [q.input_low, q._input_range_param_storage]
    return [q._scale_param_storage]


def _reduce_dims(param: torch.Tensor, x: torch.Tensor) -> list[int]:
    """Dims of ``x`` that share one range entry of ``param`` (all of them for a per-tensor range)."""
    if param.numel() == 1 or param.dim() != x.dim():
        return list(range(x.dim()))
    return [i for i in range(x.dim()) if param.shape[i] == 1]


@torch.no_grad()
def _search_ranges(q: nn.Module, x: torch.Tensor, ratios: Iterable[float]) -> None:
    """Shrink the quantizer's current range by each ratio; keep, per range entry (per tensor or per
    channel, whatever the range's shape is), the one with the lowest MSE on ``x``."""
    params = _range_params(q)
    if not params:
        return
    base = [p.data.clone() for p in params]
    dims = _reduce_dims(params[-1], x)
    best_err = None
    best = [b.clone() for b in base]
    for r in ratios:
        for p, b in zip(params, base):
            p.data.copy_(b * r)
        err = (q.quantize(x) - x).pow(2).mean(dim=dims, keepdim=True)  # the range's shape (or all-ones)
        if best_err is None:
            better = torch.ones_like(err, dtype=torch.bool)
            best_err = err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
        for bb, p in zip(best, params):
            bb.copy_(torch.where(better.reshape(p.shape) if better.numel() == p.numel() else better.reshape(()),
                                 p.data, bb))
    for p, bb in zip(params, best):
        p.data.copy_(bb)


def refit_weight_scale(q: nn.Module, weight: torch.Tensor) -> None:
    """Per-channel grid search of the weight range minimising the weight MSE (data-free)."""
    store = _range_params(q)
    if not store or store[-1].numel() != weight.shape[0]:
        return
    _search_ranges(q, weight.detach(), torch.linspace(0.1, 1.0, 37).tolist())


def _channel_dim(q: nn.Module, ndim: int) -> int | None:
    """The input dim a per-channel range runs along (``None``: per tensor). ``ValueError`` for a range
    that varies along more than one dim or does not match the input's rank."""
    params = _range_params(q)
    shape = tuple(params[-1].shape) if params else (1,)
    if math.prod(shape) == 1:
        return None
    dims = [i for i, n in enumerate(shape) if n != 1]
    if len(shape) != ndim or len(dims) != 1:
        raise ValueError(f"cannot re-fit a range of shape {shape} on a {ndim}-d input")
    return dims[0]


def _sample(x: torch.Tensor, ch: int | None, budget: int) -> torch.Tensor:
    """At most ~``budget`` values of ``x`` at a fixed stride (deterministic). Per tensor: flat; per channel
    along ``ch``: the same positions of every channel, shaped ``(M, C)`` with C moved to the end."""
    x = x.detach()
    if ch is None:
        flat = x.reshape(-1)
        return flat[:: math.ceil(flat.numel() / budget)].clone()
    rows = x.movedim(ch, -1).reshape(-1, x.shape[ch])
    return rows[:: math.ceil(rows.numel() / budget)].clone()


def _as_range_input(x: torch.Tensor, ch: int | None, ndim: int) -> torch.Tensor:
    """Captured ``(M, C)`` samples laid out to broadcast with a per-channel range along dim ``ch``:
    C at ``ch``, M at another dim, 1 elsewhere (the quantizer's output then has the input's shape)."""
    if ch is None:
        return x
    shape = [1] * ndim
    other = 0 if ch != 0 else 1
    shape[ch], shape[other] = x.shape[1], x.shape[0]
    return (x if other < ch else x.t()).contiguous().reshape(shape)


class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is not run."""


def _call_order(model: nn.Module, x: Any, quantizers: list[QuantizerInfo]) -> list[tuple[QuantizerInfo, int]]:
    """``quantizers`` in the order a forward on ``x`` first calls them, with their calls per forward."""
    calls: dict[str, int] = {}
    handles = []
    for qi in quantizers:
        def count(m: nn.Module, args: tuple[Any, ...], key: str = qi.name) -> None:
            calls[key] = calls.get(key, 0) + 1
        handles.append(qi.module.register_forward_pre_hook(count))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    by_name = {qi.name: qi for qi in quantizers}
    return [(by_name[k], n) for k, n in calls.items()]


def _capture(model: nn.Module, batches: list[Any], qi: QuantizerInfo, calls: int, budget: int
             ) -> tuple[list[torch.Tensor], int | None, int]:
    """Samples of ``qi``'s inputs over ``batches``; each forward stops after ``qi``'s last call."""
    captured: list[torch.Tensor] = []
    layout: dict[str, Any] = {"ch": None, "ndim": 0}
    seen = [0]

    def grab(m: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        layout["ch"], layout["ndim"] = _channel_dim(m, x.dim()), x.dim()
        captured.append(_sample(x, layout["ch"], budget))
        seen[0] += 1
        if seen[0] == calls:
            raise _StopForward

    handle = qi.module.register_forward_pre_hook(grab)
    try:
        for x in batches:
            seen[0] = 0
            try:
                model(x)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured, layout["ch"], layout["ndim"]


@torch.no_grad()
def refit_activation_ranges(model: nn.Module, batches: list[Any], quantizers: list[QuantizerInfo],
                            *, max_elements: int = 1 << 20) -> dict[str, tuple[float, float]]:
    """Re-fit activation quantizers' ranges at their current width by MSE on calibration activations.

    Greedy, in the order the forward calls them: each quantizer's inputs are captured (forward
    pre-hook) while the model runs the calibration ``batches`` in train mode (batch statistics; BN
    running statistics restored) with every quantizer at its target width and every earlier quantizer
    already re-fitted, so a range is fitted to the inputs it will see, not to inputs distorted by
    upstream ranges still at their 8-bit calibration. Each range is set to the shrink of its observed
    min/max range with the lowest quantization MSE (project choice: the criterion of the torch.ao
    path's ``init="mse"``), per tensor or, for NNCF's per-channel activation quantizers (e.g.
    depthwise-conv inputs), per channel; at most ``max_elements`` values per quantizer are kept (a
    fixed stride). Returns ``{name: (mse_before, mse_after)}`` (MSE over all kept values).
    """
    budget = max(1, max_elements // max(1, len(batches)))  # per batch and quantizer: bounded memory
    # train mode: BatchNorm normalises with batch statistics, as in every QAT step that follows; the
    # FP running statistics do not fit the low-bit network's outputs (docs/bn.md). They are restored.
    bn_state = {k: v.clone() for k, v in model.state_dict().items()
                if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    was = model.training
    model.train()
    out = {}
    try:
        order = _call_order(model, batches[0], quantizers) if batches else []
        for qi, calls in order:
            captured, ch, ndim = _capture(model, batches, qi, calls, budget)
            values = torch.cat(captured) if captured else None
            if values is None or not values.numel():
                continue
            x = _as_range_input(values, ch, ndim)
            q = qi.module
            _reset_range_to_minmax(q, x)
            before = float((q.quantize(x) - x).pow(2).mean())
            _search_ranges(q, x, torch.linspace(0.05, 1.0, 39).tolist())
            out[qi.name] = (before, float((q.quantize(x) - x).pow(2).mean()))
    finally:
        model.load_state_dict(bn_state, strict=False)
        model.train(was)
    return out


@torch.no_grad()
def _reset_range_to_minmax(q: nn.Module, x: torch.Tensor) -> None:
    """Start the search from the full observed range of ``x`` (min/max), per range entry (tensor or channel)."""
    params = _range_params(q)
    if not params:
        return
    dims = _reduce_dims(params[-1], x)
    shape = params[-1].shape
    lo = x.amin(dim=dims, keepdim=True).reshape(shape)
    hi = x.amax(dim=dims, keepdim=True).reshape(shape)
    if len(params) == 2:  # asymmetric: input_low, input_range
        lo = lo.clamp(max=0.0)
        params[0].data.copy_(lo)
        params[1].data.copy_((hi - lo).clamp(min=1e-8))
    elif q.signed:
        params[0].data.copy_(torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-8))
    else:
        params[0].data.copy_(hi.clamp(min=1e-8))


class _LSQGradScale:
    """Forward pre-hook of an NNCF quantizer: scales its range gradients so that SGD moves the grid step
    as LSQ does (step gradient times ``1/sqrt(N*Q_p)``); see docs/nncf.md for the factor."""

    def __init__(self) -> None:
        self.factor = 1.0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
            return
        params = [p for p in _range_params(module) if p.requires_grad]
        if not params:
            return
        n = args[0].numel() / max(1, params[-1].numel())
        qp = max(1, int(module.levels) - 1) if len(params) == 2 else max(1, int(module.level_high))
        # NNCF's parameter is the range (Q_p steps), so d/d(range) = d/d(step) / Q_p; the step then moves
        # by lr * factor * grad / Q_p^2, which is LSQ's lr * grad / sqrt(N * Q_p) for this factor
        self.factor = qp ** 1.5 / math.sqrt(max(n, 1.0))
        for p in params:
            hooks = getattr(p, "_backward_hooks", None) or {}
            if not any(isinstance(h, _ScaleGrad) for h in hooks.values()):
                p.register_hook(_ScaleGrad(self))


class _ScaleGrad:
    def __init__(self, owner: _LSQGradScale) -> None:
        self.owner = owner

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.owner.factor


def install_lsq_grad_scale(model: nn.Module, kinds: Sequence[str] = ("activation",)) -> int:
    """Give every NNCF quantizer of the given kinds LSQ's gradient scale (idempotent); returns how many.

    Default ``kinds`` (*project choice*): activations only. Weight quantizers keep NNCF's own gradient:
    they quantize the weights before BatchNorm, where LSQ's scale (derived for folded weights) made
    training unstable (measured, docs/nncf.md); ``kinds=("activation", "weight")`` is for experiments.
    """
    n = 0
    for qi in nncf_quantizers(model):
        if qi.kind not in kinds:
            continue
        hooks = qi.module._forward_pre_hooks.values()
        if not any(isinstance(h, _LSQGradScale) for h in hooks):
            qi.module.register_forward_pre_hook(_LSQGradScale())
        n += 1
    return n


def _walk_to_quantizer(graph: Any, op_name: str, max_depth: int = 8) -> str | None:
    """Hook name of the activation quantizer feeding port 0 of ``op_name`` (through flatten, view, ...)."""
    try:
        node = graph.get_node_by_name(op_name)
    except Exception:  # noqa: BLE001 - op not traced
        return None
    for _ in range(max_depth):
        act_edges = [e for e in graph.get_input_edges(node) if e.from_node.node_type != "nncf_model_const"]
        edges0 = [e for e in act_edges if e.input_port_id == 0] or act_edges
        if len(edges0) != 1:
            return None
        prev = edges0[0].from_node
        if prev.node_type.endswith("quantize"):
            return _quantizer_hook(graph, prev)
        if prev.node_type == "nncf_model_input":
            return None
        node = prev
    return None


def _quantizer_hook(graph: Any, qnode: Any) -> str | None:
    """Hook name of the quantizer behind an NNCF graph's quantize node."""
    for e in graph.get_input_edges(qnode):
        cname = e.from_node.node_name
        if e.from_node.node_type == "nncf_model_const" and cname.startswith(HOOKS_ATTR + "."):
            return cname[len(HOOKS_ATTR) + 1:].rsplit(".", 1)[0]
    return None


def _walk_from_output(graph: Any, op_name: str, max_depth: int = 8) -> list[str]:
    """Hook names of the activation quantizers on ``op_name``'s output, reached through single-consumer
    float ops (batch norm, ReLU, ...); empty when the output branches before any quantizer."""
    try:
        node = graph.get_node_by_name(op_name)
    except Exception:  # noqa: BLE001 - op not traced
        return []
    for _ in range(max_depth):
        nexts = [e.to_node for e in graph.get_output_edges(node)]
        hooks = [h for n in nexts if n.node_type.endswith("quantize") for h in [_quantizer_hook(graph, n)] if h]
        if hooks:
            return sorted(set(hooks))
        if len(nexts) != 1 or nexts[0].node_type == "nncf_model_output":
            return []
        node = nexts[0]
    return []


def nncf_graph(model: nn.Module, example_input: Any) -> Any:
    """NNCF's graph of ``model`` traced (eval mode, no grad) on ``example_input``; pass it to
    :func:`input_quantizer_map` / :func:`output_quantizer_map` to trace once for both."""
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph  # noqa: PLC0415

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return build_nncf_graph(model, example_input)
    finally:
        model.train(was)


def output_quantizer_map(model: nn.Module, example_input: Any, *, graph: Any = None) -> dict[str, list[str]]:
    """``{layer name: [hook names]}`` of the activation quantizers on each weight layer's output (after
    its batch norm / activation), read from NNCF's graph of ``model`` on ``example_input`` (or ``graph``)."""
    graph = nncf_graph(model, example_input) if graph is None else graph
    out: dict[str, list[str]] = {}
    for qi in nncf_quantizers(model):
        if qi.kind == "weight" and qi.module_name and qi.module_name not in out:
            out[qi.module_name] = _walk_from_output(graph, qi.op_name)
    return out


def input_quantizer_map(model: nn.Module, example_input: Any, *, graph: Any = None) -> dict[str, str]:
    """``{layer name: hook name}`` of the activation quantizer producing each weight layer's input,
    read from NNCF's graph of ``model`` on ``example_input`` (or ``graph``); cached on the model for the finder."""
    graph = nncf_graph(model, example_input) if graph is None else graph
    out: dict[str, str] = {}
    for qi in nncf_quantizers(model):
        if qi.kind == "weight" and qi.module_name and qi.module_name not in out:
            hook = _walk_to_quantizer(graph, qi.op_name)
            if hook is not None:
                out[qi.module_name] = hook
    model.__dict__[INPUT_MAP_ATTR] = dict(out)
    return out


class NNCFQuantizerFinder:
    """The NNCF entry of :func:`qat_plugins.quant.step_size.register_quantizer_finder`."""

    def applies(self, model: nn.Module) -> bool:
        return has_nncf_quantizers(model)

    def activation_quantizers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(q.name, q.module) for q in nncf_quantizers(model) if q.kind == "activation"]

    def input_quantizer(self, model: nn.Module, layer_name: str) -> nn.Module | None:
        if not is_nncf_model(model):
            return None
        hook = model.__dict__.get(INPUT_MAP_ATTR, {}).get(layer_name)
        if hook is None:
            return None
        q = hook_storage(model).get_submodule(hook)
        return q if hasattr(q, "num_bits") else None

    def step_size(self, quantizer: nn.Module) -> torch.Tensor | None:
        if type(quantizer).__module__.startswith("nncf.") and hasattr(quantizer, "num_bits"):
            return quantizer_step(quantizer)
        return None
