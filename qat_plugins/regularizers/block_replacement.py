"""BR: block replacement on the full-precision counterpart (Yu, Yang, Zhang et al., arXiv 2412.15846)."""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from torch import nn

from ..quant.prepare import fusion_groups
from ..taps import FeatureTap, exclusive, find_site, first_tensor, unwrap
from ._losses import kd_kl
from .base import Regularizer, StepContext
from .frozen_fp import FrozenFP
from .options import OptionError, check_bool, check_choice, check_int, check_names, check_number

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

    Cost: a mixed forward does not rerun the FP prefix. The step's one clean FP forward caches the
    outputs of the FP modules that run before the replaced block (the earlier children of each of its
    ancestors, e.g. ``conv1, bn1, relu, layer1`` for ``layer2``; ``layer2.0`` too for ``layer2.1``),
    and the mixed forward returns those cached outputs instead of computing them, so only the FP
    suffix runs (modules called more than once per forward are recomputed). See docs/regularizers.md.

    Defaults (all project choices; open in the paper): weight=1.0, sample="one", temperature=1.0,
    ce_weight=1.0, kd_weight=1.0, distill_backbone=True, seed=None (sample with torch's global
    generator; an int gives the regularizer its own generator); FP BatchNorm stays in eval mode.
    """

    name = "br"
    needs_fp_model = True

    def __init__(self, blocks: Sequence[str], weight: float = 1.0, *, sample: str = "one",
                 temperature: float = 1.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 distill_backbone: bool = True, seed: int | None = None) -> None:
        super().__init__(weight)
        self.blocks = check_names("blocks", blocks, allow_none=False, non_empty=True) or []
        self.sample = check_choice("sample", sample, _SAMPLES)
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True)
        self.ce_weight = check_number("ce_weight", ce_weight, low=0.0)
        self.kd_weight = check_number("kd_weight", kd_weight, low=0.0)
        self.distill_backbone = check_bool("distill_backbone", distill_backbone)
        self.seed = None if seed is None else check_int("seed", seed, low=0)
        if len(set(self.blocks)) != len(self.blocks):
            raise OptionError("blocks", f"lists a block twice: {self.blocks}")
        # seed=None draws from torch's global generator, which the trainer seeds and checkpoints
        self._rng = random.Random(seed) if seed is not None else None
        self._q_tap: FeatureTap | None = None
        self._cache: _PrefixCache | None = None
        self._fp_blocks: dict[str, str] = {}
        self.last_blocks: list[str] = []
        self.last_skipped: list[str] = []  # FP modules served from the cache in the latest mixed forward

    def _attach(self) -> None:
        assert self.model is not None and self.fp_model is not None
        student = unwrap(self.model)
        self._require_in_fp(self.blocks, "block")
        self._q_tap = self.tap(student, self.blocks)
        fp_modules = dict(self.fp_model.named_modules())
        self._fp_blocks = {}
        for b in self.blocks:
            name = self._fp_block(student, b)
            if name not in fp_modules:  # e.g. an FX graph as FP model: no module of that name
                raise ValueError(f"block {b!r}: the FP model has no module {name!r}; pass the float model the QAT "
                                 "model was prepared from")
            self._fp_blocks[b] = name
        self._cache = _PrefixCache(self.fp_model, list(self._fp_blocks.values()))
        self.fp_taps.append(self._cache)  # type: ignore[arg-type]  # enabled in the shared clean FP forward

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
        return next((g[-1] for g in fusion_groups(self.fp_model) if g[0] == block), block)

    def _mixed_forward(self, inputs: Any, block: str, feature: torch.Tensor) -> torch.Tensor:
        """FP model with ``block``'s output replaced by ``feature``; the FP prefix served from the cache."""
        assert self._cache is not None and self.fp_model is not None
        fp_name = self._fp_blocks[block]
        clean = self._cache.outputs.get(fp_name)
        if isinstance(clean, torch.Tensor) and clean.shape != feature.shape:
            raise ValueError(f"block {block!r}: the quantized output {tuple(feature.shape)} does not match the FP "
                             f"output {tuple(clean.shape)}; the FP model must be the same architecture")
        served = self._cache.prefix(fp_name)
        frozen = FrozenFP.lookup(self.fp_model)
        served.append((fp_name, frozen.feature_for(feature) if frozen is not None else feature))
        self.last_skipped = [n for n, _ in served[:-1]]
        patched: list[tuple[nn.Module, Any]] = []
        try:
            for name, value in served:
                mod = self._cache.modules[name]
                patched.append((mod, mod.__dict__.get("forward")))  # e.g. a folded conv's own instance forward
                mod.forward = _returning(value)  # instance attribute: shadows the class's forward
            with exclusive(self.fp_model):
                return first_tensor(self.fp_model(inputs))
        finally:
            for mod, previous in reversed(patched):
                if previous is None:
                    del mod.forward
                else:
                    mod.forward = previous

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
        assert self._cache is not None
        if not self._cache.outputs:
            raise RuntimeError("the clean FP forward recorded nothing; is the FP model the one passed to attach()?")
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
        self._cache.clear()
        return loss + branch / len(chosen)

    def _pick(self) -> str:
        if self._rng is not None:
            return self._rng.choice(self.blocks)
        # a host RNG draw (CPU generator): reading it never waits for the device
        return self.blocks[int(torch.randint(len(self.blocks), (), device="cpu"))]

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


