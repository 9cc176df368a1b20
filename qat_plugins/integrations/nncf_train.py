"""``qat-plugins train --config nncf.json``: an NNCF-style config run end to end (:func:`run_config`).

The config is the one :func:`qat_plugins.integrations.nncf_config.from_config` reads (quantization in
``compression``, regularizers in ``qat_plugins.regularizers``) plus the run settings in
``qat_plugins.train`` (schema in :mod:`qat_plugins.integrations.nncf_config`). :func:`run_config`:

1. validates the whole config, builds the float model and checks the config against it (module names
   of ``ignored_scopes`` / ``layers`` / ``blocks``, ``input_info.sample_size`` vs the data) before any
   training;
2. loads the data (digits by default) and trains the float model with
   :func:`qat_plugins.training.train_fp` (when resuming: the float weights stored in the checkpoint);
3. fine-tunes with :func:`qat_plugins.training.train_qat` -- the trainer's loop, optimizer, schedule,
   non-finite handling, checkpoints and exact resume -- with ``prepare_fn`` = the NNCF prepare of
   :func:`~qat_plugins.integrations.nncf_config.from_config` (``nncf.quantize`` + bit widths; one code
   path) and ``regularizers`` built from the config, which ``train_qat`` attaches with the float model
   as teacher. Every checkpoint (``OUTPUT/checkpoint.pt``) also stores NNCF's own
   ``nncf.torch.get_config(student)`` and the normalized config; the regularizer state (CR's EMA
   teacher, BR's block sampler, step counters) is the trainer's ``RegularizerSet.state_dict()``.
   ``resume=True`` rebuilds the student with ``nncf.torch.load_from_config`` on the stored float model
   (no re-calibration), then loads the weights / quantizer ranges, optimizer, scheduler, RNG and
   regularizer state: the result equals that of an uninterrupted run;
4. writes ``OUTPUT/nncf_qat.pt`` (:func:`qat_plugins.integrations.nncf.save_checkpoint`: restore it with
   ``load_checkpoint(fresh_float_model, path, example_input)``), ``OUTPUT/model_int8.onnx`` (or
   ``model_int4.onnx``; ``qat_plugins.export.export_onnx``, which routes NNCF models to
   :func:`~qat_plugins.integrations.nncf.export_nncf_onnx`) validated in ONNX Runtime on the test split,
   and ``OUTPUT/results.json``.

Files already in the output directory are never overwritten, except the run's own ``checkpoint.pt``
and, with ``resume``, the model files of a run that stopped before writing ``results.json``.
Single process only (no ``torch.distributed``).
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
import time
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import nncf as _q
from . import nncf_config as _c

__all__ = ["run_config", "train_config", "NNCF_CHECKPOINT_NAME", "onnx_name"]

log = logging.getLogger("qat_plugins.nncf")

NNCF_CHECKPOINT_NAME = "nncf_qat.pt"
_EXTRA_FORMAT = "qat_plugins.nncf_run/1"


def onnx_name(weight_format: str) -> str:
    """File name of the run's ONNX export, e.g. ``model_int8.onnx``."""
    return f"model_{weight_format}.onnx"


def train_config(config: Any, *, output_dir: str | os.PathLike[str] | None = None) -> Any:
    """The :class:`~qat_plugins.training.TrainConfig` of an NNCF-style config (dict or JSON path).

    ``qat_plugins.train`` fills the matching fields (table in :mod:`~qat_plugins.integrations.nncf_config`),
    ``compression[0].weights/activations.bits`` and ``qat_plugins.keep_first_last_8bit`` the ``qat``
    section (for logs and the checkpoint's config check; the NNCF prepare uses the compression section),
    ``qat_plugins.regularizers`` the regularizers (an entry whose regularizer takes a ``seed`` -- BR's
    block sampler -- and sets none gets ``qat_plugins.train.seed``, so a run is reproducible).
    ``output_dir`` overrides ``qat_plugins.train.output_dir``.
    """
    from ..training.config import load_config  # noqa: PLC0415

    norm = _c.validate_config(config)
    t = norm["qat_plugins"]["train"]
    d: dict[str, Any] = {"data": {}, "model": {}, "fp": {}, "qat": {}}
    for key, (section, name, _default) in _c.TRAIN_FIELDS.items():
        if section is None:
            continue
        if section == "":
            d[name] = t[key]  # type: ignore[index]
        else:
            d[section][name] = t[key]  # type: ignore[index]
    comp = norm["compression"][0]
    d["qat"].update(weight_bits=comp["weights"]["bits"], act_bits=comp["activations"]["bits"],
                    keep_first_last_8bit=norm["qat_plugins"]["keep_first_last_8bit"])
    d["regularizers"] = [_seeded(r, t["seed"]) for r in norm["qat_plugins"]["regularizers"]]
    if output_dir is not None:
        d["output_dir"] = os.fspath(output_dir)
    return load_config(d)


