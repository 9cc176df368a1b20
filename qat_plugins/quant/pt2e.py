"""torchao PT2E QAT with the package's low-bit fake quantizers.

Flow (:func:`prepare_qat_pt2e_model`)::

    model --deepcopy, .train()--> torch.export.export(..., dynamic batch dim).module()
          --prepare_qat_pt2e(LowBitQuantizer)--> GraphModule with LSQ / min-max fake quantizers

:class:`LowBitQuantizer` is a torchao ``Quantizer``. Its patterns are torchao's own annotators (the
XNNPACK-style ``OP_TO_ANNOTATOR`` table shipped in torchao 0.18 as
``torchao.testing.pt2e._xnnpack_quantizer_utils``) run in the order torchao's XNNPACK quantizer runs
them in QAT: conv-bn-relu, conv-bn, linear-relu, linear, conv-relu, conv, adaptive_avg_pool2d,
add-relu, add, then ``propagate_annotation`` (relu / flatten / pooling share their input's
quantizer). The resulting recipe:

* conv / linear weights: ``torch.int8``, ``per_channel_symmetric`` along ``ch_axis=0`` (or
  ``per_tensor_symmetric``), range ``[-2^(b-1), 2^(b-1)-1]`` for ``b = weight_bits``; biases stay float;
* activations: ``torch.uint8``, ``per_tensor_affine``, range ``[0, 2^b-1]`` for ``b = act_bits`` --
  the input of every conv/linear/add and the output of each fused pattern (after the bn / relu);
* BatchNorm is not folded during training: torchao's ``_fuse_conv_bn_qat`` rewrites conv-bn into its
  simulated-fold pattern (weight scaled by ``gamma / sqrt(running_var + eps)`` before the weight
  fake quantizer); ``convert_pt2e`` folds it.

The ``QuantizationSpec.observer_or_fake_quant_ctr`` is :class:`~.fake_quantize.LSQFakeQuantize`
(``learnable=True``) or :class:`~.fake_quantize.MinMaxFakeQuantize` -- the class itself, so
torchao's prepare builds each instance with ``dtype``, ``quant_min``, ``quant_max``, ``qscheme`` and
``is_dynamic`` from the spec (the bit width travels in ``quant_min``/``quant_max``). Extra constructor
keyword arguments (``fake_quant_kwargs=dict(init="lsq")``) are attached with torchao's own
``PartialWrapper`` (torch.ao's ``.with_args`` wrapper is rejected by torchao's prepare). torchao passes
``ch_axis`` only to classes whose name contains ``"PerChannel"``; the fake quantizers' default
``ch_axis=0`` is what weights need.

torchao's prepare/convert recognise fake quantizers by ``isinstance`` against *torchao's*
``FakeQuantizeBase``, a different class from torch.ao's that ours derive from. Importing this module
registers both fake quantizers as virtual subclasses of it (``ABCMeta.register``); without that,
prepare drops the extra quantizers on edges whose spec differs from the producer's and
``convert_pt2e`` leaves the modules in the graph (no quantize/dequantize ops, no bn folding).

Per-layer precision (``keep_8bit``): after annotation, every pattern anchored at an op whose module
path (:func:`pt2e_module_name`) equals a ``keep_8bit`` entry or lies under it (``"layer1"`` covers
``"layer1.conv1"`` and the block's residual add) gets 8-bit weights and an 8-bit output (the bn /
relu after a conv). Its activation inputs are read at the precision their producer quantized them
to (shared quantizer; ``act_bits`` for the pooled features before the last ``fc``), or through an
8-bit quantizer when the producer is not quantized (the image before the first conv). A low-bit
consumer of an 8-bit output gets its own ``act_bits`` quantizer on that edge. So a layer's input
precision is the lower of its producer's and its own, and nothing is re-quantized at a higher
precision.

Costs (torch 2.13 / torchao 0.18, 2 CPU cores): torchao traces small pattern graphs with
``torch.export`` -- ``prepare`` of a model with batch norm takes ~10 s (conv-bn annotation + QAT
fusion), each train <-> eval switch ~1-2 s, and ``convert_pt2e`` of a model with batch norm ~1 min
(96 pattern traces in ``_fold_conv_bn_qat``); BN-free models take about a second for each.

Names in the prepared graph
---------------------------
``torch.export`` keeps the module hierarchy for *parameters and buffers* (``get_attr`` targets such as
``layer1.conv1.weight``; the prepared GraphModule has children ``conv1``, ``bn1``, ``layer1`` ...,
holding only parameters/buffers), but the computation is flat aten ops named ``conv2d_3``,
``batch_norm_3``, ``relu_2``, ``add``, ... . Fake quantizers are top-level submodules
``activation_post_process_<N>`` (``N`` in insertion order, no relation to the layer) called by
``call_module`` nodes of the same name. A fake quantizer shared between several tensors (e.g.
relu -> adaptive_avg_pool2d -> flatten) is one module registered under several names;
``named_modules()`` lists it once. :func:`pt2e_module_name` maps any node (including a fake-quantizer
node: the module of the tensor it quantizes) back to the original module path,
:func:`pt2e_module_output` finds the node carrying a module's output (e.g. the ``"layer1"`` block) and
:func:`pt2e_fake_quantizers` lists the fake quantizers with the module whose tensor they quantize.

Train / eval: exported models cannot switch batch norm / dropout through ``nn.Module.train``;
torchao rewrites those patterns (``move_exported_model_to_eval`` / ``..._to_train``). The returned
model's ``.train()`` / ``.eval()`` are rebound to do that *and* set ``training`` on every submodule
(:class:`~.fake_quantize.MinMaxFakeQuantize` only updates its range in training mode).
"""

