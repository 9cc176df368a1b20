"""The one run entry: config -> data -> FP -> prepare -> QAT -> export -> validate -> ``results.json``.

:func:`run` serves the CLI (``qat-plugins train``), the demo and the NNCF config flow. Other QAT
flows plug in through :class:`RunHooks` (every hook optional)::

    hooks = RunHooks(
        outputs=["nncf_qat.pt"],                 # extra files the run writes (refused if already there)
        check=lambda fp, data, cfg: ...,         # before any training: raise ValueError naming the field
        on_resume=lambda ckpt: ...,              # the checkpoint (already checked) before anything loads
        prepare_fn=lambda fp, data, cfg: qat,    # build the calibrated QAT model (default prepare_student)
        regularizers=lambda cfg: [...],          # Regularizer instances (default: build cfg.regularizers)
        checkpoint_extra=lambda student: {...},  # stored under "extra" in every checkpoint
        after_qat=lambda result, data, out: {...},  # extra results.json fields (e.g. an NNCF checkpoint)
    )
    result = run(cfg, output_dir="runs/x", resume=False, hooks=hooks)

The output directory is locked for the whole run (:class:`~qat_plugins._io.DirectoryLock`); files in it
are never overwritten except the run's own ``checkpoint.pt``. Reasoning: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .._io import DirectoryLock, atomic_write_bytes, remove_stale_temp_files
from ..data import DataSplit
from ..models import build_model
from ..quant import prepare_qat
from ..regularizers import Regularizer, build_regularizers
from .checkpoint import load_checkpoint, read_resume_checkpoint
from .config import TrainConfig, as_train_config, update_config
from .distributed import agree_on_error, distributed_session, is_distributed, world_size
from .loaders import evaluate, first_batch, load_data
from .trainer import TrainResult, is_rank0, prepare_student, seed_everything, train_fp, train_qat

__all__ = ["RunHooks", "run", "build_fp_model", "check_run", "prepare_output_dir", "lock_output_dir", "write_json",
           "load_trained",
           "export_and_validate", "onnx_name", "CHECKPOINT_NAME", "RESULTS_NAME"]

log = logging.getLogger("qat_plugins.training")

CHECKPOINT_NAME = "checkpoint.pt"
RESULTS_NAME = "results.json"


@dataclass
class RunHooks:
    """Customisation points of :func:`run` (see the module docstring); ``None`` = the plain torch.ao flow."""

    outputs: Sequence[str] = ()
    check: Callable[[nn.Module, DataSplit, TrainConfig], None] | None = None
    on_resume: Callable[[Mapping[str, Any]], None] | None = None
    prepare_fn: Callable[[nn.Module, DataSplit, TrainConfig], nn.Module] | None = None
    regularizers: Callable[[TrainConfig], Sequence[Regularizer]] | None = None
    checkpoint_extra: Callable[[nn.Module], Mapping[str, Any]] | None = None
    after_qat: Callable[[TrainResult, DataSplit, Path | None], Mapping[str, Any]] | None = None


def onnx_name(weight_format: str) -> str:
    """File name of a run's ONNX export, e.g. ``model_int8.onnx``."""
    return f"model_{weight_format}.onnx"


# --- output directory ---------------------------------------------------------------------------
def _writable_dir(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output directory {out} is a file, not a directory; choose another "
                                 "(output_dir / --output-dir)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        err = type(e) if isinstance(e, (PermissionError, NotADirectoryError, FileExistsError)) else PermissionError
        raise err(f"cannot write to output directory {out}: {e.strerror or e}; choose a writable directory "
                  "(output_dir / --output-dir)") from None
    return out


def lock_output_dir(output_dir: str | Path, what: str = "run") -> DirectoryLock:
    """Create ``output_dir`` if needed and lock it for this process (``LockedError`` while another live run
    holds it; a stale lock of a killed run is taken over). Release with ``.release()``."""
    return DirectoryLock(_writable_dir(output_dir), what=what).acquire()


def prepare_output_dir(output_dir: str | Path, *, resume: bool = False,
                       outputs: Iterable[str] = (RESULTS_NAME,)) -> Path:
    """Create / check the output directory; never lets a run overwrite another run's files.

    Raises ``FileExistsError`` (checkpoint or outputs of an earlier run present without ``resume``,
    or outputs of a finished run with ``resume``), ``FileNotFoundError`` (``resume`` without a
    checkpoint) or ``PermissionError`` / ``NotADirectoryError`` (cannot write there), each naming the path.
    """
    out = _writable_dir(output_dir)
    ckpt = out / CHECKPOINT_NAME
    existing = [out / name for name in outputs if (out / name).exists()]
    if resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {ckpt} to resume from; drop --resume to start a new "
                                    "run, or point --output-dir at the interrupted run")
        if existing:
            raise FileExistsError(f"the run in {out} already finished ({existing[0]} exists); nothing to resume")
    else:
        if ckpt.exists():
            raise FileExistsError(f"{ckpt} exists (an earlier run); pass --resume to continue it, or choose another "
                                  "output directory")
        if existing:
            raise FileExistsError(f"{existing[0]} exists; not overwriting it: choose another output directory")
    return out


