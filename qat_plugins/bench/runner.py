"""Benchmark runs: data, cached FP models, one QAT run per task (torch.ao LSQ +- regularizers, or
NNCF), ONNX Runtime deployment checks and per-method peak memory.

Every task is a plain dict (picklable for ``spawn`` worker processes) and returns a JSON-ready dict.
Each worker process is single-threaded (``torch.set_num_threads(1)``).

Peak memory is measured in the step-time micro-benchmark (:mod:`qat_plugins.bench.timing`).

NNCF models go through the trainer too: :func:`train_nncf_qat` calls
:func:`~qat_plugins.training.train_qat` with ``prepare_fn`` = :func:`prepare_nncf_student`
(:func:`qat_plugins.integrations.nncf.prepare_qat` at the config's widths), so the optimizer, schedule,
data order, evaluation and step timing are those of every other column.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import logging
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .._io import atomic_write_bytes
from .settings import BenchSettings, data_spec, fp_cache_key, fp_seed, regularizer_specs, train_config

__all__ = ["load_bench_data", "fp_task", "qat_task", "train_nncf_qat", "load_fp_model", "run_id", "maxrss_mb",
           "quiet_worker", "prepare_nncf_student", "deploy"]

log = logging.getLogger("qat_plugins.bench")


def quiet_worker() -> None:
    """Per-process setup: one torch thread, no library chatter (warnings, NNCF progress bars).

    In a worker process only: run in the caller's process (``--workers 1``) it would silence the
    caller's own logging and warnings for good.
    """
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("nncf", "qat_plugins.training"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")


def maxrss_mb() -> float:
    """``ru_maxrss`` of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- data -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _load_cached(spec_json: str) -> Any:
    from ..data import DataSplit, load_digits_split, load_fashion_mnist

    spec = json.loads(spec_json)
    if spec["name"] == "fashion-mnist":
        split = load_fashion_mnist(limit_train=spec["limit_train"])
        k = int(spec["avg_pool"])

        def pool(x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(x, k) if k > 1 else x

        (xtr, ytr), (xte, yte) = split.train.tensors, split.test.tensors
        return DataSplit(TensorDataset(pool(xtr).contiguous(), ytr), TensorDataset(pool(xte).contiguous(), yte),
                         split.num_classes, "fashion-mnist")
    split = load_digits_split(size=int(spec.get("size", 8)))
    lim = spec.get("limit_train")
    if lim is not None and lim < len(split.train):
        split = DataSplit(TensorDataset(*(t[:lim] for t in split.train.tensors)), split.test, split.num_classes,
                          split.name)
    return split


def load_bench_data(s: BenchSettings, dataset: str) -> Any:
    """The benchmark's :class:`~qat_plugins.data.DataSplit` of ``dataset`` (cached per process).

    Fashion-MNIST: the first ``s.fashion_train`` training images and the full 10k test set,
    standardised, then ``s.fashion_pool`` x ``s.fashion_pool`` average pooling (28x28 -> 14x14).
    Digits: the embedded 8x8 split (1,347 train / 450 test).
    """
    return _load_cached(json.dumps(data_spec(s, dataset), sort_keys=True))


# --- FP models ------------------------------------------------------------------------------------
def _fp_path(cache_dir: str | Path, s: BenchSettings, dataset: str, model: str, seed: int) -> Path:
    return Path(cache_dir) / f"fp_{dataset}_{model}_s{seed}_{fp_cache_key(s, dataset, model, seed)}.pt"


def fp_task(task: dict[str, Any]) -> dict[str, Any]:
    """Train (or load from the cache) the FP model of one dataset / model / seed."""
    quiet_worker()
    from ..training import build_fp_model, evaluate, load_config, train_fp

    s = BenchSettings.from_dict(task["settings"])
    ds, model, seed = task["dataset"], task["model"], task["seed"]
    path = _fp_path(task["cache_dir"], s, ds, model, seed)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        return {**blob["meta"], "cached": True, "path": str(path)}
    data = load_bench_data(s, ds)
    cfg = load_config(train_config(s, ds, model, seed))
    fp = build_fp_model(cfg, data)
    t0 = time.perf_counter()
    train_fp(fp, data, cfg)
    wall = time.perf_counter() - t0
    meta = {"dataset": ds, "model": model, "seed": seed, "test_accuracy": evaluate(fp, data.test),
            "train_time_s": wall, "key": fp_cache_key(s, ds, model, seed), "config": cfg.to_dict(),
            "data_spec": data_spec(s, ds)}
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"state_dict": fp.state_dict(), "meta": meta}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return {**meta, "cached": False, "path": str(path)}


def load_fp_model(cache_dir: str | Path, s: BenchSettings, dataset: str, model: str, seed: int,
                  data: Any) -> nn.Module:
    from ..training import build_fp_model, load_config

    blob = torch.load(_fp_path(cache_dir, s, dataset, model, seed), map_location="cpu", weights_only=False)
    fp = build_fp_model(load_config(train_config(s, dataset, model, seed)), data)
    fp.load_state_dict(blob["state_dict"])
    return fp.eval()


