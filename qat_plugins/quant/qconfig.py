"""QConfigs and QConfigMappings built from the package's fake quantizers."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.ao.quantization import QConfig, QConfigMapping

from .fake_quantize import LSQFakeQuantize, MinMaxFakeQuantize, quant_range

__all__ = ["qconfig", "qconfig_mapping", "weight_fake_quant", "act_fake_quant"]


def _cls(learnable: bool) -> type:
    return LSQFakeQuantize if learnable else MinMaxFakeQuantize


def weight_fake_quant(bits: int, *, per_channel: bool = True, learnable: bool = True,
                      reduce_range: bool = False, **kw: Any) -> Callable[..., Any]:
    """Constructor of a signed symmetric weight fake quantizer (per output channel by default).

    ``reduce_range=True`` trains 8-bit weights on the 7-bit grid [-64, 63] (*project choice*, default
    off): ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI saturate an int16 sum for |w| > 64.
    """
    qmin, qmax = (-64, 63) if reduce_range and bits == 8 else quant_range(bits, signed=True)
    qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    return _cls(learnable).with_args(quant_min=qmin, quant_max=qmax, dtype=torch.qint8,
                                     qscheme=qscheme, ch_axis=0, **kw)


def act_fake_quant(bits: int, *, learnable: bool = True, **kw: Any) -> Callable[..., Any]:
    """Constructor of an unsigned asymmetric activation fake quantizer (zero point fixed at init)."""
    qmin, qmax = quant_range(bits, signed=False)
    return _cls(learnable).with_args(quant_min=qmin, quant_max=qmax, dtype=torch.quint8,
                                     qscheme=torch.per_tensor_affine, **kw)


def qconfig(weight_bits: int = 8, act_bits: int = 8, *, per_channel: bool = True,
            learnable: bool = True, reduce_range: bool = False, init: str = "mse",
            calib_samples: int = 0) -> QConfig:
    """A ``torch.ao.quantization.QConfig`` with LSQ (or min/max) fake quantizers.

    Weights: signed, symmetric, per output channel (``per_channel=True``), ``weight_bits`` bits.
    Activations: unsigned, asymmetric (zero point fixed after first-batch calibration),
    ``act_bits`` bits. ``learnable=False`` uses :class:`MinMaxFakeQuantize` instead of LSQ.
    ``init`` / ``calib_samples``: LSQ's scale initialisation (see :class:`LSQFakeQuantize`): ``"mse"``
    on the first batch (default, project choice), ``init="minmax", calib_samples=100`` (FPQ's base
    QAT; activations observe 100 rows, weights are the same on every batch) or ``"lsq"`` (LSQ paper).
    """
    quant_range(weight_bits, True)  # validates
    quant_range(act_bits, False)
    if not isinstance(per_channel, bool) or not isinstance(learnable, bool):
        raise TypeError("per_channel and learnable must be bools")
    akw: dict[str, Any] = {"init": init, "calib_samples": calib_samples} if learnable else {}
    wkw: dict[str, Any] = {"init": init} if learnable else {}
    return QConfig(activation=act_fake_quant(act_bits, learnable=learnable, **akw),
                   weight=weight_fake_quant(weight_bits, per_channel=per_channel, learnable=learnable,
                                            reduce_range=reduce_range, **wkw))


def qconfig_mapping(weight_bits: int = 8, act_bits: int = 8, **kw: Any) -> QConfigMapping:
    """A global FX ``QConfigMapping`` of :func:`qconfig` (``**kw`` as for :func:`qconfig`)."""
    return QConfigMapping().set_global(qconfig(weight_bits, act_bits, **kw))
