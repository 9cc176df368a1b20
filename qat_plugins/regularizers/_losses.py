"""Loss formulas shared by the regularizers (pure tensor functions, tested by hand computation)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["kd_kl", "channel_standardize", "csd_distance", "feature_mse", "sigmoid_rampup"]


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, mean over the batch; the teacher side gets no gradient."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return (t * t) * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


def channel_standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``(z - mu_c) / sqrt(var_c + eps)`` with mean/(biased) variance per channel (dim 1) over all other dims.

    Computed by ``F.batch_norm`` in training mode without running statistics or affine parameters:
    the same value as the four separate ops, 2.7-3.3x faster forward and backward on CPU.
    """
    if z.dim() < 2:
        raise ValueError(f"expected a (N, C, ...) feature, got shape {tuple(z.shape)}")
    return F.batch_norm(z, None, None, training=True, eps=eps)


class _StandardizedDistance(torch.autograd.Function):
    """``coef * sum((standardize(z) - target)^2)`` with its gradient, in one batch-norm forward and one
    batch-norm backward (ATen's fused kernels): the same value and gradient as ``F.batch_norm`` +
    ``F.mse_loss``, 10-15 % faster (measured on CPU, 64x16x32x32 and 128x16x14x14 features)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, target: torch.Tensor, eps: float, coef: float) -> torch.Tensor:
        zhat, mean, invstd = torch.ops.aten.native_batch_norm(z, None, None, None, None, True, 0.0, eps)[:3]
        d = zhat.sub_(target)
        ctx.save_for_backward(z, d, mean, invstd)
        ctx.eps, ctx.coef = eps, coef
        flat = d.reshape(-1)
        return torch.dot(flat, flat) * coef

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        z, d, mean, invstd = ctx.saved_tensors
        g = d * (2.0 * ctx.coef * grad)
        gz = torch.ops.aten.native_batch_norm_backward(g, z, None, None, None, mean, invstd, True, ctx.eps,
                                                       [True, False, False])[0]
        return gz, None, None, None


def _channel_dims(z: torch.Tensor) -> list[int]:
    return [0, *range(2, z.dim())]


def _csd_coef(z: torch.Tensor, per_channel_sum: bool) -> float:
    """The reduction's factor on the total sum of squares. Every channel has ``numel / C`` elements, so
    the sum over channels of the per-channel means is the total sum times ``C / numel``. Derived from
    the shape (not passed as a float) so that the compiled kernels do not specialise on its value."""
    return (z.shape[1] if per_channel_sum else 1) / z.numel()


def _csd_forward(z: torch.Tensor, teacher: torch.Tensor, eps: float,
                 per_channel_sum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSD's value written out, plus what its gradient needs (``d``, the student's mean and inverse std)."""
    dims = _channel_dims(z)
    var_s, mean_s = torch.var_mean(z, dim=dims, correction=0, keepdim=True)
    var_t, mean_t = torch.var_mean(teacher, dim=dims, correction=0, keepdim=True)
    invstd = torch.rsqrt(var_s + eps)
    d = (z - mean_s) * invstd - (teacher - mean_t) * torch.rsqrt(var_t + eps)
    return (d * d).sum() * _csd_coef(z, per_channel_sum), d, mean_s, invstd


def _csd_backward(grad: torch.Tensor, z: torch.Tensor, d: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                  per_channel_sum: bool) -> torch.Tensor:
    """Gradient of :func:`_csd_forward` w.r.t. the student feature (batch norm's backward of ``2 coef d``)."""
    dims = _channel_dims(z)
    zhat = (z - mean) * invstd
    g = d * (2.0 * _csd_coef(z, per_channel_sum) * grad)
    return invstd * (g - g.mean(dim=dims, keepdim=True) - zhat * (g * zhat).mean(dim=dims, keepdim=True))