from __future__ import annotations

import copy
import functools
import operator
import types
import warnings
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .fake_quantize import LSQFakeQuantize, MinMaxFakeQuantize, quant_range

__all__ = [
    "LowBitQuantizer",
    "prepare_qat_pt2e_model",
    "pt2e_module_name",
    "is_fake_quant_node",
    "pt2e_module_output",
    "pt2e_fake_quantizers",
    "set_pt2e_train",
    "TORCHAO_INSTALL_HINT",
]

TORCHAO_INSTALL_HINT = "install torchao==0.18.0: pip install 'qat-plugins[pt2e]'"

try:  # torchao is optional (extra "pt2e"); the class below needs its Quantizer base.
    from torchao.quantization.pt2e import FakeQuantizeBase as _AOFakeQuantizeBase
    from torchao.quantization.pt2e.quantizer import Quantizer as _QuantizerBase
except ImportError:  # pragma: no cover - exercised only without torchao
    _QuantizerBase = object  # type: ignore[assignment,misc]
else:
    # torchao's prepare/convert recognise fake quantizers by isinstance checks against *torchao's*
    # FakeQuantizeBase (a separate class from torch.ao's, which ours derive from). Without this,
    # convert_pt2e silently leaves our modules in the graph (no quantize/dequantize ops, no bn fold).
    # Registering them as virtual subclasses (ABCMeta.register) changes nothing else about them.
    for _cls in (LSQFakeQuantize, MinMaxFakeQuantize):
        _AOFakeQuantizeBase.register(_cls)

# Annotators in the order torchao's XNNPACK quantizer applies them in QAT (fused patterns first, so
# a conv inside conv-bn-relu is not also annotated as a lone conv).
_ANNOTATOR_ORDER = ("conv_bn_relu", "conv_bn", "linear_relu", "linear", "conv_relu", "conv",
                    "adaptive_avg_pool2d", "add_relu", "add")
_FQ_PREFIX = "activation_post_process_"
_AVERAGING_OPS = {torch.ops.aten.adaptive_avg_pool2d.default, torch.ops.aten.avg_pool2d.default,
                  torch.ops.aten.mean.dim, torch.ops.aten.adaptive_avg_pool1d.default,
                  torch.ops.aten.avg_pool1d.default}


