"""``qat-plugins train --config nncf.json``: the NNCF flow as hooks of :func:`qat_plugins.training.run`.

The training run entry does data, FP training, QAT, checkpoints, export and validation; the hooks
add NNCF's prepare (or rebuild on resume), NNCF's model config in checkpoints and ``nncf_qat.pt``.
"""

from __future__ import annotations

import inspect
import os
import pathlib
from typing import Any, Mapping

import torch
from torch import nn

from ...regularizers import REGISTRY
from ...training import RunHooks, TrainConfig, config_diff, run, update_config
from ._compat import SequentialWrapper, require_nncf
from .checkpoint import nncf_model_config, rebuild_from_nncf_config, save_checkpoint
from .config import prepare_from_config, to_train_config, validate_config, validate_for_model

__all__ = ["run_config", "train_config", "NNCF_CHECKPOINT_NAME"]

NNCF_CHECKPOINT_NAME = "nncf_qat.pt"
_EXTRA_FORMAT = "qat_plugins.nncf_run/1"


def _seeded(entry: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """A regularizer entry whose class takes ``seed`` (BR's block sampler) gets the run's seed if it has none."""
    entry = dict(entry)
    cls = REGISTRY.get(entry.get("name", ""))
    if cls is not None and entry.get("seed") is None and "seed" in inspect.signature(cls.__init__).parameters:
        entry["seed"] = seed
    return entry


def train_config(config: Any, *, output_dir: str | os.PathLike[str] | None = None) -> TrainConfig:
    """The :class:`~qat_plugins.training.TrainConfig` of an NNCF-style config (dict or JSON path).

    ``qat_plugins.train`` fills the run fields, ``compression[0]`` bits and ``keep_first_last_8bit`` the
    ``qat`` section (for logs and the resume check), ``qat_plugins.regularizers`` the regularizers.
    """
    norm = validate_config(config)
    t = dict(norm["qat_plugins"]["train"])
    if output_dir is not None:
        t["output_dir"] = os.fspath(output_dir)
    comp = norm["compression"][0]
    cfg = to_train_config(t, weight_bits=comp["weights"]["bits"], act_bits=comp["activations"]["bits"],
                          keep_first_last_8bit=norm["qat_plugins"]["keep_first_last_8bit"])
    regs = [_seeded(r, t["seed"]) for r in norm["qat_plugins"]["regularizers"]]
    return update_config(cfg, {"regularizers": regs})


def _nncf_part(norm: Mapping[str, Any]) -> dict[str, Any]:
    """What the trainer's config hash does not cover: the NNCF quantization settings."""
    return {"input_info": norm["input_info"], "target_device": norm["target_device"],
            "compression": norm["compression"],
            "keep_first_last_8bit": norm["qat_plugins"]["keep_first_last_8bit"]}


class _NNCFHooks:
    """State shared by the hooks of one run (the normalized config, the resume checkpoint's extra)."""

    def __init__(self, norm: dict[str, Any]) -> None:
        self.norm = norm
        self.path = "compression[0]"
        self.resume_extra: Mapping[str, Any] | None = None
        self.nncf_config: dict[str, Any] | None = None

    def check(self, fp: nn.Module, data: Any, cfg: TrainConfig) -> None:
        self.norm, self.path = validate_for_model(fp, self.norm, data.train)

    def on_resume(self, ckpt: Mapping[str, Any]) -> None:
        extra = ckpt.get("extra")
        if not isinstance(extra, Mapping) or extra.get("format") != _EXTRA_FORMAT or "nncf_config" not in extra:
            raise ValueError("the checkpoint was not written by an NNCF config run (no NNCF model config in it); "
                             "resume it with the command that made it")
        diffs = config_diff(extra["quantization"], _nncf_part(self.norm))
        if diffs:
            shown = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs[:8])
            raise ValueError(f"the checkpoint was made with different NNCF settings: {shown}; resume with the "
                             "config it was made with, or start a new run in another output directory")
        self.resume_extra = dict(extra)

    def prepare(self, fp_model: nn.Module, data: Any, cfg: TrainConfig) -> nn.Module:
        example = torch.zeros(self.norm["input_info"]["sample_size"])
        if self.resume_extra is not None:  # NNCF's own structure; the trainer loads the saved state next
            return rebuild_from_nncf_config(fp_model, self.resume_extra["nncf_config"], example_input=example,
                                            sequential_wrapper=bool(self.resume_extra.get("sequential_wrapper"))
                                            ).train()
        return prepare_from_config(fp_model, self.norm, self.path, data.train).train()

    def checkpoint_extra(self, student: nn.Module) -> dict[str, Any]:
        if self.nncf_config is None:  # the quantizer structure does not change during training
            self.nncf_config = nncf_model_config(student)
        return {"format": _EXTRA_FORMAT, "nncf_config": self.nncf_config,
                "sequential_wrapper": isinstance(student, SequentialWrapper),
                "quantization": _nncf_part(self.norm), "config": self.norm}

    def after_qat(self, result: Any, data: Any, out: pathlib.Path | None) -> dict[str, Any]:
        q = result.config.qat
        w, a = q.weight_bits, q.act_bits
        # results.json: the normalized NNCF config under "config", the TrainConfig it ran as under "train_config"
        extra: dict[str, Any] = {"quantization": f"W{w}A{a}", "config": self.norm,
                                 "train_config": result.config.to_dict(), "nncf_checkpoint": None}
        if out is not None:
            path = save_checkpoint(result.model.eval(), out / NNCF_CHECKPOINT_NAME,
                                   extra={"config": self.norm, "test_accuracy": result.test_accuracy})
            extra["nncf_checkpoint"] = str(path)
        return extra


def run_config(
    path: str | os.PathLike[str] | Mapping[str, Any],
    *,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Run an NNCF-style config end to end with :func:`qat_plugins.training.run` and NNCF hooks.

    Args:
        path: the JSON file (or a dict); fields in docs/nncf.md.
        output_dir: overrides ``qat_plugins.train.output_dir`` (default ``runs/nncf``); ``None`` in both
            means no files.
        resume: continue from ``OUTPUT/checkpoint.pt`` (same config, else ``ValueError``).
        max_steps: stop after this many QAT steps in total, leaving a checkpoint to resume from.

    Returns:
        the ``results.json`` payload (``fp_test_accuracy``, ``test_accuracy``, ``history``, ``onnx`` --
        the first export's report -- ``nncf_checkpoint``, ...); with ``interrupted=True`` the progress only.
    """
    require_nncf()
    norm = validate_config(path)
    cfg = train_config(norm, output_dir=output_dir)
    h = _NNCFHooks(norm)
    hooks = RunHooks(outputs=[NNCF_CHECKPOINT_NAME], check=h.check, on_resume=h.on_resume, prepare_fn=h.prepare,
                     checkpoint_extra=h.checkpoint_extra, after_qat=h.after_qat)
    result = run(cfg, resume=resume, max_steps=max_steps, hooks=hooks)
    payload = result.to_dict()
    payload["config_path"] = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    payload["onnx"] = payload["onnx"][0] if payload.get("onnx") else None
    return payload



