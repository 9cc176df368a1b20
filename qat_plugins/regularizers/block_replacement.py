"""BR: block replacement on the full-precision counterpart (Yu, Yang, Zhang et al., arXiv 2412.15846)."""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..quant.prepare import _fusion_groups
from ..taps import FeatureTap, TapSite, find_site, first_tensor, unwrap
from ._losses import kd_kl
from .base import Regularizer, StepContext

__all__ = ["BlockReplacementRegularizer"]

_SAMPLES = ("one", "all")


class BlockReplacementRegularizer(Regularizer):
    """Mixed-precision branches: quantized blocks ``Q_1..Q_k`` followed by the frozen FP blocks.

    For block ``k`` of ``blocks`` the mixed model ``MP_k`` runs the quantized model up to the end of
    block ``k`` (its output is taken from the training forward, no copy of the model) and continues in
    the frozen FP model from block ``k+1`` (a hook replaces the FP block-``k`` output with the quantized
    one). Gradients flow through the FP suffix back into the quantized blocks (backward guidance);
    the FP suffix consumes the quantized features (forward guidance). Loss::

        KD(Q || F) + mean_{k in S} [ ce_weight * CE(MP_k, y) + kd_weight * KD(MP_k || F) ]

    with ``KD(a || F) = T^2 KL(softmax(F/T) || softmax(a/T))`` against the FP model's clean logits and
    ``S`` one block sampled uniformly per step (``sample="one"``, default: one extra FP forward and
    backward) or all blocks (``sample="all"``). ``distill_backbone=False`` drops ``KD(Q || F)``.

    Defaults (open in the paper): weight=1.0, sample="one", temperature=1.0, ce_weight=1.0,
    kd_weight=1.0, distill_backbone=True, seed=None (sample with torch's global generator; an int gives
    the regularizer its own generator); FP BatchNorm stays in eval mode.
    """

    name = "br"
    needs_fp_model = True

    def __init__(self, blocks: Sequence[str], weight: float = 1.0, *, sample: str = "one",
                 temperature: float = 1.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 distill_backbone: bool = True, seed: int | None = None) -> None:
        super().__init__(weight)
        if isinstance(blocks, str) or not blocks or not all(isinstance(b, str) for b in blocks):
            raise ValueError(f"blocks must be a non-empty list of block names, e.g. ['layer1', 'layer2'], got {blocks!r}")
        if sample not in _SAMPLES:
            raise ValueError(f"sample must be one of {_SAMPLES}, got {sample!r}")
        if temperature <= 0 or ce_weight < 0 or kd_weight < 0:
            raise ValueError("temperature must be > 0, ce_weight and kd_weight >= 0")
        self.blocks = list(blocks)
        self.sample, self.temperature = sample, float(temperature)
        self.ce_weight, self.kd_weight, self.distill_backbone = float(ce_weight), float(kd_weight), bool(distill_backbone)
        self.seed = seed
        # seed=None draws from torch's global generator, which the trainer seeds and checkpoints
        self._rng = random.Random(seed) if seed is not None else None
        self._q_tap: FeatureTap | None = None
        self._replace: FeatureTap | None = None
        self._feature: torch.Tensor | None = None
        self._current: str | None = None
        self.last_blocks: list[str] = []

    def _attach(self) -> None:
        assert self.model is not None and self.fp_model is not None
        student = unwrap(self.model)
        self._require_in_fp(self.blocks, "block")
        self._q_tap = self.tap(student, self.blocks)
        sites = []
        for b in self.blocks:
            site = find_site(self.fp_model, self._fp_block(student, b))
            sites.append(TapSite(b, site.module, site.occurrence, site.side))
        self._replace = FeatureTap(self.fp_model, (), record=False, transform=self._swap, always=True, sites=sites)
        self._replace.enabled = False
        self._taps.append(self._replace)  # removed on detach; enabled only inside _mixed_forward

    def _fp_block(self, student: torch.nn.Module, block: str) -> str:
        """The FP-model name whose output matches the QAT model's ``block`` output.

        ``prepare_qat`` fuses conv -> bn (-> relu) into one QAT module named after the conv whose output
        is after BN (and ReLU); the FP conv's own output is before BN. Replacing it there would run BN
        (and ReLU) twice, so a fused block is replaced at the end of its FP fusion group instead.
        """
        assert self.fp_model is not None
        fused = isinstance(getattr(find_site(student, block).module, "bn", None), torch.nn.modules.batchnorm._BatchNorm)
        fp_module = dict(self.fp_model.named_modules()).get(block)
        if not fused or fp_module is None or hasattr(fp_module, "bn"):
            return block
        return next((g[-1] for g in _fusion_groups(self.fp_model) if g[0] == block), block)

    def _swap(self, name: str, fp_feature: torch.Tensor) -> torch.Tensor:
        if name != self._current:
            return fp_feature
        assert self._feature is not None
        if self._feature.shape != fp_feature.shape:
            raise ValueError(f"block {name!r}: the quantized output {tuple(self._feature.shape)} does not match the FP "
                             f"output {tuple(fp_feature.shape)}; the FP model must be the same architecture")
        return self._feature

    def _mixed_forward(self, inputs: Any, block: str, feature: torch.Tensor) -> torch.Tensor:
        assert self._replace is not None and self.fp_model is not None
        self._current, self._feature = block, feature
        self._replace.enabled = True
        try:
            return first_tensor(self.fp_model(inputs))
        finally:
            self._replace.enabled = False
            self._current = self._feature = None

    def _loss(self, inputs: Any, targets: torch.Tensor | None, outputs: torch.Tensor,
              ctx: StepContext) -> torch.Tensor:
        assert self._q_tap is not None
        feats = dict(self._q_tap.features)
        missing = [b for b in self.blocks if b not in feats]
        if missing:
            raise RuntimeError(f"no block outputs recorded for {missing}: call loss() right after the model's "
                               "training forward on the same inputs")
        fp_logits = ctx.fp_forward()
        if fp_logits.shape != outputs.shape:
            raise ValueError(f"FP model logits {tuple(fp_logits.shape)} differ from the QAT model's "
                             f"{tuple(outputs.shape)}; the FP model must be the same architecture")
        chosen = self.blocks if self.sample == "all" else [self._pick()]
        self.last_blocks = chosen
        loss = kd_kl(outputs, fp_logits, self.temperature) if self.distill_backbone else outputs.new_zeros(())
        branch = outputs.new_zeros(())
        for b in chosen:
            mixed = self._mixed_forward(inputs, b, feats[b])
            if targets is not None and self.ce_weight:
                branch = branch + self.ce_weight * F.cross_entropy(mixed, targets)
            if self.kd_weight:
                branch = branch + self.kd_weight * kd_kl(mixed, fp_logits, self.temperature)
        return loss + branch / len(chosen)

    def _pick(self) -> str:
        if self._rng is not None:
            return self._rng.choice(self.blocks)
        return self.blocks[int(torch.randint(len(self.blocks), ()))]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._rng is not None:
            state["rng"] = self._rng.getstate()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "rng" in state and self._rng is not None:
            rng = state["rng"]
            self._rng.setstate((rng[0], tuple(rng[1]), rng[2]))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "blocks": self.blocks, "sample": self.sample, "temperature": self.temperature,
                "ce_weight": self.ce_weight, "kd_weight": self.kd_weight, "distill_backbone": self.distill_backbone,
                "seed": self.seed}
