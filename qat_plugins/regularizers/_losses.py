"""Loss formulas shared by the regularizers (pure tensor functions, tested by hand computation)."""

from __future__ import annotations

import math
from typing import Any

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


def csd_distance(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-5,
                 reduction: str = "mean") -> torch.Tensor:
    """Channel-wise standardization distillation distance between two ``(N, C, ...)`` features.

    ``reduction="mean"`` (default): mean squared difference over all elements of the standardized
    features. ``reduction="sum"`` (the paper's sum over channels): sum over channels of the
    per-channel mean (over batch and positions) squared difference. The teacher gets no gradient.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student feature {tuple(student.shape)} and teacher feature {tuple(teacher.shape)} differ; "
                         "is the FP model the same architecture?")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if student.dim() < 2:
        raise ValueError(f"expected a (N, C, ...) feature, got shape {tuple(student.shape)}")
    with torch.no_grad():
        target = channel_standardize(teacher, eps)
    # every channel has numel / C elements, so the sum over channels of the per-channel means is the
    # total sum times C / numel
    coef = 1.0 / student.numel() if reduction == "mean" else student.shape[1] / student.numel()
    if not student.requires_grad:
        return F.mse_loss(channel_standardize(student, eps), target, reduction="sum") * coef
    return _StandardizedDistance.apply(student, target, float(eps), coef)


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
