"""The training loops: one optimisation step, FP pre-training and QAT with exact resume.

* :func:`train_step` -- forward, cross-entropy + regularizers, finite check, backward, step.
* :func:`train_fp` -- full-precision pre-training (Adam or SGD, per-step cosine, default augmentation).
* :func:`train_qat` -- ``prepare_qat`` + calibration forward + ``attach`` of the regularizers, SGD with
  a per-step cosine schedule, test top-1 per epoch, step-granular atomic checkpoints, exact resume.

Determinism, resume and distributed behaviour are explained in docs/reliability.md.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import DataSplit, default_augment
from ..quant import prepare_qat, snap_biases
from ..quant.step_size import activation_quantizers, weight_quantizers
from ..regularizers import NonFiniteLossError, Regularizer, RegularizerSet, attach, build_regularizers
from ..taps import first_tensor, unwrap
from .bn import BNSchedule, reestimate_bn_stats
from .checkpoint import capture_rng, read_resume_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig, as_train_config, config_hash
from .distributed import (agree_on_error, any_rank, broadcast_module, broadcast_object, is_distributed, rank,
                          world_size, wrap_ddp)
from .loaders import build_loader, evaluate, first_batch, iterate_batches, steps_per_epoch

__all__ = ["TrainResult", "train_fp", "train_qat", "train_step", "prepare_student", "is_rank0", "seed_everything",
           "check_finite_model", "param_groups"]

log = logging.getLogger("qat_plugins.training")


# --- process helpers ----------------------------------------------------------------------------
def is_rank0() -> bool:
    """True unless this process is not rank 0 (of the process group, else of ``RANK`` set by torchrun)."""
    return rank() == 0


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _wrap_model(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel`` when distributed; call it after the calibration forward."""
    return wrap_ddp(model) if is_distributed() else model


def _show_progress(enabled: bool) -> bool:
    return bool(enabled) and is_rank0() and sys.stderr.isatty()


def _info(msg: str, *args: Any) -> None:
    if is_rank0():
        log.info(msg, *args)


