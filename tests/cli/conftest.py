"""Shared fixture of the CLI tests: a finished tiny run and its ONNX exports."""

from __future__ import annotations

import pytest

from qat_plugins.cli import main

from cli_files import BASE, Ctx, write_yaml


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    """A finished run (tiny CNN), its ONNX export and the ONNX export of another model."""
    c = Ctx(tmp_path_factory.mktemp("hostile"))
    write_yaml(c.cfg, {**BASE, "output_dir": str(c.run)})
    assert main(["-q", "train", "--config", str(c.cfg)]) == 0
    assert main(["-q", "export", "--checkpoint", str(c.ckpt), "--out", str(c.onnx)]) == 0
    other = {**BASE, "seed": 7, "model": {"name": "cnn", "width": 6}, "output_dir": str(c.root / "other_run")}
    assert main(["-q", "train", "--config", str(write_yaml(c.root / "other.yaml", other))]) == 0
    assert main(["-q", "export", "--checkpoint", str(c.root / "other_run" / "checkpoint.pt"), "--out",
                 str(c.other_onnx)]) == 0
    return c
