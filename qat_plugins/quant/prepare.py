"""``prepare_qat``: one call from an ordinary ``nn.Module`` to a torch.ao QAT model.

Modes:

* ``"eager"`` -- ``torch.ao.quantization.prepare_qat`` on a deep copy. conv-bn(-relu) runs found by
  tracing are fused first; an input ``QuantStub`` and output ``DeQuantStub`` are attached as
  submodules ``qat_input_quant`` / ``qat_output_dequant`` driven by hooks, so the user's module tree
  and names stay as they were. Residual adds and other float ops feeding a quantized layer get an
  output quantizer too (``docs/regularizers.md``), as the deployed int8 graph has; a
  ``FloatFunctional`` add followed by a ReLU is quantized as after the ReLU, as FX's add-relu.
* ``"fx"`` -- ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` (needs ``example_inputs``).
* ``"pt2e"`` -- torchao's ``prepare_qat_pt2e`` with :class:`qat_plugins.quant.pt2e.LowBitQuantizer`.

With ``keep_first_last_8bit`` the first and last conv/linear layers (in execution order) keep 8-bit
weights and outputs, as the papers do.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import FakeQuantizeBase

from .fake_quantize import quant_range
from .qconfig import qconfig as make_qconfig
from .step_size import grid_preserving, trace_quantized

__all__ = ["prepare_qat", "quantizable_layers", "quiet_deprecation", "fusion_groups", "MODES"]

MODES = ("eager", "fx", "pt2e")
_QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# averaging ops: their output gets its own quantizer in FX (torch.ao's native config shares the input's)
_AVERAGING = {nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d,
              nn.AvgPool3d, torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d,
              torch.nn.functional.adaptive_avg_pool3d, torch.nn.functional.avg_pool1d,
              torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d, torch.adaptive_avg_pool1d,
              torch.avg_pool1d, torch.mean, "mean"}


def fx_backend_config() -> Any:
    """torch.ao's native FX backend config, except that average pooling and ``mean`` quantize their
    output with a quantizer of their own instead of the input's: a mean of ``N`` values on one grid
    lands on an exact .5 tie for about ``1/N`` of the outputs, which float summation order then breaks
    differently in PyTorch and in ORT's integer kernel (docs/onnx_export.md). ORT's own quantizer
    gives pooling outputs their own scale too."""
    import torch.ao.quantization.backend_config.utils  # noqa: F401 - the native config needs it loaded
    from torch.ao.quantization.backend_config import BackendConfig, ObservationType, get_native_backend_config

    native = get_native_backend_config()
    out = BackendConfig(native.name)
    for cfg in native.configs:
        if cfg.pattern in _AVERAGING and cfg.observation_type == ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT:
            cfg.set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
        out.set_backend_pattern_config(cfg)
    return out


@contextlib.contextmanager
def quiet_deprecation() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation notice (noise for users of this package)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecat.*")
        warnings.filterwarnings("ignore", message=r".*erminology.*")
        yield


def _trace(model: nn.Module) -> torch.fx.GraphModule | None:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - untraceable models fall back to registration order
        return None


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of conv/linear modules in execution order (registration order if not traceable)."""
    gm = _trace(model)
    mods = dict(model.named_modules())
    if gm is not None:
        names = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        return [str(n) for n in names if isinstance(mods.get(str(n)), _QUANTIZABLE)]
    return [n for n, m in model.named_modules() if isinstance(m, _QUANTIZABLE)]


