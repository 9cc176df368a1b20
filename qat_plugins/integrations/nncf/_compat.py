"""NNCF import guard and model detection (nothing here imports NNCF at module load).

``require_nncf()`` imports NNCF on demand or raises an ``ImportError`` naming the extra;
``is_nncf_model()`` recognises an NNCF model without importing NNCF.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch import nn

__all__ = ["INSTALL_HINT", "HOOKS_ATTR", "SUPPORTED_BITS", "require_nncf", "is_nncf_model", "has_nncf_quantizers",
           "hook_storage", "SequentialWrapper", "wrap_sequential", "check_bits"]

INSTALL_HINT = "pip install 'qat-plugins[nncf]'"
HOOKS_ATTR = "__nncf_hooks"
SUPPORTED_BITS = tuple(range(2, 9))
_EXTENSION_TIMEOUT_ENV = "NNCF_EXTENSION_LOAD_TIMEOUT"


def require_nncf() -> Any:
    """Import NNCF (and ``nncf.torch``) or raise an ``ImportError`` that says how to install it."""
    # NNCF compiles a C++ extension on first use and gives up after 60 s; on a loaded 2-core machine
    # the build takes longer (project choice: 10 minutes unless the user set a value)
    os.environ.setdefault(_EXTENSION_TIMEOUT_ENV, "600")
    try:
        import nncf  # noqa: PLC0415
        import nncf.torch  # noqa: F401, PLC0415
    except ImportError as e:
        raise ImportError(
            f"the NNCF integration needs nncf 3.4 ({type(e).__name__}: {e}); install it with: {INSTALL_HINT}"
        ) from e
    return nncf


def is_nncf_model(model: nn.Module) -> bool:
    """True when ``model`` carries NNCF hooks (``__nncf_hooks``); does not import NNCF."""
    return isinstance(getattr(model, "_modules", {}).get(HOOKS_ATTR), nn.Module)


def has_nncf_quantizers(model: nn.Module) -> bool:
    """True when ``model`` is an NNCF model with at least one NNCF quantizer module (no NNCF import)."""
    if not is_nncf_model(model):
        return False
    return any(type(m).__module__.startswith("nncf.") and hasattr(m, "num_bits")
               for m in model._modules[HOOKS_ATTR].modules())


def hook_storage(model: nn.Module) -> nn.Module:
    """NNCF's hook storage of ``model``; ``ValueError`` when it is not an NNCF model."""
    require_nncf()
    from nncf.torch.function_hook.wrapper import get_hook_storage, is_wrapped  # noqa: PLC0415

    if not is_wrapped(model):
        raise ValueError(f"{type(model).__name__} is not an NNCF model (no {HOOKS_ATTR}); run prepare_qat first")
    return get_hook_storage(model)


def check_bits(bits: Any, field: str) -> None:
    """``ValueError`` naming ``field`` unless ``bits`` is an int in 2..8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{field}: must be an int from 2 to 8, got {bits!r}")


class SequentialWrapper(nn.Module):
    """A plain ``nn.Module`` that runs the children of an ``nn.Sequential`` in order.

    NNCF registers its hook storage as a child of the model, which an ``nn.Sequential`` would call.
    Same child names ("0", "1", ...), same state-dict keys, same forward.
    """

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        for name, child in seq.named_children():
            self.add_module(name, child)
        self._order = tuple(name for name, _ in seq.named_children())
        self.train(seq.training)

    def forward(self, x: Any) -> Any:
        for name in self._order:
            x = self._modules[name](x)
        return x


def wrap_sequential(model: nn.Module, *, warn: bool) -> nn.Module:
    """``model`` itself, or a :class:`SequentialWrapper` around a top-level ``nn.Sequential``."""
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        if warn:
            warnings.warn(
                f"NNCF cannot quantize a top-level {type(model).__name__} (its hook storage would become a "
                "child the Sequential calls); wrapped it in qat_plugins.integrations.nncf.SequentialWrapper. "
                "Module names ('0', '1', ...) and state_dict keys are unchanged.",
                UserWarning, stacklevel=3)
        return SequentialWrapper(model)
    return model