def _nonfinite_field(obj: Any, where: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "value"
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            hit = _nonfinite_field(v, f"{where}.{k}" if where else str(k))
            if hit:
                return hit
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            hit = _nonfinite_field(v, f"{where}[{i}]")
            if hit:
                return hit
    return None


def write_json(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically, refusing to overwrite an existing file and to write NaN / inf values."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"directory {parent} does not exist; create it first or choose another path for "
                                f"{p.name}")
    if p.exists():
        raise FileExistsError(f"{p} already exists; not overwriting it")
    plain = json.loads(json.dumps(payload, default=_json_default))
    bad = _nonfinite_field(plain)
    if bad is not None:
        raise ValueError(f"{p}: {bad} is NaN/inf; not writing non-finite results (the training diverged: check the "
                         "config's learning rates and regularizer options)")
    blob = json.dumps(plain, indent=2, sort_keys=False, allow_nan=False).encode() + b"\n"
    return atomic_write_bytes(p, blob, overwrite=False)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


@contextlib.contextmanager
def _locked_output(out: Path | None, resume: bool, outputs: Sequence[str]) -> Iterator[None]:
    """Rank 0 checks and locks the output directory for the run; every rank gets rank 0's error."""
    lock: DirectoryLock | None = None
    err: BaseException | None = None
    if out is not None and is_rank0():
        try:
            lock = lock_output_dir(out)
            prepare_output_dir(out, resume=resume, outputs=outputs)
            remove_stale_temp_files(out, unowned=True)  # left by a run SIGKILLed while writing
        except OSError as e:
            err = e
            if lock is not None:
                lock.release()
                lock = None
    err = agree_on_error(err)
    if err is not None:
        raise err
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# --- model and pre-training checks --------------------------------------------------------------
def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _estimate_bytes(cfg: TrainConfig, num_classes: int, image_shape: Sequence[int]) -> tuple[int, int]:
    """(parameter bytes, activation bytes per sample) of the config's model, from a meta-device forward."""
    with torch.device("meta"):
        m = build_model(cfg.model.name, width=cfg.model.width, num_classes=num_classes, in_channels=image_shape[0])
    params = sum(p.numel() for p in m.parameters()) * 4
    acts = [0]

    def count(_m: nn.Module, _i: Any, o: Any) -> None:
        if isinstance(o, torch.Tensor):
            acts[0] += o.numel() * 4

    hooks = [mod.register_forward_hook(count) for mod in m.modules() if not list(mod.children())]
    try:
        with torch.no_grad():
            m(torch.empty(1, *image_shape, device="meta"))
    except Exception:  # noqa: BLE001 - shapes are checked (with a clear message) by check_run
        pass
    finally:
        for h in hooks:
            h.remove()
    return params, acts[0]


def _check_memory(cfg: TrainConfig, data: DataSplit) -> None:
    """Refuse a model that cannot fit in memory before allocating it (``model.width`` / ``data.batch_size``)."""
    avail = _mem_available()
    if avail is None:
        return
    params, act = _estimate_bytes(cfg, data.num_classes, data.image_shape)
    # FP model + grads + 2 Adam moments, QAT copy + grads + momentum (8x params, project choice);
    # activations kept for backward in the FP, QAT and teacher forwards (3x, project choice)
    need = 8 * params + 3 * act * cfg.data.batch_size
    if need > avail:
        gb = 1024 ** 3
        raise ValueError(f"model.width: {cfg.model.width} needs about {need / gb:.1f} GB for training "
                         f"({params / gb:.2f} GB of parameters, batch {cfg.data.batch_size}), more than the "
                         f"{avail / gb:.1f} GB available; lower model.width or data.batch_size")


def build_fp_model(cfg: TrainConfig | Mapping[str, Any] | str, data: DataSplit) -> nn.Module:
    """The config's reference model, initialised with ``seed`` (refused up front if it cannot fit in memory)."""
    cfg = as_train_config(cfg)
    _check_memory(cfg, data)
    seed_everything(cfg.seed)
    return build_model(cfg.model.name, width=cfg.model.width, num_classes=data.num_classes,
                       in_channels=data.image_shape[0])


def check_run(cfg: TrainConfig, fp: nn.Module, data: DataSplit,
              regularizers: Sequence[Regularizer] | None = None) -> None:
    """Before any training: the model runs on the data's images, and every regularizer attaches.

    A layer / block name that is not in the model fails in seconds, naming its config entry.
    """
    if len(data.train) < 2 * world_size():
        raise ValueError(f"data.limit_train: {len(data.train)} training sample(s) for {world_size()} process(es); "
                         "each process needs at least 2 (BatchNorm)")
    x0 = first_batch(data, 2)
    try:
        with torch.no_grad():
            fp.eval()(x0)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"data: images of shape {tuple(x0.shape[1:])} do not fit model.name {cfg.model.name!r} "
                         f"(width {cfg.model.width}): {first[:200]}; use images of the model's input size") from None
    regs = list(regularizers) if regularizers is not None else build_regularizers(cfg.regularizers,
                                                                                  where="regularizers")
    if not regs:
        return
    q = cfg.qat
    probe = prepare_qat(fp, weight_bits=q.weight_bits, act_bits=q.act_bits, mode=q.mode, example_inputs=(x0,),
                        keep_first_last_8bit=q.keep_first_last_8bit, per_channel=q.per_channel,
                        learnable=q.learnable)
    specs = list(cfg.regularizers) if regularizers is None else [{} for _ in regs]
    for i, (spec, reg) in enumerate(zip(specs, regs)):
        field = next((f".{k}" for k in ("blocks", "layers") if spec.get(k) is not None), "")
        try:
            reg.attach(probe, fp_model=fp)
        except ValueError as e:
            raise ValueError(f"regularizers[{i}]{field}: {e}; use module names of the {cfg.model.name} model") from None
        finally:
            if reg.attached:
                reg.detach()