def _seeded(entry: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """A regularizer entry whose class takes ``seed`` (BR's block sampler) gets the run's seed if it has none."""
    import inspect  # noqa: PLC0415

    from ..regularizers import REGISTRY  # noqa: PLC0415

    entry = dict(entry)
    cls = REGISTRY.get(entry.get("name", ""))
    if cls is not None and entry.get("seed") is None and "seed" in inspect.signature(cls.__init__).parameters:
        entry["seed"] = seed
    return entry


def _nncf_part(norm: Mapping[str, Any]) -> dict[str, Any]:
    """What the trainer's config hash does not cover: the NNCF quantization settings."""
    return {"input_info": norm["input_info"], "target_device": norm["target_device"],
            "compression": norm["compression"],
            "keep_first_last_8bit": norm["qat_plugins"]["keep_first_last_8bit"]}


def _check_resume(ckpt: Mapping[str, Any], norm: Mapping[str, Any], path: pathlib.Path) -> dict[str, Any]:
    from ..training.config import config_diff  # noqa: PLC0415

    extra = ckpt.get("extra")
    if not isinstance(extra, Mapping) or extra.get("format") != _EXTRA_FORMAT or "nncf_config" not in extra:
        raise ValueError(f"checkpoint {path} was not written by an NNCF config run (no NNCF model config in it); "
                         "resume it with the command that made it")
    diffs = config_diff(extra["quantization"], _nncf_part(norm))
    if diffs:
        shown = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs[:8])
        raise ValueError(f"checkpoint {path} was made with different NNCF settings: {shown}; resume with the "
                         "config it was made with, or start a new run in another output directory")
    return dict(extra)


def _prepare_fn(norm: dict[str, Any], path: str, resume_extra: Mapping[str, Any] | None
                ) -> Callable[[nn.Module, Any, Any], nn.Module]:
    def prepare(fp_model: nn.Module, data: Any, cfg: Any) -> nn.Module:
        if resume_extra is not None:  # NNCF's own structure; the trainer loads the saved state next
            return _q.rebuild_from_nncf_config(fp_model, resume_extra["nncf_config"],
                                               sequential_wrapper=bool(resume_extra.get("sequential_wrapper"))).train()
        return _c._prepare(fp_model, norm, path, data.train).train()
    return prepare


def _checkpoint_extra(norm: dict[str, Any]) -> Callable[[nn.Module], dict[str, Any]]:
    cache: dict[str, Any] = {}

    def extra(student: nn.Module) -> dict[str, Any]:
        if "nncf_config" not in cache:  # the quantizer structure does not change during training
            cache["nncf_config"] = _q.nncf_model_config(student)
        return {"format": _EXTRA_FORMAT, "nncf_config": cache["nncf_config"],
                "sequential_wrapper": isinstance(student, _q.SequentialWrapper),
                "quantization": _nncf_part(norm), "config": norm}
    return extra