# --- one step -----------------------------------------------------------------------------------
def train_step(model: nn.Module, regs: RegularizerSet | None, batch: Sequence[torch.Tensor],
               optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """One optimisation step: forward, cross-entropy + regularizers, finite check, backward, step.

    A non-finite task loss (named ``"task loss (cross-entropy)"``) or regularizer loss (named by
    :class:`~qat_plugins.regularizers.RegularizerSet`) raises :class:`NonFiniteLossError` before
    ``backward`` / ``optimizer.step``, so the weights are untouched. The check and the returned
    values come from one read of the device per step (the step's one host sync).

    Returns ``{"loss", "task_loss", "reg_losses": {name: value}, "correct", "n"}``.
    """
    x, y = batch[0], batch[1]
    optimizer.zero_grad(set_to_none=True)
    out = model(x)
    logits = first_tensor(out)
    task = F.cross_entropy(logits, y)
    active = regs if regs is not None and len(regs) else None
    reg = active.loss(x, y, out, check_finite=False) if active is not None else None
    loss = task if reg is None else task + reg
    terms = list(active.last_terms.values()) if active is not None else []
    with torch.no_grad():
        correct = (logits.argmax(-1) == y).sum()
        host = torch.stack([task.detach().float(), loss.detach().float(), correct.float(),
                            *[t.float() for t in terms]]).tolist()  # the step's one host sync
    task_v, loss_v, correct_v = host[:3]
    err: NonFiniteLossError | None = None
    try:
        if not math.isfinite(task_v):
            raise NonFiniteLossError(f"task loss (cross-entropy) is non-finite ({task_v}); check the "
                                     "inputs for NaN/inf values, or lower the learning rate")
        if active is not None:
            active.record(host[3:])  # raises naming the regularizer
        if not math.isfinite(loss_v):
            raise NonFiniteLossError(f"total loss (task + regularizers) is non-finite ({loss_v}); "
                                     "lower the regularizer weights or the learning rate")
    except NonFiniteLossError as e:
        err = e
    if is_distributed():  # every rank skips / stops together, or the others would wait in the all-reduce
        bad = any_rank(err is not None)
        if bad and err is None:
            err = NonFiniteLossError(f"non-finite loss on rank(s) {bad} (this rank's shard was fine)")
    if err is not None:
        raise err
    loss.backward()
    optimizer.step()
    return {"loss": loss_v, "task_loss": task_v,
            "reg_losses": active.last_losses if active is not None else {},
            "correct": int(correct_v), "n": int(y.numel())}


# --- schedules / optimizers ---------------------------------------------------------------------
class _LRSchedule:
    """Per-step learning-rate factor: cosine from 1 to 0 over ``total`` steps, or constant 1."""

    def __init__(self, kind: str, total: int) -> None:
        self.kind, self.total = kind, max(1, int(total))

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        t = min(step, self.total) / self.total
        return 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight tensors only (not biases, BN, quantizer step sizes or ranges).

    Decayed: every trainable parameter with more than one dimension that does not belong to a fake
    quantizer (found through :mod:`qat_plugins.quant.step_size`, so NNCF's per-channel weight ranges of
    shape ``(C, 1, 1, 1)`` are excluded); everything else gets none (project choice, the usual recipe).
    """
    quantizers = weight_quantizers(model) + activation_quantizers(model)
    no_decay = {id(p) for _, q in quantizers for p in q.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1 and id(p) not in no_decay]
    rest = [p for p in params if p.dim() <= 1 or id(p) in no_decay]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _scheduler_step(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    with warnings.catch_warnings():  # a skipped first batch steps the schedule before the optimizer
        warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\).*")
        scheduler.step()


class _EpochStats:
    """Running sums of one epoch (checkpointed, so a resumed epoch reports the same numbers)."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        s = dict(state or {})
        self.loss = float(s.get("loss", 0.0))
        self.task = float(s.get("task", 0.0))
        self.regs: dict[str, float] = dict(s.get("regs", {}))
        self.batches = int(s.get("batches", 0))
        self.correct = int(s.get("correct", 0))
        self.n = int(s.get("n", 0))
        self.skipped = int(s.get("skipped", 0))
        self.time = float(s.get("time", 0.0))

    def add(self, info: Mapping[str, Any]) -> None:
        self.loss += info["loss"]
        self.task += info["task_loss"]
        for k, v in info["reg_losses"].items():
            self.regs[k] = self.regs.get(k, 0.0) + v
        self.batches += 1
        self.correct += info["correct"]
        self.n += info["n"]

    def state(self) -> dict[str, Any]:
        return {"loss": self.loss, "task": self.task, "regs": dict(self.regs), "batches": self.batches,
                "correct": self.correct, "n": self.n, "skipped": self.skipped, "time": self.time}

    def summary(self, epoch: int, test_acc: float, lr: float, steps: int) -> dict[str, Any]:
        b = max(1, self.batches)
        return {"epoch": epoch, "steps": steps, "loss": self.loss / b, "task_loss": self.task / b,
                "reg_losses": {k: v / b for k, v in self.regs.items()},
                "train_acc": self.correct / self.n if self.n else float("nan"), "test_acc": test_acc, "lr": lr,
                "time_s": self.time, "skipped_batches": self.skipped}


def _fmt_epoch(tag: str, h: Mapping[str, Any], epochs: int) -> str:
    regs = "".join(f", {k} {v:.4f}" for k, v in h["reg_losses"].items())
    skipped = f"  skipped {h['skipped_batches']}" if h["skipped_batches"] else ""
    return (f"{tag} epoch {h['epoch']}/{epochs}  loss {h['loss']:.4f} (task {h['task_loss']:.4f}{regs})  "
            f"train {100 * h['train_acc']:.2f}%  test {100 * h['test_acc']:.2f}%  lr {h['lr']:.3g}  "
            f"{h['time_s']:.1f}s{skipped}")


def _handle_nonfinite(e: NonFiniteLossError, cfg: TrainConfig, skipped_total: int, where: str) -> None:
    """Raise (policy ``raise`` or too many skips) or return to skip the batch."""
    if cfg.nan_policy == "raise":
        raise NonFiniteLossError(f"{where}: {e} (nan_policy=raise; set nan_policy: skip to skip such batches)") from None
    if skipped_total > cfg.max_skipped:
        raise NonFiniteLossError(f"{where}: {skipped_total} batches skipped for non-finite losses, more than "
                                 f"max_skipped={cfg.max_skipped}; last: {e}") from None
    _info("%s: skipping batch (%s)", where, e)


def _check_epoch_trained(stats: _EpochStats, where: str) -> None:
    """``nan_policy: skip`` must not end an epoch in which every batch was skipped (NaN metrics)."""
    if stats.batches == 0 and stats.skipped > 0:
        raise NonFiniteLossError(f"{where}: all {stats.skipped} batches were skipped for non-finite losses "
                                 "(nan_policy=skip); nothing was trained: check the config's options and the data")


# --- FP training --------------------------------------------------------------------------------
def train_fp(model: nn.Module, data: DataSplit, cfg: TrainConfig | Mapping[str, Any] | str) -> nn.Module:
    """Full-precision training of ``model`` in place (``cfg.fp``); returns it in eval mode.

    Adam (or SGD with momentum 0.9) with a per-step cosine schedule and, when ``fp.augment``, the
    default augmentation (:func:`qat_plugins.data.default_augment`) on the inputs. Seeded with
    ``cfg.seed``. Non-finite losses follow ``nan_policy``.
    """
    cfg = as_train_config(cfg)
    fc = cfg.fp
    seed_everything(cfg.seed)
    if fc.epochs == 0:
        return model.eval()
    bs = cfg.data.batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    if fc.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=fc.lr, weight_decay=fc.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=fc.lr, momentum=0.9, weight_decay=fc.weight_decay)
    spe = steps_per_epoch(data.train, bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _LRSchedule("cosine", fc.epochs * spe))
    aug_gen = torch.Generator().manual_seed(cfg.seed + 10)
    loader_gen = torch.Generator().manual_seed(cfg.seed + 11)
    augment = default_augment(aug_gen) if fc.augment else None
    wrapped = _wrap_model(model)
    model.train()
    skipped = 0

    for epoch in range(fc.epochs):
        stats = _EpochStats()
        t0 = time.perf_counter()
        loader = build_loader(data.train, bs, seed=cfg.seed, epoch=epoch, generator=loader_gen)
        with tqdm(loader, desc=f"fp {epoch + 1}/{fc.epochs}", leave=False, file=sys.stderr,
                  disable=not _show_progress(cfg.progress)) as bar:
            for x, y in bar:
                if augment is not None:
                    x = augment(x)
                try:
                    info = train_step(wrapped, None, (x, y), opt)
                    stats.add(info)
                    bar.set_postfix(loss=f"{info['loss']:.3f}", refresh=False)
                except NonFiniteLossError as e:
                    skipped += 1
                    stats.skipped += 1
                    opt.zero_grad(set_to_none=True)
                    _handle_nonfinite(e, cfg, skipped, f"FP training, epoch {epoch + 1}")
                _scheduler_step(sched)
        stats.time = time.perf_counter() - t0
        _check_epoch_trained(stats, f"FP training, epoch {epoch + 1}")
        broadcast_module(model, params=False)  # BN statistics of the last local batch -> rank 0's
        h = stats.summary(epoch + 1, evaluate(model, data.test), opt.param_groups[0]["lr"], (epoch + 1) * spe)
        _info("%s", _fmt_epoch("fp", h, fc.epochs))
    return model.eval()


