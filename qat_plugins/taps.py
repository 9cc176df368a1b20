"""Feature taps: forward hooks that read (or rewrite) named features of a model.

Layers are addressed by the names of the *original* model (``model.named_modules()`` names). The
same name works on

* eager ``prepare_qat`` models (module names are kept),
* FX / PT2E ``GraphModule`` s, where a container such as ``layer1`` is no longer called: the tap
  sits on the graph node that ends the container (found through ``node.meta["nn_module_stack"]``),
  moved past the fake quantizer that consumes it, so the feature is what the next block reads,
* NNCF models (module names are kept; NNCF's quantizers hang under ``__nncf_hooks``),
* ``DistributedDataParallel`` wrappers (names of the wrapped module).

A tap records only while the model is in training mode with gradients enabled, so evaluation and
``torch.no_grad()`` pay nothing and see unchanged outputs. Inside :func:`exclusive` only the listed
taps of a model act (regularizers' extra forwards never touch other regularizers' features). Every handle a tap registers is kept and
removed by :meth:`FeatureTap.remove`; :func:`strip_hooks` removes this package's hooks from a deep
copy (used for EMA teachers).
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = ["unwrap", "FeatureTap", "TapSite", "find_site", "strip_hooks", "default_feature_layers",
           "conv_layers", "preact_site", "first_tensor", "exclusive", "graph_convs", "GraphSplice"]

_OUR_HOOK_IDS: set[int] = set()
# id(model) -> stack of the tap ids allowed to act on it (innermost exclusive() block last)
_SCOPES: dict[int, list[frozenset[int]]] = {}
_QUANT_MODULE_PREFIXES = ("activation_post_process",)


@contextlib.contextmanager
def exclusive(model: nn.Module, keep: Iterable["FeatureTap"] = ()) -> Iterator[None]:
    """Within the block only the taps in ``keep`` act on ``model``; all others neither record nor rewrite.

    Regularizers run their loss inside ``exclusive(model)`` and each extra forward (a strongly
    augmented view, ...) inside ``exclusive(model, [own taps])``, so the features other regularizers
    recorded in the user's training forward stay untouched and no other transform (SFP noise) fires.
    """
    key = id(unwrap(model))
    stack = _SCOPES.setdefault(key, [])
    stack.append(frozenset(id(t) for t in keep))
    try:
        yield
    finally:
        stack.pop()
        if not stack:
            _SCOPES.pop(key, None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def first_tensor(x: Any) -> torch.Tensor:
    """The first tensor of a (possibly nested) module output."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x:
        return first_tensor(x[0])
    if isinstance(x, dict) and x:
        return first_tensor(next(iter(x.values())))
    raise TypeError(f"expected a tensor output, got {type(x).__name__}")


