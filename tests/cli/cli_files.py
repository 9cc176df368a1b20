"""Files for CLI tests: YAML configs with dotted-path changes, idx data sets, directory snapshots."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml


def write_yaml(path: Path, cfg: Any) -> Path:
    """``cfg`` as YAML at ``path``."""
    path.write_text(yaml.safe_dump(cfg))
    return path


def config_file(base: Mapping[str, Any], tmp: Path, name: str = "c.yaml", **changes: Any) -> Path:
    """``base`` with dotted-path ``changes`` (``"data.batch_size": 8``) and output_dir ``tmp/out``."""
    cfg = json.loads(json.dumps(base))
    cfg["output_dir"] = str(tmp / "out")
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return write_yaml(tmp / name, cfg)


def write_idx(path: Path, arr: np.ndarray, code: int = 8) -> None:
    """An idx file (uint8 ``code=8``, int8 ``9`` or big-endian float32 ``0x0D``) holding ``arr``."""
    body = arr.astype({8: np.uint8, 9: np.int8, 0x0D: ">f4"}[code]).tobytes()
    path.write_bytes(bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + body)


def snapshot(*dirs: Path) -> dict[str, str]:
    """SHA-256 of every file below ``dirs`` (to assert that nothing changed)."""
    out = {}
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                p = Path(root) / f
                try:
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
                except FileNotFoundError:  # removed between listing and reading (a run's write probe)
                    continue
    return out


ROOT = Path(__file__).resolve().parents[2]

# 64 training digits, batch 32: 2 QAT steps; trains in about a second.
BASE: dict[str, Any] = {
    "data": {"limit_train": 64, "batch_size": 32},
    "model": {"name": "cnn", "width": 4},
    "fp": {"epochs": 1},
    "qat": {"epochs": 1, "augment": False},
    "progress": False,
}


def subprocess_env() -> dict[str, str]:
    """The environment of a ``python -m qat_plugins`` subprocess: this checkout first, one thread."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def error_lines(err: str) -> list[str]:
    """The ``qat-plugins: ...`` lines of a stderr text."""
    return [ln for ln in err.splitlines() if ln.startswith("qat-plugins:")]


class Ctx:
    """Shared files: a finished run, its ONNX export, the ONNX file of another model."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run = root / "run"
        self.cfg = root / "run.yaml"
        self.ckpt = self.run / "checkpoint.pt"
        self.results = self.run / "results.json"
        self.onnx = root / "model.onnx"
        self.other_onnx = root / "other.onnx"
