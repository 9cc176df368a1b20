"""Benchmark results -> aggregated numbers, Markdown tables and accuracy-vs-bits plots."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

__all__ = ["aggregate", "method_label", "accuracy_table", "cost_table", "deploy_table", "markdown_report",
           "plot_accuracy", "mean_std", "ACC_METHODS"]

# accuracy columns after FP (nncf8 = NNCF at W8A8, the same value in every row)
ACC_METHODS = ("lsq", "cr", "fpq", "br", "combo", "nncf8", "nncf")


def method_label(method: str, combo: Sequence[str] = ("cr", "fpq", "br")) -> str:
    if method == "combo":
        return "+" + "+".join(c.upper() for c in combo)
    return {"lsq": "LSQ QAT", "cr": "+CR", "fpq": "+FPQ", "br": "+BR", "nncf8": "NNCF W8A8",
            "nncf": "NNCF WbAb", "fp": "FP"}.get(method, method)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = [float(x) for x in values]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def _fmt(values: Sequence[float] | None, scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def aggregate(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"<dataset>/<model>": {"fp": [acc per seed], "acc": {method: {bits: [acc per seed]}}, ...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for fp in results.get("fp_models", []):
        g = out.setdefault(f"{fp['dataset']}/{fp['model']}", {"fp": [], "acc": {}, "step_s": {}, "deploy": {}})
        g["fp"].append(fp["test_accuracy"])
    for r in results.get("runs", []):
        g = out.setdefault(f"{r['dataset']}/{r['model']}", {"fp": [], "acc": {}, "step_s": {}, "deploy": {}})
        g["acc"].setdefault(r["method"], {}).setdefault(r["bits"], []).append(r["test_accuracy"])
        g["step_s"].setdefault(r["method"], {}).setdefault(r["bits"], []).append(r["mean_step_time_s"])
        if "deploy" in r:
            g["deploy"].setdefault((r["method"], r["bits"]), []).append(r["deploy"])
    return out


def accuracy_table(group: dict[str, Any], bits: Sequence[int], methods: Sequence[str],
                   combo: Sequence[str]) -> str:
    cols = ["bits", "FP"] + [method_label(m, combo) for m in methods]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for b in bits:
        row = [f"W{b}A{b}", _fmt(group["fp"])]
        for m in methods:
            key = 8 if m == "nncf8" else b
            row.append(_fmt(group["acc"].get(m, {}).get(key)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def cost_table(group: dict[str, Any], timing: dict[str, Any] | None, memory: dict[str, float],
               methods: Sequence[str], combo: Sequence[str], bits: int) -> str:
    cols = ["method", "step time / LSQ (interleaved median)", "median step ms", "peak RSS growth MiB",
            f"mean step ms in the W{bits}A{bits} runs"]
    lines = ["| " + " | ".join(cols) + " |", "|---|---:|---:|---:|---:|"]
    for m in methods:
        rel = med = "–"
        if timing is not None and m in timing["median_step_s"]:
            rel = f"{timing['relative_to_lsq'][m]:.2f}x"
            med = f"{1000 * timing['median_step_s'][m]:.0f}"
        mem = f"{memory[m]:.0f}" if m in memory else "–"
        key = 8 if m == "nncf8" else bits
        steps = group["step_s"].get(m, {}).get(key)
        run_ms = f"{1000 * statistics.fmean(steps):.0f}" if steps else "–"
        lines.append(f"| {method_label(m, combo).replace('WbAb', f'W{bits}A{bits}')} | {rel} | {med} | {mem} | {run_ms} |")
    return "\n".join(lines)


def deploy_table(group: dict[str, Any], methods: Sequence[str], combo: Sequence[str], bits: int) -> str:
    cols = ["method", "INT8 KB", "INT4 KB", "FP32 KB", "ORT latency INT8 / FP32", "ORT latency INT4 / FP32",
            "top-1 agree INT8", "top-1 agree INT4", "ORT top-1 INT8 %", "ORT top-1 INT4 %"]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for m in methods:
        key = 8 if m == "nncf8" else bits
        deps = group["deploy"].get((m, key))
        if not deps:
            continue

        def avg(fmt: str, field: str, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
            vals = [d[fmt][field] for d in deps if fmt in d and field in d[fmt]]
            if not vals:
                errs = [d[fmt]["error"] for d in deps if fmt in d and "error" in d[fmt]]
                return "failed" if errs else "–"
            return f"{scale * statistics.fmean(vals):.{digits}f}{unit}"

        label = method_label(m, combo).replace("WbAb", f"W{bits}A{bits}")
        lines.append("| " + " | ".join([
            label, avg("int8", "size_bytes", 1 / 1024, 1), avg("int4", "size_bytes", 1 / 1024, 1),
            avg("fp32", "size_bytes", 1 / 1024, 1), avg("int8", "latency_rel_fp32", unit="x"), avg("int4", "latency_rel_fp32", unit="x"),
            avg("int8", "top1_agreement", 100, 2, "%"), avg("int4", "top1_agreement", 100, 2, "%"),
            avg("int8", "onnx_top1", 100, 2), avg("int4", "onnx_top1", 100, 2)]) + " |")
    return "\n".join(lines)


def deploy_errors(group: dict[str, Any]) -> list[str]:
    errs = []
    for (m, b), deps in group["deploy"].items():
        for d in deps:
            for fmt in ("int8", "int4"):
                if "error" in d.get(fmt, {}):
                    errs.append(f"{m} W{b}A{b} {fmt}: {d[fmt]['error']}")
    return sorted(set(errs))


def markdown_report(key: str, group: dict[str, Any], results: dict[str, Any]) -> str:
    s = results["settings"]
    dataset, model = key.split("/")
    bits, combo = s["bits"], s["combo"]
    methods = [m for m in ACC_METHODS if m in s["methods"]]
    timing = next((t for t in results.get("timing", []) if t["dataset"] == dataset and t["model"] == model), None)
    tbits = timing["bits"] if timing else bits[0]
    memory = {m["method"]: m["delta_mb"] for m in results.get("memory", [])
              if m["dataset"] == dataset and m["model"] == model}
    seeds = s["seeds"]
    if dataset == "fashion-mnist":
        data_desc = (f"Fashion-MNIST, first {s['fashion_train']} training images, full 10k test set, "
                     f"{s['fashion_pool']}x{s['fashion_pool']} average-pooled to {28 // s['fashion_pool']}x"
                     f"{28 // s['fashion_pool']}")
    else:
        data_desc = "scikit-learn digits 8x8 (1,347 train / 450 test)" if not s.get("digits_limit") else \
            f"digits 8x8, first {s['digits_limit']} training images, 450 test"
    parts = [
        f"## {dataset} / {model} (width {s['width']})", "",
        f"{data_desc}; batch {s['batch_size'][dataset]}; FP: Adam lr {s['fp_lr']}, {s['fp_epochs'][dataset]} epochs, "
        f"cosine, default augmentation; QAT (every column): SGD momentum 0.9, lr {s['qat_lr']}, wd 5e-5, cosine per "
        f"step, {s['qat_epochs'][dataset]} epochs, no input augmentation (qat.augment=false), first/last layer 8 bit. "
        f"Test top-1 % as mean ± std over {seeds} seed(s); the same FP model per seed for every column. "
        f"NNCF W8A8 is one run per seed (NNCF 3.4 `nncf.quantize` + the same fine-tuning loop), "
        f"repeated in every row; NNCF WbAb is NNCF at the row's widths.", "",
        "### Test accuracy", "", accuracy_table(group, bits, methods, combo), "",
        f"### Training cost (W{tbits}A{tbits})", "",
        "Step time: all methods in one single-threaded process, round-robin on the same batches, median of "
        f"{timing['steps'] if timing else '?'} steps after {timing['warmup'] if timing else '?'} warm-up rounds. "
        "Peak memory: growth of the process's current RSS (sampled every 0.5 ms) over "
        f"{s['memory_steps']} training steps of the method, above the RSS right before them (after `malloc_trim`). "
        "The last column is the trainer's own mean step time during the accuracy runs (two workers and other "
        "jobs sharing the machine: noisy).", "",
        cost_table(group, timing, memory, methods, combo, tbits), "",
    ]
    for b in s["deploy_bits"]:
        tab = deploy_table(group, methods, combo, b)
        if tab.count("\n") > 1:
            parts += [f"### Deployment (W{b}A{b} models, ONNX Runtime CPU, 1 thread)", "",
                      f"QDQ ONNX files (INT8 weights / packed INT4 weights) of the seed-0 model"
                      f"{'s' if s['deploy_seeds'] > 1 else ''}; latency = median per-batch (256) ORT time relative to "
                      "the FP32 ONNX export of the same FP model, measured in the same process; agreement = "
                      "ORT top-1 == PyTorch top-1 on the test set.", "", tab, ""]
    errs = deploy_errors(group)
    if errs:
        parts += ["Export failures:", ""] + [f"- {e}" for e in errs] + [""]
    return "\n".join(parts)


def plot_accuracy(key: str, group: dict[str, Any], results: dict[str, Any], path: Path) -> Path:
    """Test accuracy vs bits: one line per method with error bars (std over seeds), FP as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    bits = sorted(s["bits"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    fp_m, fp_s = mean_std(group["fp"])
    ax.axhline(100 * fp_m, color="black", lw=1.2, label=f"FP ({100 * fp_m:.2f}%)")
    if fp_s > 0:
        ax.axhspan(100 * (fp_m - fp_s), 100 * (fp_m + fp_s), color="black", alpha=0.08)
    n8 = group["acc"].get("nncf8", {}).get(8)
    if n8:
        m8, _ = mean_std(n8)
        ax.axhline(100 * m8, color="gray", ls=":", lw=1.2, label=f"NNCF W8A8 ({100 * m8:.2f}%)")
    for i, m in enumerate([m for m in ACC_METHODS if m != "nncf8" and m in s["methods"]]):
        xs, ys, es = [], [], []
        for b in bits:
            v = group["acc"].get(m, {}).get(b)
            if v:
                mu, sd = mean_std(v)
                xs.append(b + (i - 2.5) * 0.04)
                ys.append(100 * mu)
                es.append(100 * sd)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, lw=1.3,
                        ls="--" if m == "nncf" else "-", label=method_label(m, s["combo"]).replace("WbAb", "at bits"))
    ax.set_xticks(bits)
    ax.set_xticklabels([f"W{b}A{b}" for b in bits])
    ax.set_xlabel("weight / activation bits (first and last layer 8 bit)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{key}: accuracy vs bits (mean ± std, {s['seeds']} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
