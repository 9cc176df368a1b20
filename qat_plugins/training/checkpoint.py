"""Atomic, self-describing training checkpoints.

A checkpoint (``torch.save`` of plain containers and tensors, loadable with ``weights_only=True``)
holds everything needed to continue a QAT run bit for bit:

* ``model`` -- the QAT model's ``state_dict`` (weights, BN statistics, fake-quant scales / flags),
* ``fp_model`` -- the full-precision model's ``state_dict``,
* ``optimizer`` / ``scheduler`` state, ``regularizers`` (``RegularizerSet.state_dict()``),
* ``rng`` -- torch, numpy and Python ``random`` states plus named ``torch.Generator`` s
  (augmentation, DataLoader),
* ``progress`` -- epoch, step, batch within the epoch, history and the running epoch sums,
* ``config`` / ``config_hash`` and the package / torch versions.

Files are written to a temporary file in the same directory and moved into place with
``os.replace``, so a crash leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from torch import nn

from .._io import atomic_path, atomic_write_bytes
from ..taps import unwrap
from .config import TrainConfig, config_diff, config_hash
from .distributed import world_size

__all__ = [
    "CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng",
    "check_config_matches", "read_resume_checkpoint", "atomic_write_bytes",
]

CHECKPOINT_FORMAT = "qat_plugins.checkpoint/1"


def _package_version() -> str:
    from .. import __version__

    return __version__


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Atomically write a checkpoint dict (adds format and version fields); returns the path."""
    p = Path(path)
    full = {"format": CHECKPOINT_FORMAT, "package_version": _package_version(), "torch_version": str(torch.__version__),
            **state}
    try:
        with atomic_path(p) as tmp:
            with open(tmp, "wb") as f:
                torch.save(full, f)
                f.flush()
                os.fsync(f.fileno())
    except RuntimeError as e:  # torch's zip writer reports a failed write (disk full, file-size limit) this way
        detail = " ".join(str(e).split())[:200]
        raise OSError(errno.ENOSPC, f"cannot write checkpoint ({detail}); the previous checkpoint is intact",
                      str(p)) from None
    return p


_REQUIRED = ("model", "fp_model", "optimizer", "scheduler", "rng", "progress", "config", "config_hash")


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated, corrupt or not a qat_plugins checkpoint (the message names the file).
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"checkpoint {p} is a directory; pass the checkpoint file inside it, e.g. "
                                f"{p / 'checkpoint.pt'}")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise PermissionError(f"cannot read checkpoint {p}: {e.strerror or e}") from None
    if head[:2] != b"PK":  # torch.save writes a zip archive; name other kinds of file instead of "corrupt"
        kind = "a JSON file" if head[:1] in (b"{", b"[") else "an ONNX file" if p.suffix == ".onnx" else \
            "a YAML file" if p.suffix in (".yaml", ".yml") else None
        if kind is not None:
            raise ValueError(f"{p} is {kind}, not a qat_plugins training checkpoint; pass the checkpoint.pt written "
                             "by qat-plugins train")
        what = "empty file" if not head else "not a torch zip archive"
        raise ValueError(f"checkpoint {p} is truncated or corrupt ({what}); pass the checkpoint.pt written by "
                         "qat-plugins train, or start again without "
                         "--resume")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip / pickle / EOF errors of a damaged file
        detail = " ".join(str(e).split())
        if "Weights only load failed" in detail:
            detail = "not loadable with weights_only=True"
        detail = detail[:200]
        raise ValueError(f"checkpoint {p} is truncated or corrupt ({type(e).__name__}: {detail}); delete it and "
                         "start again without --resume") from None
    if isinstance(state, dict) and state.get("format") != CHECKPOINT_FORMAT and \
            any("nncf" in str(k).lower() for k in state):
        raise ValueError(f"{p} is an NNCF checkpoint (qat_plugins.integrations.nncf.save_checkpoint), not a "
                         "training checkpoint; pass OUTPUT_DIR/checkpoint.pt of the run, or load it with "
                         "qat_plugins.integrations.nncf.load_checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p} is not a qat_plugins training checkpoint (format {CHECKPOINT_FORMAT!r} expected); "
                         "resume only from a checkpoint.pt written by qat-plugins train")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"checkpoint {p} is incomplete (missing {missing}); delete it and start again")
    return state


def check_config_matches(ckpt: Mapping[str, Any], cfg: TrainConfig, path: str | os.PathLike[str] = "checkpoint") -> None:
    """Raise ``ValueError`` naming the differing fields when ``ckpt`` was made with another config."""
    if ckpt.get("config_hash") == config_hash(cfg):
        return
    diffs = config_diff(ckpt["config"], cfg.to_dict())
    if not diffs:  # hash differs only through formatting of equal values
        return
    shown = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs[:8])
    more = f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else ""
    raise ValueError(f"checkpoint {path} was made with a different config: {shown}{more}; resume with the "
                     "config it was made with, or start a new run in another output directory")


def read_resume_checkpoint(path: str | os.PathLike[str], cfg: TrainConfig,
                           fp_model: nn.Module | None = None) -> dict[str, Any]:
    """The one resume block: load ``path`` and check it fits this run, else ``ValueError`` naming why.

    Checks the config (:func:`check_config_matches`), the number of processes and, with ``fp_model``,
    that the FP model is the one the checkpoint was made from.
    """
    ckpt = load_checkpoint(path)
    check_config_matches(ckpt, cfg, path)
    saved = int(ckpt.get("world_size", 1))
    if saved != world_size():  # the data order, steps per epoch and schedule depend on it
        raise ValueError(f"checkpoint {path} was made by {saved} process(es), this run has {world_size()}; resume "
                         "with the same torchrun --nnodes x --nproc_per_node")
    if fp_model is not None:
        current = unwrap(fp_model).state_dict()
        stored = ckpt["fp_model"]
        if set(stored) != set(current):
            raise ValueError(f"fp_model does not match the FP model in checkpoint {path} (different layers); "
                             "resume with the FP model the checkpoint was made from")
        for k, v in stored.items():
            if v.shape != current[k].shape or not torch.equal(v, current[k]):
                raise ValueError(f"fp_model differs from the FP model in checkpoint {path} (first difference: "
                                 f"{k}); resume with the FP model the checkpoint was made from")
    return ckpt


# --- random number generators -------------------------------------------------------------------
def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """torch / numpy / Python ``random`` states and the states of named generators."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name in saved:
            g.set_state(saved[name])
