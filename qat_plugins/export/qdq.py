"""Traceable stand-ins for fake quantizers that the TorchScript ONNX exporter turns into QDQ nodes.

* :class:`ActivationQDQ` replaces an activation fake quantizer. In PyTorch it computes exactly what
  the fake quantizer computes in eval mode, ``(clamp(round(x/s) + z, qmin, qmax) - z) * s``; in ONNX
  it becomes ``QuantizeLinear -> [Clip] -> DequantizeLinear`` (see :data:`CLIP_MODES`).
* :class:`QuantizedWeight` holds a layer's integer weight, scale and zero point as buffers; in
  PyTorch it returns ``(q - z) * s``, in ONNX a ``DequantizeLinear`` of an INT8 initializer
  (per-channel ``axis`` for per-channel grids). INT4 repacking happens after export
  (:mod:`qat_plugins.export.int4`).
* :class:`ExportConv` / :class:`ExportLinear` are the plain (BN-folded) conv / linear layers that
  consume a :class:`QuantizedWeight` (or a float weight) and apply an optional fused ReLU.

Sub-8-bit activation grids: a ``uint8`` ``QuantizeLinear`` saturates at ``0..255``, not at the
fake quantizer's ``quant_max``, so a clamp is needed. Three placements give the same values:

* ``"int"`` (default): ``QuantizeLinear -> Clip(uint8 qmin, qmax) -> DequantizeLinear`` -- the
  clamp runs on the integer tensor, so ONNX Runtime still fuses ``DQ -> Conv -> Q`` into
  ``QLinearConv`` (and ``Add`` into ``QLinearAdd``); only a cheap integer ``Clip`` stays between the
  fused kernels.
* ``"before"``: float ``Clip`` before ``QuantizeLinear``; ``Conv -> Clip -> Q`` no longer matches
  ORT's QDQ conv pattern, the conv runs in float.
* ``"after"``: float ``Clip`` after ``DequantizeLinear``; the consumer's ``DQ -> Conv`` pattern is
  broken the same way.

8-bit grids (``quant_min, quant_max`` equal to the storage type's range) get no clamp.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ActivationQDQ", "QuantizedWeight", "FloatWeight", "ExportConv", "ExportLinear",
           "CLIP_MODES", "DEFAULT_CLIP_MODE"]

CLIP_MODES = ("int", "before", "after")
DEFAULT_CLIP_MODE = "int"


def _const(g: Any, value: torch.Tensor) -> Any:
    return g.op("Constant", value_t=value)


class _QDQFunction(torch.autograd.Function):
    """``x -> QuantizeLinear -> [Clip] -> DequantizeLinear`` (a per-tensor or per-axis grid)."""

    # scale / zero point arrive as Python floats / ints (tuples when per-axis) so that the
    # symbolic sees values, not traced graph inputs
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: Any, zero_point: Any,  # type: ignore[override]
                quant_min: int, quant_max: int, signed: bool, axis: int, clip_mode: str) -> torch.Tensor:
        s = _expand(torch.tensor(scale, dtype=torch.float32), x, axis).to(x.dtype)
        z = _expand(torch.tensor(zero_point, dtype=torch.float32), x, axis).to(x.dtype)
        q = torch.clamp(x / s + z, quant_min, quant_max).round()
        return (q - z) * s

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, zero_point: Any, quant_min: int,
                 quant_max: int, signed: bool, axis: int, clip_mode: str) -> Any:
        qdtype = torch.int8 if signed else torch.uint8
        lo_t, hi_t = (-128, 127) if signed else (0, 255)
        per_axis = isinstance(scale, tuple)
        kw = {"axis_i": axis} if per_axis else {}
        s = _const(g, torch.tensor(scale, dtype=torch.float32))
        zp = _const(g, torch.tensor(zero_point, dtype=qdtype))
        need_clip = (quant_min, quant_max) != (lo_t, hi_t)
        if need_clip and clip_mode != "int" and per_axis:
            raise ValueError("per-channel activation quantizers with sub-8-bit grids need clip_mode='int'")
        if need_clip and clip_mode == "before":
            lo, hi = _float_bounds(scale, zero_point, quant_min, quant_max)
            x = g.op("Clip", x, _const(g, lo), _const(g, hi))
        q = g.op("QuantizeLinear", x, s, zp, **kw)
        if need_clip and clip_mode == "int":
            q = g.op("Clip", q, _const(g, torch.tensor(quant_min, dtype=qdtype)),
                     _const(g, torch.tensor(quant_max, dtype=qdtype)))
        y = g.op("DequantizeLinear", q, s, zp, **kw)
        if need_clip and clip_mode == "after":
            lo, hi = _float_bounds(scale, zero_point, quant_min, quant_max)
            y = g.op("Clip", y, _const(g, lo), _const(g, hi))
        return y


def _float_bounds(scale: float, zero_point: int, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    # (q - z) * s in float32, the same single rounding DequantizeLinear does
    s = torch.tensor(scale, dtype=torch.float32)
    return (torch.tensor(float(qmin - zero_point)) * s, torch.tensor(float(qmax - zero_point)) * s)


def _expand(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


class _DQWeightFunction(torch.autograd.Function):
    """``DequantizeLinear(q, scale, zero_point[, axis])`` of a constant integer weight."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,  # type: ignore[override]
                axis: int, per_axis: bool) -> torch.Tensor:
        s, z = _expand(scale, q, axis), _expand(zero_point.float(), q, axis)
        return (q.float() - z) * s

    @staticmethod
    def symbolic(g: Any, q: Any, scale: Any, zero_point: Any, axis: int, per_axis: bool) -> Any:
        kw = {"axis_i": axis} if per_axis else {}
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class ActivationQDQ(nn.Module):
    """Eval-mode stand-in for an activation fake quantizer (fixed grid), exported as QDQ."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                 signed: bool, axis: int = -1, clip_mode: str = DEFAULT_CLIP_MODE, bits: int = 8) -> None:
        super().__init__()
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
        scale_l = [float(v) for v in scale.detach().float().reshape(-1).tolist()]
        zp_l = [int(v) for v in zero_point.detach().round().reshape(-1).tolist()]
        # Python values, not buffers: they become Constant nodes in ONNX. Per-tensor grids use
        # scalars (as QuantizeLinear requires), per-channel grids tuples plus ``axis``.
        per_axis = len(scale_l) > 1
        self.scale: Any = tuple(scale_l) if per_axis else scale_l[0]
        self.zero_point: Any = tuple(zp_l) if per_axis else zp_l[0]
        self.quant_min, self.quant_max, self.signed = int(quant_min), int(quant_max), bool(signed)
        self.axis, self.clip_mode, self.bits = int(axis), clip_mode, int(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QDQFunction.apply(x, self.scale, self.zero_point, self.quant_min, self.quant_max,
                                  self.signed, self.axis, self.clip_mode)

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """The integer grid values of ``x`` as the file stores them after ``QuantizeLinear`` (+ the
        integer ``Clip``): ``clamp(round(x / s) + z)`` as int32."""
        s = _expand(torch.tensor(self.scale, dtype=torch.float32), x, self.axis)
        z = _expand(torch.tensor(self.zero_point, dtype=torch.float32), x, self.axis)
        lo, hi = (self.quant_min, self.quant_max) if self.clip_mode != "after" else \
            ((-128, 127) if self.signed else (0, 255))
        return torch.clamp(torch.round(x.float() / s) + z, lo, hi).to(torch.int32)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, range=({self.quant_min}, {self.quant_max}), signed={self.signed}, "
                f"per_channel={isinstance(self.scale, tuple)}, clip_mode={self.clip_mode!r}")


class QuantizedWeight(nn.Module):
    """Integer weight, scale and zero point; ``forward()`` returns ``(q - z) * s``.

    ``storage="int8"`` keeps a signed grid as INT8; ``storage="uint8"`` stores a signed grid shifted
    by +128 (``q + 128``, ``z + 128``: the same dequantized values) so that ONNX Runtime picks its
    U8U8 integer kernels -- on x86 CPUs without VNNI the U8S8 kernels add pairs of ``u8 * s8``
    products in saturating int16 and can be wrong for 8-bit weights. Unsigned grids are UINT8.
    ``offset`` records the shift (0 or 128). ``factor`` (a power of two, default 1) stores a grid of
    fewer than 8 bits as ``q * factor`` with scale ``s / factor`` -- the same float weights, but ONNX
    Runtime's integer kernels add the bias as int32 at scale ``s_in * s_weight``, so the bias is
    ``factor`` times more exact (see ``docs/onnx_export.md``).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                 bits: int, quant_min: int, quant_max: int, storage: str = "int8", factor: int = 1) -> None:
        super().__init__()
        signed = quant_min < 0
        self.offset = 128 if signed and storage == "uint8" else 0
        self.factor = int(factor)
        lo, hi = (-128, 127) if signed else (0, 255)
        if self.factor < 1 or self.factor & (self.factor - 1) or not (lo <= quant_min * self.factor
                                                                      and quant_max * self.factor <= hi):
            raise ValueError(f"grid factor {factor} must be a power of two that keeps ({quant_min}, {quant_max}) "
                             "within 8 bits")
        store = torch.int8 if signed and not self.offset else torch.uint8
        per_channel = scale.numel() > 1 or axis >= 0
        # q * 2^k with scale / 2^k: the same float weights bit for bit (power-of-two scaling is exact)
        scale = scale.detach().float().reshape(-1) / self.factor
        zero_point = zero_point.detach().round().reshape(-1) * self.factor
        if not per_channel:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        self.register_buffer("qweight", (q.detach().round().to(torch.int16) * self.factor + self.offset).to(store))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", (zero_point.to(torch.int16) + self.offset).to(store))
        self.axis = axis if per_channel else 0
        self.per_axis = per_channel
        self.bits, self.quant_min, self.quant_max = int(bits), int(quant_min), int(quant_max)

    def forward(self) -> torch.Tensor:
        return _DQWeightFunction.apply(self.qweight, self.scale, self.zero_point, self.axis, self.per_axis)

    def dequantize(self) -> torch.Tensor:
        """The float weight ``(q - z) * s`` (what ``DequantizeLinear`` computes)."""
        return _DQWeightFunction.forward(None, self.qweight, self.scale, self.zero_point, self.axis,
                                         self.per_axis)

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.qweight.shape)}, bits={self.bits}, axis={self.axis}, offset={self.offset}, "
                f"factor={self.factor}")


