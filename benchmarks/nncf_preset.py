"""NNCF QAT with NNCF's "performance" vs "mixed" preset, paired with a finished benchmark-v2 NNCF run.

Loads the benchmark's FP model (cache) and the config of its NNCF run, re-runs that QAT run with the
given preset (symmetric activations = "performance", NNCF's default; asymmetric = "mixed") and prints
the test top-1 next to the benchmark's. Single-threaded, a few minutes per run.

    OMP_NUM_THREADS=1 python benchmarks/nncf_preset.py PRESET MODEL SEED BITS [--weights-lsq] [--out bench-results]

``--weights-lsq``: LSQ's gradient scale on the weight ranges too (the integration's default: activations only).
(The former ``--stem8``, the first layer's output quantizer at 8 bit, is ``qn.prepare_qat``'s default now.)
"""
import argparse
import json
import pathlib
import warnings

import torch

from qat_plugins.bench.main import parse_args, settings_from_args
from qat_plugins.bench.runner import load_bench_data, load_fp_model, prepare_nncf_student
from qat_plugins.integrations import nncf as qn
from qat_plugins.training import load_config, train_qat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=["performance", "mixed"])
    ap.add_argument("model", help="resnet20 or resnet")
    ap.add_argument("seed", type=int)
    ap.add_argument("bits", type=int)
    ap.add_argument("--out", default="bench-results", help="the benchmark's output directory")
    ap.add_argument("--weights-lsq", action="store_true", help="LSQ's gradient scale on weight ranges too")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out = pathlib.Path(args.out)
    s = settings_from_args(parse_args([]))
    data = load_bench_data(s, "fashion-mnist")
    fp = load_fp_model(out / "cache", s, "fashion-mnist", args.model, args.seed, data)
    ref = json.loads((out / "runs" / f"fashion-mnist_{args.model}_s{args.seed}_nncf_w{args.bits}a{args.bits}.json").read_text())
    cfg = load_config(ref["config"])

    def prepare(fp_model: torch.nn.Module, data, cfg) -> torch.nn.Module:
        student = prepare_nncf_student(fp_model, data, cfg, preset=args.preset)
        if args.weights_lsq:
            qn.install_lsq_grad_scale(student, kinds=("activation", "weight"))
        return student

    res = train_qat(fp, data, cfg, regularizers=[], prepare_fn=prepare)
    print(f"{args.preset} {args.model} seed {args.seed} W{args.bits}A{args.bits}: {100 * res.test_accuracy:.2f} "
          f"(benchmark's NNCF run: {100 * ref['test_accuracy']:.2f}); per epoch "
          f"{[round(100 * h['test_acc'], 2) for h in res.history]}")


if __name__ == "__main__":
    main()
