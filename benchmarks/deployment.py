"""Deployment benchmark: ONNX Runtime latency and size of FP32, our INT8, our INT4 (widened at load
time, :func:`qat_plugins.export.ort_session`) and ORT's own ``quantize_static`` QDQ, for ResNet-18 and
MobileNetV2 at 224x224 (untrained weights: latency does not depend on them).

    python benchmarks/deployment.py [--models resnet18,mobilenet_v2] [--threads 2] [--repeats 7]
                                    [--iters 20] [--out-dir DIR] [--json FILE]

All sessions of one model live in one process and are timed interleaved (round-robin, ``--repeats``
rounds of ``--iters`` runs each; the median per-run time over all rounds is reported), so machine load
hits every column alike. Latency ratios are against FP32 at the same batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

import qat_plugins as qp
from qat_plugins.export import cpu_info, ort_session
from qat_plugins.models import MobileNetV2, ResNet18

MODELS = {"resnet18": lambda: ResNet18(), "mobilenet_v2": lambda: MobileNetV2()}


def _calibrated(fp: torch.nn.Module, weight_bits: int, x: torch.Tensor) -> torch.nn.Module:
    q = qp.prepare_qat(fp, weight_bits=weight_bits, act_bits=8, mode="fx", example_inputs=(x[:1],))
    q.train()
    with torch.no_grad():
        q(x)
    return q.eval()


class _Reader:
    """Calibration data for ``onnxruntime.quantization.quantize_static``."""

    def __init__(self, x: np.ndarray, name: str) -> None:
        self.items = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def _ort_static(fp32: Path, out: Path, x: np.ndarray) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), _Reader(x, "input"), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _kernels(sess_path: Path, threads: int, widen: bool) -> str:
    import onnxruntime as ort

    model = onnx.load(str(sess_path))
    if widen:
        from qat_plugins.export import int4_weights_to_int8
        int4_weights_to_int8(model)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        counts: dict[str, int] = {}
        for n in onnx.load(so.optimized_model_filepath).graph.node:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    keep = ("QLinearConv", "QGemm", "QLinearAdd", "QLinearGlobalAveragePool", "Conv", "FusedConv", "Gemm",
            "DequantizeLinear", "QuantizeLinear", "Clip")
    return ", ".join(f"{counts[k]} {k}" for k in keep if counts.get(k))


def bench_model(name: str, out_dir: Path, threads: int, repeats: int, iters: int) -> dict:
    torch.manual_seed(0)
    fp = MODELS[name]().eval()
    g = torch.Generator().manual_seed(0)
    calib = torch.randn(8, 3, 224, 224, generator=g)
    files = {"fp32": out_dir / f"{name}_fp32.onnx", "int8": out_dir / f"{name}_int8.onnx",
             "int4": out_dir / f"{name}_int4.onnx", "ort_qdq": out_dir / f"{name}_ort_qdq.onnx"}
    t0 = time.time()
    qp.export_onnx(fp, files["fp32"], calib[:1], weight_format="fp32")
    qp.export_onnx(_calibrated(fp, 8, calib), files["int8"], calib[:1], weight_format="int8")
    qp.export_onnx(_calibrated(fp, 4, calib), files["int4"], calib[:1], weight_format="int4")
    _ort_static(files["fp32"], files["ort_qdq"], calib.numpy())
    print(f"[{name}] exported in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    sessions = {k: ort_session(p, num_threads=threads) for k, p in files.items()}
    result: dict = {"model": name, "size_bytes": {k: p.stat().st_size for k, p in files.items()},
                    "kernels": {k: _kernels(p, threads, k == "int4") for k, p in files.items()}, "latency_ms": {}}
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224, generator=g).numpy()
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, {"input": x})  # warm-up
        for _ in range(repeats):
            for k, s in sessions.items():
                for _ in range(iters):
                    t = time.perf_counter()
                    s.run(None, {"input": x})
                    times[k].append((time.perf_counter() - t) * 1000)
        result["latency_ms"][str(batch)] = {k: statistics.median(v) for k, v in times.items()}
    return result


def table(results: list[dict]) -> str:
    cols = ["model", "format", "size MB", "x FP32", "b1 ms", "b1 x FP32", "b8 ms", "b8 x FP32", "ORT kernels"]
    rows = []
    labels = {"fp32": "FP32", "int8": "ours INT8 (s8 weights)", "int4": "ours INT4 (widened at load)",
              "ort_qdq": "ORT quantize_static QDQ"}
    for r in results:
        fp_size, lat = r["size_bytes"]["fp32"], r["latency_ms"]
        for k in ("fp32", "int8", "int4", "ort_qdq"):
            rows.append([r["model"], labels[k], f"{r['size_bytes'][k] / 1e6:.2f}", f"{r['size_bytes'][k] / fp_size:.3f}",
                         f"{lat['1'][k]:.2f}", f"{lat['1'][k] / lat['1']['fp32']:.2f}",
                         f"{lat['8'][k]:.2f}", f"{lat['8'][k] / lat['8']['fp32']:.2f}", r["kernels"][k]])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out-dir", default=None, help="where the ONNX files go (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        results = [bench_model(m, out, args.threads, args.repeats, args.iters) for m in args.models.split(",")]
    cpu, isa = cpu_info()
    print(f"CPU: {cpu}; ISA: {' '.join(isa)}; ORT threads: {args.threads}; repeats x iters: "
          f"{args.repeats} x {args.iters}")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "isa": isa, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