# --- QAT ----------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train_qat` / :func:`run` produced.

    ``model`` is the trained QAT model (eval mode, regularizers detached: no hooks left), ``history``
    one dict per epoch (``epoch, steps, loss, task_loss, reg_losses, train_acc, test_acc, lr, time_s,
    skipped_batches``), accuracies in [0, 1], ``mean_step_time`` in seconds per QAT step.
    """

    model: nn.Module
    fp_model: nn.Module
    regularizers: RegularizerSet | None
    history: list[dict[str, Any]]
    test_accuracy: float
    mean_step_time: float
    steps: int
    skipped_batches: int = 0
    fp_test_accuracy: float | None = None
    interrupted: bool = False
    checkpoint_path: str | None = None
    config: TrainConfig | None = None
    onnx: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no models)."""
        return {"test_accuracy": self.test_accuracy, "fp_test_accuracy": self.fp_test_accuracy,
                "mean_step_time_s": self.mean_step_time, "steps": self.steps,
                "skipped_batches": self.skipped_batches, "interrupted": self.interrupted,
                "checkpoint": self.checkpoint_path, "history": self.history,
                "regularizers": [r.config() for r in self.regularizers] if self.regularizers else [],
                "config": self.config.to_dict() if self.config is not None else None,
                "onnx": list(self.onnx), **self.extra}