def _module_calls(graph: torch.fx.Graph) -> dict[str, int]:
    """How often each module is called in ``graph`` (by qualified name)."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    return calls


def fusion_groups(model: nn.Module, *, traced_only: bool = False) -> list[list[str]]:
    """conv->bn(->relu) runs where each intermediate output has one user (traced when possible).

    A conv or BN called more than once per forward is never fused. A ReLU may be shared (torchvision's
    one ``relu`` module per block): :func:`prepare_qat` fuses it and then puts the module back, see there.
    An untraceable model falls back to registration order (consecutive children), or gives no groups
    with ``traced_only=True``.
    """
    gm = _trace(model)
    if gm is None and traced_only:
        return []
    return _fusion_groups(model, gm)


def _fusion_groups(model: nn.Module, gm: torch.fx.GraphModule | None) -> list[list[str]]:
    mods = dict(model.named_modules())
    groups: list[list[str]] = []
    if gm is not None:
        calls = _module_calls(gm.graph)
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(mods.get(node.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                continue
            if calls[str(node.target)] != 1:
                continue
            group, cur = [node.target], node
            for want in ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), (nn.ReLU,)):
                users = list(cur.users)
                if len(users) != 1 or users[0].op != "call_module" or not isinstance(mods.get(users[0].target), want) \
                        or (calls[str(users[0].target)] != 1 and want[0] is not nn.ReLU):
                    break
                cur = users[0]
                group.append(cur.target)
            if len(group) > 1:
                groups.append(group)
        return groups
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if isinstance(child, nn.Conv2d) and i + 1 < len(children) and isinstance(children[i + 1][1], nn.BatchNorm2d):
                prefix = f"{parent_name}." if parent_name else ""
                group = [prefix + name, prefix + children[i + 1][0]]
                if i + 2 < len(children) and isinstance(children[i + 2][1], nn.ReLU):
                    group.append(prefix + children[i + 2][0])
                groups.append(group)
    return groups


def _input_quant_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (module.qat_input_quant(args[0]),) + tuple(args[1:])


def _output_dequant_hook(module: nn.Module, args: Any, output: Any) -> Any:
    return module.qat_output_dequant(output)


def _quantize_output_hook(module: nn.Module, args: Any, output: Any) -> Any:
    return module.activation_post_process(output)


def _output_exits(node: torch.fx.Node) -> list[str]:
    """Modules (innermost first) whose forward returns ``node``'s value: in its stack, not in a user's."""
    stack = [v[0] if isinstance(v, tuple) else str(k) for k, v in (node.meta.get("nn_module_stack") or {}).items()]
    for user in node.users:
        inner = {v[0] if isinstance(v, tuple) else str(k) for k, v in (user.meta.get("nn_module_stack") or {}).items()}
        exits = [m for m in stack if m not in inner]
        if exits:
            return exits[::-1]
    return []


_ELEMENTWISE_FUNCTIONS = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, torch.add,
                          torch.mul, torch.sub, torch.cat}
_ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}


def _is_tensor_op(node: torch.fx.Node) -> bool:
    """A residual add / elementwise product / concat of two or more graph tensors."""
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        args = node.args[0] if node.target is torch.cat else node.args[:2]
    elif node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        args = node.args[:2]
    else:
        return False
    return isinstance(args, (list, tuple)) and sum(isinstance(a, torch.fx.Node) for a in args) >= 2


def _placement(src: torch.fx.Node, chain: list[torch.fx.Node], modules: dict[str, nn.Module],
               module_ok: bool, calls: dict[str, int]) -> str | None:
    """Module whose output quantizer puts ``src``'s value (after the grid-preserving ``chain``) on a grid."""
    if src.op == "call_module":
        return str(src.target) if module_ok and calls.get(str(src.target), 0) == 1 else None
    # the module nearest the producer (the ReLU after a residual add), unless it is also called
    # elsewhere (torchvision's shared ``relu``: a quantizer there would requantize its other uses)
    leaves = [str(n.target) for n in chain if n.op == "call_module" and calls.get(str(n.target), 0) == 1]
    if leaves:
        return leaves[0]
    for n in [src] + chain:
        # a leaf's own name is in its stack: skip it (and leaves called more than once, as above)
        exits = [e for e in _output_exits(n) if e and e in modules and e != str(n.target) and calls.get(e, 1) == 1]
        if exits:
            return exits[0]
    return None


_Traced = tuple[torch.fx.Graph, dict[str, nn.Module], dict[str, int]]


def _traced(m: nn.Module) -> _Traced | None:
    """The eager QAT model's traced graph, its modules by name, and how often each module is called."""
    graph = trace_quantized(m)
    if graph is None:
        return None
    return graph, dict(m.named_modules(remove_duplicate=False)), _module_calls(graph)


def _relu_input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (torch.relu(args[0]),) + tuple(args[1:])


def _quantize_after_relu(traced: _Traced) -> list[str]:
    """Let the output quantizer of a ``FloatFunctional`` op followed only by a ReLU see the ReLU'd value.

    Eager torch.ao quantizes ``self.add.add(out, identity)`` before the block's ReLU: its grid is fitted
    to (and its zero point placed in) the negative values the ReLU then zeroes, which wastes levels (at
    2 bit, one of four). FX's add-relu pattern, PT2E and NNCF quantize after the ReLU. A forward
    pre-hook that applies the ReLU to the quantizer's input does the same here: values and gradients
    equal FX's, the ReLU module after it becomes a no-op, and the grid (zero point at its minimum)
    stays where torch.ao ``convert`` reads it (``QFunctional.add`` then clamps exactly as the ReLU).
    Returns the names of the quantizers given the hook.
    """
    graph, modules, calls = traced
    hooked = []
    for node in graph.nodes:
        owner, _, attr = str(node.target).rpartition(".")
        fq = modules.get(str(node.target)) if node.op == "call_module" else None
        if (not isinstance(fq, FakeQuantizeBase) or attr != "activation_post_process" or len(node.users) != 1
                or not isinstance(modules.get(owner), FloatFunctional) or calls[str(node.target)] != 1):
            continue
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(modules.get(str(user.target)), nn.ReLU):
            fq.register_forward_pre_hook(_relu_input_hook)
            hooked.append(str(node.target))
    return hooked


