"""Lower a torch.ao QAT model (eager or FX, prepared by :func:`qat_plugins.prepare_qat`) to an
export-ready float graph of :mod:`qat_plugins.export.qdq` modules.

What :func:`lower_qat_model` does, on a deep copy in eval mode (the caller's model is untouched):

* every activation fake quantizer (``activation_post_process`` of eager modules / ``QuantStub`` /
  ``FloatFunctional``, FX's ``activation_post_process_N``) becomes an :class:`ActivationQDQ` with
  the trained scale / zero point / range (an ``nn.Identity`` if its fake quant is disabled);
* every QAT weight layer (``torch.ao.nn.qat`` Conv/Linear, ``torch.ao.nn.intrinsic.qat``
  ConvReLU / ConvBn / ConvBnReLU / LinearReLU / LinearBn1d) becomes an :class:`ExportConv` /
  :class:`ExportLinear`. Fused BatchNorm is folded exactly as the QAT module computes in eval
  mode: ``w_fold = w * gamma / sqrt(running_var + eps)``, integer weights
  ``q = round(weight_fake_quant(w_fold) / s) + z`` (checked to reproduce the fake-quantized weight
  bit for bit), ``bias = beta - gamma * (running_mean - b) / sqrt(running_var + eps)``.
  Forward hooks (eager's activation observer hook) and the ``activation_post_process`` child move
  to the replacement, so eager models keep working through their hooks -- including
  ``prepare_qat``'s input ``QuantStub`` / output ``DeQuantStub`` hooks on the top module;
* modules without a qconfig stay as they are (float).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

from ..quant.fold import fold_bn, is_pt2e_graph
from .lowering_pt2e import lower_pt2e_weights
from .qdq import DEFAULT_CLIP_MODE, ActivationQDQ, ExportConv, ExportLinear, FloatWeight, QuantizedWeight

__all__ = ["lower_qat_model", "LoweredModel", "WeightInfo", "find_fake_quantizers", "is_converted_model",
           "WEIGHT_TYPE_ALIASES"]

WEIGHT_TYPE_ALIASES = {"s8": "int8", "u8": "uint8"}

_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine,
                torch.per_channel_affine_float_qparams)


@dataclass
class WeightInfo:
    """One exported weight: its module path, bit width and integer range (``None``: float)."""

    name: str
    layer_type: str
    bits: int | None
    quant_min: int | None = None
    quant_max: int | None = None
    per_channel: bool = False
    offset: int = 0  # +128 when a signed grid is stored as UINT8
    factor: int = 1  # stored as q * factor with scale / factor (a finer grid for the int32 bias)

    @property
    def int4_eligible(self) -> bool:
        return self.bits is not None and self.bits <= 4 and self.quant_min is not None \
            and self.quant_max is not None and (-8 <= self.quant_min and self.quant_max <= 7
                                                or 0 <= self.quant_min and self.quant_max <= 15)


@dataclass
class LoweredModel:
    """The lowered model plus what the ONNX post-processing needs to know."""

    module: nn.Module
    weights: list[WeightInfo] = field(default_factory=list)
    num_activation_quantizers: int = 0
    num_fake_quantizers: int = 0


def find_fake_quantizers(model: nn.Module) -> list[tuple[str, FakeQuantizeBase]]:
    """``(name, module)`` of every torch.ao fake quantizer in ``model``."""
    return [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, FakeQuantizeBase)]


def is_converted_model(model: nn.Module) -> bool:
    """True for models already converted to real quantized kernels (``convert`` / ``convert_fx``)."""
    for m in model.modules():
        mod = type(m).__module__
        if mod.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                           "torch.nn.quantized", "torch.ao.nn.quantized.reference")):
            if not mod.startswith("torch.ao.nn.quantized.modules.functional_modules"):
                return True
    gm_graph = getattr(model, "graph", None)
    if gm_graph is not None:
        for node in gm_graph.nodes:
            if node.op == "call_function" and getattr(node.target, "__name__", "") in (
                    "quantize_per_tensor", "quantize_per_channel"):
                return True
            if node.op == "call_method" and node.target == "dequantize":
                return True
    return False


def _qrange(fq: FakeQuantizeBase) -> tuple[int, int]:
    qmin, qmax = getattr(fq, "quant_min", None), getattr(fq, "quant_max", None)
    if qmin is None or qmax is None:
        raise ValueError(f"fake quantizer {type(fq).__name__} has no quant_min/quant_max; "
                         "only torch.ao-style fake quantizers can be exported")
    return int(qmin), int(qmax)


def _bits(fq: FakeQuantizeBase) -> int:
    b = getattr(fq, "bits", None)
    if b is not None:
        return int(b)
    qmin, qmax = _qrange(fq)
    return int(math.ceil(math.log2(qmax - qmin + 1)))


def _enabled(fq: FakeQuantizeBase) -> bool:
    fe = getattr(fq, "fake_quant_enabled", None)
    return bool(fe is None or int(fe[0]) == 1)


def _check_initialised(name: str, fq: FakeQuantizeBase) -> None:
    init = getattr(fq, "initialized", None)
    if isinstance(init, torch.Tensor) and init.numel() and int(init.reshape(-1)[0]) == 0 and _enabled(fq):
        raise ValueError(
            f"fake quantizer '{name}' was never initialised (no batch has passed through it); run at "
            "least one training or calibration batch through the QAT model in train mode before export")


def _qparams(name: str, fq: FakeQuantizeBase) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zp = fq.calculate_qparams()
    scale = scale.detach().float().reshape(-1)
    zp = zp.detach().float().reshape(-1)
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ValueError(f"fake quantizer '{name}' ({type(fq).__name__}) has a non-positive or "
                         "non-finite scale; check its training (NaN losses?)")
    return scale, zp


def _act_module(name: str, fq: FakeQuantizeBase, clip_mode: str) -> nn.Module:
    if not _enabled(fq):
        return nn.Identity()
    qmin, qmax = _qrange(fq)
    scale, zp = _qparams(name, fq)
    signed = fq.dtype in (torch.qint8, torch.int8)
    lo, hi = (-128, 127) if signed else (0, 255)
    if qmin < lo or qmax > hi:
        raise ValueError(f"activation quantizer '{name}': range ({qmin}, {qmax}) does not fit {fq.dtype}")
    axis = int(getattr(fq, "ch_axis", -1)) if getattr(fq, "qscheme", None) in _PER_CHANNEL else -1
    return ActivationQDQ(scale, zp, qmin, qmax, signed, axis=axis, clip_mode=clip_mode, bits=_bits(fq))


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    app = getattr(old, "activation_post_process", None)
    if isinstance(app, nn.Module):
        new.activation_post_process = app
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig


def _storage(qmin: int, qmax: int, int8_weight_type: str) -> str:
    if int8_weight_type == "auto":
        # U8S8 int16 saturation needs |w| > 64: only full 8-bit signed grids are at risk
        return "uint8" if qmin < -64 or qmax > 64 else "int8"
    return int8_weight_type


def grid_factor(quant_min: int, quant_max: int, limit: int = 128) -> int:
    """Largest power of two ``k`` with ``quant_min * k >= -limit`` and ``quant_max * k < limit``
    (signed grids; 1 for unsigned ones): the refinement :class:`QuantizedWeight` can store."""
    if quant_min >= 0:
        return 1
    k = 1
    while quant_min * 2 * k >= -limit and quant_max * 2 * k <= limit - 1:
        k *= 2
    return k


def _integer_weight(name: str, fq: FakeQuantizeBase, w: torch.Tensor, int8_weight_type: str,
                    grid_limit: int | None = 128) -> QuantizedWeight:
    qmin, qmax = _qrange(fq)
    w_hat = fq(w)  # exactly what the QAT forward computes in eval mode
    scale, zp = _qparams(name, fq)
    per_channel = getattr(fq, "qscheme", None) in _PER_CHANNEL
    axis = int(getattr(fq, "ch_axis", 0)) % w.dim() if per_channel else 0
    shape = [1] * w.dim()
    if per_channel:
        shape[axis] = -1
        if scale.numel() != w.shape[axis]:
            raise ValueError(f"weight quantizer of '{name}' has {scale.numel()} scales for "
                             f"{w.shape[axis]} channels; run a batch through the model first")
    s, z = scale.reshape(shape), zp.reshape(shape)
    q = torch.round(w_hat / s + z)
    if (q < qmin).any() or (q > qmax).any():
        raise ValueError(f"weight quantizer of '{name}' produced values outside ({qmin}, {qmax})")
    deq = (q - z) * s
    if not torch.equal(deq, w_hat):
        err = (deq - w_hat).abs().max().item()
        warnings.warn(f"'{name}': integer weights times scale differ from the fake-quantized weight by "
                      f"up to {err:.3g} (a fake quantizer with non-standard rounding?)", stacklevel=3)
    factor = grid_factor(qmin, qmax, grid_limit) if grid_limit else 1
    return QuantizedWeight(q, scale, zp, axis if per_channel else -1, _bits(fq), qmin, qmax,
                           storage=_storage(qmin, qmax, int8_weight_type), factor=factor)


_RELU_TYPES: tuple[type, ...] = ()


def _fused_relu(mod: nn.Module) -> bool:
    global _RELU_TYPES
    if not _RELU_TYPES:
        import torch.ao.nn.intrinsic.qat as nniqat

        _RELU_TYPES = tuple(getattr(nniqat, n) for n in (
            "ConvReLU1d", "ConvReLU2d", "ConvReLU3d", "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d",
            "LinearReLU") if hasattr(nniqat, n))
    return isinstance(mod, _RELU_TYPES)


def _lower_weight(name: str, layer_type: str, fq: FakeQuantizeBase, w: torch.Tensor, fmt: str,
                  info: list[WeightInfo], int8_weight_type: str, grid_limit: int | None = 128) -> nn.Module:
    """A :class:`QuantizedWeight` (or :class:`FloatWeight` for ``fp32`` / disabled fake quant) of ``w``.

    ``grid_limit``: refine grids of fewer than 8 bits up to ``|q| <= grid_limit`` (``None``: never);
    INT4 exports pass ``None`` for the layers they pack."""
    if fmt != "fp32" and _enabled(fq):
        _check_initialised(name, fq)
        qmin, qmax = _qrange(fq)
        if fmt == "int4" and WeightInfo(name, layer_type, _bits(fq), qmin, qmax).int4_eligible:
            grid_limit = None  # packed as INT4 later: keep the quantizer's own grid
        qw = _integer_weight(name, fq, w, int8_weight_type, grid_limit)
        per_channel = getattr(fq, "qscheme", None) in _PER_CHANNEL
        info.append(WeightInfo(name, layer_type, _bits(fq), qmin, qmax, per_channel, qw.offset, qw.factor))
        return qw
    info.append(WeightInfo(name, layer_type, None))
    return FloatWeight(w)


def _weight_module(name: str, mod: nn.Module, fq: FakeQuantizeBase, fmt: str,
                   info: list[WeightInfo], int8_weight_type: str, grid_limit: int | None) -> nn.Module:
    is_conv = isinstance(mod, nn.modules.conv._ConvNd)
    is_linear = isinstance(mod, nn.Linear)
    if is_conv and getattr(mod, "transposed", False):
        is_conv = False
    if not (is_conv or is_linear):
        raise ValueError(
            f"cannot export QAT layer '{name}' of type {type(mod).__name__}: supported weight layers "
            "are Conv1d/2d/3d and Linear (with fused BatchNorm / ReLU); leave it unquantized "
            "(qconfig=None) or export the float model")
    w, bias = fold_bn(mod)
    weight = _lower_weight(name, type(mod).__name__, fq, w, fmt, info, int8_weight_type, grid_limit)
    relu = _fused_relu(mod)
    if is_conv:
        return ExportConv(mod, weight, bias, relu)  # type: ignore[arg-type]
    return ExportLinear(weight, bias, relu)


@torch.no_grad()
def lower_qat_model(model: nn.Module, weight_format: str = "int8", *,
                    clip_mode: str = DEFAULT_CLIP_MODE, int8_weight_type: str = "int8",
                    refine_weight_grid: bool = True) -> LoweredModel:
    """Deep-copy ``model`` in eval mode and swap fake quantizers / QAT layers for export modules.

    ``weight_format="fp32"`` strips all quantization (a float reference with BN folded);
    ``"int8"`` / ``"int4"`` keep it (INT4 packing is done on the ONNX file later).
    ``int8_weight_type``: ``"int8"`` (default, alias ``"s8"``) stores signed grids as INT8 (zero
    point 0); ``"uint8"`` (``"u8"``) stores them as UINT8 + 128; ``"auto"`` does that only for full
    8-bit grids (see :class:`~qat_plugins.export.qdq.QuantizedWeight`).
    ``refine_weight_grid`` (default) stores weight grids of fewer than 8 bits on the finest
    power-of-two refinement that fits INT8 (same values, a more exact int32 bias in ORT's kernels);
    models trained with ``reduce_range`` (7-bit weights, for CPUs without VNNI) keep ``|q| <= 64``.
    """
    int8_weight_type = WEIGHT_TYPE_ALIASES.get(int8_weight_type, int8_weight_type)
    if int8_weight_type not in ("auto", "int8", "uint8"):
        raise ValueError(f"int8_weight_type must be 'int8' ('s8'), 'uint8' ('u8') or 'auto', got {int8_weight_type!r}")
    m = copy.deepcopy(model).eval()
    lowered = LoweredModel(m)
    grid_limit: int | None = None
    if refine_weight_grid:  # reduce_range (7-bit weights) means: never store |q| > 64
        reduced = any((getattr(f, "quant_min", None), getattr(f, "quant_max", None)) == (-64, 63)
                      for _, f in find_fake_quantizers(m))
        grid_limit = 64 if reduced else 128
    if is_pt2e_graph(m):  # PT2E: weight fake quantizers -> integer weights, torchao's conv-bn pattern folded
        lower_pt2e_weights(m, lambda name, kind, fq, w: _lower_weight(name, kind, fq, w, weight_format,
                                                                       lowered.weights, int8_weight_type,
                                                                       grid_limit))
    fqs = find_fake_quantizers(m)
    if not fqs and weight_format != "fp32":
        raise ValueError(
            f"not a QAT model: {type(model).__name__} has no fake quantizers; call "
            "qat_plugins.prepare_qat first (or use weight_format='fp32' for a float model)")
    for name, fq in fqs:
        _check_initialised(name, fq)
    weight_fq_ids = set()
    owners: list[tuple[str, nn.Module, FakeQuantizeBase]] = []
    # remove_duplicate=False: FX shares one quantizer between several graph positions
    # (e.g. an identity shortcut reuses its input's quantizer) under several names
    for name, mod in m.named_modules(remove_duplicate=False):
        fq = getattr(mod, "weight_fake_quant", None)
        if isinstance(fq, FakeQuantizeBase):
            weight_fq_ids.add(id(fq))
            owners.append((name, mod, fq))
    lowered.num_fake_quantizers = len({id(f) for _, f in fqs}) + len(lowered.weights)
    # 1. activation quantizers (inside eager modules too, before those are swapped)
    done: dict[int, nn.Module] = {}
    for name, fq in fqs:
        if id(fq) in weight_fq_ids:
            continue
        if id(fq) not in done:
            done[id(fq)] = nn.Identity() if weight_format == "fp32" else _act_module(name, fq, clip_mode)
            lowered.num_activation_quantizers += isinstance(done[id(fq)], ActivationQDQ)
        _set_submodule(m, name, done[id(fq)])
    # 2. weight layers, BN folded, hooks and activation_post_process carried over
    swapped: dict[int, nn.Module] = {}
    for name, mod, fq in owners:
        if not name:
            raise ValueError("the top-level module itself is a QAT layer; wrap it in an nn.Module")
        if id(mod) not in swapped:
            swapped[id(mod)] = _weight_module(name, mod, fq, weight_format, lowered.weights, int8_weight_type,
                                              grid_limit)
            _move_hooks(mod, swapped[id(mod)])
        _set_submodule(m, name, swapped[id(mod)])
    return lowered