def _torchao() -> types.SimpleNamespace:
    """Import what this module uses from torchao, or raise ``ImportError`` with the install hint."""
    try:
        from torchao.quantization.pt2e import (PartialWrapper, move_exported_model_to_eval,
                                               move_exported_model_to_train)
        from torchao.quantization.pt2e.export_utils import _EXPORTED_TRAINING_ATTR
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer import QuantizationSpec, SharedQuantizationSpec
        # torchao 0.18 ships its XNNPACK-style pattern annotators only in this (private) module
        from torchao.testing.pt2e import _xnnpack_quantizer_utils as xnn
    except ImportError as e:
        raise ImportError(TORCHAO_INSTALL_HINT) from e
    return types.SimpleNamespace(
        PartialWrapper=PartialWrapper, move_to_eval=move_exported_model_to_eval,
        move_to_train=move_exported_model_to_train, exported_training_attr=_EXPORTED_TRAINING_ATTR,
        prepare_qat_pt2e=prepare_qat_pt2e, QuantizationSpec=QuantizationSpec,
        SharedQuantizationSpec=SharedQuantizationSpec, xnn=xnn)


# --- node -> module names -----------------------------------------------------------------------

def _normalize_path(path: str) -> str:
    for prefix in ("L['self'].", "L__self___", "L__self__"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path


def _is_fq_module(mod: Any) -> bool:
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase

    if isinstance(mod, (FakeQuantizeBase, ObserverBase)):
        return True
    try:  # torchao's own observer / fake-quant bases are separate classes
        from torchao.quantization.pt2e import FakeQuantizeBase as AOFakeQuantizeBase
        from torchao.quantization.pt2e import ObserverBase as AOObserverBase
    except ImportError:  # pragma: no cover
        return False
    return isinstance(mod, (AOFakeQuantizeBase, AOObserverBase))


def _is_fq_node(node: torch.fx.Node) -> bool:
    if node.op != "call_module":
        return False
    gm = node.graph.owning_module
    if gm is None:
        return str(node.target).startswith(_FQ_PREFIX)
    try:
        return _is_fq_module(gm.get_submodule(str(node.target)))
    except AttributeError:
        return False


def is_fake_quant_node(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls a fake quantizer / observer module (``activation_post_process_N``)."""
    return _is_fq_node(node)


def pt2e_module_name(node: torch.fx.Node) -> str | None:
    """Original module path (``"layer1.conv1"``) a node of an exported / PT2E graph comes from.

    * ``call_function`` nodes: the innermost entry of ``node.meta["nn_module_stack"]`` (``None`` for
      ops in the root module's own ``forward`` and for helper ops without that metadata, e.g. the bn
      scale arithmetic torchao inserts for conv-bn QAT);
    * ``get_attr`` nodes (parameters, buffers): the owner of the attribute (``"layer1.bn1"``);
    * fake-quantizer / observer ``call_module`` nodes (``activation_post_process_N``): the module of
      the tensor they quantize (so the weight quantizer of ``fc`` maps to ``"fc"`` and the output
      quantizer after ``layer1``'s final relu maps to ``"layer1.relu2"``);
    * other ``call_module`` nodes: their target, except export's ``_guards_fn`` (``None``);
    * placeholders and the output node: ``None``.

    A residual add written as ``self.add.add(a, b)`` (``FloatFunctional``) or ``a + b`` inside a block
    maps to the block (``"layer1"``): method calls are not module calls.
    """
    seen = 0
    while node.op == "call_module" and _is_fq_node(node):
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if not args or seen > 64:
            return None
        node, seen = args[0], seen + 1
    if node.op == "get_attr":
        owner, _, _ = str(node.target).rpartition(".")
        return owner or None
    if node.op == "call_module":
        return None if str(node.target) == "_guards_fn" else str(node.target)
    if node.op != "call_function":
        return None
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return _normalize_path(str(path)) or None


def _under(name: str | None, prefixes: Iterable[str]) -> bool:
    return name is not None and any(name == p or name.startswith(p + ".") for p in prefixes)


def pt2e_module_output(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    """The node holding module ``name``'s output in an exported / PT2E-prepared graph.

    That is the last node (graph order) from ``name`` or its submodules whose value is used outside
    the module (fake-quantizer nodes are looked through), replaced by its output fake quantizer when it
    has one (in a prepared ``SmallResNet``, ``"layer1"`` -> the ``activation_post_process_N`` node
    after ``layer1``'s final relu). To observe that tensor, register a forward hook on
    ``gm.get_submodule(node.target)`` when ``node.op == "call_module"`` -- but note a shared fake
    quantizer (relu -> pool -> flatten) is called once per tensor it quantizes -- or insert a node
    after it with ``gm.graph.inserting_after(node)``.

    Raises ``KeyError`` (listing the top-level module names found) when no node comes from ``name``.
    """
    def inside(n: torch.fx.Node) -> bool:
        return n.op in ("call_function", "call_module") and not _is_fq_node(n) and \
            _under(pt2e_module_name(n), [name])

    def real_users(n: torch.fx.Node) -> list[torch.fx.Node]:
        out: list[torch.fx.Node] = []
        for u in n.users:
            out.extend(real_users(u) if _is_fq_node(u) else [u])
        return out

    last = None
    for n in gm.graph.nodes:
        if inside(n) and any(not inside(u) for u in real_users(n)):
            last = n
    if last is None:
        tops = sorted({m.split(".")[0] for m in (pt2e_module_name(n) for n in gm.graph.nodes) if m})
        raise KeyError(f"no node of the graph comes from module {name!r}; modules found: {tops}")
    users = list(last.users)
    if len(users) == 1 and _is_fq_node(users[0]):
        return users[0]
    return last


def pt2e_fake_quantizers(gm: nn.Module) -> dict[str, tuple[nn.Module, str | None]]:
    """``{fake-quantizer name: (module, module path of the tensor it quantizes)}``, each once.

    Names are ``activation_post_process_<N>``; a shared quantizer is listed under the first name the
    graph calls it by and with the module of the first tensor it quantizes.
    """
    out: dict[str, tuple[nn.Module, str | None]] = {}
    seen: set[int] = set()
    if isinstance(gm, torch.fx.GraphModule):
        for n in gm.graph.nodes:
            if _is_fq_node(n):
                mod = gm.get_submodule(str(n.target))
                if id(mod) not in seen:
                    seen.add(id(mod))
                    out[str(n.target)] = (mod, pt2e_module_name(n))
    for name, mod in gm.named_modules():  # quantizers not called by the graph, if any
        if _is_fq_module(mod) and id(mod) not in seen:
            seen.add(id(mod))
            out[name] = (mod, None)
    return out


# --- quantizer --------------------------------------------------------------------------------

class LowBitQuantizer(_QuantizerBase):  # type: ignore[misc,valid-type]
    """torchao PT2E ``Quantizer``: ``weight_bits`` weights, ``act_bits`` activations, LSQ by default.

    Args:
        weight_bits, act_bits: bit widths 2..8.
        per_channel: per-output-channel weight scales (``per_channel_symmetric``, ``ch_axis=0``);
            ``False``: one ``per_tensor_symmetric`` scale per weight.
        learnable: :class:`LSQFakeQuantize` (learned step size); ``False``:
            :class:`MinMaxFakeQuantize`.
        keep_8bit: module paths (from the original model) whose patterns use 8-bit weights and
            activations; an entry covers its submodules.
        fake_quant_kwargs: extra constructor arguments of the fake quantizers (e.g.
            ``{"init": "lsq"}``), attached with torchao's ``PartialWrapper``.
        reduce_range: 8-bit weights on the 7-bit grid [-64, 63] (*project choice*, default off; for
            ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI).

    Attributes ``config`` and ``config_8bit`` hold the two quantization configs (``input_activation``,
    ``output_activation``, ``weight``, ``bias`` specs).
    """

    def __init__(self, weight_bits: int, act_bits: int, *, per_channel: bool = True,
                 learnable: bool = True, keep_8bit: Sequence[str] | str = (),
                 fake_quant_kwargs: dict[str, Any] | None = None, reduce_range: bool = False) -> None:
        ao = _torchao()
        super().__init__()
        quant_range(weight_bits, True)
        quant_range(act_bits, False)
        if not isinstance(per_channel, bool) or not isinstance(learnable, bool):
            raise TypeError("per_channel and learnable must be bools")
        if isinstance(keep_8bit, str):
            keep_8bit = (keep_8bit,)
        keep = tuple(keep_8bit)
        if not all(isinstance(k, str) and k for k in keep):
            raise TypeError(f"keep_8bit must be module names (non-empty str), got {keep_8bit!r}")
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.per_channel, self.learnable, self.keep_8bit = per_channel, learnable, keep
        self.reduce_range = bool(reduce_range)
        ctr: Any = LSQFakeQuantize if learnable else MinMaxFakeQuantize
        if fake_quant_kwargs:
            ctr = ao.PartialWrapper(functools.partial(ctr, **fake_quant_kwargs))
        self.fake_quant_ctr = ctr
        self.config = self._config(ao, weight_bits, act_bits)
        self.config_8bit = self._config(ao, 8, 8)

    def _config(self, ao: types.SimpleNamespace, wbits: int, abits: int) -> Any:
        wmin, wmax = (-64, 63) if self.reduce_range and wbits == 8 else quant_range(wbits, True)
        amin, amax = quant_range(abits, False)
        weight = ao.QuantizationSpec(
            dtype=torch.int8, quant_min=wmin, quant_max=wmax,
            qscheme=torch.per_channel_symmetric if self.per_channel else torch.per_tensor_symmetric,
            ch_axis=0, is_dynamic=False, observer_or_fake_quant_ctr=self.fake_quant_ctr)
        act = ao.QuantizationSpec(
            dtype=torch.uint8, quant_min=amin, quant_max=amax, qscheme=torch.per_tensor_affine,
            is_dynamic=False, observer_or_fake_quant_ctr=self.fake_quant_ctr)
        return ao.xnn.QuantizationConfig(act, act, weight, None, is_qat=True)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(weight_bits={self.weight_bits}, act_bits={self.act_bits}, "
                f"per_channel={self.per_channel}, learnable={self.learnable}, "
                f"keep_8bit={list(self.keep_8bit)})")

    # -- Quantizer API ---------------------------------------------------------------------------
    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        ao = _torchao()
        targets = {n.target for n in model.graph.nodes if n.op == "call_function"}
        aten = torch.ops.aten
        has_conv = bool(targets & {aten.conv1d.default, aten.conv2d.default})
        has_bn = any(_is_bn_target(t) for t in targets)
        for op in _ANNOTATOR_ORDER:
            if op.startswith("conv_bn") and not (has_conv and has_bn):
                continue  # the conv-bn annotators export pattern graphs: skip when pointless
            ao.xnn.OP_TO_ANNOTATOR[op](model, self.config, None)
        ao.xnn.propagate_annotation(model)
        self._own_pool_output(model, ao)
        if self.keep_8bit:
            self._apply_keep_8bit(model, ao)
        return model

    def _own_pool_output(self, model: torch.fx.GraphModule, ao: types.SimpleNamespace) -> None:
        """Average pooling / ``mean`` quantize their output with a quantizer of their own (XNNPACK's
        annotator shares the input's): the FX path's choice, see ``prepare.fx_backend_config``."""
        for node in model.graph.nodes:
            ann = node.meta.get("quantization_annotation")
            if node.op == "call_function" and node.target in _AVERAGING_OPS and ann is not None \
                    and isinstance(ann.output_qspec, ao.SharedQuantizationSpec):
                ann.output_qspec = self.config.output_activation

    def validate(self, model: torch.fx.GraphModule) -> None:
        pass

    # -- keep_8bit ---------------------------------------------------------------------------------
    def _swap(self, spec: Any) -> Any:
        low, high = self.config, self.config_8bit
        if spec == low.weight:
            return high.weight
        if spec == low.input_activation:
            return high.input_activation
        return spec

    def _apply_keep_8bit(self, model: torch.fx.GraphModule, ao: types.SimpleNamespace) -> None:
        """Give the patterns anchored in ``keep_8bit`` modules the 8-bit specs.

        A pattern is an annotated op with quantized inputs (conv, linear, add, pool) plus the
        single-user chain of bn / relu / hardtanh nodes torchao fused into it, up to the node carrying
        the pattern's output spec. Its weights and output become 8 bit. An activation input that is
        already quantized by its producer (e.g. the pooled features before ``fc``) is read through
        the producer's quantizer (``SharedQuantizationSpec``) rather than re-quantized at 8 bits (a
        redundant, lossless-at-best quantizer whose step size would get no gradient); other inputs
        (the graph input before ``conv1``) get an 8-bit quantizer.
        """
        key = "quantization_annotation"
        matched: set[str] = set()
        for node in model.graph.nodes:
            ann = node.meta.get(key)
            if node.op != "call_function" or ann is None or not ann.input_qspec_map:
                continue
            name = pt2e_module_name(node)
            hits = {k for k in self.keep_8bit if _under(name, [k])}
            if not hits:
                continue
            matched |= hits
            new_map = {}
            for arg, spec in ann.input_qspec_map.items():
                producer = arg.meta.get(key) if isinstance(arg, torch.fx.Node) else None
                if spec == self.config.input_activation and producer is not None \
                        and producer.output_qspec is not None:
                    new_map[arg] = ao.SharedQuantizationSpec(arg)
                else:
                    new_map[arg] = self._swap(spec)
            ann.input_qspec_map = new_map
            cur = node
            while True:
                a = cur.meta.get(key)
                if a is not None:
                    if cur is not node:
                        a.input_qspec_map = {k: self._swap(v) for k, v in a.input_qspec_map.items()}
                    if a.output_qspec is not None:
                        a.output_qspec = self._swap(a.output_qspec)
                        break
                users = list(cur.users)
                if len(users) != 1 or not _is_fusable_tail(users[0]):
                    break
                cur = users[0]
        missing = [k for k in self.keep_8bit if k not in matched]
        if missing:
            warnings.warn(f"keep_8bit entries {missing} match no quantized op of the exported graph "
                          "(expected module paths such as 'conv1' or 'layer1.conv1'); they stay at "
                          f"{self.weight_bits}/{self.act_bits} bits", stacklevel=2)


def _is_bn_target(target: Any) -> bool:
    aten = torch.ops.aten
    return target in (aten.batch_norm.default, aten._native_batch_norm_legit.default,
                      aten._native_batch_norm_legit_no_training.default, aten.cudnn_batch_norm.default)


def _is_fusable_tail(node: torch.fx.Node) -> bool:
    aten = torch.ops.aten
    return node.op == "call_function" and (
        _is_bn_target(node.target) or node.target in (
            aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
            operator.getitem))


# --- train / eval -----------------------------------------------------------------------------

_META_KEY = "qat_plugins_pt2e_exported_training"


def set_pt2e_train(model: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
    """Switch an exported / PT2E model between train and eval.

    Rewrites batch norm and dropout with torchao's ``move_exported_model_to_train`` /
    ``move_exported_model_to_eval`` (a no-op when already in that mode; otherwise about a second:
    torchao traces its match/replace patterns each time) and sets ``training`` on the model and every
    submodule (fake quantizers included). The models returned by :func:`prepare_qat_pt2e_model` call
    this from ``.train()`` / ``.eval()``.
    """
    ao = _torchao()
    mode = bool(mode)
    (ao.move_to_train if mode else ao.move_to_eval)(model)
    nn.Module.train(model, mode)  # the unbound method: sets .training recursively
    model.meta[_META_KEY] = mode  # GraphModule deep copies keep .meta but not plain attributes
    return model


def _train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
    return set_pt2e_train(self, mode)


def _eval(self: torch.fx.GraphModule) -> torch.fx.GraphModule:
    return set_pt2e_train(self, False)


def _install_train_eval(model: torch.fx.GraphModule) -> None:
    model.train = types.MethodType(_train, model)  # type: ignore[method-assign]
    model.eval = types.MethodType(_eval, model)  # type: ignore[method-assign]


def _after_deepcopy(copied: torch.fx.GraphModule) -> None:
    """GraphModule.__deepcopy__ drops instance attributes: restore train/eval and torchao's mode flag.

    Skipped once the model has been converted (no fake quantizers left; convert_pt2e disallows
    train/eval on purpose).
    """
    if _META_KEY in copied.meta and any(_is_fq_node(n) for n in copied.graph.nodes):
        _install_train_eval(copied)
        setattr(copied, _torchao().exported_training_attr, bool(copied.meta[_META_KEY]))


# --- prepare ----------------------------------------------------------------------------------

def _dynamic_batch_shapes(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """``dynamic_shapes`` marking dim 0 of each tensor input (with the first's batch size) dynamic."""
    batch = torch.export.Dim("batch")
    first = next((x.shape[0] for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == first
                 else None for x in example_inputs)


def prepare_qat_pt2e_model(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    *,
    weight_bits: int = 8,
    act_bits: int = 8,
    keep_8bit: Sequence[str] = (),
    per_channel: bool = True,
    learnable: bool = True,
    fake_quant_kwargs: dict[str, Any] | None = None,
    reduce_range: bool = False,
) -> torch.fx.GraphModule:
    """Export a copy of ``model`` and prepare it for QAT with :class:`LowBitQuantizer`.

    ``model`` is deep-copied and put in train mode, captured by ``torch.export.export`` with dimension
    0 of the tensor inputs dynamic (any batch size >= 2 works afterwards; the example batch must have
    at least 2 samples -- a batch of 1 is repeated to 2 for tracing), then ``prepare_qat_pt2e`` inserts
    the fake quantizers. Returns the prepared ``GraphModule`` in train mode; its ``.train()`` /
    ``.eval()`` work (see :func:`set_pt2e_train`). Convert a trained model with
    ``torchao.quantization.pt2e.quantize_pt2e.convert_pt2e`` (after ``.eval()``).

    Raises:
        ImportError: torchao is not installed (``pip install 'qat-plugins[pt2e]'``).
        ValueError: no example inputs, or ``torch.export`` cannot capture the model.
    """
    ao = _torchao()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise ValueError("PT2E needs example_inputs (a batch of inputs as a tuple) for torch.export")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not example_inputs:
        raise ValueError("example_inputs is empty; pass a batch of inputs as a tuple")
    quantizer = LowBitQuantizer(weight_bits, act_bits, per_channel=per_channel, learnable=learnable,
                                keep_8bit=tuple(keep_8bit), fake_quant_kwargs=fake_quant_kwargs,
                                reduce_range=reduce_range)
    # a batch of one would be specialised by export (sizes 0/1 are never symbolic): repeat it
    example_inputs = tuple(x.repeat(2, *([1] * (x.dim() - 1)))
                           if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x
                           for x in example_inputs)
    m = copy.deepcopy(model).train()
    try:
        exported = torch.export.export(m, example_inputs,
                                       dynamic_shapes=_dynamic_batch_shapes(example_inputs))
    except Exception as e:  # noqa: BLE001 - export raises many error types; all mean the same here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"torch.export could not capture {type(model).__name__} with a dynamic batch dimension "
            f"({type(e).__name__}: {msg}). PT2E needs a forward torch.export can trace: no Python "
            "control flow on tensor values (use torch.where / torch.cond), no .item()/.tolist(), and "
            "no shapes tied to the batch size (x.flatten(1) instead of x.view(32, -1)); otherwise use "
            "mode='eager' or mode='fx'") from e
    gm = exported.module()
    prepared = ao.prepare_qat_pt2e(gm, quantizer)
    _install_train_eval(prepared)
    # exported in train mode: record that for torchao's move_exported_model_to_eval/_train (else its
    # first call would rewrite batch norm / dropout patterns it does not need to touch)
    setattr(prepared, ao.exported_training_attr, True)
    prepared.meta[_META_KEY] = True
    if hasattr(prepared, "_register_deepcopy_hook"):
        prepared._register_deepcopy_hook(_after_deepcopy)
    nn.Module.train(prepared, True)
    return prepared
