"""Training-step cost micro-benchmark: every method in one process, timed round-robin on the same batches.

For each measured step ``i`` every method trains on batch ``i`` (the same tensors for all methods), in
an order that rotates with ``i`` so no method always runs first (cache warmth, frequency scaling);
the cost of a method is the median of its step times, reported relative to LSQ measured alongside
it. A step is the trainer's :func:`~qat_plugins.training.trainer.train_step` (forward, task loss +
regularizer losses, backward, SGD step), exactly what ``train_qat`` times as ``mean_step_time``.

Peak memory (:func:`peak_step_memory`): after the timing, for each method in turn, the growth of the
process's *current* RSS (``/proc/self/statm``, sampled every 0.5 ms by a thread) over a few training
steps above the RSS right before them (after ``gc.collect()`` + glibc ``malloc_trim(0)``): activations
kept for backward, gradients, the regularizers' extra forwards. ``ru_maxrss`` deltas were tried first
and read 0 (the high-water mark of loading the dataset already exceeds any training step).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import statistics
import threading
import time
from typing import Any

import torch
from torch import nn

from .settings import BenchSettings, regularizer_specs, train_config

__all__ = ["MethodUnderTest", "build_method", "time_methods", "timing_task", "RssSampler", "peak_step_memory"]


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``) so RSS starts from what is in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Peak resident set size (``/proc/self/statm``) sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _current_rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = _current_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss_bytes())


def peak_step_memory(method: "MethodUnderTest", batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Peak RSS growth (MiB) over training steps of ``method``: sampled current RSS, baseline after
    ``malloc_trim`` right before the steps (the models, optimizer state and earlier methods are in it)."""
    _trim()
    base = _current_rss_bytes()
    with RssSampler() as s:
        for b in batches:
            method.step(b)
    return {"baseline_mb": base / 2**20, "peak_mb": s.peak / 2**20, "delta_mb": (s.peak - base) / 2**20,
            "steps": len(batches)}


class MethodUnderTest:
    """A prepared student of one method with its regularizers attached and its optimizer."""

    def __init__(self, name: str, student: nn.Module, regs: Any, optimizer: torch.optim.Optimizer) -> None:
        self.name, self.student, self.regs, self.optimizer = name, student, regs, optimizer

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        from ..training import train_step

        return train_step(self.student, self.regs, batch, self.optimizer)

    def close(self) -> None:
        self.regs.detach()


def build_method(method: str, fp_model: nn.Module, data: Any, s: BenchSettings, dataset: str, model: str,
                 bits: int) -> MethodUnderTest:
    """The student of ``method`` exactly as a QAT run builds it (own copy of the FP model)."""
    from ..regularizers import attach, build_regularizers
    from ..training import load_config, prepare_student
    from ..training import trainer as T
    from .runner import prepare_nncf_student

    fp = copy.deepcopy(fp_model).eval()
    wbits = 8 if method == "nncf8" else bits
    specs = regularizer_specs(method, model, 0, s.combo)
    cfg = load_config(train_config(s, dataset, model, 0, wbits, specs))
    T.seed_everything(cfg.seed + 1)
    if method in ("nncf", "nncf8"):
        student = prepare_nncf_student(fp, data, cfg)
    else:
        student = prepare_student(fp, data, cfg)
    regs = attach(student, build_regularizers(specs), fp_model=fp)
    opt = torch.optim.SGD(T.param_groups(student, cfg.qat.weight_decay), lr=cfg.qat.lr, momentum=cfg.qat.momentum)
    student.train()
    return MethodUnderTest(method, student, regs, opt)


def time_methods(methods: dict[str, MethodUnderTest], batches: list[tuple[torch.Tensor, torch.Tensor]], *,
                 warmup: int = 3, reference: str = "lsq") -> dict[str, Any]:
    """Round-robin step timing; returns per-method median / all times and the ratio to ``reference``."""
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup):
        for n in names:
            methods[n].step(batches[i % len(batches)])
    for i, batch in enumerate(batches):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            t0 = time.perf_counter()
            methods[n].step(batch)
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    ref = med.get(reference)
    return {"median_step_s": med, "step_times_s": times,
            "relative_to_lsq": {n: (m / ref if ref else None) for n, m in med.items()}, "steps": len(batches),
            "warmup": warmup}


def timing_task(task: dict[str, Any]) -> dict[str, Any]:
    """Micro-benchmark of every method at ``bits`` on one dataset / model (seed-0 FP model)."""
    from .runner import load_bench_data, load_fp_model, quiet_worker

    quiet_worker()
    s = BenchSettings.from_dict(task["settings"])
    ds, model, bits = task["dataset"], task["model"], task["bits"]
    data = load_bench_data(s, ds)
    fp = load_fp_model(task["cache_dir"], s, ds, model, 0, data)
    names = list(dict.fromkeys(["lsq", *task["methods"]]))  # LSQ is every ratio's reference
    methods = {m: build_method(m, fp, data, s, ds, model, bits) for m in names}
    bs = s.batch_size[ds]
    x, y = data.train.tensors
    n = task["steps"]
    batches = []
    for i in range(n):
        j = (i * bs) % max(1, len(x) - bs)
        batches.append((x[j:j + bs], y[j:j + bs]))
    try:
        res = time_methods(methods, batches, warmup=task.get("warmup", 3))
        mem_batches = batches[:max(1, task.get("memory_steps", 3))]
        res["memory"] = {m: peak_step_memory(mu, mem_batches) for m, mu in methods.items()}
    finally:
        for m in methods.values():
            m.close()
    rec = {"dataset": ds, "model": model, "bits": bits, "batch_size": bs, "task_key": task.get("task_key"), **res}
    if task.get("out_dir"):
        import json
        from pathlib import Path

        from .._io import atomic_write_bytes

        runs = Path(task["out_dir"]) / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(runs / f"timing_{ds}_{model}_w{bits}.json", json.dumps(rec, indent=1).encode())
    return rec