# --- NNCF through the trainer's loop --------------------------------------------------------------
def prepare_nncf_student(fp_model: nn.Module, data: Any, cfg: Any, *, calib_images: int = 300,
                         **options: Any) -> nn.Module:
    """NNCF ``prepare_qat`` at the config's widths (calibration: the first ``calib_images`` training samples,
    NNCF's default 300); ``options`` go to ``qn.prepare_qat`` (``preset=...``, ``lsq_grad_scale=...``)."""
    from ..integrations import nncf as qn

    bs = cfg.data.batch_size
    x, y = data.train.tensors
    n = min(calib_images, len(x))
    calib = [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
    with open(os.devnull, "w") as devnull:  # NNCF's rich progress bars
        old = sys.stdout
        sys.stdout = devnull
        try:
            student = qn.prepare_qat(fp_model, calib, weight_bits=cfg.qat.weight_bits, act_bits=cfg.qat.act_bits,
                                     subset_size=n, keep_first_last_8bit=cfg.qat.keep_first_last_8bit, **options)
        finally:
            sys.stdout = old
    return student.train()


def train_nncf_qat(fp_model: nn.Module, data: Any, cfg: Any) -> Any:
    """QAT of an NNCF-prepared copy of ``fp_model`` by :func:`~qat_plugins.training.train_qat` itself
    (``prepare_fn`` hook): the same optimizer, schedule, data order, evaluation and step timing."""
    from ..training import train_qat

    return train_qat(fp_model, data, cfg, regularizers=[], prepare_fn=prepare_nncf_student)


# --- deployment -----------------------------------------------------------------------------------
def _export_fp32(fp_model: nn.Module, path: Path, x0: torch.Tensor) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(fp_model).eval(), (x0,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def deploy(student: nn.Module, fp_model: nn.Module, data: Any, out_dir: Path, *, nncf: bool,
           formats: tuple[str, ...] = ("int8", "int4"), repeats: int = 2) -> dict[str, Any]:
    """Export INT8 / INT4 QDQ ONNX files (and the FP32 reference) and validate them in ORT (1 thread).

    Latency ratios are against the FP32 ONNX model measured in the same process right before.
    """
    from ..export import export_onnx, validate_onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    x0 = data.test.tensors[0][:8]
    test = data.test
    kw = dict(batch_size=256, num_threads=1, repeats=repeats)
    fp32 = out_dir / "fp32.onnx"
    _export_fp32(fp_model, fp32, x0)
    ref = validate_onnx(fp32, fp_model, test, **kw)
    res: dict[str, Any] = {"fp32": {"size_bytes": ref.size_bytes, "latency_ms_p50": ref.latency_ms_p50,
                                    "onnx_top1": ref.onnx_top1, "top1_agreement": ref.top1_agreement}}
    for fmt in formats:
        path = out_dir / f"{fmt}.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if nncf:
                    from ..integrations.nncf import export_nncf_onnx

                    export_nncf_onnx(student, path, (x0,), weight_format=fmt)
                else:
                    export_onnx(student, path, x0, weight_format=fmt)
            r = validate_onnx(path, student, test, **kw)
            res[fmt] = {"size_bytes": r.size_bytes, "latency_ms_p50": r.latency_ms_p50, "onnx_top1": r.onnx_top1,
                        "torch_top1": r.torch_top1, "top1_agreement": r.top1_agreement,
                        "max_abs_diff": r.max_abs_diff, "latency_rel_fp32": r.latency_ms_p50 / ref.latency_ms_p50,
                        "size_rel_fp32": r.size_bytes / ref.size_bytes,
                        "node_counts": r.node_counts}
        except Exception as e:  # noqa: BLE001 - a failed export is a result, not a crash of the benchmark
            res[fmt] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    return res


# --- one QAT run ----------------------------------------------------------------------------------
def run_id(dataset: str, model: str, seed: int, method: str, bits: int) -> str:
    return f"{dataset}_{model}_s{seed}_{method}_w{bits}a{bits}"


def qat_task(task: dict[str, Any]) -> dict[str, Any]:
    """One QAT run: ``task`` = settings, dataset, model, seed, method, bits, cache_dir, out_dir, deploy."""
    quiet_worker()
    from ..regularizers import build_regularizers
    from ..training import config_hash, load_config, train_qat

    s = BenchSettings.from_dict(task["settings"])
    ds, model, seed, method, bits = task["dataset"], task["model"], task["seed"], task["method"], task["bits"]
    rid = run_id(ds, model, seed, method, bits)
    data = load_bench_data(s, ds)
    src = fp_seed(s, seed)
    fp = load_fp_model(task["cache_dir"], s, ds, model, src, data)
    specs = regularizer_specs(method, model, seed, s.combo)
    cfg = load_config(train_config(s, ds, model, seed, bits, specs))
    rss0 = maxrss_mb()
    t0 = time.perf_counter()
    is_nncf = method in ("nncf", "nncf8")
    if is_nncf:
        result = train_nncf_qat(fp, data, cfg)
    else:
        result = train_qat(fp, data, cfg, regularizers=build_regularizers(specs))
    wall = time.perf_counter() - t0
    rec: dict[str, Any] = {
        "id": rid, "dataset": ds, "model": model, "seed": seed, "method": method, "bits": bits,
        "framework": "nncf" if is_nncf else "torch.ao eager (LSQ)", "regularizers": specs,
        "test_accuracy": result.test_accuracy, "mean_step_time_s": result.mean_step_time, "steps": result.steps,
        "wall_time_s": wall, "maxrss_mb_before": rss0, "maxrss_mb_after": maxrss_mb(),
        "history": [{k: h[k] for k in ("epoch", "loss", "task_loss", "reg_losses", "train_acc", "test_acc", "time_s")}
                    for h in result.history],
        "config": cfg.to_dict(), "config_hash": config_hash(cfg), "fp_seed": src,
        "fp_key": fp_cache_key(s, ds, model, src),
    }
    if task.get("deploy"):
        t1 = time.perf_counter()
        rec["deploy"] = deploy(result.model, fp, data, Path(task["out_dir"]) / "onnx" / rid, nncf=is_nncf,
                               formats=("int8",) if bits == 8 else ("int8", "int4"))
        rec["deploy_time_s"] = time.perf_counter() - t1
    runs = Path(task["out_dir"]) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(runs / f"{rid}.json", json.dumps(rec, indent=1, default=str).encode())
    return rec