def run_config(
    path: str | os.PathLike[str] | Mapping[str, Any],
    *,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Run an NNCF-style config: data, FP training, NNCF QAT with the regularizers, checkpoints, ONNX.

    Args:
        path: the JSON file (or a dict) -- see :mod:`qat_plugins.integrations.nncf_config`.
        output_dir: overrides ``qat_plugins.train.output_dir`` (default ``runs/nncf``); ``None`` in both
            means no files (no checkpoint, no resume; the ONNX file goes to a temporary directory).
        resume: continue from ``OUTPUT/checkpoint.pt`` (same config, else ``ValueError`` naming the
            differences).
        max_steps: stop after this many QAT steps in total, leaving a checkpoint to resume from.

    Returns:
        the ``results.json`` payload: ``fp_test_accuracy``, ``test_accuracy`` (fake-quant NNCF model),
        ``history``, ``mean_step_time_s``, ``regularizers``, ``onnx`` (file, weight format and the
        :class:`~qat_plugins.export.ValidationReport` as a dict), file paths, the normalized config and
        ``wall_time_s``; with ``interrupted=True`` (``max_steps``) only the progress fields, and
        nothing is written but the checkpoint.
    """
    from ..training.checkpoint import check_config_matches, load_checkpoint  # noqa: PLC0415
    from ..training.trainer import (CHECKPOINT_NAME, RESULTS_NAME, build_fp_model, evaluate,  # noqa: PLC0415
                                    load_data, prepare_output_dir, train_fp, train_qat, write_json)

    _q._require_nncf()
    t_start = time.perf_counter()
    source = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    norm = _c.validate_config(path)
    tcfg = train_config(norm, output_dir=output_dir)
    export_format = norm["qat_plugins"]["train"]["export"]
    if tcfg.num_threads is not None:
        torch.set_num_threads(tcfg.num_threads)
    out = pathlib.Path(tcfg.output_dir) if tcfg.output_dir else None
    if resume and out is None:
        raise ValueError("output_dir: needed to resume (the checkpoint lives there); pass --output-dir")
    # a fresh run refuses any earlier output; a resumed one only a finished run's results.json (the
    # model files of a run that failed while exporting are rewritten)
    outputs = [RESULTS_NAME] if resume else \
        [RESULTS_NAME, NNCF_CHECKPOINT_NAME] + ([onnx_name(export_format)] if export_format else [])
    if out is not None:
        prepare_output_dir(out, resume=resume, outputs=outputs)
    ckpt_path = out / CHECKPOINT_NAME if out is not None else None

    data = load_data(tcfg)
    fp = build_fp_model(tcfg, data)
    norm, qpath = _c._validate_for(fp, norm, data.train)  # module names, sample_size: before any training
    resume_extra = None
    if resume:
        assert ckpt_path is not None
        ckpt = load_checkpoint(ckpt_path)
        check_config_matches(ckpt, tcfg, ckpt_path)
        resume_extra = _check_resume(ckpt, norm, ckpt_path)
        fp.load_state_dict(ckpt["fp_model"])
        fp.eval()
        del ckpt
    else:
        log.info("nncf: FP training, %s(width=%d) on %s (%d train / %d test)", type(fp).__name__,
                 tcfg.model.width, data.name, len(data.train), len(data.test))
        train_fp(fp, data, tcfg)
    fp_acc = evaluate(fp, data.test)
    log.info("nncf: FP test top-1 %.2f%%", 100 * fp_acc)

    from ..regularizers import build_regularizers  # noqa: PLC0415

    regs = build_regularizers(tcfg.regularizers, where="qat_plugins.regularizers")
    result = train_qat(fp, data, tcfg, regularizers=regs, checkpoint_path=ckpt_path, resume=resume,
                       max_steps=max_steps, prepare_fn=_prepare_fn(norm, qpath, resume_extra),
                       checkpoint_extra=_checkpoint_extra(norm))
    result.fp_test_accuracy = fp_acc
    wbits, abits = tcfg.qat.weight_bits, tcfg.qat.act_bits
    if result.interrupted:
        log.info("nncf: stopped after QAT step %d (max_steps); resume to continue", result.steps)
        return {"interrupted": True, "steps": result.steps, "checkpoint": str(ckpt_path) if ckpt_path else None,
                "fp_test_accuracy": fp_acc, "history": result.history}
    reg_names = "+".join(r.name for r in regs) or "none"
    log.info("nncf: QAT W%dA%d (regularizers: %s) test top-1 %.2f%% (FP %.2f%%), %.1f ms/step", wbits, abits,
             reg_names, 100 * result.test_accuracy, 100 * fp_acc, 1000 * result.mean_step_time)

    model = result.model.eval()
    nncf_ckpt = None
    if out is not None:
        nncf_ckpt = _q.save_checkpoint(model, out / NNCF_CHECKPOINT_NAME,
                                       extra={"config": norm, "test_accuracy": result.test_accuracy})
    onnx_report = None
    if export_format:
        onnx_report = _export_and_validate(model, data, export_format, out, tcfg.num_threads)
        log.info("nncf: ONNX %s: ORT top-1 %.2f%%, agreement with PyTorch %.2f%% (%s)", export_format,
                 100 * onnx_report["validation"]["onnx_top1"], 100 * onnx_report["validation"]["top1_agreement"],
                 onnx_report["path"] or "temporary file")

    from .. import __version__  # noqa: PLC0415

    payload = {
        "package_version": __version__,
        "config_path": source,
        "quantization": f"W{wbits}A{abits}",
        "regularizers": [r.config() for r in regs],
        "fp_test_accuracy": fp_acc,
        "test_accuracy": result.test_accuracy,
        "mean_step_time_s": result.mean_step_time,
        "steps": result.steps,
        "skipped_batches": result.skipped_batches,
        "interrupted": False,
        "history": result.history,
        "onnx": onnx_report,
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "nncf_checkpoint": str(nncf_ckpt) if nncf_ckpt else None,
        "config": norm,
        "train_config": tcfg.to_dict(),
        "wall_time_s": time.perf_counter() - t_start,
    }
    if out is not None:
        write_json(out / RESULTS_NAME, payload)
        log.info("nncf: results: %s", out / RESULTS_NAME)
    return payload


def _export_and_validate(model: nn.Module, data: Any, weight_format: str, out: pathlib.Path | None,
                         num_threads: int | None) -> dict[str, Any]:
    from ..export import export_onnx, validate_onnx  # noqa: PLC0415

    example = data.test.tensors[0][:1] if hasattr(data.test, "tensors") else next(iter(data.test))[0][None]
    with tempfile.TemporaryDirectory(prefix="qat_plugins_nncf_") as tmp:
        target = (out if out is not None else pathlib.Path(tmp)) / onnx_name(weight_format)
        export_onnx(model, target, example, weight_format=weight_format)
        report = validate_onnx(target, model, data.test, num_threads=num_threads)
        return {"path": str(target) if out is not None else None, "weight_format": weight_format,
                "validation": report.to_dict()}
