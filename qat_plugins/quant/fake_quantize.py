"""Low-bit fake quantizers that plug into ``torch.ao.quantization``.

Two modules, both :class:`torch.ao.quantization.FakeQuantizeBase` subclasses, so eager
``prepare_qat``, FX ``prepare_qat_fx``, torchao's PT2E ``prepare_qat_pt2e`` and ``convert`` accept
them:

* :class:`LSQFakeQuantize` -- learned step size (Esser et al., LSQ): the scale is an
  ``nn.Parameter`` trained with LSQ's gradient scale ``g = 1 / sqrt(N * Q_p)``, rounding uses a
  straight-through estimator, and the scale (and, for asymmetric grids, the zero point) is
  initialised from the first batch it sees.
* :class:`MinMaxFakeQuantize` -- the same grid with a non-learnable scale tracked by a running
  min/max, for baselines.

The quantization grid is ``q = clamp(round(x / s) + z, quant_min, quant_max)``,
``x_hat = (q - z) * s``; the bit width is carried by ``quant_min``/``quant_max`` exactly as
torch.ao does, so ``2 <= bits <= 8`` fits torch's 8-bit storage dtypes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

__all__ = ["LSQFakeQuantize", "MinMaxFakeQuantize", "quant_range", "fake_quantize"]

_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
_INITS = ("mse", "minmax", "lsq")
_EPS = float(torch.finfo(torch.float32).eps)


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit grid: ``[-2^(b-1), 2^(b-1)-1]`` or ``[0, 2^b-1]``."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int from 2 to 8, got {bits!r} ({type(bits).__name__})")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be from 2 to 8, got {bits}; choose a bit width in 2..8")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    # forward: exactly x (``(x - x*g) + x*g`` can be off by one ulp); backward: g * grad
    y = x * g
    return x.detach() + (y - y.detach())


def _view_for(t: torch.Tensor, x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return t.reshape(shape)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    ch_axis: int = 0,
) -> torch.Tensor:
    """``(clamp(round(x/s) + z, qmin, qmax) - z) * s`` with straight-through rounding.

    Gradients: ``x`` gets 1 inside the clamp range and 0 outside; ``scale`` gets LSQ's
    ``round(x/s) - x/s`` inside and ``qmin - z`` / ``qmax - z`` outside (times any gradient scale the
    caller applied to ``scale``). ``zero_point`` is treated as a constant.
    """
    s = _view_for(scale, x, ch_axis)
    z = _view_for(zero_point, x, ch_axis).detach()
    # round(x/s) + z as ONNX QuantizeLinear computes it (z is an integer): rounding x/s + z instead
    # breaks .5 ties differently for odd z and can round x/s + z onto a tie; values then differ from ORT
    q = _round_ste(torch.clamp(x / s, quant_min - z, quant_max - z))
    return q * s


class _ObserverView:
    """Read-only stand-in for the ``activation_post_process`` observer torch.ao's FX code reads."""

    def __init__(self, fq: "_GridFakeQuantize") -> None:
        self.quant_min, self.quant_max = fq.quant_min, fq.quant_max
        self.eps, self.dtype, self.qscheme, self.ch_axis = fq.eps, fq.dtype, fq.qscheme, fq.ch_axis
        self.is_dynamic = False
        self.calculate_qparams = fq.calculate_qparams