# --- export ---------------------------------------------------------------------------------------
def export_and_validate(model: nn.Module, data: DataSplit, weight_format: str, path: str | Path,
                        num_threads: int | None = None) -> dict[str, Any]:
    """Export ``model`` to ``path`` (``weight_format``) and validate it in ONNX Runtime on the test split.

    Returns ``{"path", "weight_format", "validation": ValidationReport.to_dict()}``.
    """
    from ..export import export_onnx, validate_onnx  # floor 2; imported here to keep `import training` light

    export_onnx(model, path, data.test.tensors[0][:1], weight_format=weight_format)
    report = validate_onnx(path, model, data.test, num_threads=num_threads)
    return {"path": str(path), "weight_format": weight_format, "validation": report.to_dict()}


# --- the run --------------------------------------------------------------------------------------
def run(cfg: TrainConfig | Mapping[str, Any] | str, *, output_dir: str | Path | None = None, resume: bool = False,
        max_steps: int | None = None, callback: Callable[[int, dict[str, Any]], None] | None = None,
        hooks: RunHooks | None = None, fp_model: nn.Module | None = None,
        prepare_fn: Callable[[nn.Module, DataSplit, TrainConfig], nn.Module] | None = None) -> TrainResult:
    """Run a config end to end: data, FP model + FP training, QAT, ONNX export + validation, ``results.json``.

    Writes ``checkpoint.pt`` (the run's own, updated in place), ``model_<format>.onnx`` for each of
    ``cfg.export`` and, when training completes, ``results.json`` into ``output_dir`` (default
    ``cfg.output_dir``; ``None`` for no files). With ``resume`` the FP model comes from the checkpoint
    and QAT continues where it stopped. ``fp_model`` (a trained FP model) skips FP training.
    ``prepare_fn`` is a shortcut for ``hooks.prepare_fn``. Sets ``torch.set_num_threads(cfg.num_threads)``
    when it is not null. Under ``torchrun`` it initialises and tears down the process group.
    """
    cfg = as_train_config(cfg)
    if output_dir is not None:
        cfg = update_config(cfg, {"output_dir": str(output_dir)})
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
    hooks = hooks or RunHooks()
    if prepare_fn is not None:
        hooks = RunHooks(**{**vars(hooks), "prepare_fn": prepare_fn})
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir) if cfg.output_dir else None
    if resume and out is None:
        raise ValueError("output_dir: needed to resume (the checkpoint lives there)")
    outputs = [RESULTS_NAME] if resume else [RESULTS_NAME, *hooks.outputs, *(onnx_name(f) for f in cfg.export)]
    with distributed_session(), _locked_output(out, resume, outputs):
        return _run(cfg, out, resume, max_steps, callback, hooks, fp_model)


