"""A table of ONNX exporters that integrations register into (the core never imports them).

:func:`~qat_plugins.export.onnx_export.export_onnx` hands a model to the first registered exporter
whose ``applies(model)`` is true, else lowers it with the built-in torch.ao / PT2E path. Same shape
as brevitas' handler table per export target and ModelOpt's self-registering plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from torch import nn

__all__ = ["Exporter", "ExportFunction", "register_exporter", "unregister_exporter", "registered_exporters",
           "find_exporter"]


class ExportFunction(Protocol):
    """``export(model, path, inputs, *, weight_format, **options) -> Path``.

    ``path`` is already checked (its directory exists and is writable), ``inputs`` is a non-empty
    tuple of float CPU tensors. The function writes the file (atomically) and returns its path.
    """

    def __call__(self, model: nn.Module, path: Path, inputs: tuple, *, weight_format: str,
                 **options: object) -> Path: ...


@dataclass(frozen=True)
class Exporter:
    """One entry of the table."""

    name: str
    applies: Callable[[nn.Module], bool]
    export: ExportFunction


_EXPORTERS: list[Exporter] = []


def register_exporter(name: str, applies: Callable[[nn.Module], bool], export: ExportFunction) -> None:
    """Register (or replace, by ``name``) an exporter for the models ``applies`` accepts.

    Later registrations are tried after earlier ones; re-registering a name keeps its position.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"exporter name must be a non-empty str, got {name!r}")
    if not callable(applies) or not callable(export):
        raise TypeError("applies and export must be callables")
    entry = Exporter(name, applies, export)
    for i, e in enumerate(_EXPORTERS):
        if e.name == name:
            _EXPORTERS[i] = entry
            return
    _EXPORTERS.append(entry)


def unregister_exporter(name: str) -> bool:
    """Remove the exporter ``name``; returns whether it was registered."""
    for i, e in enumerate(_EXPORTERS):
        if e.name == name:
            del _EXPORTERS[i]
            return True
    return False


def registered_exporters() -> list[Exporter]:
    """The table, in the order it is consulted."""
    return list(_EXPORTERS)


def find_exporter(model: nn.Module) -> Exporter | None:
    """The first registered exporter that applies to ``model`` (``None``: the built-in path)."""
    for e in _EXPORTERS:
        if e.applies(model):
            return e
    return None
