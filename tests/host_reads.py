"""Counts the host reads of tensors in a block of code: the syncs a GPU run would wait on (issue 11).

Scalar reads (``item``, ``bool``, ``float``, ``int``, also from inside torch) all end in
``aten._local_scalar_dense``; list reads (``tolist``, ``numpy``) are Tensor methods seen as torch
functions; data-dependent shapes (``nonzero``, ``masked_select``, ``unique``) read the device too. A read
of a host RNG draw (a random tensor made from no tensor, on the CPU) waits for no device work and is
counted apart, as ``draws``.
"""

from __future__ import annotations

import traceback
import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_LIST_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}
_SHAPE_OPS = {"aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
              "aten.unique_consecutive", "aten.nonzero_static"}
_RANDOM_OPS = {"aten.rand", "aten.randint", "aten.randn", "aten.randperm"}


class HostReads:
    """``with HostReads() as r: ...``; then ``r.syncs`` (device reads), ``r.draws`` (host RNG draws
    read) and ``r.where`` (the code line of each sync, for the assertion message)."""

    def __init__(self) -> None:
        self.syncs = 0
        self.draws = 0
        self.where: list[str] = []
        self._drawn: "weakref.WeakSet[torch.Tensor]" = weakref.WeakSet()
        outer = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                if func in _LIST_READS:
                    outer._read(args[0])
                return func(*args, **(kwargs or {}))

        class _Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                name = str(func.overloadpacket)
                if name == "aten._local_scalar_dense" or name in _SHAPE_OPS:
                    outer._read(args[0])
                out = func(*args, **(kwargs or {}))
                if name in _RANDOM_OPS and isinstance(out, torch.Tensor) and out.device.type == "cpu":
                    outer._drawn.add(out)
                return out

        self._modes = (_Functions(), _Ops())

    def _read(self, t: Any) -> None:
        if isinstance(t, torch.Tensor) and t in self._drawn:
            self.draws += 1
            return
        self.syncs += 1
        frame = [f for f in traceback.extract_stack() if "qat_plugins" in f.filename]
        self.where.append(f"{frame[-1].filename}:{frame[-1].lineno}" if frame else "?")

    def __enter__(self) -> "HostReads":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