def _run(cfg: TrainConfig, out: Path | None, resume: bool, max_steps: int | None,
         callback: Callable[[int, dict[str, Any]], None] | None, hooks: RunHooks,
         fp_model: nn.Module | None) -> TrainResult:
    t0 = time.perf_counter()
    ckpt_path = out / CHECKPOINT_NAME if out is not None else None
    data = load_data(cfg)
    fp = fp_model if fp_model is not None else build_fp_model(cfg, data)
    regs = list(hooks.regularizers(cfg)) if hooks.regularizers is not None else None
    check_run(cfg, fp, data, regs)
    if hooks.check is not None:
        hooks.check(fp, data, cfg)
    if resume:
        assert ckpt_path is not None
        ckpt = read_resume_checkpoint(ckpt_path, cfg)
        if hooks.on_resume is not None:
            hooks.on_resume(ckpt)
        fp.load_state_dict(ckpt["fp_model"])
        del ckpt
    elif fp_model is None:
        if is_rank0():
            log.info("FP training, %s(width=%d) on %s (%d train / %d test)", type(fp).__name__, cfg.model.width,
                     data.name, len(data.train), len(data.test))
        train_fp(fp, data, cfg)
    fp.eval()
    fp_acc = evaluate(fp, data.test)
    if is_rank0():
        log.info("FP test top-1 %.2f%%", 100 * fp_acc)
    result = train_qat(fp, data, cfg, regularizers=regs, checkpoint_path=ckpt_path, resume=resume,
                       max_steps=max_steps, callback=callback, prepare_fn=hooks.prepare_fn,
                       checkpoint_extra=hooks.checkpoint_extra)
    result.fp_test_accuracy = fp_acc
    if result.interrupted:
        return result
    if is_rank0():
        log.info("QAT W%dA%d test top-1 %.2f%% (FP %.2f%%), %.1f ms/step", cfg.qat.weight_bits, cfg.qat.act_bits,
                 100 * result.test_accuracy, 100 * fp_acc, 1000 * result.mean_step_time)
    err: BaseException | None = None
    if is_rank0():  # rank 0 writes every file; the others wait for its verdict
        try:
            _finish(result, data, cfg, out, hooks, t0)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            err = e
    err = agree_on_error(err) if is_distributed() else err
    if err is not None:
        raise err
    return result


def _finish(result: TrainResult, data: DataSplit, cfg: TrainConfig, out: Path | None, hooks: RunHooks,
            t0: float) -> None:
    if hooks.after_qat is not None:
        result.extra.update(hooks.after_qat(result, data, out))
    with tempfile.TemporaryDirectory(prefix="qat_plugins_onnx_") as tmp:
        for fmt in cfg.export:
            target = (out if out is not None else Path(tmp)) / onnx_name(fmt)
            rep = export_and_validate(result.model, data, fmt, target, cfg.num_threads)
            if out is None:
                rep["path"] = None
            result.onnx.append(rep)
            v = rep["validation"]
            log.info("ONNX %s: ORT top-1 %.2f%%, agreement with PyTorch %.2f%%", fmt, 100 * v["onnx_top1"],
                     100 * v["top1_agreement"])
            if v["top1_agreement"] < 0.99:
                log.warning("warning: the %s ONNX file agrees with the PyTorch model on only %.2f%% of the test "
                            "split", fmt, 100 * v["top1_agreement"])
    if out is not None:
        from .. import __version__

        payload = {"package_version": __version__, "wall_time_s": time.perf_counter() - t0, **result.to_dict()}
        write_json(out / RESULTS_NAME, payload)


def load_trained(checkpoint: str | Path) -> tuple[nn.Module, nn.Module, TrainConfig, DataSplit]:
    """Rebuild ``(qat_model, fp_model, config, data)`` from a training checkpoint (models in eval mode).

    The QAT model is prepared from the stored FP weights with the stored config, calibrated once and
    then loaded with the stored QAT state (weights, BN statistics, quantizer scales).
    """
    ckpt = load_checkpoint(checkpoint)
    extra = ckpt.get("extra")
    if isinstance(extra, Mapping) and "nncf_config" in extra:
        raise ValueError(f"checkpoint {checkpoint} was written by an NNCF config run; its ONNX file is written by "
                         "that run (model_int8.onnx / model_int4.onnx in its output directory), or load it with "
                         "qat_plugins.integrations.nncf")
    try:
        cfg = as_train_config(ckpt["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {checkpoint}: its stored config is not valid in this version ({e})") from None
    data = load_data(cfg)
    fp = build_fp_model(cfg, data)
    try:
        fp.load_state_dict(ckpt["fp_model"])
        fp.eval()
        student = prepare_student(fp, data, cfg)
        student.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ValueError(f"checkpoint {checkpoint} does not match the model of its own config ({first}); it was "
                         "written by another version or flow") from None
    return student.eval(), fp, cfg, data
