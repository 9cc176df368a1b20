"""Config section -> regularizer: ``{"name": "cr", "weight": 1.0, "layers": [...]}``."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

from .base import Regularizer
from .block_replacement import BlockReplacementRegularizer
from .consistency import ConsistencyRegularizer
from .feature_perturbation import FeaturePerturbationRegularizer
from .kd import KnowledgeDistillationRegularizer
from .options import OptionError

__all__ = ["REGISTRY", "build_regularizer", "build_regularizers", "register"]

REGISTRY: dict[str, type[Regularizer]] = {
    "cr": ConsistencyRegularizer,
    "fpq": FeaturePerturbationRegularizer,
    "br": BlockReplacementRegularizer,
    "kd": KnowledgeDistillationRegularizer,
}
_NOT_FROM_CONFIG = {"augment"}


def register(name: str, cls: type[Regularizer]) -> None:
    """Make a custom :class:`Regularizer` subclass available to configs under ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
        raise TypeError("cls must be a Regularizer subclass")
    REGISTRY[name] = cls


def build_regularizer(spec: Mapping[str, Any], *, where: str = "regularizers[0]") -> Regularizer:
    """Build one regularizer from a config entry; errors name the field (``where.field``)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: must be a mapping like {{name: cr, weight: 1.0}}, got {type(spec).__name__}")
    name = spec.get("name")
    if name not in REGISTRY:
        raise ValueError(f"{where}.name: unknown regularizer {name!r}; known: {sorted(REGISTRY)}")
    cls = REGISTRY[str(name)]
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self",) and p not in _NOT_FROM_CONFIG]
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"{where}.{key}: unknown option for {name!r}; allowed: {allowed}")
    for p in allowed:
        if params[p].default is inspect.Parameter.empty and p not in kwargs:
            hint = " (a list of module names, e.g. [layer1, layer2])" if p in ("blocks", "layers") else ""
            raise ValueError(f"{where}.{p}: required for {name!r}{hint}")
    try:
        return cls(**kwargs)
    except OptionError as e:  # every option is checked by the constructor; report its field path
        raise ValueError(f"{where}.{e.option}: {e.message}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def build_regularizers(specs: Sequence[Mapping[str, Any]] | None, *, where: str = "regularizers") -> list[Regularizer]:
    """Build a list of regularizers from config entries (``None`` or ``[]`` -> ``[]``)."""
    if specs is None:
        return []
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        raise ValueError(f"{where}: must be a list of regularizer entries, got {type(specs).__name__}")
    return [build_regularizer(s, where=f"{where}[{i}]") for i, s in enumerate(specs)]
