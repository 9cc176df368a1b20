"""Which activation fake quantizer feeds which layer, and its step size, found from model structure.

Built in: torch.ao quantizers of eager and FX models (the data flow comes from an FX trace of the
prepared model). Integrations (NNCF) plug in a :class:`QuantizerFinder` with
:func:`register_quantizer_finder`; the core never imports them. See ``docs/regularizers.md``.
"""

from __future__ import annotations

import operator
import weakref
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

from ..taps import exclusive, graph_convs, unwrap

__all__ = ["QuantizerFinder", "register_quantizer_finder", "unregister_quantizer_finder", "activation_quantizers",
           "weight_quantizers", "input_quantizer", "step_size", "grid_preserving", "trace_quantized"]


@runtime_checkable
class QuantizerFinder(Protocol):
    """What an integration (e.g. NNCF) implements so the core can find its quantizers."""

    def applies(self, model: nn.Module) -> bool: ...

    def activation_quantizers(self, model: nn.Module) -> list[tuple[str, nn.Module]]: ...

    def input_quantizer(self, model: nn.Module, layer_name: str) -> nn.Module | None: ...

    def step_size(self, quantizer: nn.Module) -> torch.Tensor | None: ...


_FINDERS: list[QuantizerFinder] = []


def register_quantizer_finder(finder: QuantizerFinder) -> None:
    """Add ``finder``; it is asked before the built-in torch.ao logic (latest registered first).

    Registering an instance of a class already registered replaces the old instance.
    """
    for name in ("applies", "activation_quantizers", "input_quantizer", "step_size"):
        if not callable(getattr(finder, name, None)):
            raise TypeError(f"a QuantizerFinder needs a method {name}(); {type(finder).__name__} has none")
    _FINDERS[:] = [f for f in _FINDERS if type(f) is not type(finder)]
    _FINDERS.append(finder)


def unregister_quantizer_finder(finder: QuantizerFinder) -> None:
    """Remove ``finder`` (no error if it is not registered)."""
    _FINDERS[:] = [f for f in _FINDERS if f is not finder]


def _finder_for(model: nn.Module) -> QuantizerFinder | None:
    for f in reversed(_FINDERS):
        if f.applies(model):
            return f
    return None


# --- built-in: torch.ao fake quantizers ---------------------------------------------------------
def _is_weight_name(name: str) -> bool:
    return name.endswith("weight_fake_quant") or "weight" in name.rsplit(".", 1)[-1]


def _is_act_quantizer(name: str, m: nn.Module) -> bool:
    # weights are signed (qint8) in every qconfig of this package and torch.ao's defaults
    return (isinstance(m, FakeQuantizeBase) and not _is_weight_name(name)
            and getattr(m, "dtype", None) in (torch.quint8, torch.uint8))


def activation_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every activation fake quantizer of ``model``."""
    model = unwrap(model)
    finder = _finder_for(model)
    if finder is not None:
        return list(finder.activation_quantizers(model))
    return [(n, m) for n, m in model.named_modules() if _is_act_quantizer(n, m)]


def weight_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every torch.ao weight fake quantizer of ``model``."""
    model = unwrap(model)
    act_ids = {id(m) for _, m in activation_quantizers(model)}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizeBase) and id(m) not in act_ids]


def step_size(quantizer: nn.Module) -> torch.Tensor | None:
    """The quantization step of a fake quantizer (carries gradient for learnable ones), or ``None``."""
    if isinstance(quantizer, FakeQuantizeBase):
        s = getattr(quantizer, "scale", None)
        if isinstance(s, torch.Tensor):
            return s.abs()
        try:
            return quantizer.calculate_qparams()[0]
        except (RuntimeError, AttributeError, TypeError):
            return None
    for f in reversed(_FINDERS):
        s = f.step_size(quantizer)
        if s is not None:
            return s
    return None


# ops after which a tensor stays on the grid of the quantizer before them
_GRID_MODULES: tuple[type, ...] = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                                   nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Identity,
                                   nn.Dropout, nn.Dropout2d, nn.Unflatten)
_GRID_FUNCTIONS: set[Any] = {F.relu, torch.relu, torch.flatten, torch.reshape, F.max_pool1d, F.max_pool2d,
                             F.max_pool3d, F.adaptive_max_pool2d, F.dropout, operator.getitem, torch.squeeze,
                             torch.unsqueeze, torch.permute, torch.transpose}
_aten = torch.ops.aten
_GRID_FUNCTIONS |= {_aten.relu.default, _aten.relu_.default, _aten.max_pool2d.default, _aten.view.default,
                    _aten.reshape.default, _aten.flatten.using_ints, _aten._unsafe_view.default, _aten.clone.default,
                    _aten.dropout.default, _aten.max_pool2d_with_indices.default}
