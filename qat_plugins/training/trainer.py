"""Reference FP and QAT training loops (seeded, resumable, distributed-ready).

* :func:`train_fp` -- full-precision pre-training (Adam or SGD, cosine schedule, default augmentation).
* :func:`train_qat` -- ``prepare_qat`` + one calibration forward + ``attach`` of the regularizers
  (with the frozen FP model), SGD with momentum and a per-step cosine schedule, test top-1 per epoch,
  step-granular atomic checkpoints and exact resume.
* :func:`run` -- the whole job of a :class:`~qat_plugins.training.config.TrainConfig`: data, FP
  model, FP training (or the FP model from the checkpoint when resuming), QAT, ``results.json``.
* :func:`evaluate`, :func:`train_step`, :func:`build_loader`, :func:`is_rank0`, :func:`seed_everything`.

Determinism on CPU: every run seeds torch / numpy / ``random``; the data order of epoch ``e`` is
``randperm(n, generator=manual_seed(seed + e))`` (the order ``DistributedSampler`` uses), augmentation
has its own generator, and the DataLoader gets its own generator, so the same config twice gives
identical weights (at the same ``num_threads``). Resuming mid-epoch skips the batches of that
permutation already seen, after restoring model, optimizer, scheduler, regularizer and RNG states.

Distributed: under ``torchrun`` :func:`run` initialises the process group (gloo on CPU; see
:mod:`qat_plugins.training.distributed`); the loader switches to ``DistributedSampler`` (this rank's
shard; ``data.batch_size`` is per process) and :func:`_wrap_model` to ``DistributedDataParallel``
after the calibration forward; progress bars, logs, checkpoints and results are written on rank 0
only, and rank-0-only failures (output directory, checkpoint writes) and non-finite losses are
agreed on by all ranks. :func:`train_step` is the per-batch unit.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from ..data import DataSplit, default_augment, load_dataset
from ..models import build_model
from ..quant import prepare_qat
from ..regularizers import NonFiniteLossError, Regularizer, RegularizerSet, attach, build_regularizers
from ..taps import first_tensor, unwrap
from .checkpoint import atomic_write_bytes, capture_rng, check_config_matches, load_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig, _as_train_config, config_hash, update_config
from .distributed import (agree_on_error, any_rank, broadcast_module, broadcast_object, distributed_session, rank,
                          world_size, wrap_ddp)

__all__ = [
    "TrainResult", "train_fp", "train_qat", "run", "evaluate", "train_step", "build_loader", "load_data",
    "build_fp_model", "prepare_student", "is_rank0", "seed_everything", "EpochPermutationSampler",
    "prepare_output_dir", "load_trained", "write_json", "CHECKPOINT_NAME", "RESULTS_NAME",
]

log = logging.getLogger("qat_plugins.training")

CHECKPOINT_NAME = "checkpoint.pt"
RESULTS_NAME = "results.json"


# --- process / distributed helpers -------------------------------------------------------------
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_rank0() -> bool:
    """True unless this process is not rank 0 (of the process group, else of ``RANK`` set by torchrun)."""
    return rank() == 0


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _wrap_model(model: nn.Module) -> nn.Module:
    """The one place the training model is wrapped: ``DistributedDataParallel`` when distributed.

    Call it after the calibration forward (LSQ per-channel step sizes get their shape there).
    """
    if _distributed():
        return wrap_ddp(model)
    return model


def _show_progress(enabled: bool) -> bool:
    return bool(enabled) and is_rank0() and sys.stderr.isatty()


def _info(msg: str, *args: Any) -> None:
    if is_rank0():
        log.info(msg, *args)


# --- data ----------------------------------------------------------------------------------------
class EpochPermutationSampler(Sampler[int]):
    """Indices of epoch ``e`` in the order ``randperm(n, manual_seed(seed + e))`` (or 0..n-1).

    The same order as ``DistributedSampler`` with one replica; call :meth:`set_epoch` per epoch.
    """

    def __init__(self, n: int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = int(n), shuffle, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _SkipFirst(Sampler[int]):
    """The indices of ``base`` without the first ``skip`` (resume mid-epoch)."""

    def __init__(self, base: Sampler[int], skip: int) -> None:
        self.base, self.skip = base, int(skip)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]


def build_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 skip_batches: int = 0, drop_last: bool = False,
                 generator: torch.Generator | None = None) -> DataLoader:
    """A single-process DataLoader with a deterministic per-epoch order.

    Uses ``DistributedSampler`` (this rank's shard) when ``torch.distributed`` is initialised, else
    :class:`EpochPermutationSampler`; ``skip_batches`` drops the first batches of the epoch (resume).
    ``generator`` is handed to the DataLoader so creating its iterator does not draw from torch's
    global RNG.
    """
    sampler: Sampler[int]
    if _distributed():
        from torch.utils.data.distributed import DistributedSampler

        ds = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)  # type: ignore[arg-type]
        ds.set_epoch(epoch)
        sampler = ds
    else:
        es = EpochPermutationSampler(len(dataset), shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        es.set_epoch(epoch)
        sampler = es
    if skip_batches:
        sampler = _SkipFirst(sampler, skip_batches * batch_size)
    if generator is None:
        generator = torch.Generator().manual_seed(seed + epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=0,
                      generator=generator)


def _steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    n = len(dataset)  # type: ignore[arg-type]
    if _distributed():
        n = math.ceil(n / torch.distributed.get_world_size())
    return math.ceil(n / batch_size)


def load_data(cfg: TrainConfig | Mapping[str, Any] | str) -> DataSplit:
    """The config's dataset (``data.limit_train`` keeps the first N training samples)."""
    cfg = _as_train_config(cfg)
    d = cfg.data
    try:
        split = load_dataset(d.name, data_dir=d.data_dir, size=d.size)
    except (FileNotFoundError, ValueError) as e:
        if d.name == "digits":
            raise
        raise type(e)(f"data.data_dir: {e}") from None  # name the config field to fix
    if d.limit_train is not None and d.limit_train < len(split.train):
        split = DataSplit(TensorDataset(*(t[:d.limit_train] for t in split.train.tensors)), split.test,
                          split.num_classes, split.name)
    return split


def build_fp_model(cfg: TrainConfig | Mapping[str, Any] | str, data: DataSplit) -> nn.Module:
    """The config's reference model, initialised with ``seed``."""
    cfg = _as_train_config(cfg)
    seed_everything(cfg.seed)
    return build_model(cfg.model.name, width=cfg.model.width, num_classes=data.num_classes,
                       in_channels=data.image_shape[0])


def _batches(data: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, DataSplit):
        data = data.test
    if isinstance(data, TensorDataset):
        x, y = data.tensors[0], data.tensors[1]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        for i in range(0, len(data[0]), batch_size):
            yield data[0][i:i + batch_size], data[1][i:i + batch_size]
    elif isinstance(data, DataLoader) or not isinstance(data, Dataset):
        for batch in data:
            yield batch[0], batch[1]
    else:
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
            yield batch[0], batch[1]


def evaluate(model: nn.Module, dataset_or_loader: Any, *, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] in eval mode without gradients (the model's mode is restored).

    ``dataset_or_loader``: a Dataset, a DataLoader / iterable of ``(inputs, targets)`` batches, an
    ``(inputs, targets)`` tensor pair, or a :class:`~qat_plugins.data.DataSplit` (its test split).
    """
    m = unwrap(model)
    was_training = m.training
    m.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for x, y in _batches(dataset_or_loader, batch_size):
                pred = first_tensor(m(x)).argmax(-1)
                correct += int((pred == y).sum())
                total += int(y.numel())
    finally:
        if was_training:
            m.train()
    if total == 0:
        raise ValueError("evaluate: the dataset is empty")
    return correct / total


# --- one step -----------------------------------------------------------------------------------
def train_step(model: nn.Module, regs: RegularizerSet | None, batch: Sequence[torch.Tensor],
               optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """One optimisation step: forward, cross-entropy + regularizers, finite check, backward, step.

    A non-finite task loss (named ``"task loss (cross-entropy)"``) or regularizer loss (named by
    :class:`~qat_plugins.regularizers.RegularizerSet`) raises :class:`NonFiniteLossError` before
    ``backward`` / ``optimizer.step``, so the weights are untouched.

    Returns ``{"loss", "task_loss", "reg_losses": {name: value}, "correct", "n"}``.
    """
    x, y = batch[0], batch[1]
    optimizer.zero_grad(set_to_none=True)
    out = model(x)
    logits = first_tensor(out)
    task = F.cross_entropy(logits, y)
    err: NonFiniteLossError | None = None
    reg = None
    try:
        if not torch.isfinite(task.detach()):
            raise NonFiniteLossError(f"task loss (cross-entropy) is non-finite ({float(task.detach())}); check the "
                                     "inputs for NaN/inf values, or lower the learning rate")
        reg = regs.loss(x, y, out) if regs is not None and len(regs) else None
        loss = task if reg is None else task + reg
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLossError(f"total loss (task + regularizers) is non-finite ({float(loss.detach())}); "
                                     "lower the regularizer weights or the learning rate")
    except NonFiniteLossError as e:
        err = e
    if _distributed():  # every rank skips / stops together, or the others would wait in the all-reduce
        bad = any_rank(err is not None)
        if bad and err is None:
            err = NonFiniteLossError(f"non-finite loss on rank(s) {bad} (this rank's shard was fine)")
    if err is not None:
        raise err
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        correct = int((logits.argmax(-1) == y).sum())
    return {"loss": float(loss.detach()), "task_loss": float(task.detach()),
            "reg_losses": dict(regs.last_losses) if reg is not None and regs is not None else {},
            "correct": correct, "n": int(y.numel())}


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


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv / linear weights only (not biases, BN, quantizer step sizes)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
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


# --- FP training --------------------------------------------------------------------------------
def train_fp(model: nn.Module, data: DataSplit, cfg: TrainConfig | Mapping[str, Any] | str) -> nn.Module:
    """Full-precision training of ``model`` in place (``cfg.fp``); returns it in eval mode.

    Adam (or SGD with momentum 0.9) with a per-step cosine schedule and, when ``fp.augment``, the
    default augmentation (:func:`qat_plugins.data.default_augment`) on the inputs. Seeded with
    ``cfg.seed``. Non-finite losses follow ``nan_policy``.
    """
    cfg = _as_train_config(cfg)
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
    spe = _steps_per_epoch(data.train, bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _LRSchedule("cosine", fc.epochs * spe))
    aug_gen = torch.Generator().manual_seed(cfg.seed + 10)
    loader_gen = torch.Generator().manual_seed(cfg.seed + 11)
    augment = default_augment(aug_gen) if fc.augment else None
    wrapped = _wrap_model(model)
    model.train()
    skipped = 0
    from tqdm import tqdm

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no models)."""
        return {"test_accuracy": self.test_accuracy, "fp_test_accuracy": self.fp_test_accuracy,
                "mean_step_time_s": self.mean_step_time, "steps": self.steps,
                "skipped_batches": self.skipped_batches, "interrupted": self.interrupted,
                "checkpoint": self.checkpoint_path, "history": self.history,
                "regularizers": [r.config() for r in self.regularizers] if self.regularizers else [],
                "config": self.config.to_dict() if self.config is not None else None}


def _first_batch(data: DataSplit, batch_size: int) -> torch.Tensor:
    ds = data.train
    if isinstance(ds, TensorDataset):
        return ds.tensors[0][:batch_size]
    return next(iter(DataLoader(ds, batch_size=batch_size, shuffle=False)))[0]


def prepare_student(fp_model: nn.Module, data: DataSplit, cfg: TrainConfig | Mapping[str, Any] | str) -> nn.Module:
    """``prepare_qat`` of ``fp_model`` per ``cfg.qat``, then one no-grad eval-mode calibration forward
    on the first training batch, so every quantizer is initialised (and per-channel scales sized)
    before an optimizer is built. Returns the QAT model in train mode.
    """
    cfg = _as_train_config(cfg)
    q = cfg.qat
    x0 = _first_batch(data, cfg.data.batch_size * world_size())  # the first global batch, on every rank
    student = prepare_qat(fp_model, weight_bits=q.weight_bits, act_bits=q.act_bits, mode=q.mode,
                          example_inputs=(x0,), keep_first_last_8bit=q.keep_first_last_8bit,
                          per_channel=q.per_channel, learnable=q.learnable)
    student.eval()
    with torch.no_grad():
        student(x0)
    return student.train()


def _check_same_fp(saved: Mapping[str, torch.Tensor], fp_model: nn.Module, path: Any) -> None:
    current = unwrap(fp_model).state_dict()
    if set(saved) != set(current):
        raise ValueError(f"fp_model does not match the FP model in checkpoint {path} (different layers); resume "
                         "with the FP model the checkpoint was made from")
    for k, v in saved.items():
        if v.shape != current[k].shape or not torch.equal(v, current[k]):
            raise ValueError(f"fp_model differs from the FP model in checkpoint {path} (first difference: {k}); "
                             "resume with the FP model the checkpoint was made from")


def _check_world_size(ckpt: Mapping[str, Any], path: Any) -> None:
    saved = int(ckpt.get("world_size", 1))
    if saved != world_size():  # the data order, steps per epoch and schedule depend on it
        raise ValueError(f"checkpoint {path} was made by {saved} process(es), this run has {world_size()}; resume "
                         "with the same torchrun --nnodes x --nproc_per_node")


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
    cfg = _as_train_config(cfg)
    q = cfg.qat
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_path")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    ckpt = None
    if resume:
        assert ckpt_path is not None
        ckpt = load_checkpoint(ckpt_path)
        check_config_matches(ckpt, cfg, ckpt_path)
        _check_same_fp(ckpt["fp_model"], fp_model, ckpt_path)
        _check_world_size(ckpt, ckpt_path)

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


def _qat_loop(student: nn.Module, model: nn.Module, regs: RegularizerSet, fp_model: nn.Module, data: DataSplit,
              cfg: TrainConfig, ckpt: Mapping[str, Any] | None, ckpt_path: Path | None, max_steps: int | None,
              callback: Callable[[int, dict[str, Any]], None] | None,
              checkpoint_extra: Callable[[nn.Module], Mapping[str, Any]] | None = None) -> TrainResult:
    q = cfg.qat
    bs = cfg.data.batch_size
    optimizer = torch.optim.SGD(_param_groups(student, q.weight_decay), lr=q.lr, momentum=q.momentum)
    spe = _steps_per_epoch(data.train, bs)
    total = q.epochs * spe
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LRSchedule(q.schedule, total))
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
    if _distributed():  # rank 0's regularizer state (EMA teacher, block-replacement RNG) on every rank
        regs.load_state_dict(broadcast_object(regs.state_dict()))

    def save() -> None:
        if not _distributed():
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
    from tqdm import tqdm

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
                    stats.time = time.perf_counter() - t_epoch
                    broadcast_module(student, params=False)  # buffers of the last local forward -> rank 0's
                    h = stats.summary(epoch + 1, evaluate(student, data.test), optimizer.param_groups[0]["lr"],
                                      prog["step"])
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
        test_acc = evaluate(student, data.test)
    mean_step = prog["step_time_sum"] / max(1, prog["step_count"])
    return TrainResult(model=student, fp_model=fp_model, regularizers=regs, history=history, test_accuracy=test_acc,
                       mean_step_time=mean_step, steps=prog["step"], skipped_batches=prog["skipped"],
                       interrupted=interrupted, checkpoint_path=str(ckpt_path) if ckpt_path is not None else None,
                       config=cfg)


# --- the whole job ------------------------------------------------------------------------------
def prepare_output_dir(output_dir: str | Path, *, resume: bool = False,
                       outputs: Iterable[str] = (RESULTS_NAME,)) -> Path:
    """Create / check the output directory; never lets a run overwrite another run's files.

    Raises ``FileExistsError`` (checkpoint or outputs of an earlier run present without ``resume``,
    or outputs of a finished run with ``resume``), ``FileNotFoundError`` (``resume`` without a
    checkpoint) or ``PermissionError`` / ``NotADirectoryError`` (cannot write there), each naming the path.
    """
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        err = type(e) if isinstance(e, (PermissionError, NotADirectoryError, FileExistsError)) else PermissionError
        raise err(f"cannot write to output directory {out}: {e.strerror or e}; choose a writable directory "
                  "(output_dir / --output-dir)") from None
    ckpt = out / CHECKPOINT_NAME
    existing = [out / name for name in outputs if (out / name).exists()]
    if resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {ckpt} to resume from; drop --resume to start a new "
                                    "run, or point --output-dir at the interrupted run")
        if existing:
            raise FileExistsError(f"the run in {out} already finished ({existing[0]} exists); nothing to resume")
        for stale in out.glob(f".{CHECKPOINT_NAME}.*.tmp"):  # half-written by a run killed while saving
            stale.unlink(missing_ok=True)
    else:
        if ckpt.exists():
            raise FileExistsError(f"{ckpt} exists (an earlier run); pass --resume to continue it, or choose another "
                                  "output directory")
        if existing:
            raise FileExistsError(f"{existing[0]} exists; not overwriting it: choose another output directory")
    return out


