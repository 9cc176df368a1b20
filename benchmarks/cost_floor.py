"""Cost of each regularizer per training step, relative to plain LSQ QAT (issue 11's cost floors).

One process, one thread; every method has its own QAT model copy, and the methods are timed
interleaved (one step each per round, in a seeded random order per round) so machine load and the
previous step's cache and heap state hit all alike; the median step time of each is divided by
LSQ's (in parentheses: the median of the per-round ratios; in brackets: the 95 % bootstrap interval
of the ratio over rounds, which shows how much of a run's figure is this machine's noise). A step is
forward + CE + regularizer terms + backward + SGD step. "ok" / "MISSED" judge the ratio itself.
With KD in the table, KD's frozen FP forward alone is timed in the same rounds, and "KD floor"
(1 + its median / LSQ's) is what KD would cost with nothing but that one extra forward.

    OMP_NUM_THREADS=1 python benchmarks/cost_floor.py [--rounds 20] [--mode eager] [--models ...] [--out FILE]
    OMP_NUM_THREADS=1 python benchmarks/cost_floor.py --csd-reduction   # FPQ's CSD sum vs mean study
    OMP_NUM_THREADS=1 python benchmarks/cost_floor.py --kernels         # CSD eager vs compiled, FP layout/fold, pool, FP conv rate
    OMP_NUM_THREADS=1 python benchmarks/cost_floor.py --profile [M [BASE]] # where M's extra time goes
    OMP_NUM_THREADS=1 python benchmarks/cost_floor.py --phases [--methods ...]  # a step's phases, ms
    OMP_NUM_THREADS=1 python benchmarks/cost_floor.py --alone LSQ      # one method alone: ms, page faults
    OMP_NUM_THREADS=1 python benchmarks/cost_floor.py --twins LSQ 4 --rounds 200  # identical copies: a ratio's noise
    OMP_NUM_THREADS=1 python benchmarks/cost_floor.py --processes 6 --rounds 200 --models SmallResNet  # the table in 6 fresh processes

Every mode first lets glibc keep freed memory in the process (:func:`keep_freed_memory`);
``--glibc-defaults`` measures with the allocator as configured instead.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import qat_plugins as qp
from qat_plugins.data import default_augment, load_digits_split
from qat_plugins.models import ResNet20, SmallResNet
from qat_plugins.regularizers._losses import csd_distance
from qat_plugins.regularizers.frozen_fp import FrozenFP

BLOCKS = ["layer1", "layer2", "layer3"]  # BR's blocks in both benchmark models
TARGETS = {"LSQ": 1.0, "CR": 2.05, "FPQ": 1.3, "BR": 1.3, "KD": 1.15, "CR+FPQ+BR": 2.4}
FP_FORWARD = "FP forward"  # KD's frozen FP forward alone, timed with the methods when KD is among them
KD_FLOOR = "KD floor"  # 1 + FP forward / LSQ step: KD's cost with nothing but its one extra forward
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters, <malloc.h>


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory in this process, as ``MALLOC_TRIM_THRESHOLD_=268435456
    MALLOC_MMAP_THRESHOLD_=33554432`` would: the heap top is not returned to the OS after a step and
    blocks under 32 MiB come from the heap, so a step does not fault its memory back in. With glibc's
    dynamic defaults plain LSQ run alone pays thousands of minor faults per step, and in the
    interleaved run only the method with the highest peak does (``--alone``, BENCHMARKS.md "Cost").
    False where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 256 << 20)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))


def _models() -> dict[str, tuple[str, torch.nn.Module, torch.Tensor]]:
    """The two benchmark models with their input batch, built in this order from the current RNG state
    (both always, so that each model's weights and input do not depend on which are timed)."""
    return {"SmallResNet": ("SmallResNet 14x14 b128", SmallResNet(width=16), torch.randn(128, 1, 14, 14)),
            "ResNet20": ("ResNet20 32x32 b64", ResNet20(width=16, in_channels=3), torch.randn(64, 3, 32, 32))}


def _labels(x: torch.Tensor) -> torch.Tensor:
    """Fixed class labels for a benchmark batch (their own seeded generator)."""
    return torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(0))


def _small_case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """SmallResNet (14x14, batch 128) as in the main table, from seed 0: FP model, batch, labels."""
    torch.manual_seed(0)
    _, fp, x = _models()["SmallResNet"]
    return fp, x, _labels(x)


