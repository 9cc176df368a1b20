"""One benchmark LSQ run again, with eager (as the benchmark), FX or NNCF (N calibration images) prepare.

Loads the benchmark's FP model (``--cache``) and the config of its LSQ run (``benchmarks/results/runs``), re-runs
that QAT run (same data order, loop and evaluation) with the variant and prints the test top-1 per epoch.
Single-threaded, a few minutes per run:

    OMP_NUM_THREADS=1 python benchmarks/lsq_mode_gap.py VARIANT MODEL SEED [--bits 2] [--cache bench-results/cache]

VARIANT: ``eager`` (the benchmark's LSQ column), ``fx`` (``qat.mode: fx``), ``nncfN`` (``qn.prepare_qat`` on the
first N training images, e.g. ``nncf128``).
"""
import argparse
import json
import pathlib
import warnings

import torch

from qat_plugins.bench.main import parse_args, settings_from_args
from qat_plugins.bench.runner import load_bench_data, load_fp_model, prepare_nncf_student
from qat_plugins.training import load_config, train_qat

RUNS = pathlib.Path(__file__).resolve().parent / "results" / "runs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", help="eager, fx or nncfN")
    ap.add_argument("model", help="resnet20 or resnet")
    ap.add_argument("seed", type=int)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--cache", default="bench-results/cache", help="the benchmark's FP model cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    s = settings_from_args(parse_args([]))
    data = load_bench_data(s, "fashion-mnist")
    fp = load_fp_model(args.cache, s, "fashion-mnist", args.model, args.seed, data)
    tag = f"fashion-mnist_{args.model}_s{args.seed}_lsq_w{args.bits}a{args.bits}"
    ref = json.loads((RUNS / f"{tag}.json").read_text())
    raw = ref["config"]
    kw = {}
    if args.variant == "fx":
        raw["qat"]["mode"] = "fx"
    elif args.variant.startswith("nncf"):
        n = int(args.variant[4:])
        kw["prepare_fn"] = lambda fp_model, data, cfg: prepare_nncf_student(fp_model, data, cfg, calib_images=n)
    elif args.variant != "eager":
        raise SystemExit(f"unknown variant {args.variant!r}")
    res = train_qat(fp, data, load_config(raw), regularizers=[], **kw)
    print(f"{args.variant} {args.model} seed {args.seed} W{args.bits}A{args.bits}: {100 * res.test_accuracy:.2f} "
          f"(benchmark's LSQ run: {100 * ref['test_accuracy']:.2f}); per epoch "
          f"{[round(100 * h['test_acc'], 2) for h in res.history]}")


if __name__ == "__main__":
    main()
