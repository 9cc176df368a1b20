"""FPQ: feature-perturbed quantization (Pang & Cai, arXiv 2503.11159) = SFP + CSD."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..quant.step_size import activation_quantizers, step_size
from ..taps import FeatureTap, TapSite, conv_layers, find_site, preact_site, unwrap
from ._losses import csd_distance
from .base import Regularizer, StepContext

__all__ = ["FeaturePerturbationRegularizer"]


class FeaturePerturbationRegularizer(Regularizer):
    """Stochastic feature perturbation (SFP) plus channel-wise standardization distillation (CSD).

    SFP: in training forwards, each listed conv layer's *input* gets, with probability ``p`` (an
    independent coin per layer per forward), element-wise noise ``delta ~ U[-s/2, s/2]``, where ``s`` is
    the step size of the activation fake quantizer that produced that input (noise added after the
    quantizer). Where no quantizer feeds the input, ``s = fallback_ratio * std(input)``.

    CSD (when ``fp_model`` is given and ``distill=True``)::

        L_CSD = mean_l  D( std_c(z_Q^l), std_c(z_FP^l) ),   std_c(z) = (z - mu_c) / sqrt(var_c + eps)

    with ``z^l`` the conv output *before* BatchNorm in the quantized student (perturbed forward) and
    the frozen FP model (clean input); mean/variance per channel over batch and spatial axes; ``D`` the
    mean squared difference (``reduction="mean"``) or the per-channel mean summed over channels
    (``reduction="sum"``). The paper adds ``L_CSD`` to the task loss with weight 1.

    Defaults: layers=None (every conv layer), weight=1.0, p=0.1 (the paper's best), eps=1e-5,
    reduction="mean", fallback_ratio=0.1, distill=True. Open choices of the paper made here: noise after
    the activation quantizer, a coin per layer per forward, the axes/eps/reduction of CSD.
    """

    name = "fpq"

    def __init__(self, layers: Sequence[str] | None = None, weight: float = 1.0, *, p: float = 0.1,
                 distill: bool = True, eps: float = 1e-5, reduction: str = "mean",
                 fallback_ratio: float = 0.1) -> None:
        super().__init__(weight)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if eps <= 0 or fallback_ratio < 0:
            raise ValueError("eps must be > 0 and fallback_ratio >= 0")
        self.layers = list(layers) if layers is not None else None
        self.p, self.distill, self.eps = float(p), bool(distill), float(eps)
        self.reduction, self.fallback_ratio = reduction, float(fallback_ratio)
        self._scales: dict[tuple[int, int], torch.Tensor] = {}
        self._student_pre: FeatureTap | None = None
        self._fp_pre: FeatureTap | None = None
        self._names: list[str] = []
        self.perturbed = 0  # layers perturbed in the latest training forward (for tests and logs)

    # -- SFP ------------------------------------------------------------------------------
    def _perturb(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or float(torch.rand(())) >= self.p:
            return x
        s = self._scales.get((x.data_ptr(), x.numel()))
        if s is None:
            s = self.fallback_ratio * x.detach().std()
        self.perturbed += 1
        noise = (torch.rand_like(x) - 0.5) * s.detach()
        return x + noise

    def _attach(self) -> None:
        assert self.model is not None
        student = unwrap(self.model)
        self._names = self.layers if self.layers is not None else conv_layers(student)
        if not self._names:
            if isinstance(student, torch.fx.GraphModule):
                raise ValueError("FeaturePerturbationRegularizer needs conv layers as modules; this graph (PT2E) has "
                                 "them as aten ops. Prepare the model with mode='eager' or 'fx' (or NNCF) for FPQ")
            raise ValueError("FeaturePerturbationRegularizer found no conv layers; pass layers=[...]")
        for n in self._names:
            find_site(student, n)  # validates names (ValueError with close matches)
        quantizers = activation_quantizers(student)
        # 0. forget the addresses of the previous forward at the start of each forward, before any
        #    other pre-hook (eager prepare_qat quantizes the model input in a pre-hook of the model)
        self.tap(student, sites=[TapSite("input", student, -1, "input")], record=False, transform=self._forget,
                 prepend=True)
        # 1. remember each activation quantizer's step size by the address of its output
        for qname, qmod in quantizers:
            self.tap(student, sites=[_site(qname, qmod)], record=False, transform=self._make_recorder(qmod))
        # 2. perturb conv inputs
        self.tap(student, sites=[find_site(student, n, side="input") for n in self._names], record=False,
                 transform=self._perturb)
        # 3. CSD: pre-BN conv outputs of student and FP model
        if self.distill and self.fp_model is not None:
            self._require_in_fp(self._names, "layer")
            self._student_pre = self.tap(student, sites=[preact_site(student, n) for n in self._names])
            self._fp_pre = self.fp_tap(sites=[preact_site(self.fp_model, n) for n in self._names])

    def _forget(self, name: str, x: torch.Tensor) -> torch.Tensor:
        self._scales.clear()
        return x

    def _make_recorder(self, qmod: nn.Module):  # type: ignore[no-untyped-def]
        def rec(name: str, out: torch.Tensor) -> torch.Tensor:
            s = step_size(qmod)
            if s is not None and s.numel() == 1:
                self._scales[(out.data_ptr(), out.numel())] = s.reshape(())
            return out
        return rec

    def _loss(self, inputs: Any, targets: torch.Tensor | None, outputs: torch.Tensor,
              ctx: StepContext) -> torch.Tensor:
        self._scales.clear()
        self.perturbed = 0
        if self._student_pre is None or self._fp_pre is None:
            return outputs.new_zeros(())
        student_feats = dict(self._student_pre.features)
        ctx.fp_forward()
        fp_feats = self._fp_pre.features
        missing = [n for n in self._names if n not in student_feats or n not in fp_feats]
        if missing:
            raise RuntimeError(f"no features recorded for {missing}: call loss() right after the model's "
                               "training forward on the same inputs")
        total = outputs.new_zeros(())
        for n in self._names:
            total = total + csd_distance(student_feats[n], fp_feats[n], self.eps, self.reduction)
        return total / len(self._names) if self.reduction == "mean" else total

    def config(self) -> dict[str, Any]:
        return {**super().config(), "layers": self.layers, "p": self.p, "distill": self.distill, "eps": self.eps,
                "reduction": self.reduction, "fallback_ratio": self.fallback_ratio}


def _site(name: str, module: nn.Module) -> TapSite:
    return TapSite(name, module, -1, "output")