def _quantize_float_producers(m: nn.Module, traced: _Traced) -> list[str]:
    """Quantize the outputs eager torch.ao leaves float although the deployed int8 graph needs them.

    torch.ao's eager ``prepare_qat`` quantizes module outputs only, so a plain ``out + identity`` (and
    any other elementwise op, or an unquantized module feeding a conv) stays off any grid. Each such
    value, followed through grid-preserving ops (ReLU, max-pool, reshapes), gets an output quantizer on
    the producing module itself (modules feeding a conv), else on the first module of that chain (the
    ReLU after a residual add, as FX's add-relu pattern), else on the innermost module whose forward
    returns the value (a block ending in ``F.relu(out + x)``). Returns the names of the modules given
    one; warns for a value no module returns. ``traced`` is ``_traced(m)``: the pre-hooks of
    :func:`_quantize_after_relu` leave it valid.
    """
    graph, modules, calls = traced
    placed: dict[str, nn.Module] = {}

    def is_quantizer(n: Any) -> bool:
        return isinstance(n, torch.fx.Node) and n.op == "call_module" and \
            isinstance(modules.get(str(n.target)), FakeQuantizeBase)

    def place(src: torch.fx.Node, chain: list[torch.fx.Node], qc: Any, module_ok: bool, what: str) -> None:
        target = _placement(src, chain, modules, module_ok, calls)
        if target is None:
            if src.op != "call_module":
                warnings.warn(f"prepare_qat(mode='eager'): {what} comes from {src.target} outside any module "
                              "and stays unquantized; use mode='fx' or move the op into a module", stacklevel=4)
            return
        mod = modules[target]
        if target in placed or qc is None or isinstance(getattr(mod, "activation_post_process", None), FakeQuantizeBase):
            return
        mod.activation_post_process = qc.activation()
        mod.register_forward_hook(_quantize_output_hook)
        placed[target] = mod

    default_qc = getattr(m, "qconfig", None)
    # 1. inputs of quantized layers
    for node in graph.nodes:
        layer = modules.get(str(node.target)) if node.op == "call_module" else None
        if layer is None or not isinstance(getattr(layer, "weight_fake_quant", None), nn.Module) or not node.args:
            continue
        chain, src = [], node.args[0]
        while isinstance(src, torch.fx.Node) and grid_preserving(src, modules):
            chain.append(src)
            src = src.args[0] if src.args else None
        if not isinstance(src, torch.fx.Node) or src.op in ("placeholder", "get_attr") or is_quantizer(src):
            continue
        place(src, chain[::-1], getattr(layer, "qconfig", default_qc),
              isinstance(layer, nn.modules.conv._ConvNd), f"the input of {node.target!r}")
    # 2. every other residual add / product / concat (QLinearAdd etc. in the deployed graph)
    for node in graph.nodes:
        if not _is_tensor_op(node):
            continue
        chain, cur = [], node
        while len(cur.users) == 1 and grid_preserving(next(iter(cur.users)), modules):
            cur = next(iter(cur.users))
            chain.append(cur)
        if any(is_quantizer(u) for u in cur.users):
            continue
        place(node, chain, default_qc, False, f"the output of {node.name!r}")
    return list(placed)


def _check_args(weight_bits: Any, act_bits: Any, mode: Any) -> None:
    for name, bits, signed in (("weight_bits", weight_bits, True), ("act_bits", act_bits, False)):
        try:
            quant_range(bits, signed)
        except (TypeError, ValueError) as e:  # name the argument
            raise type(e)(f"{name}: {e}") from None
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