def prepare_student(fp_model: nn.Module, data: DataSplit, cfg: TrainConfig | Mapping[str, Any] | str,
                    **prepare_kwargs: Any) -> nn.Module:
    """``prepare_qat`` of ``fp_model`` per ``cfg.qat``, then one no-grad calibration forward on the first
    training batch, so every quantizer is initialised (and per-channel scales sized) before an optimizer
    is built. The forward runs in train mode: BatchNorm normalises with batch statistics, as in training,
    so the activation quantizers see the ranges training produces (an eval-mode forward normalises with
    the FP running statistics, about 3x off at 2 bits; docs/bn.md). ``prepare_kwargs`` go to
    :func:`~qat_plugins.quant.prepare_qat` as well (e.g. ``init="lsq"``; default: none, its defaults).
    Returns the QAT model in train mode.
    """
    cfg = as_train_config(cfg)
    q = cfg.qat
    x0 = first_batch(data, cfg.data.batch_size * world_size())  # the first global batch, on every rank
    if not torch.isfinite(x0).all():
        raise ValueError(f"data: the calibration batch (the first {len(x0)} training samples) contains NaN/inf "
                         "values; clean the data")
    student = prepare_qat(fp_model, weight_bits=q.weight_bits, act_bits=q.act_bits, mode=q.mode,
                          example_inputs=(x0,), keep_first_last_8bit=q.keep_first_last_8bit,
                          per_channel=q.per_channel, learnable=q.learnable, **prepare_kwargs)
    student.train()
    with torch.no_grad():
        student(x0)
    check_finite_model(student, "after the calibration forward")
    return student.train()


