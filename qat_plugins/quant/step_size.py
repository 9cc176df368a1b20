"""Find activation fake quantizers in a QAT model and read their step sizes.

Understands this package's quantizers, torch.ao ``FakeQuantize`` modules (eager, FX, PT2E) and
NNCF's quantizer modules (duck-typed: ``levels`` with ``scale`` or ``input_low``/``input_range``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

from ..taps import unwrap

__all__ = ["activation_quantizers", "weight_quantizers", "step_size"]


def _is_nncf_quantizer(m: nn.Module) -> bool:
    return hasattr(m, "levels") and (hasattr(m, "input_range") or hasattr(m, "scale")) and hasattr(m, "num_bits")


def _is_weight_name(name: str) -> bool:
    return name.endswith("weight_fake_quant") or "weight" in name.rsplit(".", 1)[-1]


def _quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    model = unwrap(model)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizeBase) or _is_nncf_quantizer(m):
            out.append((name, m))
    return out


def activation_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every activation fake quantizer of ``model``."""
    from ..integrations.nncf import is_nncf_model

    if is_nncf_model(unwrap(model)):
        from ..integrations.nncf import nncf_quantizers

        return [(q.name, q.module) for q in nncf_quantizers(unwrap(model)) if q.kind == "activation"]
    acts = []
    for name, m in _quantizers(model):
        if isinstance(m, FakeQuantizeBase):
            # weights are signed (qint8) in every qconfig of this package and torch.ao's defaults
            if not _is_weight_name(name) and getattr(m, "dtype", None) in (torch.quint8, torch.uint8):
                acts.append((name, m))
    return acts


def weight_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every weight fake quantizer of ``model``."""
    act_ids = {id(m) for _, m in activation_quantizers(model)}
    return [(n, m) for n, m in _quantizers(model) if id(m) not in act_ids]


def step_size(m: nn.Module) -> torch.Tensor | None:
    """The quantization step of a fake quantizer (may carry gradient for learnable ones)."""
    if isinstance(m, FakeQuantizeBase):
        s = getattr(m, "scale", None)
        if isinstance(s, torch.Tensor):
            return s
        try:
            return m.calculate_qparams()[0]
        except Exception:  # noqa: BLE001
            return None
    if _is_nncf_quantizer(m):
        levels = int(getattr(m, "levels"))
        if hasattr(m, "input_range"):
            return m.input_range.abs() / (levels - 1)
        level_high = getattr(m, "level_high", levels // 2 - 1)
        return m.scale.abs() / max(1, int(level_high))
    return None
