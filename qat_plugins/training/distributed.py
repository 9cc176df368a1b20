"""Multi-process training with ``torchrun``: process group, DDP wrapping and keeping ranks in sync.

:func:`distributed_session` initialises the default process group from the torchrun environment when
``WORLD_SIZE > 1`` (gloo on CPU, ``cpu:gloo,cuda:nccl`` with CUDA, ``QAT_PLUGINS_DIST_BACKEND``
overrides) and tears it down at the end. How the ranks stay identical: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn

__all__ = [
    "is_distributed", "rank", "world_size", "local_rank", "default_backend", "init_distributed",
    "teardown_distributed", "distributed_session", "wrap_ddp", "broadcast_module", "broadcast_object",
    "any_rank", "agree_on_error",
]

BACKEND_ENV = "QAT_PLUGINS_DIST_BACKEND"


def is_distributed() -> bool:
    """True when the default ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} must be an integer "
                         "(it is set by torchrun)") from None


def rank() -> int:
    """This process's global rank (from the process group, else ``RANK`` set by torchrun, else 0)."""
    if is_distributed():
        return torch.distributed.get_rank()
    return _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def default_backend() -> str:
    """``$QAT_PLUGINS_DIST_BACKEND``, else ``cpu:gloo,cuda:nccl`` with CUDA, else ``gloo``."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        return forced
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_distributed(backend: str | None = None) -> bool:
    """Initialise the default process group from the torchrun environment when ``WORLD_SIZE > 1``.

    Returns True when this call created the group (the caller tears it down with
    :func:`teardown_distributed`), False when it was already initialised or the job is single-process.
    """
    if is_distributed() or _env_int("WORLD_SIZE", 1) <= 1:
        return False
    if not torch.distributed.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; launch with "
                         "torchrun --nproc_per_node N (it sets them), or unset WORLD_SIZE")
    backend = backend or default_backend()
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    torch.distributed.init_process_group(backend=backend, init_method="env://")
    return True


def teardown_distributed(*, barrier: bool = True) -> None:
    """Destroy the default process group (after a barrier unless ``barrier=False``, e.g. on errors)."""
    if not is_distributed():
        return
    try:
        if barrier:
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def distributed_session(backend: str | None = None) -> Iterator[bool]:
    """``with distributed_session():`` -- :func:`init_distributed` on entry, teardown on exit.

    Yields whether the job is distributed. A group that existed before is left alone.
    """
    created = init_distributed(backend)
    ok = False
    try:
        yield is_distributed()
        ok = True
    finally:
        if created:
            teardown_distributed(barrier=ok)


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` (CPU: no device ids; CUDA: this process's device).

    Call it only after every lazily sized parameter (LSQ per-channel step sizes) has its final shape:
    DDP registers the parameters and broadcasts rank 0's values (and buffers) when it wraps.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in model.parameters()):
        return model  # nothing to all-reduce (DDP refuses such modules)
    devices = {p.device for p in model.parameters()}
    device_ids = None
    if len(devices) == 1:
        dev = next(iter(devices))
        if dev.type == "cuda":
            device_ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(model, device_ids=device_ids)  # buffers: broadcast from rank 0 each forward


@torch.no_grad()
def broadcast_module(module: nn.Module, *, params: bool = True, buffers: bool = True, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and/or buffers into ``module`` on every rank (no-op when not distributed)."""
    if not is_distributed():
        return
    tensors: list[torch.Tensor] = []
    if params:
        tensors += [p.detach() for p in module.parameters()]
    if buffers:
        tensors += [b for b in module.buffers()]
    for t in tensors:
        if t.dtype == torch.bool:  # not every backend reduces bools
            tmp = t.to(torch.uint8)
            torch.distributed.broadcast(tmp, src)
            t.copy_(tmp.bool())
        else:
            torch.distributed.broadcast(t, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small state such as RNG / EMA dicts)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> list[int]:
    """Collective: the ranks whose ``flag`` is True (every rank gets the same list)."""
    if not is_distributed():
        return [0] if flag else []
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    torch.distributed.all_gather(out, t)
    return [r for r, v in enumerate(out) if int(v) != 0]


def agree_on_error(err: BaseException | None) -> BaseException | None:
    """Collective: every rank gets the error of the lowest failing rank (``None`` when none failed).

    Used for checks done on rank 0 only (the output directory), so the other ranks stop with the
    same one-line message instead of waiting for rank 0 in the next collective.
    """
    if not is_distributed():
        return err
    errors: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(errors, err)
    for e in errors:
        if e is not None:
            return e if isinstance(e, BaseException) else RuntimeError(str(e))
    return None