def check_finite_model(model: nn.Module, when: str) -> None:
    """Raise ``ValueError`` naming the first parameter / buffer holding NaN or inf."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{kind} {name} is NaN/inf {when}; check the data and the model for non-finite "
                                 "values")


def train_qat(fp_model: nn.Module, data: DataSplit, cfg: TrainConfig | Mapping[str, Any] | str, *,
              regularizers: Sequence[Regularizer] | None = None, checkpoint_path: str | Path | None = None,
              resume: bool = False, max_steps: int | None = None,
              callback: Callable[[int, dict[str, Any]], None] | None = None,
              prepare_fn: Callable[[nn.Module, DataSplit, TrainConfig], nn.Module] | None = None,
              checkpoint_extra: Callable[[nn.Module], Mapping[str, Any]] | None = None) -> TrainResult:
    """Quantization-aware training of a copy of ``fp_model`` (which is left unchanged).

    Args:
        fp_model: the trained full-precision model (also the frozen teacher of the regularizers).
        data: a :class:`~qat_plugins.data.DataSplit`.
        cfg: a :class:`TrainConfig` (or dict / file); uses ``seed``, ``data.batch_size``, ``qat.*``,
            ``regularizers``, ``nan_policy`` / ``max_skipped``, ``checkpoint_every``, ``progress``.
        regularizers: Regularizer instances to use instead of building ``cfg.regularizers``.
        checkpoint_path: write checkpoints here (at step 0, every ``checkpoint_every`` steps, at the
            end of each epoch and when stopping at ``max_steps``); rank 0 only.
        resume: continue from ``checkpoint_path`` (same config and FP model, else ``ValueError``
            naming the differences); the result equals that of an uninterrupted run.
        max_steps: stop after this many QAT steps in total (``interrupted=True``), leaving a checkpoint.
        callback: ``callback(step, metrics)`` after every step (and checkpoint); an exception it raises
            stops training with the last checkpoint intact.
        prepare_fn: ``prepare_fn(fp_model, data, cfg) -> student`` builds the QAT model instead of
            :func:`prepare_student` (e.g. NNCF's flow); it must return a calibrated copy in train mode.
        checkpoint_extra: ``checkpoint_extra(student) -> dict`` stored under ``"extra"`` in every
            checkpoint (e.g. NNCF's ``get_config``, needed to rebuild the student on resume); plain
            containers and tensors only (``torch.load(weights_only=True)``).

    Raises:
        NonFiniteLossError: non-finite loss with ``nan_policy="raise"`` (or after ``max_skipped`` skips),
            raised before the optimizer step of that batch.
        ValueError: bad config, incompatible or corrupt checkpoint.
    """
    cfg = as_train_config(cfg)
    q = cfg.qat
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_path")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    ckpt = read_resume_checkpoint(ckpt_path, cfg, fp_model) if resume and ckpt_path is not None else None

    broadcast_module(unwrap(fp_model))  # one teacher for all ranks (no-op in a single process)
    seed_everything(cfg.seed + 1)
    student = (prepare_fn or prepare_student)(fp_model, data, cfg)
    regs_list = build_regularizers(cfg.regularizers) if regularizers is None else list(regularizers)
    if q.augment and any(r.name == "cr" for r in regs_list) and is_rank0():
        log.warning("note: qat.augment is on and the consistency regularizer augments those inputs again; on small "
              "images (8x8 digits) the doubly augmented view is a poor target: consider qat.augment: false")
    model = _wrap_model(student)
    regs = attach(model, regs_list, fp_model=fp_model)
    try:
        return _qat_loop(student, model, regs, fp_model, data, cfg, ckpt, ckpt_path, max_steps, callback,
                         checkpoint_extra)
    finally:
        regs.detach()
        student.eval()


def _evaluate_student(student: nn.Module, data: DataSplit, cfg: TrainConfig) -> float:
    """Test top-1 of the QAT model: the one place the QAT loop evaluates (epoch ends and the end).

    With ``qat.bn.reestimate_batches`` > 0 the BN statistics are first re-estimated on the first training
    batches, unaugmented (docs/bn.md); the checkpoint saved after an epoch's evaluation holds them. With
    ``qat.snap_biases`` the biases are then put on the int32 grid of the integer kernels
    (:func:`~qat_plugins.quant.bias.snap_biases`), so the evaluated model is the one ORT runs.
    """
    n = cfg.qat.bn["reestimate_batches"]
    if n:
        reestimate_bn_stats(student, iterate_batches(data.train, cfg.data.batch_size), n)
    if cfg.qat.snap_biases:
        snap_biases(student, data.test.tensors[0][:2])
    return evaluate(student, data.test)


def _qat_loop(student: nn.Module, model: nn.Module, regs: RegularizerSet, fp_model: nn.Module, data: DataSplit,
              cfg: TrainConfig, ckpt: Mapping[str, Any] | None, ckpt_path: Path | None, max_steps: int | None,
              callback: Callable[[int, dict[str, Any]], None] | None,
              checkpoint_extra: Callable[[nn.Module], Mapping[str, Any]] | None = None) -> TrainResult:
    q = cfg.qat
    bs = cfg.data.batch_size
    optimizer = torch.optim.SGD(param_groups(student, q.weight_decay), lr=q.lr, momentum=q.momentum)
    spe = steps_per_epoch(data.train, bs)
    total = q.epochs * spe
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LRSchedule(q.schedule, total))
    bn_schedule = BNSchedule.from_epochs(q.bn["freeze_after_epochs"], spe)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 20)
    loader_gen = torch.Generator().manual_seed(cfg.seed + 21)
    gens = {"augment": aug_gen, "loader": loader_gen}
    augment = default_augment(aug_gen) if q.augment else None
    saver = ckpt_path is not None and is_rank0()

    prog: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "skipped": 0, "history": [], "epoch_stats": None,
                            "step_time_sum": 0.0, "step_count": 0, "loader_gen": loader_gen.get_state()}
    if ckpt is not None:
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "regularizers" in ckpt:
            regs.load_state_dict(ckpt["regularizers"])
        prog = dict(ckpt["progress"])
        restore_rng(ckpt["rng"], gens)
        _info("resumed from %s at step %d/%d (epoch %d, batch %d)", ckpt_path, prog["step"], total,
              prog["epoch"] + 1, prog["batch"])
    if is_distributed():  # rank 0's regularizer state (EMA teacher, block-replacement RNG) on every rank
        regs.load_state_dict(broadcast_object(regs.state_dict()))

    def save() -> None:
        if not is_distributed():
            _save()
            return
        err: BaseException | None = None  # rank 0 writes; every rank waits for the file (resume reads it)
        try:
            _save()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            err = e
        err = agree_on_error(err)
        if err is not None:
            raise err

    def _save() -> None:
        if not saver:
            return
        assert ckpt_path is not None
        p = dict(prog)
        p["epoch_stats"] = stats.state()
        state = {
            "model": student.state_dict(), "fp_model": unwrap(fp_model).state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "regularizers": regs.state_dict(), "rng": capture_rng(gens), "progress": p,
            "config": cfg.to_dict(), "config_hash": config_hash(cfg), "world_size": world_size(),
        }
        if checkpoint_extra is not None:
            state["extra"] = dict(checkpoint_extra(student))
        save_checkpoint(ckpt_path, state)

    stats = _EpochStats(prog.get("epoch_stats"))
    if ckpt is None:
        save()  # step 0: a run interrupted before its first periodic checkpoint can still resume

    interrupted = max_steps is not None and prog["step"] >= max_steps and prog["step"] < total
    student.train()
    last_eval_step = -1
    while prog["epoch"] < q.epochs and not interrupted:
        epoch = prog["epoch"]
        if prog["batch"] == 0:
            prog["loader_gen"] = loader_gen.get_state()
        else:
            loader_gen.set_state(prog["loader_gen"])
        loader = build_loader(data.train, bs, seed=cfg.seed, epoch=epoch, skip_batches=prog["batch"],
                              generator=loader_gen)
        t_epoch = time.perf_counter() - stats.time
        with tqdm(total=spe, initial=prog["batch"], desc=f"qat {epoch + 1}/{q.epochs}", leave=False,
                  file=sys.stderr, disable=not _show_progress(cfg.progress)) as bar:
            for x, y in loader:
                if augment is not None:
                    x = augment(x)
                bn_schedule(student, prog["step"])
                t0 = time.perf_counter()
                info: dict[str, Any] | None
                try:
                    info = train_step(model, regs, (x, y), optimizer)
                    stats.add(info)
                except NonFiniteLossError as e:
                    info = None
                    optimizer.zero_grad(set_to_none=True)
                    prog["skipped"] += 1
                    stats.skipped += 1
                    _handle_nonfinite(e, cfg, prog["skipped"], f"QAT epoch {epoch + 1}, step {prog['step'] + 1}")
                prog["step_time_sum"] += time.perf_counter() - t0
                prog["step_count"] += 1
                _scheduler_step(scheduler)
                prog["step"] += 1
                prog["batch"] += 1
                bar.update(1)
                if info is not None:
                    bar.set_postfix(loss=f"{info['loss']:.3f}", refresh=False)
                end_of_epoch = prog["batch"] >= spe
                if end_of_epoch:
                    bar.close()  # before the epoch's log line
                    _check_epoch_trained(stats, f"QAT epoch {epoch + 1}")
                    stats.time = time.perf_counter() - t_epoch
                    broadcast_module(student, params=False)  # buffers of the last local forward -> rank 0's
                    h = stats.summary(epoch + 1, _evaluate_student(student, data, cfg),
                                      optimizer.param_groups[0]["lr"], prog["step"])
                    last_eval_step = prog["step"]
                    prog["history"] = list(prog["history"]) + [h]
                    _info("%s", _fmt_epoch("qat", h, q.epochs))
                    prog["epoch"] += 1
                    prog["batch"] = 0
                    stats = _EpochStats()
                stop = max_steps is not None and prog["step"] >= max_steps and prog["step"] < total
                every = cfg.checkpoint_every
                if end_of_epoch or stop or (every and prog["step"] % every == 0):
                    if not end_of_epoch:
                        stats.time = time.perf_counter() - t_epoch
                    save()
                if callback is not None:
                    metrics = dict(info or {"skipped": True})
                    metrics.update(epoch=epoch + 1, step=prog["step"], lr=optimizer.param_groups[0]["lr"])
                    callback(prog["step"], metrics)
                if stop:
                    interrupted = True
                    _info("stopping after step %d of %d (max_steps); resume to continue", prog["step"], total)
                    break
                if end_of_epoch:
                    break

    broadcast_module(student, params=False)
    history = list(prog["history"])
    if history and (last_eval_step == prog["step"] or prog["step"] == total):
        test_acc = history[-1]["test_acc"]
    else:
        test_acc = _evaluate_student(student, data, cfg)
    mean_step = prog["step_time_sum"] / max(1, prog["step_count"])
    return TrainResult(model=student, fp_model=fp_model, regularizers=regs, history=history, test_accuracy=test_acc,
                       mean_step_time=mean_step, steps=prog["step"], skipped_batches=prog["skipped"],
                       interrupted=interrupted, checkpoint_path=str(ckpt_path) if ckpt_path is not None else None,
                       config=cfg)
