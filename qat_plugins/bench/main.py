"""``qat-plugins bench``: the benchmark runner (argument parsing, task scheduling, outputs).

Phases: FP models (trained once per dataset / model / seed, cached under ``--cache``), then every
QAT run plus the step-time / peak-memory micro-benchmark on ``--workers`` single-threaded spawn
processes, then ``results.json``, ``<dataset>_<model>.md`` and the plots in ``--out`` (default
``./bench-results``, never the committed ``benchmarks/results``). Resumable: every finished run is a
file ``OUT/runs/<run>.json`` written atomically, and a re-run of the same command skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Sequence

from .._io import atomic_write_bytes
from .settings import DATASETS, DEFAULT_METHODS, METHODS, MODELS, BenchSettings, fp_seeds, preset, seeds_for

__all__ = ["main", "parse_args", "settings_from_args", "run_benchmark", "estimate_wall_s", "TINY_ENV", "DEFAULT_OUT"]

TINY_ENV = "QAT_PLUGINS_BENCH_TINY"  # =1: the test suite's tiny setting (same as --tiny)
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
INSTALL_FASHION = "apt-get update && apt-get install -y dataset-fashion-mnist"
DEFAULT_OUT = "bench-results"  # a scratch directory (gitignored); BENCHMARKS.md is written from it by hand


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(t) for t in items]
    return parse


def _seeds(text: str) -> dict[int, int] | int:
    """``N`` (every row) or ``bits=N,...`` (e.g. ``2=5,4=3``)."""
    try:
        if "=" not in text:
            return int(text)
        return {int(k): int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or bits=N,... (e.g. 2=5,4=3); got {text!r}") from None


def _epochs(text: str) -> dict[str, int] | int:
    try:
        if "=" not in text:
            return int(text)
        out = {}
        for part in text.split(","):
            k, v = part.split("=")
            out[k.strip()] = int(v)
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or dataset=N,...; got {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qat-plugins bench", description="LSQ vs CR / FPQ / BR vs NNCF benchmark.")
    p.add_argument("--quick", action="store_true", help="digits only, SmallResNet, 1 seed, few epochs, W2A2 + W4A4")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests; also env QAT_PLUGINS_BENCH_TINY=1
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (a scratch directory) [{DEFAULT_OUT}]")
    p.add_argument("--cache", help="FP model cache directory [OUT/cache]")
    p.add_argument("--datasets", type=_csv(str), help="comma list of fashion-mnist, digits [fashion-mnist]")
    p.add_argument("--models", type=_csv(str), help=f"comma list of {', '.join(MODELS)} [resnet20,resnet]")
    p.add_argument("--seeds", type=_seeds, help="seeds per row: N, or bits=N,... [2=5,4=3; quick: 1]")
    p.add_argument("--bits", type=_csv(int), help="rows, e.g. 2,3,4 [2,4]")
    p.add_argument("--methods", type=_csv(str),
                   help=f"columns, subset of {','.join(METHODS)} [{','.join(DEFAULT_METHODS)}]")
    p.add_argument("--combo", type=_csv(str), help="regularizers of the combination column [cr,fpq,br]")
    p.add_argument("--workers", type=int, help="single-threaded worker processes [2]")
    p.add_argument("--width", type=int, help="model width [16]")
    p.add_argument("--fashion-train", type=int, help="Fashion-MNIST training images used [20000]")
    p.add_argument("--fp-models", choices=("shared", "per-seed"),
                   help="one FP model (seed 0's) for every seed, or one per seed [full: shared; quick: per-seed]")
    p.add_argument("--fp-epochs", type=_epochs, help="FP epochs: N (all datasets) or e.g. fashion-mnist=8,digits=15")
    p.add_argument("--qat-epochs", type=_epochs, help="QAT epochs: N (all datasets) or e.g. fashion-mnist=2,digits=6")
    p.add_argument("--timing-steps", type=int, help="measured steps per method in the step-time benchmark")
    p.add_argument("--resume", action="store_true",
                   help="(the default) reuse finished runs in OUT/runs whose config matches")
    p.add_argument("--rerun", action="store_true", help="ignore finished runs in OUT/runs and train them again")
    p.add_argument("--plan", action="store_true",
                   help="print the runs and an estimated wall time (from measured step costs), train nothing")
    p.add_argument("--report-only", action="store_true",
                   help="no training: rebuild results.json / tables / plots from the finished runs in OUT/runs")
    return p.parse_args(list(argv) if argv is not None else None)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    tiny = args.tiny or os.environ.get(TINY_ENV, "") not in ("", "0")
    s = preset("tiny" if tiny else "quick" if args.quick else "full")
    if args.datasets is not None:
        s.datasets = args.datasets
    for ds in s.datasets:
        if ds not in DATASETS:
            raise ValueError(f"--datasets: unknown dataset {ds!r}; choose from {', '.join(DATASETS)}")
    if args.models is not None:
        s.models = args.models
    for m in s.models:
        if m not in MODELS:
            raise ValueError(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    if args.bits is not None:
        if any(not 2 <= b <= 8 for b in args.bits):
            raise ValueError("--bits: each must be 2..8")
        s.bits = sorted(set(args.bits))
    if args.seeds is not None:
        if isinstance(args.seeds, int):
            s.seeds, s.default_seeds = {}, args.seeds
        else:
            s.seeds = {**s.seeds, **args.seeds}
        if any(n < 1 for n in [s.default_seeds, *s.seeds.values()]):
            raise ValueError("--seeds must be >= 1")
    if args.methods is not None:
        bad = [m for m in args.methods if m not in METHODS]
        if bad:
            raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
        s.methods = [m for m in METHODS if m in args.methods]
    if args.combo is not None:
        bad = [c for c in args.combo if c not in ("cr", "fpq", "br")]
        if bad or not args.combo:
            raise ValueError("--combo: a comma list of cr, fpq, br")
        s.combo = list(dict.fromkeys(args.combo))
    if args.workers is not None:
        if args.workers < 1:
            raise ValueError("--workers must be >= 1")
        s.workers = args.workers
    if args.width is not None:
        s.width = args.width
    if args.fashion_train is not None:
        s.fashion_train = args.fashion_train
    for name in ("fp_epochs", "qat_epochs"):
        v = getattr(args, name)
        cur = getattr(s, name)
        if v is None:
            continue
        new = {k: v for k in cur} if isinstance(v, int) else {**cur, **v}
        if set(new) - set(DATASETS) or any(e < (0 if name == "fp_epochs" else 1) for e in new.values()):
            raise ValueError(f"--{name.replace('_', '-')}: datasets {', '.join(DATASETS)}, epochs >= "
                             f"{0 if name == 'fp_epochs' else 1}; got {v}")
        setattr(s, name, new)
    if args.fp_models is not None:
        s.shared_fp = args.fp_models == "shared"
    if args.timing_steps is not None:
        s.timing_steps = args.timing_steps
    s.deploy_bits = [b for b in s.deploy_bits if b in s.bits] or [min(s.bits, key=lambda b: abs(b - 4))]
    return s


def check_fashion() -> str | None:
    """None when the Fashion-MNIST idx files are installed, else what is missing."""
    from ..data import FASHION_MNIST_DIR

    d = Path(FASHION_MNIST_DIR)
    missing = [f for f in FASHION_FILES if not (d / f).is_file() and not (d / f"{f}.gz").is_file()]
    if not missing:
        return None
    return f"Fashion-MNIST not found in {d} (missing {', '.join(missing)})"


def machine_info() -> dict[str, Any]:
    import numpy
    import onnx
    import onnxruntime
    import torch

    try:
        import nncf  # noqa: PLC0415

        nncf_version = nncf.__version__
    except Exception:  # noqa: BLE001
        nncf_version = None
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "nncf": nncf_version, "numpy": numpy.__version__,
            "loadavg_start": list(os.getloadavg())}


# --- task execution -------------------------------------------------------------------------------
def _call(fn_name: str, task: dict[str, Any]) -> dict[str, Any]:
    """Run ``fn_name(task)`` and turn an exception into an error record (picklable entry point)."""
    from . import runner, timing

    fn = {"fp": runner.fp_task, "qat": runner.qat_task, "timing": timing.timing_task}[fn_name]
    t0 = time.perf_counter()
    try:
        out = fn(task)
    except Exception as e:  # noqa: BLE001
        out = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}",
               "traceback": traceback.format_exc()[-3000:]}
        out.update({k: v for k, v in task.items() if k in ("dataset", "model", "seed", "method", "bits")})
    out["task_wall_s"] = time.perf_counter() - t0
    out["kind"] = fn_name
    return out


def _spawn_pool(workers: int, fresh: bool = False) -> ProcessPoolExecutor:
    import multiprocessing as mp

    kw: dict[str, Any] = {"max_workers": workers, "mp_context": mp.get_context("spawn")}
    if fresh:
        kw["max_tasks_per_child"] = 1
    return ProcessPoolExecutor(**kw)


def _run_all(jobs: list[tuple[str, dict[str, Any]]], workers: int, t_start: float, *, fresh: bool = False,
             inline: bool = False) -> list[dict[str, Any]]:
    """Run jobs (inline, or on a spawn pool), printing one line per finished job."""
    results: list[dict[str, Any]] = []

    def report(r: dict[str, Any], i: int) -> None:
        what = r["kind"] + " " + " ".join(str(r[k]) for k in ("dataset", "model", "seed", "method", "bits") if k in r)
        if "error" in r:
            status = "ERROR " + r["error"]
        elif "test_accuracy" in r:
            status = f"top-1 {100 * r['test_accuracy']:.2f}%" + (" (cached)" if r.get("cached") else "")
        elif "relative_to_lsq" in r:
            status = "step time / LSQ " + ", ".join(f"{k} {v:.2f}x" for k, v in r["relative_to_lsq"].items())
        else:
            status = "done"
        print(f"[{time.perf_counter() - t_start:7.1f}s] {i}/{len(jobs)} {what}: {status} "
              f"({r['task_wall_s']:.1f}s)", flush=True)

    if inline or workers == 1 and not fresh:
        for i, (fn, task) in enumerate(jobs, 1):
            r = _call(fn, task)
            results.append(r)
            report(r, i)
        return results
    with _spawn_pool(workers, fresh) as pool:
        futs: list[Future[dict[str, Any]]] = [pool.submit(_call, fn, task) for fn, task in jobs]
        for i, f in enumerate(as_completed(futs), 1):
            r = f.result()
            results.append(r)
            report(r, i)
    return results


# relative cost of a run (scheduling only: the longest runs go first)
_COST = {"combo": 2.6, "cr": 2.0, "fpq": 1.3, "br": 1.3, "kd": 1.15, "lsq": 1.0, "nncf": 1.1, "nncf8": 1.1}
_MODEL_COST = {"resnet20": 2.0, "resnet": 1.0, "cnn": 0.5}


def _existing(out: Path, fn: str, task: dict[str, Any]) -> dict[str, Any] | None:
    """A finished record in OUT/runs for this job (same config), else None."""
    from ..training import config_hash, load_config
    from .runner import run_id
    from .settings import BenchSettings as BS, fp_cache_key, fp_seed, regularizer_specs, train_config

    s = BS.from_dict(task["settings"])
    if fn == "qat":
        rid = run_id(task["dataset"], task["model"], task["seed"], task["method"], task["bits"])
        path = out / "runs" / f"{rid}.json"
    else:
        path = out / "runs" / f"timing_{task['dataset']}_{task['model']}_w{task['bits']}.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        return None
    if fn == "qat":
        specs = regularizer_specs(task["method"], task["model"], task["seed"], s.combo)
        cfg = load_config(train_config(s, task["dataset"], task["model"], task["seed"], task["bits"], specs))
        fp_key = fp_cache_key(s, task["dataset"], task["model"], fp_seed(s, task["seed"]))
        if (rec.get("config_hash") != config_hash(cfg) or rec.get("fp_key") != fp_key
                or (task.get("deploy") and "deploy" not in rec)):
            return None
    elif rec.get("task_key") != _timing_key(task):
        return None
    rec["reused"] = True
    return rec


def _timing_key(task: dict[str, Any]) -> str:
    keep = {k: task[k] for k in ("dataset", "model", "bits", "methods", "steps", "warmup", "memory_steps")}
    keep["settings"] = {k: v for k, v in task["settings"].items() if k not in ("workers", "mode")}
    return json.dumps(keep, sort_keys=True)


# one-thread step cost in seconds at batch 128 and 28x28 inputs, measured on this machine (shared/facts.md,
# 2026-12-01): (FP step, LSQ QAT step); scales with the pixel count
_STEP_S = {"resnet20": (0.345, 0.856), "resnet": (0.165, 0.431), "cnn": (0.08, 0.2)}


def estimate_wall_s(s: BenchSettings) -> dict[str, float]:
    """Rough wall time of ``s`` on idle cores: FP + QAT steps (method cost factors of ``_COST``), one test-set
    evaluation and BN re-estimation per epoch, divided over ``s.workers`` processes."""
    total = {"fp_s": 0.0, "qat_s": 0.0}
    for ds in s.datasets:
        pix = (28 // s.fashion_pool) ** 2 / 784 if ds == "fashion-mnist" else 64 / 784
        bs = s.batch_size[ds]
        n_train = s.fashion_train if ds == "fashion-mnist" else (s.digits_limit or 1347)
        n_test = 10000 if ds == "fashion-mnist" else 450
        spe = -(-n_train // bs)
        for m in s.models:
            fp_step, q_step = (c * pix * bs / 128 for c in _STEP_S[m])
            n_fp = len(fp_seeds(s))
            total["fp_s"] += n_fp * s.fp_epochs[ds] * (spe * fp_step + n_test / bs * fp_step / 3)
            for b in s.bits:
                for method in s.methods:
                    if method == "nncf8":
                        continue
                    per_epoch = spe * q_step * _COST[method] + (n_test / bs + s.bn_reestimate_batches) * q_step / 3
                    total["qat_s"] += seeds_for(s, b) * s.qat_epochs[ds] * per_epoch
    total["wall_s"] = (total["fp_s"] + total["qat_s"]) / max(1, s.workers)
    return total


def run_benchmark(s: BenchSettings, out: Path, cache: Path, argv: Sequence[str], *, resume: bool = False,
                  report_only: bool = False) -> dict[str, Any]:
    from .report import aggregate, evaluate_targets, markdown_report, plot_accuracy, plot_curves
    from .runner import _fp_path

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    sd = s.to_dict()
    base = {"settings": sd, "cache_dir": str(cache), "out_dir": str(out)}
    inline = s.workers == 1

    # 1. FP models
    fp_jobs = [("fp", {**base, "dataset": ds, "model": m, "seed": seed})
               for ds in s.datasets for m in s.models for seed in fp_seeds(s)]
    if report_only:
        fp_jobs = [j for j in fp_jobs if _fp_path(cache, s, j[1]["dataset"], j[1]["model"], j[1]["seed"]).is_file()]
    print(f"== FP models: {len(fp_jobs)} (cache {cache})", flush=True)
    fp_res = _run_all(fp_jobs, s.workers, t_start, inline=inline or report_only)
    bad = [r for r in fp_res if "error" in r]
    if bad:
        raise RuntimeError(f"FP training failed: {bad[0]['error']}\n{bad[0].get('traceback', '')}")

    # 2. QAT runs + step-time micro-benchmark (longest first)
    qat_jobs: list[tuple[str, dict[str, Any]]] = []
    for ds in s.datasets:
        for m in s.models:
            for seed in range(max(seeds_for(s, b) for b in s.bits)):
                for method in s.methods:
                    for bits in ([8] if method == "nncf8" else [b for b in s.bits if seed < seeds_for(s, b)]):
                        dep = seed < s.deploy_seeds and (bits in s.deploy_bits or method == "nncf8")
                        qat_jobs.append(("qat", {**base, "dataset": ds, "model": m, "seed": seed, "method": method,
                                                 "bits": bits, "deploy": dep}))
    tbits = s.deploy_bits[0]
    timing_jobs = [("timing", {**base, "dataset": ds, "model": m, "bits": tbits, "methods": list(s.methods),
                               "steps": s.timing_steps, "warmup": s.timing_warmup, "memory_steps": s.memory_steps})
                   for ds in s.datasets for m in s.models]
    size = {"fashion-mnist": 10.0 * s.fashion_train / 10000 / s.fashion_pool ** 2, "digits": 1.0}
    # seed by seed (an interrupted run still has complete tables for the first seeds), longest first within
    qat_jobs.sort(key=lambda j: (j[1]["seed"],
                                 -size[j[1]["dataset"]] * _COST[j[1]["method"]] * _MODEL_COST.get(j[1]["model"], 1.0)
                                 * s.qat_epochs[j[1]["dataset"]]))
    jobs = timing_jobs + qat_jobs
    for fn, task in timing_jobs:
        task["task_key"] = _timing_key(task)
    done: list[dict[str, Any]] = []
    if resume or report_only:
        todo = []
        for fn, task in jobs:
            rec = _existing(out, fn, task)
            if rec is not None:
                rec.setdefault("kind", fn)
                done.append(rec)
            else:
                todo.append((fn, task))
        print(f"== reusing {len(done)} finished run(s) from {out / 'runs'}", flush=True)
        jobs = todo
    missing = []
    if report_only:
        missing = [{k: t[k] for k in ("dataset", "model", "seed", "method", "bits") if k in t} | {"kind": fn}
                   for fn, t in jobs]
        jobs = []
    print(f"== QAT runs: {len(qat_jobs)} + step-time benchmarks: {len(timing_jobs)}; to run: {len(jobs)} on "
          f"{s.workers} worker(s)", flush=True)
    res = done + _run_all(jobs, s.workers, t_start, inline=inline)

    wall = time.perf_counter() - t_start
    info["loadavg_end"] = list(os.getloadavg())
    results: dict[str, Any] = {
        "command": "python -m qat_plugins bench " + " ".join(argv), "settings": sd, "machine": info,
        "wall_time_s": wall, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": ["qat.augment=false for every QAT run (CR collapsed on doubly augmented inputs); fp.augment=true",
                  f"train-mode calibration forward; BN statistics re-estimated on {s.bn_reestimate_batches} clean "
                  "batches before every evaluation (docs/bn.md)",
                  "each method is paired with LSQ by seed (same FP model, same data order); CIs: t-distribution",
                  "one FP model (seed 0's) for every seed" if s.shared_fp else "one FP model per seed",
                  "peak memory = sampled current-RSS growth over memory_steps training steps (after malloc_trim), "
                  "per method, in the timing process",
                  "step time relative to LSQ from the interleaved micro-benchmark (timing)",
                  "NNCF runs: train_qat(prepare_fn=NNCF prepare_qat), the same loop as every other column",
                  "the combination column runs the regularizers listed in settings.combo together"],
        "fp_models": sorted([r for r in fp_res if "error" not in r], key=lambda r: (r["dataset"], r["model"], r["seed"])),
        "runs": sorted([r for r in res if r["kind"] == "qat" and "error" not in r],
                       key=lambda r: (r["dataset"], r["model"], r["method"], -r["bits"], r["seed"])),
        "timing": [r for r in res if r["kind"] == "timing" and "error" not in r],
        "memory": [{"dataset": t["dataset"], "model": t["model"], "method": m, "bits": t["bits"], **v}
                   for t in res if t["kind"] == "timing" and "error" not in t for m, v in t.get("memory", {}).items()],
        "errors": [r for r in res if "error" in r],
        "missing": missing,
    }
    for r in results["timing"]:
        r.pop("step_times_s", None) if s.mode == "tiny" else None
    groups = aggregate(results)
    results["targets"] = {key: evaluate_targets(g, s.bits, s.methods) for key, g in groups.items()}
    _write_json(out / "results.json", results)
    for key, g in groups.items():
        ds, model = key.split("/")
        stem = f"{ds}_{model}"
        md = markdown_report(key, g, results, stem=stem)
        header = (f"<!-- generated by: {results['command']} ; wall {wall / 60:.1f} min ; "
                  f"{results['finished_utc']} -->\n\n")
        atomic_write_bytes(out / f"{stem}.md", (header + md).encode())
        plot_accuracy(key, g, results, out / f"{stem}.png")
        plot_curves(key, g, results, out / f"{stem}_curves.png")
        print("\n" + md, flush=True)
    if missing:
        print(f"\n{len(missing)} run(s) not finished (missing from the tables): "
              + ", ".join(f"{m.get('dataset')}/{m.get('method', 'timing')}/W{m.get('bits')}/s{m.get('seed', '-')}"
                          for m in missing), flush=True)
    if results["errors"]:
        print(f"\n{len(results['errors'])} task(s) failed; see results.json 'errors':", flush=True)
        for e in results["errors"]:
            print("  ", e.get("kind"), e.get("dataset"), e.get("method"), e.get("bits"), e["error"], flush=True)
    print(f"\nwall time {wall:.0f} s ({wall / 60:.1f} min); results in {out}", flush=True)
    return results


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=1, default=str).encode())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qat-plugins bench``; returns the exit status (2: user error / missing data)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `qat-plugins bench -- --quick` (the top-level parser passes the rest through)
        argv = argv[1:]
    try:
        args = parse_args(argv)
        s = settings_from_args(args)
    except SystemExit as e:  # argparse --help / usage errors
        return int(e.code or 0)
    except ValueError as e:
        print(f"qat-plugins bench: error: {e}", file=sys.stderr)
        return 2
    if "fashion-mnist" in s.datasets:
        missing = check_fashion()
        if missing:
            print(f"qat-plugins bench: error: {missing}; install it with: {INSTALL_FASHION} "
                  "(or run with --datasets digits)", file=sys.stderr)
            return 2
    import torch

    torch.set_num_threads(1)
    if args.plan:
        est = estimate_wall_s(s)
        n = sum(seeds_for(s, b) for b in s.bits) * len(s.methods) * len(s.models) * len(s.datasets)
        print(f"{n} QAT runs ({', '.join(f'W{b}A{b} x {seeds_for(s, b)} seeds' for b in s.bits)}; "
              f"{', '.join(s.methods)}; {', '.join(s.models)}); estimated on idle cores: FP {est['fp_s'] / 3600:.2f} h "
              f"+ QAT {est['qat_s'] / 3600:.2f} h of one thread, {est['wall_s'] / 3600:.2f} h wall on "
              f"{s.workers} worker(s)")
        return 0
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "cache"
    results = run_benchmark(s, out, cache, argv, resume=not args.rerun, report_only=args.report_only)
    return 1 if results["errors"] else 0