def write_json(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically, refusing to overwrite an existing file."""
    blob = json.dumps(payload, indent=2, sort_keys=False, default=_json_default).encode() + b"\n"
    return atomic_write_bytes(path, blob, overwrite=False)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def run(cfg: TrainConfig | Mapping[str, Any] | str, *, output_dir: str | Path | None = None, resume: bool = False,
        max_steps: int | None = None, callback: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run a config end to end: data, FP model + FP training, QAT, ``results.json``.

    Writes ``checkpoint.pt`` (the run's own, updated in place) and, when training completes,
    ``results.json`` into ``output_dir`` (default ``cfg.output_dir``; ``None`` for neither). With
    ``resume`` the FP model comes from the checkpoint and QAT continues where it stopped.
    Sets ``torch.set_num_threads(cfg.num_threads)`` when ``num_threads`` is not null.

    Under ``torchrun`` (``WORLD_SIZE > 1``) it initialises the process group for the run and tears it
    down afterwards (:func:`~qat_plugins.training.distributed.distributed_session`); ``data.batch_size``
    is per process, so the global batch is ``batch_size * WORLD_SIZE``.
    """
    cfg = _as_train_config(cfg)
    if output_dir is not None:
        cfg = update_config(cfg, {"output_dir": str(output_dir)})
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir) if cfg.output_dir else None
    if resume and out is None:
        raise ValueError("output_dir: needed to resume (the checkpoint lives there)")
    with distributed_session():
        return _run(cfg, out, resume, max_steps, callback)


