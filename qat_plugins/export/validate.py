"""Run an exported ONNX model in ONNX Runtime next to its PyTorch model and compare them.

* :func:`validate_onnx` -- one file: ORT vs PyTorch top-1, agreement, max |difference|, file size,
  per-batch ORT latency (median), and the operator types of the ORT-optimized graph (read back
  from ``SessionOptions.optimized_model_filepath``), which shows what ORT fused (``QLinearConv``,
  ``QLinearAdd``, ``QGemm``, ...) and what still runs in float.
* :func:`compare_formats` -- export FP32 / INT8 / INT4 versions of one QAT model and validate each,
  with size and latency ratios against FP32.
* :func:`format_table` -- those reports as a small text table.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from ..data import iterate_batches
from .int4 import int4_weights_to_int8
from .layerwise import compare_layers
from .onnx_export import export_onnx, read_metadata

__all__ = ["ValidationReport", "validate_onnx", "compare_formats", "format_table", "cpu_info", "ort_session"]

_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "amx_int8", "asimd", "asimddp", "i8mm")


def cpu_info() -> tuple[str, list[str]]:
    """The CPU model name and its int8-relevant ISA flags from ``/proc/cpuinfo`` (``avx512_vnni`` /
    ``avx_vnni``: ONNX Runtime's U8S8 kernels are exact and fast; without them they can saturate)."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and val.strip():
                    name = val.strip()
                elif key in ("flags", "Features"):
                    flags |= set(val.split())
    except OSError:
        pass
    return name, [f for f in _ISA_FLAGS if f in flags]


@dataclass
class ValidationReport:
    """What :func:`validate_onnx` measured (``to_dict()`` for JSON)."""

    path: str
    onnx_top1: float
    torch_top1: float
    top1_agreement: float
    max_abs_diff: float
    size_bytes: int
    latency_ms_p50: float
    node_types: list[str]
    num_samples: int
    weight_format: str | None = None
    node_counts: dict[str, int] = field(default_factory=dict)
    providers: list[str] = field(default_factory=list)
    num_batches: int = 0
    size_ratio_vs_fp32: float | None = None
    latency_ratio_vs_fp32: float | None = None
    cpu: str = ""
    cpu_isa: list[str] = field(default_factory=list)
    first_divergence: str | None = None
    layerwise: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _session(path: Path, providers: Sequence[str] | None, num_threads: int | None,
             optimized_path: str, widen_int4: bool = False) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = optimized_path
    so.log_severity_level = 3  # the "optimized model may contain hardware specific ops" notice
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
        so.intra_op_num_threads = num_threads
        so.inter_op_num_threads = 1
    providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
    unknown = [p for p in providers if p not in ort.get_available_providers()]
    if unknown:
        raise ValueError(f"ONNX Runtime providers {unknown} are not available here; available: "
                         f"{ort.get_available_providers()}")
    try:
        if widen_int4:  # the deployment path of INT4 files (see ort_session)
            model = onnx.load(str(path))
            if int4_weights_to_int8(model, factor=16):
                return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ValueError(f"ONNX Runtime cannot load {path} (corrupt, truncated or not an ONNX model?): "
                         f"{msg}; re-export it with qat_plugins.export.export_onnx") from None


def ort_session(path: str | os.PathLike[str], *, num_threads: int | None = None,
                providers: Sequence[str] | None = None, widen_int4: bool = True, int4_factor: int = 16) -> Any:
    """An ONNX Runtime ``InferenceSession`` of an exported file, the deployment path for INT4 files.

    With ``widen_int4`` (default) INT4/UINT4 weights are widened to INT8/UINT8 in memory first
    (same values, :func:`~qat_plugins.export.int4.int4_weights_to_int8`), so ORT fuses them into its
    integer ``QLinearConv`` / ``QGemm`` kernels: the INT4 file is the download, this session runs at
    INT8 speed. ``int4_factor`` stores them as ``q * 16`` with scale ``/ 16`` (the same values, a more
    exact int32 bias; pass 8 on x86 CPUs without VNNI). ``num_threads`` sets ORT's intra-op threads.
    """
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ONNX file {p} does not exist")
    model = onnx.load(str(p))
    if widen_int4:
        int4_weights_to_int8(model, factor=int4_factor)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if num_threads is not None:
        so.intra_op_num_threads = num_threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=list(providers or ["CPUExecutionProvider"]))