class FloatWeight(nn.Module):
    """A float weight (fake quant disabled, or an FP32 export)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", w.detach().float().clone())

    def forward(self) -> torch.Tensor:
        return self.weight


class _ExportLayer(nn.Module):
    """A weight module (:class:`QuantizedWeight`/:class:`FloatWeight`), a float bias, optional ReLU."""

    def __init__(self, weight: nn.Module, bias: torch.Tensor | None, relu: bool) -> None:
        super().__init__()
        self.w = weight
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None
        self.relu = relu

    def _act(self, y: torch.Tensor) -> torch.Tensor:
        return F.relu(y) if self.relu else y


class ExportConv(_ExportLayer):
    """Conv{1,2,3}d with the weight from a :class:`QuantizedWeight`/:class:`FloatWeight`, [+ ReLU]."""

    def __init__(self, src: nn.modules.conv._ConvNd, weight: nn.Module, bias: torch.Tensor | None,
                 relu: bool) -> None:
        super().__init__(weight, bias, relu)
        self.dim = len(src.kernel_size)
        self.stride, self.dilation, self.groups = src.stride, src.dilation, src.groups
        self.padding, self.padding_mode = src.padding, src.padding_mode
        self._reversed_padding_repeated_twice = getattr(src, "_reversed_padding_repeated_twice", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dim - 1]
        w = self.w()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            y = conv(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        else:
            y = conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self._act(y)


class ExportLinear(_ExportLayer):
    """Linear with the weight from a :class:`QuantizedWeight`/:class:`FloatWeight`, [+ ReLU]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._act(F.linear(x, self.w(), self.bias))