_GRID_METHODS = {"relu", "relu_", "view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze",
                 "unsqueeze", "__getitem__"}


def grid_preserving(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True if ``node``'s output lies on the grid of its first input (ReLU, max-pool, reshapes, ...)."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return type(mod).__name__ == "DeQuantStub" or (isinstance(mod, _GRID_MODULES) and
                                                       not isinstance(mod, FakeQuantizeBase))
    if node.op == "call_function":
        return node.target in _GRID_FUNCTIONS
    if node.op == "call_method":
        return node.target in _GRID_METHODS
    return False


class _EagerTracer(torch.fx.Tracer):
    """Traces an eager QAT model, making the quantizers its hooks apply visible as graph nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # torch.ao's fused QAT modules (ConvBnReLU2d, ...) subclass Sequential but run as one layer
        return (isinstance(m, FakeQuantizeBase) or isinstance(getattr(m, "weight_fake_quant", None), nn.Module)
                or super().is_leaf_module(m, qualname))

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        app = getattr(m, "activation_post_process", None)
        # eager torch.ao (and prepare_qat's output quantizers) apply ``activation_post_process`` to
        # the module's output in a forward hook, which tracing runs for traced-through modules but not
        # for leaves; FloatFunctional calls it inside its methods instead
        if (isinstance(app, FakeQuantizeBase) and m._forward_hooks and type(m).__name__ != "FloatFunctional"
                and self.is_leaf_module(m, self.path_of_module(m))):
            out = self.create_proxy("call_module", self.path_of_module(app), (out,), {})
        return out


_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], torch.fx.Graph | None]]" = \
    weakref.WeakKeyDictionary()


def trace_quantized(model: nn.Module) -> torch.fx.Graph | None:
    """FX trace of an eager QAT model with hook-applied quantizers as nodes (``None``: untraceable)."""
    was_training = model.training
    try:
        with exclusive(model):  # tracing runs the hooks of traced-through modules: keep taps out
            return _EagerTracer().trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: no structural answer
        return None
    finally:
        model.train(was_training)


def _graph(model: nn.Module) -> torch.fx.Graph | None:
    """The data-flow graph of ``model``: its own graph (FX) or a trace (eager; ``None`` if untraceable)."""
    if isinstance(model, torch.fx.GraphModule):
        return model.graph
    key = tuple(id(m) for m in model.modules())
    cached = _GRAPHS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    graph = trace_quantized(model)
    _GRAPHS[model] = (key, graph)
    return graph


def quantizer_feeding(model: nn.Module, node: torch.fx.Node) -> nn.Module | None:
    """The activation fake quantizer whose grid the first input of graph ``node`` lies on (``None``: none),
    walking back through grid-preserving ops; ``model`` is the module the graph calls into."""
    modules = dict(model.named_modules(remove_duplicate=False))  # FX shares a quantizer under several names
    src = node.args[0] if node.args else None
    while isinstance(src, torch.fx.Node):
        if src.op == "call_module":
            mod = modules.get(str(src.target))
            if isinstance(mod, FakeQuantizeBase):
                return mod if _is_act_quantizer(str(src.target), mod) else None
        if src.op == "placeholder":
            # prepare_qat's eager input QuantStub runs in a pre-hook of the model
            stub = getattr(model, "qat_input_quant", None)
            app = getattr(stub, "activation_post_process", None)
            return app if isinstance(app, FakeQuantizeBase) else None
        if not grid_preserving(src, modules):
            return None
        src = src.args[0] if src.args else None
    return None


def _builtin_input_quantizer(model: nn.Module, layer_name: str) -> nn.Module | None:
    graph = _graph(model)
    if graph is None:
        return None
    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == layer_name), None)
    if node is None and isinstance(model, torch.fx.GraphModule):  # PT2E: the conv is an aten op
        node = graph_convs(model).get(layer_name)
    if node is None:
        return None
    return quantizer_feeding(model, node)


def input_quantizer(model: nn.Module, layer_name: str) -> nn.Module | None:
    """The activation fake quantizer that produced the input of layer ``layer_name`` (``None``: none).

    Walks back from the layer through grid-preserving ops (ReLU, max-pool, reshapes) in the model's
    FX graph (eager models are traced, their hook-applied quantizers made explicit).
    """
    model = unwrap(model)
    finder = _finder_for(model)
    if finder is not None:
        return finder.input_quantizer(model, layer_name)
    return _builtin_input_quantizer(model, layer_name)