def _stack_names(node: torch.fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    names = []
    for key, val in stack.items():
        if isinstance(val, tuple) and val and isinstance(val[0], str):
            names.append(val[0])
        else:
            names.append(str(key))
    return names


def _graph_names(gm: torch.fx.GraphModule) -> set[str]:
    names: set[str] = set()
    for node in gm.graph.nodes:
        names.update(_stack_names(node))
        if node.op == "call_module":
            names.add(str(node.target))
    return names


def known_names(model: nn.Module) -> list[str]:
    """Every name a tap accepts on ``model``."""
    model = unwrap(model)
    names = {n for n, _ in model.named_modules() if n}
    if isinstance(model, torch.fx.GraphModule):
        names |= _graph_names(model)
    return sorted(n for n in names if "__nncf" not in n and not n.startswith(("_nncf", _SPLICE_PREFIX)))


def _unknown(name: str, model: nn.Module, what: str = "layer") -> ValueError:
    names = known_names(model)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    some = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return ValueError(f"{what} {name!r} not found in {type(model).__name__}{hint} (known: {some})")


@dataclass(frozen=True)
class TapSite:
    """Where a named feature is read: ``module``'s ``occurrence``-th call in one forward (-1: every call)."""

    name: str
    module: nn.Module
    occurrence: int = 0
    side: str = "output"  # "output" of the call or its first "input"


def find_site(model: nn.Module, name: str, *, side: str = "output") -> TapSite:
    """Resolve ``name`` on ``model`` to a :class:`TapSite` (``ValueError`` listing close matches)."""
    if side not in ("output", "input"):
        raise ValueError(f"side must be 'output' or 'input', got {side!r}")
    model = unwrap(model)
    full = name
    if name.endswith(":input"):
        name, side = name[: -len(":input")], "input"
    if name in ("", "output"):
        return TapSite(full or "output", model, 0, side)
    if isinstance(model, torch.fx.GraphModule):
        site = _graph_site(model, name, side)
    else:
        mods = dict(model.named_modules())
        if name not in mods:
            raise _unknown(name, model)
        site = TapSite(name, mods[name], 0, side)
    return TapSite(full, site.module, site.occurrence, site.side)


def _graph_site(gm: torch.fx.GraphModule, name: str, side: str) -> TapSite:
    nodes = list(gm.graph.nodes)
    called = [n for n in nodes if n.op == "call_module" and n.target == name]
    if called:
        return TapSite(name, gm.get_submodule(name), _occurrence(gm, called[0]), side)
    owned = [n for n in nodes if name in _stack_names(n)]
    if not owned:
        raise _unknown(name, gm)
    node = owned[0] if side == "input" else owned[-1]
    if side == "input":
        # the first node of the block reads the block input: tap that node's input
        if node.op == "call_module":
            return TapSite(name, gm.get_submodule(str(node.target)), _occurrence(gm, node), "input")
        src = node.args[0] if node.args else None
        if isinstance(src, torch.fx.Node) and src.op == "call_module":
            return TapSite(name, gm.get_submodule(str(src.target)), _occurrence(gm, src), "output")
        raise ValueError(f"cannot tap the input of {name!r} in this graph; name a submodule instead")
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and str(users[0].target).startswith(_QUANT_MODULE_PREFIXES):
        node = users[0]  # the fake quantizer that consumes the block output
    if node.op != "call_module":
        raise ValueError(f"cannot tap {name!r}: in this graph its output comes from {node.target} (not a module); "
                         "name a submodule of it instead")
    return TapSite(name, gm.get_submodule(str(node.target)), _occurrence(gm, node), "output")


def _occurrence(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    """Index of ``node`` among the call sites of the same module object (shared quantizers)."""
    target = gm.get_submodule(str(node.target))
    k = 0
    for n in gm.graph.nodes:
        if n is node:
            return k
        if n.op == "call_module" and gm.get_submodule(str(n.target)) is target:
            k += 1
    return k


def _register(handle: torch.utils.hooks.RemovableHandle, handles: list) -> None:
    _OUR_HOOK_IDS.add(handle.id)
    handles.append(handle)


def strip_hooks(model: nn.Module) -> nn.Module:
    """Remove this package's hooks from ``model`` (e.g. a deep copy of a tapped model)."""
    for m in model.modules():
        for d in (m._forward_hooks, m._forward_pre_hooks):
            for hid in list(d.keys()):
                if hid in _OUR_HOOK_IDS:
                    del d[hid]
        for hid in list(m._forward_hooks_with_kwargs.keys()):
            if hid in _OUR_HOOK_IDS:
                del m._forward_hooks_with_kwargs[hid]
    return model


class FeatureTap:
    """Hooks on a set of named sites of one model.

    ``record`` mode stores the features of the latest training forward in :attr:`features`;
    a ``transform`` (``fn(name, tensor) -> tensor``) rewrites them in the forward (used for feature
    perturbation and block replacement). Both act only when ``self.enabled`` and the model runs in
    training mode with grad enabled, unless ``always=True``. ``prepend=True`` runs the site hooks before
    hooks already registered on the same modules.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, side: str = "output",
                 record: bool = True, transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                 always: bool = False, sites: Iterable[TapSite] | None = None, prepend: bool = False) -> None:
        self.model = unwrap(model)
        self.sites = list(sites) if sites is not None else [find_site(self.model, n, side=side) for n in names]
        self.record = record
        self.transform = transform
        self.always = always
        self.enabled = True
        self.features: dict[str, torch.Tensor] = {}
        self._calls: dict[int, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        _register(self.model.register_forward_pre_hook(self._reset), self._handles)
        by_module: dict[int, list[TapSite]] = {}
        for site in self.sites:
            by_module.setdefault(id(site.module), []).append(site)
        for sites in by_module.values():
            mod = sites[0].module
            if any(s.side == "input" for s in sites):
                _register(mod.register_forward_pre_hook(self._make_pre(sites), prepend=prepend), self._handles)
            if any(s.side == "output" for s in sites):
                _register(mod.register_forward_hook(self._make_post(sites), prepend=prepend), self._handles)

    def __deepcopy__(self, memo: dict[int, Any]) -> "FeatureTap":
        # A deep copy of a tapped model copies its hooks, which are bound to this tap; share the tap
        # instead of copying it (and the non-leaf features it holds). strip_hooks() removes them.
        return self

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def _active(self) -> bool:
        scope = _SCOPES.get(id(self.model))
        if scope and id(self) not in scope[-1]:
            return False
        return self.enabled and (self.always or (self.model.training and torch.is_grad_enabled()))

    def _reset(self, module: nn.Module, args: Any) -> None:
        self._calls.clear()

    def _tick(self, module: nn.Module, side: str) -> int:
        key = id(module) * 2 + (side == "input")
        k = self._calls.get(key, 0)
        self._calls[key] = k + 1
        return k

    def _handle(self, sites: list[TapSite], side: str, module: nn.Module, value: Any) -> Any:
        k = self._tick(module, side)
        if not self._active():
            return None
        out = None
        for site in sites:
            if site.side != side or (site.occurrence >= 0 and site.occurrence != k):
                continue
            t = first_tensor(value)
            if self.transform is not None:
                t = self.transform(site.name, t)
                out = t
            if self.record:
                self.features[site.name] = t
        return out

    def _make_pre(self, sites: list[TapSite]) -> Callable[..., Any]:
        def pre(module: nn.Module, args: tuple[Any, ...]) -> Any:
            new = self._handle(sites, "input", module, args[0] if args else None)
            return None if new is None else (new,) + tuple(args[1:])
        return pre

    def _make_post(self, sites: list[TapSite]) -> Callable[..., Any]:
        def post(module: nn.Module, args: Any, output: Any) -> Any:
            new = self._handle(sites, "output", module, output)
            if new is None:
                return None
            if isinstance(output, torch.Tensor):
                return new
            raise TypeError("only single-tensor module outputs can be rewritten by a tap")
        return post

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
            _OUR_HOOK_IDS.discard(h.id)
        self._handles.clear()
        self.features.clear()


# --- graph sites (PT2E: convs are aten ops, not modules) -----------------------------------------
_SPLICE_PREFIX = "_qat_plugins_site_"
_SPLICES = [0]
_CONV_OPS = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
             torch.ops.aten.convolution.default}


def graph_convs(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """``{user's conv module name: conv node}`` of an exported graph (PT2E), from ``nn_module_stack``."""
    out: dict[str, torch.fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _CONV_OPS:
            names = _stack_names(n)
            if names:
                out.setdefault(names[-1], n)
    return out


class GraphSplice:
    """An ``nn.Identity`` spliced into one edge ``src -> dst`` of a GraphModule (all of ``src``'s uses if
    ``dst`` is None), so module hooks (taps) can read or rewrite a value an aten op produces or consumes.
    :meth:`remove` restores the graph exactly (the identity holds no state)."""

    def __init__(self, gm: torch.fx.GraphModule, src: torch.fx.Node, dst: torch.fx.Node | None = None) -> None:
        self.gm, self.src = gm, src
        self.module = nn.Identity()
        _SPLICES[0] += 1
        self.name = f"{_SPLICE_PREFIX}{_SPLICES[0]}"
        gm.add_submodule(self.name, self.module)
        with gm.graph.inserting_after(src):
            self.node = gm.graph.call_module(self.name, (src,))
        if dst is None:
            src.replace_all_uses_with(self.node, delete_user_cb=lambda u: u is not self.node)
        else:
            dst.replace_input_with(src, self.node)
        gm.recompile()

    def remove(self) -> None:
        if self.node is None:
            return
        self.node.replace_all_uses_with(self.src)
        self.gm.graph.erase_node(self.node)
        delattr(self.gm, self.name)
        self.gm.recompile()
        self.node = None


# --- default layer choices ---------------------------------------------------------------------
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the conv layers (torch.ao QAT/fused conv modules included), registration order."""
    model = unwrap(model)
    return [n for n, m in model.named_modules() if isinstance(m, _CONVS) and "__nncf" not in n]


def preact_site(model: nn.Module, name: str) -> TapSite:
    """Site of a conv layer's output *before* BatchNorm.

    A torch.ao fused conv-bn QAT module (``ConvBn2d``/``ConvBnReLU2d``) applies its ``bn`` child to
    the conv result, so the pre-BN feature is that child's input; a plain conv's output is pre-BN
    already.
    """
    mod = find_site(model, name).module
    bn = getattr(mod, "bn", None)
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return TapSite(name, bn, 0, "input")
    return TapSite(name, mod, 0, "output")


def default_feature_layers(model: nn.Module) -> list[str]:
    """Logits (``"output"``) and the input of the final classifier (the last linear layer)."""
    model = unwrap(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "__nncf" not in n]
    return ["output"] + ([f"{linears[-1]}:input"] if linears else [])