def _regs(method: str, blocks: list[str]) -> list[qp.Regularizer]:
    make = {"CR": lambda: qp.ConsistencyRegularizer(), "FPQ": lambda: qp.FeaturePerturbationRegularizer(),
            "BR": lambda: qp.BlockReplacementRegularizer(blocks), "KD": lambda: qp.KnowledgeDistillationRegularizer()}
    return [make[m]() for m in method.split("+") if m in make]


def _method(text: str) -> str:
    """argparse type of ``--methods``: LSQ or a '+' combination of the regularizers."""
    parts = text.split("+")
    if text != "LSQ" and not all(p in ("CR", "FPQ", "BR", "KD") for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: use LSQ or a '+' combination of CR, FPQ, BR, KD")
    return text


def _setups(fp: torch.nn.Module, x: torch.Tensor, blocks: list[str], mode: str, methods: list[str]) -> dict[str, tuple]:
    """``{method: (qat model, attached RegularizerSet, SGD, [])}``, every model a copy of one calibrated state."""
    fp.eval()
    base = qp.prepare_qat(fp, weight_bits=4, act_bits=4, mode=mode, example_inputs=(x[:2],))
    base(x)  # calibrate once; every method starts from the same state
    runs = {}
    for method in methods:
        q = copy.deepcopy(base).train()
        regs = qp.attach(q, _regs(method, blocks), fp_model=copy.deepcopy(fp))
        opt = torch.optim.SGD(q.parameters(), lr=1e-3, momentum=0.9)
        runs[method] = (q, regs, opt, [])
    return runs


def _train_step(run: tuple, x: torch.Tensor, y: torch.Tensor, mark: Callable[[str], None] | None = None) -> None:
    """One step of the user's loop (forward, CE + the terms, zero_grad, backward, SGD step) of a
    :func:`_setups` entry; ``mark(phase)`` after the forward, the backward and the step."""
    q, regs, opt, _ = run
    out = q(x)
    if mark:
        mark("forward")
    loss = F.cross_entropy(out, y) + regs.loss(x, y, out)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if mark:
        mark("backward")
    opt.step()
    if mark:
        mark("step")


def _timed_step(run: tuple, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Seconds and minor page faults of one :func:`_train_step`."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    _train_step(run, x, y)
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def ratio_interval(times: list[float], base: list[float], reps: int = 2000, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``median(times) / median(base)``: rounds resampled with
    replacement, each round's pair kept together (the interleaved steps of one round share the
    machine's state). ``reps`` resamples, a seeded generator: the same times give the same interval."""
    if len(times) != len(base) or not times:
        raise ValueError("times and base need one entry per round, and at least one round")
    rng = random.Random(seed)
    n = len(times)
    ratios = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(times[i] for i in idx) / statistics.median(base[i] for i in idx))
    ratios.sort()
    tail = (1.0 - level) / 2
    return ratios[round(tail * (reps - 1))], ratios[round((1.0 - tail) * (reps - 1))]


def _interleave(runs: dict[str, tuple], x: torch.Tensor, y: torch.Tensor, rounds: int, warmup: int,
                extra: dict[str, tuple[Callable[[], object], list[float]]] | None = None) -> dict[str, list[int]]:
    """Time ``warmup + rounds`` rounds of one step of every entry of ``runs`` (a :func:`_setups` dict), in
    a fresh seeded random order each round (no entry always follows the same one: cache, heap state);
    the timed rounds' seconds go to each entry's list. ``extra`` entries (``{name: (fn, seconds)}``)
    are timed in the same rounds and order, a call of ``fn`` each. Returns the minor page faults of
    each timed step of ``runs``."""
    extra = extra or {}
    faults: dict[str, list[int]] = {k: [] for k in runs}
    order = random.Random(0)
    for r in range(warmup + rounds):
        for key in order.sample([*runs, *extra], len(runs) + len(extra)):
            if key in extra:
                t0 = time.perf_counter()
                extra[key][0]()
                if r >= warmup:
                    extra[key][1].append(time.perf_counter() - t0)
                continue
            dt, f = _timed_step(runs[key], x, y)
            if r >= warmup:
                runs[key][3].append(dt)
                faults[key].append(f)
    return faults


def _fp_forward(run: tuple, x: torch.Tensor) -> Callable[[], object]:
    """One no-grad forward of the frozen FP model attached with ``run`` (a :func:`_setups` entry) on
    ``x``, as the step's shared FP forward runs it: KD's extra work, so ``1 + its time / LSQ's step``
    is KD's cost floor."""
    fp = run[1].fp_model
    frozen = FrozenFP.lookup(fp)

    def forward() -> object:
        with torch.no_grad():
            return fp(frozen.inputs_for(x))
    return forward


def twin_study(method: str, copies: int = 3, rounds: int = 60, warmup: int = 3) -> None:
    """``copies`` identical copies of ``method`` on SmallResNet (14x14, batch 128), timed interleaved like
    the main table: each copy's median step time against copy 0's. The copies do the same work, so
    their ratios show how far a ratio moves on this machine when nothing differs (heap placement,
    the VM's noise)."""
    fp, x, y = _small_case()
    runs = {f"{method} #{i}": _setups(fp, x, BLOCKS, "eager", [method])[method] for i in range(copies)}
    _interleave(runs, x, y, rounds, warmup)
    first = next(iter(runs.values()))[3]
    print(f"| copy of {method} | median ms | ratio to copy 0 (per round) [95 % interval] |\n|---|---:|---:|")
    for key, run in runs.items():
        ratio = statistics.median(run[3]) / statistics.median(first)
        paired = statistics.median(t / b for t, b in zip(run[3], first))
        spread = "" if run[3] is first else " [{:.2f}, {:.2f}]".format(*ratio_interval(run[3], first))
        print(f"| {key} | {statistics.median(run[3]) * 1000:.1f} | {ratio:.3f}x ({paired:.3f}x){spread} |")
    for _, regs, _, _ in runs.values():
        regs.detach()


def measure(name: str, fp: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, blocks: list[str], mode: str,
            rounds: int, methods: list[str], warmup: int = 3
            ) -> tuple[dict[str, float], dict[str, float], dict[str, tuple[float, float]]]:
    """Median step time and median per-round ratio to LSQ of each of ``methods`` (``"LSQ"`` first), and
    the 95 % bootstrap interval of each other method's ratio of medians (:func:`ratio_interval`).
    With KD among them, its frozen FP forward alone (:func:`_fp_forward`) is timed in the same
    rounds; its median is returned under :data:`FP_FORWARD` (no per-round ratio, no interval)."""
    runs = _setups(fp, x, blocks, mode, methods)
    extra = {FP_FORWARD: (_fp_forward(runs["KD"], x), [])} if "KD" in runs else {}
    faults = _interleave(runs, x, y, rounds, warmup, extra)
    # minor page faults per step: memory the allocator returned to the OS and touches again
    print(f"{name}: median minor page faults per step: "
          + ", ".join(f"{m} {statistics.median(v):.0f}" for m, v in faults.items()), flush=True)
    med = {m: statistics.median(v[3]) for m, v in runs.items()}
    # the median of per-round ratios pairs each step with the LSQ step of the same round (robust to drift)
    paired = {m: statistics.median(t / b for t, b in zip(v[3], runs["LSQ"][3])) for m, v in runs.items()}
    interval = {m: ratio_interval(v[3], runs["LSQ"][3]) for m, v in runs.items() if m != "LSQ"}
    med.update({k: statistics.median(times) for k, (_, times) in extra.items()})
    for _, regs, _, _ in runs.values():
        regs.detach()
    return med, paired, interval


def alone_study(method: str, rounds: int = 30, warmup: int = 5) -> None:
    """``method`` alone in this process on SmallResNet (14x14, batch 128), no interleaving (as a user's
    training loop runs): median step time and minor page faults per step."""
    fp, x, y = _small_case()
    run = _setups(fp, x, BLOCKS, "eager", [method])[method]
    times, faults = [], []
    for i in range(warmup + rounds):
        dt, f = _timed_step(run, x, y)
        if i >= warmup:
            times.append(dt * 1000)
            faults.append(f)
    run[1].detach()
    print(f"| {method} alone | {statistics.median(times):.1f} ms | {statistics.median(faults):.0f} "
          f"(max {max(faults)}) |")


def phase_study(methods: list[str], rounds: int = 30, warmup: int = 5) -> None:
    """Median ms of each phase of a step on SmallResNet (14x14, batch 128), methods interleaved: the
    training forward, each regularizer's ``loss`` (in the order the set computes them; the first one
    that needs the FP model runs the shared clean FP forward), backward, SGD step; and minor page
    faults per step. The sum of the parts measured alone against the combination shows what the
    combination costs beyond its parts."""
    fp, x, y = _small_case()
    runs = _setups(fp, x, BLOCKS, "eager", methods)
    times: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    faults: dict[str, dict[str, list[int]]] = {m: {} for m in methods}
    clock: list[tuple[str, float, int]] = []

    def now(name: str) -> None:
        clock.append((name, time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

    def timed(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def call(*args: object, **kwargs: object) -> torch.Tensor:
            out = fn(*args, **kwargs)
            now(name)
            return out
        return call

    for _, regs, _, _ in runs.values():
        for r in regs:
            r.loss = timed(r.name, r.loss)  # instance attribute: notes when each term is done
    for i in range(warmup + rounds):
        for method in methods:
            clock.clear()
            now("start")
            _train_step(runs[method], x, y, now)
            if i >= warmup:
                for (_, t0, f0), (name, t1, f1) in zip(clock, clock[1:]):
                    times[method].setdefault(name, []).append((t1 - t0) * 1000)
                    faults[method].setdefault(name, []).append(f1 - f0)
                times[method].setdefault("total", []).append((clock[-1][1] - clock[0][1]) * 1000)
    for _, regs, _, _ in runs.values():
        regs.detach()
    lsq = statistics.median(times["LSQ"]["total"]) if "LSQ" in times else None
    print("| method | phases, median ms (in order) | total ms | vs LSQ | minor page faults (median per phase) |"
          "\n|---|---|---:|---:|---|")
    for method, phases in times.items():
        parts = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in phases.items() if k != "total")
        pf = ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in faults[method].items() if statistics.median(v))
        total = statistics.median(phases["total"])
        ratio = f"{total / lsq:.2f}x" if lsq else "-"
        print(f"| {method} | {parts} | {total:.1f} | {ratio} | {pf or 0} |")


def csd_reduction_study(steps: int = 20, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    """Test accuracy after ``steps`` W4A4 SGD steps (README loop) with FPQ's CSD ``sum`` vs ``mean``."""
    data = load_digits_split()
    x_all, y_all = data.train.tensors
    x_test, y_test = data.test.tensors
    torch.manual_seed(0)
    fp0 = SmallResNet(width=8)  # trained as tests/conftest.py's fp_resnet: 200 Adam steps, augmented
    aug, opt = default_augment(), torch.optim.Adam(fp0.parameters(), 1e-2)
    for _ in range(200):
        idx = torch.randint(0, len(x_all), (64,))
        loss = F.cross_entropy(fp0(aug(x_all[idx])), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    fp0.eval()
    rows = {"LSQ only": lambda: [], "FPQ reduction=sum (paper)": lambda: [qp.FeaturePerturbationRegularizer(reduction="sum")],
            "FPQ reduction=mean": lambda: [qp.FeaturePerturbationRegularizer(reduction="mean")]}
    for name, make in rows.items():
        accs = []
        for seed in seeds:
            torch.manual_seed(seed)
            fp = copy.deepcopy(fp0)
            q = qp.prepare_qat(fp, weight_bits=4, act_bits=4)
            sgd = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
            with qp.attach(q, make(), fp_model=fp) as regs:
                for i in range(0, 64 * steps, 64):
                    x, y = x_all[i:i + 64], y_all[i:i + 64]
                    out = q(x)
                    loss = F.cross_entropy(out, y) + regs.loss(x, y, out)
                    sgd.zero_grad()
                    loss.backward()
                    sgd.step()
            q.eval()
            with torch.no_grad():
                accs.append(round(float((q(x_test).argmax(1) == y_test).float().mean()), 3))
        print(f"| {name} | " + " | ".join(str(a) for a in accs) + " |", flush=True)


def _interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, tuple[float, float]]:
    """``{name: (min ms, median ms)}`` of ``reps`` calls of each function, timed round robin."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (min(v) * 1000, statistics.median(v) * 1000) for k, v in times.items()}


def kernel_study(reps: int = 50) -> None:
    """CSD forward + backward, eager batch-norm kernels vs ``compiled=True`` (a channels_last teacher as
    the frozen FP model gives it, and both NCHW); the FP model's no-grad forward contiguous, in
    channels_last, and frozen as attached (channels_last, BatchNorm folded) (ms, min / median of
    ``reps``, interleaved)."""
    torch.manual_seed(0)
    print("| CSD feature | eager min / median | compiled, NHWC teacher | compiled, both NCHW |\n|---|---:|---:|---:|")
    for shape in [(128, 16, 14, 14), (64, 16, 32, 32)]:
        z, t = torch.randn(shape, requires_grad=True), torch.randn(shape)
        t_cl = t.contiguous(memory_format=torch.channels_last)
        fns = {"eager": lambda: csd_distance(z, t_cl).backward(),
               "compiled_cl": lambda: csd_distance(z, t_cl, compiled=True).backward(),
               "compiled": lambda: csd_distance(z, t, compiled=True).backward()}
        _interleaved(fns, 3)  # compile / warm up
        res = _interleaved(fns, reps)
        print(f"| {'x'.join(map(str, shape))} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in res.values()) + " |")
    print("\n| FP model no-grad forward | contiguous min / median | channels_last | frozen (channels_last, BN folded) |"
          "\n|---|---:|---:|---:|")
    for name, model, x in _models().values():
        model.eval()
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        folded = copy.deepcopy(model)
        frozen = FrozenFP.acquire(folded)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            res = _interleaved({"nchw": lambda: model(x), "cl": lambda: cl(x_cl), "frozen": lambda: folded(x_cl)}, reps)
        frozen.release()
        print(f"| {name} | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in res.values()) + " |")


def conv_rate_study(reps: int = 30) -> None:
    """The frozen FP model's no-grad forward (KD's cost) against this core's compute rate: its FLOPs
    (``FlopCounterMode``), median ms, its convs' ms under the profiler and their GFLOP/s, next to a
    single-threaded 2048x2048 SGEMM."""
    torch.manual_seed(0)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm_ms = _interleaved({"sgemm": lambda: a @ b}, 10)["sgemm"][1]
    print(f"\nSGEMM 2048x2048x2048, one thread: {2 * 2048 ** 3 / gemm_ms / 1e6:.0f} GFLOP/s (median of 10)")
    print("| frozen FP no-grad forward | GFLOP | median ms | convs ms (profiler) | convs GFLOP/s |\n|---|---:|---:|---:|---:|")
    for name, model, x in _models().values():
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        gflop = counter.get_total_flops() / 1e9
        frozen = FrozenFP.acquire(model)
        with torch.no_grad():
            ms = _interleaved({"fwd": lambda: model(frozen.inputs_for(x))}, reps)["fwd"][1]
            with torch.autograd.profiler.profile() as prof:
                for _ in range(10):
                    model(frozen.inputs_for(x))
        frozen.release()
        conv_ms = sum(e.self_cpu_time_total for e in prof.key_averages()
                      if e.key in ("aten::mkldnn_convolution", "aten::_convolution_pointwise")) / 10 / 1000
        print(f"| {name} | {gflop:.3f} | {ms:.1f} | {conv_ms:.1f} | {gflop / conv_ms * 1000:.0f} |")


def pool_study(reps: int = 100) -> None:
    """ReLU, global average pool and their backward on a channels_last feature (the end of BR's FP
    suffix): ``adaptive_avg_pool2d`` (a mean, whose backward returns a contiguous gradient, so the
    ReLU backward mixes layouts) vs ``avg_pool2d`` over the whole plane (what the frozen FP model
    uses), ms min / median of ``reps``, interleaved."""
    print("\n| ReLU + global pool, forward + backward | adaptive_avg_pool2d | avg_pool2d |\n|---|---:|---:|")
    for shape in [(128, 64, 4, 4), (64, 64, 8, 8)]:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
        g = torch.randn(shape[0], shape[1])
        fns = {"adaptive": lambda: F.adaptive_avg_pool2d(torch.relu(x), 1).flatten(1).backward(g),
               "avg_pool2d": lambda: F.avg_pool2d(torch.relu(x), shape[2:]).flatten(1).backward(g)}
        res = _interleaved(fns, reps)
        print(f"| {'x'.join(map(str, shape))} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in res.values()) + " |")


def profile_against(method: str = "FPQ", base_method: str = "LSQ", steps: int = 10) -> None:
    """torch.profiler of ``steps`` ``base_method`` and ``method`` steps on SmallResNet (14x14, batch 128):
    ms per step, and the ops whose self time grows most from the one to the other (ms, calls per step)."""
    fp, x, y = _small_case()
    per_op: dict[str, dict[str, tuple[float, int]]] = {}
    for name in (base_method, method):  # one model at a time: the other's memory stays out of the profile
        run = _setups(fp, x, BLOCKS, "eager", [name])[name]
        for _ in range(5):  # warm up (FPQ: compile)
            _train_step(run, x, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                _train_step(run, x, y)
        per_op[name] = {e.key: (e.self_cpu_time_total / steps / 1000, e.count // steps) for e in prof.key_averages()}
        run[1].detach()
    total = {m: sum(t for t, _ in ops.values()) for m, ops in per_op.items()}
    print(f"ms per step under the profiler: {base_method} {total[base_method]:.1f}, {method} {total[method]:.1f}")
    grow = sorted(((per_op[method].get(k, (0.0, 0))[0] - per_op[base_method].get(k, (0.0, 0))[0], k)
                   for k in per_op[method]), reverse=True)
    print(f"| op | extra ms per step | calls per step {base_method} -> {method} |\n|---|---:|---:|")
    for extra, k in grow[:12]:
        print(f"| {k[:60]} | {extra:.2f} | {per_op[base_method].get(k, (0.0, 0))[1]} -> {per_op[method][k][1]} |")


def _judge(method: str, ratio: float) -> str:
    return "" if method not in TARGETS else " ok" if ratio <= TARGETS[method] else " MISSED"


def main_table(models: list[str], methods: list[str], mode: str, rounds: int
               ) -> tuple[str, dict[str, dict[str, dict[str, float]]]]:
    """The main table (markdown) of ``methods`` (``"LSQ"`` first) on ``models``, and its numbers:
    ``{model: {method: {"ratio", "paired", "low", "high", "ms"}}}`` (LSQ: ``ms`` only). With KD, a
    column :data:`KD_FLOOR` follows: ``{"ratio": 1 + FP forward / LSQ, "ms": FP forward}``."""
    torch.manual_seed(0)
    cases = _models()
    columns = [*methods, *([KD_FLOOR] if "KD" in methods else [])]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for key in [k for k in cases if k in models]:
        name, model, x = cases[key]
        med, paired, interval = measure(name, model, x, _labels(x), BLOCKS, mode, rounds, methods)
        results[key] = {"LSQ": {"ms": med["LSQ"] * 1000}}
        for m in methods[1:]:
            results[key][m] = {"ratio": med[m] / med["LSQ"], "paired": paired[m], "low": interval[m][0],
                               "high": interval[m][1], "ms": med[m] * 1000}
        cells = [f"{med['LSQ'] * 1000:.0f} ms"] + [
            f"{r['ratio']:.3f}x ({r['paired']:.3f}x) [{r['low']:.2f}, {r['high']:.2f}]" + _judge(m, r["ratio"])
            for m, r in list(results[key].items())[1:]]
        if FP_FORWARD in med:
            floor = {"ratio": 1 + med[FP_FORWARD] / med["LSQ"], "ms": med[FP_FORWARD] * 1000}
            results[key][KD_FLOOR] = floor
            cells.append(f"{floor['ratio']:.3f}x (FP forward {floor['ms']:.0f} ms)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines.append("| target | 1 | " + " | ".join(f"<= {TARGETS[m]}x" if m in TARGETS else "-" for m in columns[1:]) + " |")
    return "\n".join(lines), results


def _table_args(args: argparse.Namespace) -> list[str]:
    """The command-line options of one process of ``--processes``: the main table's own (rounds, mode,
    models, methods, allocator), rebuilt from the parsed ``args``, never ``--processes`` itself."""
    return (["--rounds", str(args.rounds), "--mode", args.mode, "--models", *args.models]
            + (["--methods", *args.methods] if args.methods else [])
            + (["--glibc-defaults"] if args.glibc_defaults else []))


def summarize_processes(runs: list[dict[str, dict[str, dict[str, float]]]]) -> str:
    """Markdown: each process's ratios (its LSQ ms first), then per method the median over the
    processes with their range and how many processes met the target. A process's own bootstrap
    interval covers only its rounds; the spread between fresh processes (heap layout, this VM's
    state: LSQ's own step time moves by a quarter between processes) is wider, so the verdict
    ("ok" / "MISSED") judges the median over processes."""
    lines = []
    for model in runs[0]:
        methods = list(runs[0][model])
        lines += [f"| {model}, process | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
        for i, run in enumerate(runs):
            cells = [f"{run[model]['LSQ']['ms']:.0f} ms"] + [f"{run[model][m]['ratio']:.3f}x" for m in methods[1:]]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        cells = [f"{statistics.median(r[model]['LSQ']['ms'] for r in runs):.0f} ms"]
        for m in methods[1:]:
            ratios = [r[model][m]["ratio"] for r in runs]
            med = statistics.median(ratios)
            met = f" {sum(x <= TARGETS[m] for x in ratios)}/{len(ratios)} met" if m in TARGETS else ""
            cells.append(f"{med:.3f}x [{min(ratios):.3f}, {max(ratios):.3f}]{met}" + _judge(m, med))
        lines.append("| median [range] | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def process_study(processes: int, child_args: list[str], out: str | None) -> None:
    """The main table run ``processes`` times, each in a fresh Python process (one after the other),
    then :func:`summarize_processes`; ``out`` gets the summary. Nothing is written but ``out``."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(processes):
            path = os.path.join(tmp, f"run{i}.json")
            print(f"process {i + 1}/{processes}", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), *child_args, "--json", path], check=True)
            with open(path) as f:
                runs.append(json.load(f))
    summary = summarize_processes(runs)
    print(summary)
    if out:
        with open(out, "w") as f:
            f.write(summary + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--mode", default="eager", choices=["eager", "fx"])
    ap.add_argument("--models", nargs="+", default=["SmallResNet", "ResNet20"], choices=["SmallResNet", "ResNet20"],
                    help="time only these models (default: both)")
    ap.add_argument("--methods", nargs="+", type=_method, default=None,
                    help="time only these methods (and LSQ); any '+' combination of CR, FPQ, BR, KD")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    ap.add_argument("--csd-reduction", action="store_true", help="run the CSD sum-vs-mean accuracy study instead")
    ap.add_argument("--kernels", action="store_true",
                    help="time CSD's kernels, the FP forward's layout, the global pool's backward and the "
                         "frozen FP forward's conv rate against SGEMM instead")
    ap.add_argument("--phases", action="store_true",
                    help="time the phases of a step (forward, each term, backward, SGD) on SmallResNet instead")
    ap.add_argument("--profile", nargs="*", metavar="METHOD", default=None,
                    help="profile where a method's extra step time goes instead (METHOD [BASE]; default: FPQ LSQ)")
    ap.add_argument("--alone", type=_method, default=None, metavar="METHOD",
                    help="time METHOD alone (no interleaving) on SmallResNet instead: step time, page faults")
    ap.add_argument("--twins", nargs="+", default=None, metavar="METHOD [COPIES]",
                    help="time COPIES (default 3) identical copies of METHOD on SmallResNet instead: the spread "
                         "of a ratio when nothing differs")
    ap.add_argument("--processes", type=int, default=1, metavar="N",
                    help="run the main table in N fresh processes, one after the other, and summarise them "
                         "(median and range of each ratio over the processes)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the main table's numbers as JSON")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="keep glibc's malloc as configured (default: keep freed memory, see keep_freed_memory)")
    args = ap.parse_args()
    if args.processes < 1:
        ap.error("--processes must be >= 1")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    kept = not args.glibc_defaults and keep_freed_memory()
    allocator = "freed memory kept (mallopt)" if kept else "as configured (glibc defaults unless MALLOC_* set)"
    print(f"allocator: {allocator}", flush=True)
    if args.alone:
        alone_study(args.alone, rounds=args.rounds)
        return
    if args.twins:
        try:
            method, copies = _method(args.twins[0]), int(args.twins[1]) if len(args.twins) > 1 else 3
        except (argparse.ArgumentTypeError, ValueError) as e:
            ap.error(f"--twins: {e}")
        if len(args.twins) > 2 or copies < 2:
            ap.error("--twins takes METHOD and at most one COPIES >= 2")
        twin_study(method, copies, rounds=args.rounds)
        return
    if args.csd_reduction:
        csd_reduction_study()
        return
    if args.kernels:
        kernel_study()
        pool_study()
        conv_rate_study()
        return
    if args.phases:
        phase_study(["LSQ", *[m for m in (args.methods or TARGETS) if m != "LSQ"]], rounds=args.rounds)
        return
    if args.profile is not None:
        profile_against(*(args.profile or ["FPQ"]))
        return
    if args.processes > 1:
        process_study(args.processes, _table_args(args), args.out)
        return
    methods = ["LSQ", *[m for m in (args.methods or TARGETS) if m != "LSQ"]]
    table, results = main_table(args.models, methods, args.mode, args.rounds)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