class _GridFakeQuantize(FakeQuantizeBase):
    """Shared grid, qparams and state handling of the two fake quantizers."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(
        self,
        quant_min: int | None = None,
        quant_max: int | None = None,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        ch_axis: int = 0,
        *,
        bits: int | None = None,
        eps: float = _EPS,
        is_dynamic: bool = False,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        if is_dynamic:
            raise ValueError("dynamic quantization is not supported by qat_plugins fake quantizers")
        if dtype not in (torch.quint8, torch.qint8, torch.uint8, torch.int8):
            raise ValueError(f"dtype must be an 8-bit (q)int type, got {dtype}")
        signed = dtype in (torch.qint8, torch.int8)
        if bits is not None:
            quant_min, quant_max = quant_range(bits, signed)
        if quant_min is None or quant_max is None:
            quant_min, quant_max = quant_range(8, signed)
        n_levels = quant_max - quant_min + 1
        if quant_min >= quant_max or n_levels & (n_levels - 1) or not 4 <= n_levels <= 256:
            raise ValueError(
                f"quant_min/quant_max ({quant_min}, {quant_max}) must span 2^b levels with 2 <= b <= 8"
            )
        lo, hi = (-128, 127) if signed else (0, 255)
        if quant_min < lo or quant_max > hi:
            raise ValueError(f"range ({quant_min}, {quant_max}) does not fit dtype {dtype}")
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)
        self.bits = int(math.log2(n_levels))
        self.dtype = dtype
        self.qscheme = qscheme
        self.ch_axis = ch_axis if qscheme in _PER_CHANNEL else -1
        self.is_dynamic = False
        self.eps = eps
        self.register_buffer("zero_point", torch.zeros(1))
        self.register_buffer("initialized", torch.tensor([0], dtype=torch.uint8))

    # -- flags ----------------------------------------------------------------------------
    def _flag(self, name: str) -> bool:
        """``buffer[0] != 0`` of a one-element flag buffer (``fake_quant_enabled``,
        ``observer_enabled``, ``initialized``), read from its device only after the buffer changed.

        The value is kept with the tensor and its version counter, which every in-place write moves
        (``fill_``, ``copy_``, ``load_state_dict``, torch.ao's ``enable_*`` / ``disable_*``); ``.to()``
        or a new buffer is a new tensor. A forward in steady state thus reads no flag from the device
        (no host sync; design note: docs/regularizers.md, "Host syncs").
        """
        t = getattr(self, name)
        cache = self.__dict__.setdefault("_flag_cache", {})
        try:
            version = t._version
        except RuntimeError:  # an inference tensor tracks no version: read it every time
            return bool(t[0] != 0)
        hit = cache.get(name)
        if hit is None or hit[0] is not t or hit[1] != version:
            hit = (t, version, bool(t[0] != 0))
            cache[name] = hit
        return hit[2]

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle) gets fresh tensors whose version counters restart (at 1 in torch
        # 2.13) and may equal a cached one: it must read its flags anew
        state = self.__dict__.copy()
        state.pop("_flag_cache", None)
        return state

    # -- properties -----------------------------------------------------------------------
    @property
    def activation_post_process(self) -> "_ObserverView":
        """What FX prepare inspects of a fake quantizer's observer (range, eps, dtype)."""
        return _ObserverView(self)

    @property
    def is_per_channel(self) -> bool:
        return self.qscheme in _PER_CHANNEL

    @property
    def is_symmetric(self) -> bool:
        return self.qscheme in _SYMMETRIC

    def _reduce_dims(self, x: torch.Tensor) -> list[int]:
        if not self.is_per_channel:
            return list(range(x.dim()))
        return [d for d in range(x.dim()) if d != self.ch_axis % x.dim()]

    def _minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_per_channel:
            flat = x.detach().transpose(0, self.ch_axis % x.dim()).reshape(x.shape[self.ch_axis], -1)
            return flat.min(1).values, flat.max(1).values
        return x.detach().min().reshape(1), x.detach().max().reshape(1)

    def _qparams_from_range(
        self, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point whose grid covers ``[lo, hi]`` (zero always representable)."""
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        if self.is_symmetric:
            amax = torch.maximum(-lo, hi)
            if self.quant_min < 0:
                scale = amax / max(-self.quant_min, self.quant_max)
                zp = torch.zeros_like(scale)
            else:  # unsigned symmetric: non-negative data on [0, qmax]
                scale = hi / self.quant_max
                zp = torch.full_like(scale, float(self.quant_min))
        else:
            scale = (hi - lo) / (self.quant_max - self.quant_min)
            scale = torch.clamp(scale, min=self.eps)
            zp = torch.clamp(torch.round(self.quant_min - lo / scale), self.quant_min, self.quant_max)
        return torch.clamp(scale, min=self.eps), zp

    def _mse_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid search over shrunk min/max ranges, keeping the lowest reconstruction MSE."""
        lo, hi = self._minmax(x)
        best = None
        x = x.detach()
        for ratio in torch.linspace(0.2, 1.0, 17).tolist():
            s, z = self._qparams_from_range(lo * ratio, hi * ratio)
            err = (fake_quantize(x, s, z, self.quant_min, self.quant_max, self.ch_axis) - x).pow(2)
            err = err.mean(dim=self._reduce_dims(x)) if self.is_per_channel else err.mean().reshape(1)
            if best is None:
                best = [err, s, z]
            else:
                better = err < best[0]
                best = [torch.where(better, err, best[0]), torch.where(better, s, best[1]),
                        torch.where(better, z, best[2])]
        assert best is not None
        return best[1], best[2]

    def _init_qparams(self, x: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        if method == "minmax":
            return self._qparams_from_range(*self._minmax(x))
        if method == "lsq":
            s, z = self._qparams_from_range(*self._minmax(x))  # zero point from the range
            dims = self._reduce_dims(x)
            mean_abs = x.detach().abs().mean(dim=dims) if self.is_per_channel else x.detach().abs().mean().reshape(1)
            # LSQ's Q_P: the largest positive level (2^(b-1)-1 signed, 2^b-1 unsigned)
            return torch.clamp(2 * mean_abs / math.sqrt(self.quant_max), min=self.eps), z
        return self._mse_qparams(x)

    def calculate_qparams(self, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """``(scale, zero_point)`` as torch.ao's ``convert`` expects (float scale, int zero point)."""
        scale = torch.clamp(self.scale.detach().abs(), min=self.eps).float()
        return scale, self.zero_point.detach().round().to(torch.int32)

    def _resize_to(self, n: int) -> None:
        if self.scale.numel() != n:
            self.scale.data = torch.ones(n, dtype=self.scale.dtype, device=self.scale.device)
            self.zero_point.data = torch.zeros(n, dtype=self.zero_point.dtype, device=self.zero_point.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # per-channel qparams get their length on the first batch; a fresh module still has
        # length 1, so take the stored length before torch copies values in.
        key = prefix + "scale"
        if key in state_dict:
            self._resize_to(state_dict[key].numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.jit.export
    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, quant_min={self.quant_min}, quant_max={self.quant_max}, "
            f"dtype={self.dtype}, qscheme={self.qscheme}, ch_axis={self.ch_axis}"
        )


class LSQFakeQuantize(_GridFakeQuantize):
    """LSQ fake quantizer: learned step size, straight-through rounding, first-batch init.

    Args:
        quant_min, quant_max: integer range; with ``bits`` they are derived (signed for
            ``qint8`` dtype, unsigned for ``quint8``).
        dtype: ``torch.quint8`` (activations) or ``torch.qint8`` (weights).
        qscheme: ``per_tensor_affine`` (asymmetric, zero point fixed at init, as in FPQ's
            base QAT), ``per_tensor_symmetric`` or ``per_channel_symmetric``/``per_channel_affine``.
        ch_axis: channel axis for per-channel grids.
        bits: bit width 2..8, an alternative to ``quant_min``/``quant_max``.
        init: ``"mse"`` (default, project choice: grid search of the clipping range minimising
            the reconstruction error on the first batch), ``"minmax"`` (FPQ's base QAT:
            ``s = (max-min)/(2^b-1)``) or ``"lsq"`` (LSQ paper: ``s = 2 mean|x| / sqrt(Q_p)``,
            ``Q_p = quant_max``). Measured on the benchmark's ResNet-20 W2A2 (3 epochs, 5 seeds):
            ``"mse"`` 83.9 %, ``"lsq"`` 81.9 %, ``"minmax"`` over 100 images 13.4 % (collapsed;
            BENCHMARKS.md).
        calib_samples: with ``init="minmax"``, keep observing (running min/max, scale refitted)
            until this many samples (batch rows) have passed, e.g. 100 as in FPQ's base QAT; 0
            (default, project choice) fixes the scale after the first batch.
        learn_scale: train the scale (``True``) or keep it at its initial value.

    The step size receives LSQ's gradient scale ``1 / sqrt(numel_per_scale * Q_p)``. Observing
    (initialisation) happens while ``observer_enabled`` is set and the module is not yet
    initialised; ``state_dict`` holds ``scale``, ``zero_point`` and ``initialized``.
    """

    def __init__(
        self,
        quant_min: int | None = None,
        quant_max: int | None = None,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        ch_axis: int = 0,
        *,
        bits: int | None = None,
        init: str = "mse",
        calib_samples: int = 0,
        learn_scale: bool = True,
        eps: float = _EPS,
        **kwargs: Any,
    ) -> None:
        super().__init__(quant_min, quant_max, dtype, qscheme, ch_axis, bits=bits, eps=eps, **kwargs)
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if isinstance(calib_samples, bool) or not isinstance(calib_samples, int) or calib_samples < 0:
            raise ValueError(f"calib_samples must be an int >= 0, got {calib_samples!r}")
        if calib_samples and init != "minmax":
            raise ValueError("calib_samples applies to init='minmax' only")
        self.init = init
        self.calib_samples = calib_samples
        self._seen = 0
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None
        self.scale = nn.Parameter(torch.ones(1), requires_grad=learn_scale)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        if self.is_per_channel:
            self._resize_to(x.shape[self.ch_axis])
        if self.calib_samples:  # min/max over the first calib_samples rows, across batches
            lo, hi = self._minmax(x)
            self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
            self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
            self._seen += int(x.shape[0]) if x.dim() else 1
            s, z = self._qparams_from_range(self._lo, self._hi)
            done = self._seen >= self.calib_samples
        else:
            s, z = self._init_qparams(x, self.init)
            done = True
        self.scale.data.copy_(s.reshape(self.scale.shape))
        self.zero_point.copy_(z.reshape(self.zero_point.shape))
        if done:
            self.initialized.fill_(1)
            self._lo = self._hi = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._flag("observer_enabled") and not self._flag("initialized"):
            self._initialize(x)
        if not self._flag("fake_quant_enabled"):
            return x
        n = x.numel() / max(1, self.scale.numel())
        g = 1.0 / math.sqrt(n * self.quant_max)  # LSQ: g = 1/sqrt(N * Q_P), Q_P = quant_max
        # |s|: a step that SGD pushes below zero keeps a gradient and recovers; clamping alone
        # would freeze it at eps and silence every channel behind it
        scale = torch.clamp(_grad_scale(self.scale, g).abs(), min=self.eps)
        return fake_quantize(x, scale.to(x.dtype), self.zero_point.to(x.dtype), self.quant_min,
                             self.quant_max, self.ch_axis)


class MinMaxFakeQuantize(_GridFakeQuantize):
    """Non-learnable baseline: scale/zero point from a running min/max (EMA ``averaging_constant``).

    While ``observer_enabled`` is set, each training batch updates the tracked range; gradients
    reach the input through the straight-through estimator only.
    """

    def __init__(
        self,
        quant_min: int | None = None,
        quant_max: int | None = None,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        ch_axis: int = 0,
        *,
        bits: int | None = None,
        averaging_constant: float = 0.01,
        eps: float = _EPS,
        **kwargs: Any,
    ) -> None:
        super().__init__(quant_min, quant_max, dtype, qscheme, ch_axis, bits=bits, eps=eps, **kwargs)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("min_val", torch.zeros(1))
        self.register_buffer("max_val", torch.zeros(1))

    def _resize_to(self, n: int) -> None:
        super()._resize_to(n)
        if self.min_val.numel() != n:
            self.min_val.data = torch.zeros(n, device=self.min_val.device)
            self.max_val.data = torch.zeros(n, device=self.max_val.device)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        if self.is_per_channel:
            self._resize_to(x.shape[self.ch_axis])
        lo, hi = self._minmax(x)
        if not self._flag("initialized"):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.initialized.fill_(1)
        else:
            c = self.averaging_constant
            self.min_val.mul_(1 - c).add_(c * lo)
            self.max_val.mul_(1 - c).add_(c * hi)
        s, z = self._qparams_from_range(self.min_val, self.max_val)
        self.scale.copy_(s)
        self.zero_point.copy_(z)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = prefix + "min_val"
        if key in state_dict:
            n = state_dict[key].numel()
            if self.min_val.numel() != n:
                self.min_val.data = torch.zeros(n)
                self.max_val.data = torch.zeros(n)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._flag("observer_enabled") and (self.training or not self._flag("initialized")):
            self._observe(x)
        if not self._flag("fake_quant_enabled"):
            return x
        return fake_quantize(x, self.scale.to(x.dtype), self.zero_point.to(x.dtype), self.quant_min,
                             self.quant_max, self.ch_axis)
