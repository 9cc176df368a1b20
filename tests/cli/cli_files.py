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
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