def _check_shape(x: np.ndarray, declared: Sequence[Any], i: int) -> None:
    if len(declared) != x.ndim or any(isinstance(d, int) and d != s for d, s in zip(declared, x.shape)):
        want = tuple(d if isinstance(d, int) else "N" for d in declared)
        raise ValueError(f"batch {i} has input shape {tuple(x.shape)} but the ONNX model expects {want}; "
                         "validate with data shaped like the example_inputs used for export")


def validate_onnx(path: str | os.PathLike[str], model: nn.Module, data: Any, *, batch_size: int = 256,
                  providers: Sequence[str] | None = None, num_threads: int | None = None,
                  repeats: int = 3, layerwise: bool = True, widen_int4: bool = True) -> ValidationReport:
    """Compare an ONNX file run by ONNX Runtime with ``model`` (eval mode, no grad) on ``data``.

    Args:
        path: the ``.onnx`` file (e.g. from :func:`export_onnx`).
        model: the PyTorch model it was exported from (a deep copy is evaluated; ``model`` keeps
            its train/eval mode).
        data: an iterable of ``(inputs, targets)`` batches (DataLoader, list), a map-style torch
            ``Dataset`` (e.g. ``TensorDataset``; batched with ``batch_size``), or an
            ``(inputs, targets)`` pair of tensors for a whole split.
        batch_size: batch size used when ``data`` is a Dataset / tensor pair.
        providers: ORT execution providers (default ``["CPUExecutionProvider"]``).
        num_threads: ORT intra-op threads (default: ORT's choice).
        repeats: timed ORT runs per batch (after one warm-up run); ``latency_ms_p50`` is the
            median over all timed runs.
        widen_int4: run an INT4 file as it is deployed, widened to INT8 at load
            (:func:`ort_session`: the fused integer kernels); ``False`` runs the file as stored
            (ORT 1.32: ``DequantizeLinear`` + float ``Conv``).
        layerwise: also compare every quantized tensor of the first batch (up to 32 samples)
            between ORT and PyTorch (:func:`~qat_plugins.export.layerwise.compare_layers`);
            ``first_divergence`` names the first quantizer (ONNX node, producing op, torch module)
            whose integers differ by more than one grid step, ``layerwise`` is a one-line summary.
            Files of registered exporters (NNCF) or from other models report why it was skipped.

    The report also names the CPU and its int8 ISA flags (``cpu``, ``cpu_isa``) and the kernels
    ORT ran: ``node_counts`` are the operator types of ORT's optimized graph (``QLinearConv``,
    ``QGemm``, ... are the fused integer kernels; ``DequantizeLinear`` + ``Conv`` run in float).

    Raises:
        FileNotFoundError: ``path`` does not exist. ValueError: corrupt ONNX file, input shapes that
        do not match the model, empty data, unavailable providers. TypeError: bad ``model``/``data``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ONNX file {p} does not exist; export it first with "
                                "qat_plugins.export.export_onnx")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module the ONNX file came from, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    with tempfile.TemporaryDirectory(prefix="qat_plugins_ort_") as tmp:
        opt_path = os.path.join(tmp, "optimized.onnx")
        sess = _session(p, providers, num_threads, opt_path, widen_int4)
        node_counts: dict[str, int] = {}
        if os.path.exists(opt_path):
            for node in onnx.load(opt_path, load_external_data=False).graph.node:
                node_counts[node.op_type] = node_counts.get(node.op_type, 0) + 1
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"validate_onnx handles single-input models; {p} has {len(inputs)} inputs")
    in_name, declared = inputs[0].name, list(inputs[0].shape)

    ref = copy.deepcopy(model).eval()
    times: list[float] = []
    n = correct_onnx = correct_torch = agree = 0
    max_diff = 0.0
    for i, (x, y) in enumerate(iterate_batches(data, batch_size)):
        xn = x.detach().float().cpu().numpy()
        _check_shape(xn, declared, i)
        if i == 0:
            sess.run(None, {in_name: xn})  # warm-up
            first_x = x.detach().float().cpu()
        out = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = sess.run(None, {in_name: xn})[0]
            times.append((time.perf_counter() - t0) * 1000.0)
        with torch.no_grad():
            tout = ref(x.detach().float().cpu())
        if isinstance(tout, (tuple, list)):
            tout = tout[0]
        tn = tout.detach().float().numpy()
        if tn.shape != out.shape:
            raise ValueError(f"ONNX output shape {out.shape} differs from the PyTorch model's {tn.shape}; "
                             "is this the model the file was exported from?")
        yn = y.detach().cpu().numpy()
        po, pt = out.argmax(1), tn.argmax(1)
        correct_onnx += int((po == yn).sum())
        correct_torch += int((pt == yn).sum())
        agree += int((po == pt).sum())
        max_diff = max(max_diff, float(np.abs(out - tn).max()) if out.size else 0.0)
        n += len(yn)
    if n == 0:
        raise ValueError("data is empty: pass at least one (inputs, targets) batch")
    try:
        weight_format = read_metadata(p).get("weight_format")
    except Exception:  # noqa: BLE001 - metadata is optional
        weight_format = None
    first, summary = None, None
    if layerwise:
        try:
            cmp = compare_layers(p, model, first_x[:32], providers=providers, num_threads=num_threads,
                                 widen_int4=widen_int4)
            summary = cmp.summary()
            if cmp.first_divergence is not None:
                d = cmp.first_divergence
                first = f"{d.onnx_node} (after {d.producer_op}; torch '{d.torch_module}')"
        except Exception as e:  # noqa: BLE001 - a diagnostic must not fail the validation itself
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            summary = f"layer-by-layer comparison not available: {msg}"
    cpu, isa = cpu_info()
    return ValidationReport(
        path=str(p), onnx_top1=correct_onnx / n, torch_top1=correct_torch / n, top1_agreement=agree / n,
        max_abs_diff=max_diff, size_bytes=p.stat().st_size, latency_ms_p50=statistics.median(times),
        node_types=sorted(node_counts), num_samples=n, weight_format=weight_format,
        node_counts=dict(sorted(node_counts.items())), providers=list(sess.get_providers()),
        num_batches=len(times) // repeats, cpu=cpu, cpu_isa=isa, first_divergence=first, layerwise=summary)


def _float_reference(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import disable_fake_quant

    ref = copy.deepcopy(model).eval()
    ref.apply(disable_fake_quant)
    return ref


def compare_formats(model: nn.Module, example_inputs: Any, data: Any, out_dir: str | os.PathLike[str], *,
                    float_model: nn.Module | None = None, formats: Sequence[str] = ("fp32", "int8", "int4"),
                    name: str = "model", batch_size: int = 256, providers: Sequence[str] | None = None,
                    num_threads: int | None = None, repeats: int = 3) -> list[ValidationReport]:
    """Export ``model`` in several weight formats to ``out_dir`` and validate each file.

    ``"fp32"`` exports ``float_model`` when given (the original float network), else the QAT model
    with quantization stripped; it is compared with that float model (fake quant disabled).
    ``"int8"`` / ``"int4"`` are compared with the QAT model. When ``"fp32"`` is among ``formats``,
    every report gets ``size_ratio_vs_fp32`` and ``latency_ratio_vs_fp32``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports: list[ValidationReport] = []
    kw = dict(batch_size=batch_size, providers=providers, num_threads=num_threads, repeats=repeats)
    data = list(iterate_batches(data, batch_size))  # iterate once, reuse for every format
    for fmt in formats:
        path = out / f"{name}_{fmt}.onnx"
        if fmt == "fp32":
            src = float_model if float_model is not None else model
            export_onnx(src, path, example_inputs, weight_format="fp32")
            ref = float_model if float_model is not None else _float_reference(model)
            reports.append(validate_onnx(path, ref, data, **kw))  # type: ignore[arg-type]
        else:
            export_onnx(model, path, example_inputs, weight_format=fmt)
            reports.append(validate_onnx(path, model, data, **kw))  # type: ignore[arg-type]
    base = next((r for r, f in zip(reports, formats) if f == "fp32"), None)
    if base is not None:
        for r in reports:
            r.size_ratio_vs_fp32 = r.size_bytes / base.size_bytes
            r.latency_ratio_vs_fp32 = r.latency_ms_p50 / base.latency_ms_p50 if base.latency_ms_p50 > 0 else None
    return reports


def format_table(reports: Sequence[ValidationReport]) -> str:
    """A small fixed-width text table of :class:`ValidationReport` s."""
    cols = ["format", "size KB", "x FP32", "ORT top1", "torch top1", "agree", "max|diff|", "p50 ms", "lat x FP32"]
    rows = []
    for r in reports:
        rows.append([
            r.weight_format or Path(r.path).stem, f"{r.size_bytes / 1024:.1f}",
            "-" if r.size_ratio_vs_fp32 is None else f"{r.size_ratio_vs_fp32:.3f}",
            f"{r.onnx_top1:.4f}", f"{r.torch_top1:.4f}", f"{r.top1_agreement:.4f}", f"{r.max_abs_diff:.3g}",
            f"{r.latency_ms_p50:.3f}", "-" if r.latency_ratio_vs_fp32 is None else f"{r.latency_ratio_vs_fp32:.2f}",
        ])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