def _run(cfg: TrainConfig, out: Path | None, resume: bool, max_steps: int | None,
         callback: Callable[[int, dict[str, Any]], None] | None) -> TrainResult:
    ckpt_path = None
    if out is not None:
        err: BaseException | None = None
        if is_rank0():
            try:
                prepare_output_dir(out, resume=resume)
            except OSError as e:
                err = e
        err = agree_on_error(err)  # the other ranks stop with rank 0's message instead of waiting for it
        if err is not None:
            raise err
        ckpt_path = out / CHECKPOINT_NAME

    t0 = time.perf_counter()
    data = load_data(cfg)
    fp = build_fp_model(cfg, data)
    _check_regularizer_names(cfg, fp, data)
    if resume:
        assert ckpt_path is not None
        ckpt = load_checkpoint(ckpt_path)
        check_config_matches(ckpt, cfg, ckpt_path)
        _check_world_size(ckpt, ckpt_path)
        fp.load_state_dict(ckpt["fp_model"])
        fp.eval()
        del ckpt
    else:
        train_fp(fp, data, cfg)
    fp_acc = evaluate(fp, data.test)
    _info("FP test top-1 %.2f%%", 100 * fp_acc)
    result = train_qat(fp, data, cfg, checkpoint_path=ckpt_path, resume=resume, max_steps=max_steps,
                       callback=callback)
    result.fp_test_accuracy = fp_acc
    _info("QAT W%dA%d test top-1 %.2f%% (FP %.2f%%), %.1f ms/step", cfg.qat.weight_bits, cfg.qat.act_bits,
          100 * result.test_accuracy, 100 * fp_acc, 1000 * result.mean_step_time)
    if out is not None and not result.interrupted:
        from .. import __version__

        err = None
        if is_rank0():
            try:
                payload = {"package_version": __version__, "wall_time_s": time.perf_counter() - t0,
                           **result.to_dict()}
                write_json(out / RESULTS_NAME, payload)
            except OSError as e:
                err = e
        err = agree_on_error(err)
        if err is not None:
            raise err
    return result


