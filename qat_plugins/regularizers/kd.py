"""KD: plain logit distillation from the full-precision model (Hinton et al. 2015), the papers' baseline."""

from __future__ import annotations

from typing import Any

import torch

from ._losses import kd_kl
from .base import Regularizer, StepContext
from .options import check_number

__all__ = ["KnowledgeDistillationRegularizer"]


class KnowledgeDistillationRegularizer(Regularizer):
    """``T^2 KL(softmax(z_FP / T) || softmax(z_Q / T))``, mean over the batch, to the frozen FP logits.

    ``z_Q`` are the QAT model's logits of the training forward, ``z_FP`` the FP model's on the same
    clean inputs, taken from the step's one shared FP forward (no extra forward when FPQ or BR also
    run). The teacher side has no gradient. It is the "KD" column of the FPQ paper and what NNCF and
    ModelOpt ship as QAT distillation.

    Defaults: weight=1.0 (project choice; FPQ's comparison uses CE + KD with weight 1),
    temperature=1.0 (project choice; ``T^2`` keeps gradient magnitudes comparable across ``T``).
    """

    name = "kd"
    needs_fp_model = True

    def __init__(self, weight: float = 1.0, *, temperature: float = 1.0) -> None:
        super().__init__(weight)
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True)

    def _attach(self) -> None:
        pass

    def _loss(self, inputs: Any, targets: torch.Tensor | None, outputs: torch.Tensor,
              ctx: StepContext) -> torch.Tensor:
        fp_logits = ctx.fp_forward()
        if fp_logits.shape != outputs.shape:
            raise ValueError(f"FP model logits {tuple(fp_logits.shape)} differ from the QAT model's "
                             f"{tuple(outputs.shape)}; the FP model must be the same architecture")
        return kd_kl(outputs, fp_logits, self.temperature)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "temperature": self.temperature}
