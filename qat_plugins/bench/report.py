"""Benchmark results -> paired differences vs LSQ with 95 % confidence intervals, targets, tables, plots.

Every method of a (dataset, model, seed) starts from the same FP model and data order as LSQ, so it is
reported as the per-seed difference to LSQ, mean and t-interval over seeds.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

__all__ = ["aggregate", "method_label", "accuracy_table", "cost_table", "deploy_table", "markdown_report",
           "plot_accuracy", "plot_curves", "mean_std", "paired_diff", "t_quantile_975", "evaluate_targets",
           "ACC_METHODS"]

# accuracy columns after FP, in order (nncf8 = NNCF at W8A8, the same value in every row)
ACC_METHODS = ("lsq", "kd", "cr", "fpq", "br", "combo", "nncf", "nncf8")
TARGET_SINGLE = ("cr", "fpq", "br")

# two-sided 95 % quantiles t_{0.975, df} of Student's t distribution, df = 1..30 (standard tables)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}`` (table for df <= 30, the normal 1.960 beyond; NaN for df < 1)."""
    if df < 1:
        return math.nan
    return _T975[df - 1] if df <= len(_T975) else 1.960


def method_label(method: str, combo: Sequence[str] = ("cr", "fpq", "br")) -> str:
    if method == "combo":
        return "+" + "+".join(c.upper() for c in combo)
    return {"lsq": "LSQ", "kd": "+KD", "cr": "+CR", "fpq": "+FPQ", "br": "+BR", "nncf8": "NNCF W8A8",
            "nncf": "NNCF WbAb", "fp": "FP"}.get(method, method)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = [float(x) for x in values]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def paired_diff(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Per-seed ``a - b`` over the seeds both have: mean, sample std, 95 % t-interval, n."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "lo": math.nan, "hi": math.nan, "seeds": []}
    m, sd = mean_std(d)
    half = t_quantile_975(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": m, "std": sd, "lo": m - half, "hi": m + half, "seeds": seeds, "diffs": d}


def aggregate(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"<dataset>/<model>": {"fp": {seed: acc of the FP model that seed's runs started from},
    "acc": {method: {bits: {seed: acc}}}, "curves": {method: {bits: {seed: [test acc per epoch]}}}, "step_s": ..., "deploy": ...}}``."""
    out: dict[str, dict[str, Any]] = {}

    def group(r: dict[str, Any]) -> dict[str, Any]:
        return out.setdefault(f"{r['dataset']}/{r['model']}",
                              {"fp": {}, "acc": {}, "curves": {}, "step_s": {}, "deploy": {}})

    for fp in results.get("fp_models", []):
        group(fp)["fp"][int(fp["seed"])] = fp["test_accuracy"]
    for r in results.get("runs", []):
        g, m, b, s = group(r), r["method"], int(r["bits"]), int(r["seed"])
        src = int(r.get("fp_seed", s))  # the FP model this seed started from (seed 0's with --fp-models shared)
        if src in g["fp"]:
            g["fp"][s] = g["fp"][src]
        g["acc"].setdefault(m, {}).setdefault(b, {})[s] = r["test_accuracy"]
        g["curves"].setdefault(m, {}).setdefault(b, {})[s] = [h["test_acc"] for h in r.get("history", [])]
        g["step_s"].setdefault(m, {}).setdefault(b, []).append(r["mean_step_time_s"])
        if "deploy" in r:
            g["deploy"].setdefault((m, b), []).append(r["deploy"])
    return out


def _pts(x: float, signed: bool = False) -> str:
    if math.isnan(x):
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _abs(values: dict[int, float] | None) -> str:
    if not values:
        return "–"
    m, s = mean_std(list(values.values()))
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def _diff_cell(p: dict[str, Any]) -> str:
    if p["n"] == 0:
        return "–"
    if p["n"] == 1:
        return f"{_pts(p['mean'], True)} (1 seed)"
    return f"{_pts(p['mean'], True)} [{_pts(p['lo'], True)}, {_pts(p['hi'], True)}]"


def accuracy_table(group: dict[str, Any], bits: Sequence[int], methods: Sequence[str], combo: Sequence[str]) -> str:
    """Absolute test top-1 (mean ± std over seeds) per row and column."""
    cols = ["bits", "seeds", "FP"] + [method_label(m, combo) for m in methods]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for b in bits:
        lsq = group["acc"].get("lsq", {}).get(b, {})
        seeds = sorted(lsq) or sorted(group["fp"])
        row = [f"W{b}A{b}", str(len(seeds)), _abs({s: group["fp"][s] for s in seeds if s in group["fp"]})]
        for m in methods:
            row.append(_abs(group["acc"].get(m, {}).get(8 if m == "nncf8" else b)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired_table(group: dict[str, Any], bits: Sequence[int], methods: Sequence[str], combo: Sequence[str]) -> str:
    """Per-seed difference to LSQ in points: mean [95 % CI]; FP column = FP - LSQ (LSQ's gap)."""
    others = [m for m in methods if m != "lsq"]
    cols = ["bits", "FP − LSQ"] + [f"{method_label(m, combo)} − LSQ" for m in others]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for b in bits:
        lsq = group["acc"].get("lsq", {}).get(b, {})
        row = [f"W{b}A{b}", _diff_cell(paired_diff(group["fp"], lsq))]
        for m in others:
            row.append(_diff_cell(paired_diff(group["acc"].get(m, {}).get(8 if m == "nncf8" else b, {}), lsq)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def evaluate_targets(group: dict[str, Any], bits: Sequence[int], methods: Sequence[str]) -> list[dict[str, Any]]:
    """The benchmark's targets (issue #16, item 3), each ``{"target", "met", "detail"}``.

    1. At the lowest width where LSQ is >= 1 point below FP (mean of FP - LSQ over seeds), each of
       CR, FPQ, BR closes >= 1/3 of LSQ's gap with its 95 % CI of the difference to LSQ above 0, and
       CR+FPQ+BR closes >= 2/3 (CI above 0).
    2. At W4A4, the best column's mean is >= FP's mean.
    3. LSQ's seed spread (max - min) at the lowest width with >= 2 seeds is <= 1 point.
    """
    out: list[dict[str, Any]] = []
    gaps = {b: paired_diff(group["fp"], group["acc"].get("lsq", {}).get(b, {})) for b in sorted(bits)}
    low = next((b for b in sorted(bits) if gaps[b]["n"] and gaps[b]["mean"] >= 0.01), None)
    if low is None:
        out.append({"target": "a width where LSQ is >= 1 point below FP", "met": None,
                    "detail": "no row with LSQ >= 1 point below FP: the gap-closing targets do not apply"})
    else:
        gap = gaps[low]["mean"]
        for m, need in [(m, 1 / 3) for m in TARGET_SINGLE] + [("combo", 2 / 3)]:
            if m not in methods:
                continue
            p = paired_diff(group["acc"].get(m, {}).get(low, {}), group["acc"].get("lsq", {}).get(low, {}))
            if p["n"] < 2:
                out.append({"target": f"W{low}A{low} {method_label(m)} closes >= {need:.2f} of LSQ's gap", "met": None,
                            "detail": f"{p['n']} paired seed(s): no confidence interval"})
                continue
            frac = p["mean"] / gap
            met = frac >= need and p["lo"] > 0
            out.append({"target": f"W{low}A{low} {method_label(m)} closes >= {need:.2f} of LSQ's gap, CI > 0",
                        "met": met, "fraction": frac, "diff": p,
                        "detail": f"gap FP − LSQ {100 * gap:.2f} pts; {method_label(m)} − LSQ "
                                  f"{_diff_cell(p)} pts = {frac:.2f} of the gap"})
    if 4 in bits:
        row_seeds = sorted(group["acc"].get("lsq", {}).get(4, {})) or sorted(group["fp"])
        fp_m = mean_std([group["fp"][s] for s in row_seeds if s in group["fp"]])[0]
        best = None
        for m in methods:
            if m == "nncf8":
                continue
            v = group["acc"].get(m, {}).get(4)
            if v:
                mu = mean_std(list(v.values()))[0]
                if best is None or mu > best[1]:
                    best = (m, mu)
        if best is not None:
            out.append({"target": "W4A4: best column >= FP", "met": best[1] >= fp_m,
                        "detail": f"best {method_label(best[0])} {100 * best[1]:.2f} vs FP {100 * fp_m:.2f}"})
    lsq = group["acc"].get("lsq", {})
    spread_bits = next((b for b in sorted(bits) if len(lsq.get(b, {})) >= 2), None)
    if spread_bits is not None:
        vals = list(lsq[spread_bits].values())
        spread = max(vals) - min(vals)
        out.append({"target": f"W{spread_bits}A{spread_bits} LSQ seed spread <= 1 point", "met": spread <= 0.01 + 1e-12,
                    "spread": spread, "detail": f"{100 * min(vals):.2f}-{100 * max(vals):.2f} over {len(vals)} seeds "
                                                f"(spread {100 * spread:.2f})"})
    return out


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
        steps = group["step_s"].get(m, {}).get(8 if m == "nncf8" else bits)
        run_ms = f"{1000 * statistics.fmean(steps):.0f}" if steps else "–"
        lines.append(f"| {method_label(m, combo).replace('WbAb', f'W{bits}A{bits}')} | {rel} | {med} | {mem} | {run_ms} |")
    return "\n".join(lines)


def deploy_table(group: dict[str, Any], methods: Sequence[str], combo: Sequence[str], bits: int) -> str:
    cols = ["method", "INT8 KB", "INT4 KB", "FP32 KB", "ORT latency INT8 / FP32", "ORT latency INT4 / FP32",
            "top-1 agree INT8", "top-1 agree INT4", "ORT top-1 INT8 %", "ORT top-1 INT4 %"]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for m in methods:
        deps = group["deploy"].get((m, 8 if m == "nncf8" else bits))
        if not deps:
            continue

        def avg(fmt: str, key: str, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
            vals = [d[fmt][key] for d in deps if fmt in d and key in d[fmt]]
            if not vals:
                return "failed" if any("error" in d.get(fmt, {}) for d in deps) else "–"
            return f"{scale * statistics.fmean(vals):.{digits}f}{unit}"

        lines.append("| " + " | ".join([
            method_label(m, combo).replace("WbAb", f"W{bits}A{bits}"), avg("int8", "size_bytes", 1 / 1024, 1),
            avg("int4", "size_bytes", 1 / 1024, 1), avg("fp32", "size_bytes", 1 / 1024, 1),
            avg("int8", "latency_rel_fp32", unit="x"), avg("int4", "latency_rel_fp32", unit="x"),
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


def _data_desc(s: dict[str, Any], dataset: str) -> str:
    if dataset == "fashion-mnist":
        side = 28 // s["fashion_pool"]
        return (f"Fashion-MNIST, first {s['fashion_train']} training images, full 10k test set, "
                f"{s['fashion_pool']}x{s['fashion_pool']} average-pooled to {side}x{side}")
    if s.get("digits_limit"):
        return f"digits 8x8, first {s['digits_limit']} training images, 450 test"
    return "scikit-learn digits 8x8 (1,347 train / 450 test)"


def markdown_report(key: str, group: dict[str, Any], results: dict[str, Any], stem: str | None = None) -> str:
    s = results["settings"]
    dataset, model = key.split("/")
    bits, combo = sorted(s["bits"]), s["combo"]
    methods = [m for m in ACC_METHODS if m in s["methods"]]
    timing = next((t for t in results.get("timing", []) if t["dataset"] == dataset and t["model"] == model), None)
    tbits = timing["bits"] if timing else bits[-1]
    memory = {m["method"]: m["delta_mb"] for m in results.get("memory", [])
              if m["dataset"] == dataset and m["model"] == model}
    bn = (f"BN statistics re-estimated on {s['bn_reestimate_batches']} clean training batches before every "
          f"evaluation" if s.get("bn_reestimate_batches") else "no BN re-estimation")
    if s.get("bn_freeze_after_epochs") is not None:
        bn += f", frozen after QAT epoch {s['bn_freeze_after_epochs']}"
    fp_desc = ("One FP model (seed 0's) for every seed; each seed: one QAT data order" if s.get("shared_fp")
               else "Each seed: one FP model and one data order")
    parts = [
        f"## {dataset} / {model} (width {s['width']})", "",
        f"{_data_desc(s, dataset)}; batch {s['batch_size'][dataset]}; FP: Adam lr {s['fp_lr']}, "
        f"{s['fp_epochs'][dataset]} epochs, cosine, default augmentation; QAT (every column): SGD momentum 0.9, "
        f"lr {s['qat_lr']}, wd 5e-5, cosine per step, {s['qat_epochs'][dataset]} epochs, train-mode calibration "
        f"forward, {bn}, no input augmentation, first/last layer 8 bit. "
        f"{fp_desc} shared by every column. NNCF WbAb: NNCF 3.4 `nncf.quantize` at the row's widths + the same "
        "fine-tuning loop.", "",
        "### Test accuracy (top-1 %, mean ± std over seeds)", "", accuracy_table(group, bits, methods, combo), "",
        "### Paired difference to LSQ (points; mean [95 % CI], t-distribution over seeds)", "",
        paired_table(group, bits, methods, combo), "",
        "### Targets", "",
    ]
    for t in evaluate_targets(group, bits, methods):
        status = {True: "**met**", False: "**missed**", None: "n/a"}[t["met"]]
        parts.append(f"- {t['target']}: {status} ({t['detail']})")
    parts += ["", f"### Training cost (W{tbits}A{tbits})", "",
              "Step time: all methods in one single-threaded process, round-robin on the same batches, median of "
              f"{timing['steps'] if timing else '?'} steps after {timing['warmup'] if timing else '?'} warm-up "
              "rounds. Peak memory: growth of the process's current RSS (sampled every 0.5 ms) over "
              f"{s['memory_steps']} training steps of the method, above the RSS right before them. The last "
              "column is the trainer's mean step time during the accuracy runs (shared machine: noisy).", "",
              cost_table(group, timing, memory, methods, combo, tbits), ""]
    for b in s["deploy_bits"]:
        tab = deploy_table(group, methods, combo, b)
        if tab.count("\n") > 1:
            parts += [f"### Deployment (W{b}A{b} models, ONNX Runtime CPU, 1 thread)", "",
                      "QDQ ONNX files of the seed-0 model; latency = median per-batch (256) ORT time relative to the "
                      "FP32 ONNX export of the same FP model; agreement = ORT top-1 == PyTorch top-1 on the test "
                      "set.", "", tab, ""]
    errs = deploy_errors(group)
    if errs:
        parts += ["Export failures:", ""] + [f"- {e}" for e in errs] + [""]
    if stem:
        parts += [f"![accuracy vs bits]({stem}.png)", "", f"![test accuracy per QAT epoch]({stem}_curves.png)", ""]
    return "\n".join(parts)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(key: str, group: dict[str, Any], results: dict[str, Any], path: Path) -> Path:
    """Test accuracy vs bits: one line per method with error bars (std over seeds), FP as a horizontal line."""
    plt = _plt()
    s = results["settings"]
    bits = sorted(s["bits"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    fp_m, fp_s = mean_std(list(group["fp"].values()))
    ax.axhline(100 * fp_m, color="black", lw=1.2, label=f"FP ({100 * fp_m:.2f}%)")
    methods = [m for m in ACC_METHODS if m != "nncf8" and m in s["methods"]]
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for b in bits:
            v = group["acc"].get(m, {}).get(b)
            if v:
                mu, sd = mean_std(list(v.values()))
                xs.append(b + (i - len(methods) / 2) * 0.04)
                ys.append(100 * mu)
                es.append(100 * sd)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, lw=1.3, ls="--" if m == "nncf" else "-",
                        label=method_label(m, s["combo"]).replace("WbAb", "at bits"))
    ax.set_xticks(bits)
    ax.set_xticklabels([f"W{b}A{b}" for b in bits])
    ax.set_xlabel("weight / activation bits (first and last layer 8 bit)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{key}: accuracy vs bits (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(key: str, group: dict[str, Any], results: dict[str, Any], path: Path) -> Path:
    """Test accuracy after each QAT epoch (mean over seeds), one panel per row, one line per method."""
    plt = _plt()
    s = results["settings"]
    bits = sorted(s["bits"])
    fig, axes = plt.subplots(1, len(bits), figsize=(5.2 * len(bits), 4.0), squeeze=False)
    fp_m = mean_std(list(group["fp"].values()))[0]
    for ax, b in zip(axes[0], bits):
        ax.axhline(100 * fp_m, color="black", lw=1.0, label="FP")
        for m in [m for m in ACC_METHODS if m != "nncf8" and m in s["methods"]]:
            curves = [c for c in group["curves"].get(m, {}).get(b, {}).values() if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [100 * statistics.fmean(c[e] for c in curves) for e in range(n)]
            ax.plot(range(1, n + 1), mean, marker="o", ms=3, ls="--" if m == "nncf" else "-",
                    label=method_label(m, s["combo"]).replace("WbAb", f"W{b}A{b}"))
        ax.set_title(f"W{b}A{b}")
        ax.set_xlabel("QAT epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{key}: test accuracy per QAT epoch (mean over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