def _check_regularizer_names(cfg: TrainConfig, fp: nn.Module, data: DataSplit) -> None:
    """Attach the config's regularizers to a throwaway QAT copy of ``fp`` before any training, so a
    layer / block name that is not in the model fails in seconds, naming its config entry."""
    if not cfg.regularizers:
        return
    q = cfg.qat
    x0 = _first_batch(data, 2)
    probe = prepare_qat(fp, weight_bits=q.weight_bits, act_bits=q.act_bits, mode=q.mode, example_inputs=(x0,),
                        keep_first_last_8bit=q.keep_first_last_8bit, per_channel=q.per_channel,
                        learnable=q.learnable)
    for i, (spec, reg) in enumerate(zip(cfg.regularizers, build_regularizers(cfg.regularizers))):
        field = next((f".{k}" for k in ("blocks", "layers") if spec.get(k) is not None), "")
        try:
            reg.attach(probe, fp_model=fp)
        except ValueError as e:
            raise ValueError(f"regularizers[{i}]{field}: {e}; use module names of the {cfg.model.name} model") from None
        finally:
            if reg.attached:
                reg.detach()


def load_trained(checkpoint: str | Path) -> tuple[nn.Module, nn.Module, TrainConfig, DataSplit]:
    """Rebuild ``(qat_model, fp_model, config, data)`` from a training checkpoint (models in eval mode).

    The QAT model is prepared from the stored FP weights with the stored config, calibrated once and
    then loaded with the stored QAT state (weights, BN statistics, quantizer scales).
    """
    ckpt = load_checkpoint(checkpoint)
    cfg = _as_train_config(ckpt["config"])
    data = load_data(cfg)
    fp = build_fp_model(cfg, data)
    fp.load_state_dict(ckpt["fp_model"])
    fp.eval()
    student = prepare_student(fp, data, cfg)
    student.load_state_dict(ckpt["model"])
    return student.eval(), fp, cfg, data