def _returning(value: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return value
    return forward


class _PrefixCache:
    """Outputs of the FP modules that may precede a replaced block, recorded in the clean FP forward.

    Candidates are the children of every ancestor of each block (the modules an ancestor's forward
    may call before it reaches the block). Enabled only during the shared clean FP forward (like an
    FP tap); its hooks are removed by :meth:`remove`.
    """

    def __init__(self, fp_model: nn.Module, blocks: list[str]) -> None:
        self.fp_model = fp_model
        self.modules = dict(fp_model.named_modules())
        self._enabled = False
        self.outputs: dict[str, Any] = {}
        self._end: dict[str, int] = {}
        self._start: dict[str, int] = {}
        self._calls: dict[str, int] = {}
        self._tick = 0
        self._candidates: dict[str, list[str]] = {}
        watched: set[str] = set(blocks)
        for b in blocks:
            parts = b.split(".")
            ancestors = [".".join(parts[:i]) for i in range(len(parts))]
            cands = []
            for a in ancestors:
                prefix = f"{a}." if a else ""
                cands += [prefix + c for c, _ in self.modules[a].named_children()]
            self._candidates[b] = [c for c in cands if c != b and c not in ancestors]
            watched.update(self._candidates[b])
        self._handles = []
        for name in watched:
            mod = self.modules[name]
            self._handles.append(mod.register_forward_pre_hook(self._make_pre(name)))
            self._handles.append(mod.register_forward_hook(self._make_post(name)))

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        if on and not self._enabled:
            self.clear()  # a new clean forward starts
        self._enabled = on

    def _make_pre(self, name: str) -> Any:
        def pre(module: nn.Module, args: Any) -> None:
            if self._enabled:
                self._tick += 1
                self._start.setdefault(name, self._tick)
                self._calls[name] = self._calls.get(name, 0) + 1
        return pre

    def _make_post(self, name: str) -> Any:
        def post(module: nn.Module, args: Any, output: Any) -> None:
            if self._enabled:
                self._tick += 1
                self._end[name] = self._tick
                self.outputs[name] = output
        return post

    def prefix(self, block: str) -> list[tuple[str, Any]]:
        """``(name, clean output)`` of the modules that finished, called once, before ``block`` started."""
        start = self._start.get(block)
        if start is None:
            raise RuntimeError(f"block {block!r} did not run in the clean FP forward")
        return [(n, self.outputs[n]) for n in self._candidates[block]
                if self._calls.get(n) == 1 and self._end.get(n, start) < start]

    def clear(self) -> None:
        self.outputs.clear()
        self._end.clear()
        self._start.clear()
        self._calls.clear()
        self._tick = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
