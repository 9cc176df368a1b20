"""Loss formulas shared by the regularizers (pure tensor functions, tested by hand computation)."""

from __future__ import annotations

import math

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
    with torch.no_grad():
        target = channel_standardize(teacher, eps)
    # one fused kernel: every channel has numel / C elements, so the sum over channels of the
    # per-channel means is the total sum times C / numel
    total = F.mse_loss(channel_standardize(student, eps), target, reduction="sum")
    return total / student.numel() if reduction == "mean" else total * (student.shape[1] / student.numel())


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