class _CompiledOnce:
    """``torch.compile(fn)`` made on first use (shapes become dynamic after the first new shape); if
    compiling fails (no C++ compiler, an unsupported platform), one warning and plain ``fn`` from then on.
    Called under no_grad only (inference graphs): the autograd.Function around it owns the gradient."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        if not self.failed:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn)
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the plain function
                self.failed = True
                warnings.warn(f"CSD: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running "
                              f"{self.fn.__name__} uncompiled from now on", RuntimeWarning, stacklevel=2)
        return self.fn(*args)


_csd_forward_kernel = _CompiledOnce(_csd_forward)
_csd_backward_kernel = _CompiledOnce(_csd_backward)


class _CompiledDistance(torch.autograd.Function):
    """CSD with forward and backward each one ``torch.compile``-fused inference kernel: the value and
    gradient of :class:`_StandardizedDistance` (whose ATen batch-norm backward :func:`_csd_backward`
    writes out, so Inductor can fuse it), about 2x faster on CPU; ``retain_graph=True`` works."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, teacher: torch.Tensor, eps: float, per_channel_sum: bool) -> torch.Tensor:
        loss, d, mean, invstd = _csd_forward_kernel(z, teacher, eps, per_channel_sum)
        ctx.save_for_backward(z, d, mean, invstd)
        ctx.per_channel_sum = per_channel_sum
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        z, d, mean, invstd = ctx.saved_tensors
        return _csd_backward_kernel(grad, z, d, mean, invstd, ctx.per_channel_sum), None, None, None


def _csd_eager(student: torch.Tensor, teacher: torch.Tensor, eps: float, per_channel_sum: bool) -> torch.Tensor:
    with torch.no_grad():
        target = channel_standardize(teacher, eps)
    coef = _csd_coef(student, per_channel_sum)
    if not student.requires_grad:
        return F.mse_loss(channel_standardize(student, eps), target, reduction="sum") * coef
    return _StandardizedDistance.apply(student, target, float(eps), coef)


def csd_distance(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-5,
                 reduction: str = "mean", *, compiled: bool = False) -> torch.Tensor:
    """Channel-wise standardization distillation distance between two ``(N, C, ...)`` features.

    ``reduction="mean"`` (default): mean squared difference over all elements of the standardized
    features. ``reduction="sum"`` (the paper's sum over channels): sum over channels of the
    per-channel mean (over batch and positions) squared difference. The teacher gets no gradient.
    ``compiled=True``: the same formula through ``torch.compile`` (one fused kernel per direction,
    about 2x faster than the eager batch-norm kernels on CPU; float32 rounding differs by ~1e-6
    relative); the first call compiles (seconds); if compiling fails, one warning and the formula
    runs uncompiled. Only a student feature that requires grad takes the compiled path.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student feature {tuple(student.shape)} and teacher feature {tuple(teacher.shape)} differ; "
                         "is the FP model the same architecture?")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if student.dim() < 2:
        raise ValueError(f"expected a (N, C, ...) feature, got shape {tuple(student.shape)}")
    args = (student, teacher.detach(), float(eps), reduction == "sum")
    if compiled and student.requires_grad:
        return _CompiledDistance.apply(*args)
    return _csd_eager(*args)


def feature_mse(a: torch.Tensor, b: torch.Tensor, *, stop_grad_b: bool = True) -> torch.Tensor:
    """Mean squared difference of two features of equal shape (``b`` detached by default)."""
    if a.shape != b.shape:
        raise ValueError(f"features differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.mse_loss(a, b.detach() if stop_grad_b else b)


def sigmoid_rampup(step: int, length: int) -> float:
    """``exp(-5 (1 - t/L)^2)`` for ``t < L``, else 1 (the mean-teacher ramp-up); 1 when ``L == 0``."""
    if length <= 0 or step >= length:
        return 1.0
    phase = 1.0 - max(0.0, step) / length
    return math.exp(-5.0 * phase * phase)