def prepare_qat(
    model: nn.Module,
    *,
    weight_bits: int = 8,
    act_bits: int = 8,
    mode: str = "eager",
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    keep_first_last_8bit: bool = True,
    per_channel: bool = True,
    learnable: bool = True,
    reduce_range: bool = False,
    init: str = "mse",
    calib_samples: int = 0,
) -> nn.Module:
    """Return a QAT-prepared copy of ``model`` in train mode (``model`` itself is left unchanged).

    Args:
        model: an ordinary float ``nn.Module`` (no QuantStub edits needed).
        weight_bits, act_bits: bit widths 2..8.
        mode: ``"eager"``, ``"fx"`` or ``"pt2e"`` (torchao's PT2E flow).
        example_inputs: a tensor or tuple of inputs; required for ``"fx"`` and ``"pt2e"``.
        keep_first_last_8bit: keep the first and last conv/linear at 8 bit.
        per_channel: per-output-channel weight scales.
        learnable: LSQ learned step sizes (``False``: min/max baseline quantizers).
        init, calib_samples: LSQ scale initialisation (eager / FX): ``"mse"`` on the first batch
            (default, project choice), ``"minmax"`` (with ``calib_samples=100``: min/max over the first
            100 images, FPQ's base QAT) or ``"lsq"`` (``2 mean|x| / sqrt(Q_p)``, LSQ paper).
        reduce_range: train 8-bit weights on the 7-bit grid [-64, 63] (*project choice*, default off),
            for ONNX Runtime on x86 CPUs without VNNI (see ``qat_plugins.quant.qconfig.weight_fake_quant``).

    Raises:
        ValueError / TypeError: bad bit widths or mode, missing ``example_inputs``, or a model FX
            cannot trace (the message says what to change).
    """
    _check_args(weight_bits, act_bits, mode)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if mode in ("fx", "pt2e") and example_inputs is None:
        raise ValueError(f"mode={mode!r} needs example_inputs (e.g. a batch of inputs as a tuple)")
    qc = make_qconfig(weight_bits, act_bits, per_channel=per_channel, learnable=learnable, reduce_range=reduce_range,
                      init=init, calib_samples=calib_samples)
    qc8 = make_qconfig(8, 8, per_channel=per_channel, learnable=learnable, reduce_range=reduce_range, init=init,
                       calib_samples=calib_samples)
    layers = quantizable_layers(model)
    keep8 = [layers[0], layers[-1]] if keep_first_last_8bit and layers else []

    if mode == "pt2e":
        from .pt2e import prepare_qat_pt2e_model

        return prepare_qat_pt2e_model(model, tuple(example_inputs), weight_bits=weight_bits,
                                      act_bits=act_bits, keep_8bit=keep8, per_channel=per_channel,
                                      learnable=learnable, reduce_range=reduce_range)
    m = copy.deepcopy(model).train()
    with quiet_deprecation():
        if mode == "fx":
            from torch.ao.quantization.quantize_fx import prepare_qat_fx

            mapping = torch.ao.quantization.QConfigMapping().set_global(qc)
            for name in keep8:
                mapping.set_module_name(name, qc8)
            try:
                prepared = prepare_qat_fx(m, mapping, tuple(example_inputs), backend_config=fx_backend_config())
            except (torch.fx.proxy.TraceError, TypeError, NotImplementedError) as e:
                raise ValueError(
                    f"FX cannot trace {type(model).__name__} ({type(e).__name__}: {e}); use mode='eager', "
                    "or make forward free of data-dependent Python control flow") from e
            return prepared.train()

        from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules_qat, prepare_qat as ao_prepare_qat

        gm = _trace(m)  # one float trace for the fusion groups and the shared modules
        groups = _fusion_groups(m, gm)
        if groups:
            # a ReLU module called again elsewhere (torchvision's shared ``relu``) is fused into its conv
            # like FX does, then put back: fusion replaces it by an Identity, which would delete its other
            # uses (the ReLU after the residual add); re-applying it after the fused conv-bn-relu is exact
            shared = {n for n, c in _module_calls(gm.graph).items() if c > 1} if gm is not None else set()
            keep = {n: m.get_submodule(n) for g in groups for n in g[2:] if n in shared}
            m = fuse_modules_qat(m, groups, inplace=False)
            for name, relu in keep.items():
                parent, _, child = name.rpartition(".")
                setattr(m.get_submodule(parent) if parent else m, child, copy.deepcopy(relu))
        m.qconfig = qc  # type: ignore[assignment]
        for name in keep8:
            m.get_submodule(name).qconfig = qc8  # type: ignore[assignment]
        m.qat_input_quant = QuantStub(qc8)
        m.qat_output_dequant = DeQuantStub()
        ao_prepare_qat(m, inplace=True)
        traced = _traced(m)  # one trace for both placement passes (untraceable: torch.ao's placement)
        if traced is not None:
            _quantize_after_relu(traced)
            _quantize_float_producers(m, traced)
        m.register_forward_pre_hook(_input_quant_hook)
        m.register_forward_hook(_output_dequant_hook)
        return m.train()
