"""NNCF checkpoints: ``nncf.torch.get_config`` / ``load_from_config`` plus the state dict (atomic write)."""

from __future__ import annotations

import copy
import json
import os
import pathlib
from typing import Any

import torch
from torch import nn

from ..._io import atomic_path
from ._compat import SequentialWrapper, hook_storage, is_nncf_model, require_nncf, wrap_sequential
from .quantizers import INPUT_MAP_ATTR, input_quantizer_map, install_lsq_grad_scale, nncf_quantizers

__all__ = ["save_checkpoint", "load_checkpoint", "nncf_model_config", "rebuild_from_nncf_config", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "qat_plugins.nncf/1"


def nncf_model_config(model: nn.Module) -> dict[str, Any]:
    """``nncf.torch.get_config(model)`` as plain JSON types (NNCF's StrEnums become strings)."""
    nncf = require_nncf()
    hook_storage(model)
    return json.loads(json.dumps(nncf.torch.get_config(model)))


def rebuild_from_nncf_config(
    fresh_fp_model: nn.Module, nncf_config: dict[str, Any], *, sequential_wrapper: bool = False,
    example_input: Any = None, lsq_grad_scale: bool = True,
) -> nn.Module:
    """``nncf.torch.load_from_config`` on a copy of ``fresh_fp_model``: the QAT model's structure.

    The quantizers get their saved widths but initial ranges: load the saved ``state_dict`` next.
    ``example_input`` (optional) maps each layer to its input quantizer (for FPQ's noise step);
    ``lsq_grad_scale`` as in :func:`~qat_plugins.integrations.nncf.prepare_qat` (default true).
    """
    nncf = require_nncf()
    from nncf.common.quantization.structs import QuantizationScheme  # noqa: PLC0415

    if is_nncf_model(fresh_fp_model):
        raise ValueError("rebuild_from_nncf_config needs a fresh float model, got one that already has NNCF hooks")
    model = copy.deepcopy(fresh_fp_model)
    if sequential_wrapper:
        model = wrap_sequential(model, warn=False)
    config = copy.deepcopy(nncf_config)
    for cmd in config.get("compression_state", []):
        mc = cmd.get("module_config", {})
        if isinstance(mc.get("mode"), str):
            mc["mode"] = QuantizationScheme(mc["mode"])
        if isinstance(mc.get("scale_shape"), list):
            mc["scale_shape"] = tuple(mc["scale_shape"])
    qmodel = nncf.torch.load_from_config(model, config)
    for qi in nncf_quantizers(qmodel):
        qi.module.set_levels()
    if example_input is not None:
        input_quantizer_map(qmodel, example_input)
    if lsq_grad_scale:
        install_lsq_grad_scale(qmodel)
    return qmodel


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
                    ) -> pathlib.Path:
    """Save an NNCF QAT model: its NNCF config + ``state_dict`` + ``extra`` (atomic write).

    ``extra`` must load with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts).
    """
    nncf = require_nncf()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "nncf_version": nncf.__version__,
        "nncf_config": nncf_model_config(model),
        "state_dict": model.state_dict(),
        "model_class": type(model).__qualname__,
        "sequential_wrapper": isinstance(model, SequentialWrapper),
        "training": model.training,
        "input_quantizers": dict(model.__dict__.get(INPUT_MAP_ATTR, {})),
        "extra": extra,
    }
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(fresh_fp_model: nn.Module, path: str | os.PathLike[str], example_input: Any
                    ) -> tuple[nn.Module, Any]:
    """Rebuild the QAT model from a fresh float model and a :func:`save_checkpoint` file.

    ``example_input`` runs one forward pass to check the result. Returns ``(model, extra)`` in the
    train/eval mode it was saved in.
    """
    require_nncf()
    path = pathlib.Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a qat_plugins NNCF checkpoint (format {CHECKPOINT_FORMAT})")
    if is_nncf_model(fresh_fp_model):
        raise ValueError("load_checkpoint needs a fresh float model, got one that already has NNCF hooks")
    probe = wrap_sequential(fresh_fp_model, warn=False) if ckpt.get("sequential_wrapper") else fresh_fp_model
    if type(probe).__qualname__ != ckpt.get("model_class"):
        raise ValueError(f"{path} was saved from {ckpt.get('model_class')}, got {type(probe).__qualname__}")
    qmodel = rebuild_from_nncf_config(fresh_fp_model, ckpt["nncf_config"],
                                      sequential_wrapper=bool(ckpt.get("sequential_wrapper")))
    qmodel.load_state_dict(ckpt["state_dict"], strict=True)
    for qi in nncf_quantizers(qmodel):
        qi.module.set_levels()  # AsymmetricQuantizer has no post-load hook for this
        qi.module.initialized = True
    qmodel.__dict__[INPUT_MAP_ATTR] = dict(ckpt.get("input_quantizers") or {})
    qmodel.train(bool(ckpt.get("training", True)))
    was = qmodel.training
    qmodel.eval()
    with torch.no_grad():
        out = qmodel(*example_input) if isinstance(example_input, tuple) else qmodel(example_input)
    qmodel.train(was)
    if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
        raise ValueError(f"the model restored from {path} produced non-finite outputs")
    return qmodel, ckpt.get("extra")
