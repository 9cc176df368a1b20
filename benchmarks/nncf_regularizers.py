"""NNCF QAT (plain and + CR / FPQ / BR) vs the torch.ao LSQ path on digits, through one run entry.

Every variant runs the same NNCF-style config through ``qat_plugins.training.run``: NNCF variants with
``qat_plugins.integrations.nncf.run_config`` (the NNCF hooks), ``lsq`` with the TrainConfig that config
maps to (``qn.train_config``) and the torch.ao eager LSQ prepare -- same data order, FP training,
optimizer, schedule and evaluation. Single-threaded.

Run: python benchmarks/nncf_regularizers.py BITS SEEDS [VARIANTS] [--out DIR], e.g.
     python benchmarks/nncf_regularizers.py 2,4 0,1 plain,lsq --out /tmp/nncf_vs_lsq
With --latency, the int8 ONNX files of `plain` and `lsq` (same seed, same FP model) are timed interleaved
in one ONNX Runtime thread (batch 1 and 64; medians) and their fused kernels compared.
Rows go to DIR/rows.jsonl (default DIR: benchmarks/nncf_runs; configs and run outputs beside it).
"""
import argparse
import json
import logging
import pathlib
import time

import torch

torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING)
from qat_plugins.integrations import nncf as qn  # noqa: E402
from qat_plugins.training import run  # noqa: E402

VARIANTS = {
    "plain": [],
    "cr": [{"name": "cr"}],
    "fpq": [{"name": "fpq"}],
    "br": [{"name": "br", "blocks": ["layer1", "layer2", "layer3"]}],
    "lsq": None,  # the torch.ao LSQ path on the same TrainConfig (no regularizer)
    "performance": [],  # plain NNCF with NNCF's "performance" preset (symmetric activations)
    "mixed": [],  # plain NNCF with the "mixed" preset (asymmetric activations)
}
PRESETS = ("performance", "mixed")  # variants named after NNCF presets; others: the integration's default
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("bits", help="comma-separated widths, e.g. 2,4 (WbAb)")
parser.add_argument("seeds", help="comma-separated seeds, e.g. 0,1")
parser.add_argument("variants", nargs="?", default=",".join(VARIANTS), help=f"comma-separated of {list(VARIANTS)}")
parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "nncf_runs"))
parser.add_argument("--epochs", type=int, default=6, help="QAT epochs (default 6, the CLI's)")
parser.add_argument("--model", default="resnet", help="resnet (SmallResNet, default), resnet20 or cnn")
parser.add_argument("--latency", action="store_true",
                    help="after the runs: ORT latency of each NNCF int8 export vs the lsq run's (same FP model)")
args = parser.parse_args()
HERE = pathlib.Path(args.out)
HERE.mkdir(parents=True, exist_ok=True)
for b in [int(v) for v in args.bits.split(",")]:
    for seed in [int(v) for v in args.seeds.split(",")]:
        for name in args.variants.split(","):
            tag = f"w{b}a{b}_{name}_s{seed}" + ("" if args.model == "resnet" else f"_{args.model}")
            cfg = {
                "input_info": {"sample_size": [1, 1, 8, 8]},
                "compression": {"algorithm": "quantization", "weights": {"bits": b}, "activations": {"bits": b},
                                **({"preset": name} if name in PRESETS else {})},
                "qat_plugins": {"regularizers": VARIANTS[name] or [],
                                "train": {"seed": seed, "dataset": "digits", "model": args.model, "width": 16,
                                          "fp_epochs": 15, "epochs": args.epochs, "lr": 0.01, "batch_size": 64,
                                          "augment": True, "export": "int8"}},
            }
            path = HERE / f"{tag}.json"
            path.write_text(json.dumps(cfg, indent=2))
            out = HERE / "runs" / tag
            t = time.time()
            if (out / "results.json").exists():
                res = json.loads((out / "results.json").read_text())
            elif name == "lsq":
                res = run(qn.train_config(path, output_dir=out)).to_dict()
            else:
                res = qn.run_config(path, output_dir=out)
            onnx = res["onnx"][0] if isinstance(res["onnx"], list) else res["onnx"]
            row = {"tag": tag, "bits": b, "seed": seed, "variant": name, "fp": res["fp_test_accuracy"],
                   "qat": res["test_accuracy"], "ort": onnx["validation"]["onnx_top1"],
                   "agree": onnx["validation"]["top1_agreement"], "ms_step": 1000 * res["mean_step_time_s"],
                   "epochs": [round(h["test_acc"], 4) for h in res["history"]], "wall_s": round(time.time() - t, 1)}
            print(json.dumps(row), flush=True)
            with open(HERE / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


def _latency(a: pathlib.Path, b: pathlib.Path) -> dict:
    import statistics

    import onnxruntime as ort
    from qat_plugins.data import load_digits_split

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sa, sb = (ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in (a, b))
    xt = load_digits_split().test.tensors[0].numpy()
    out = {}
    for bs, reps in ((1, 400), (64, 80)):
        feed = {"input": xt[:bs]}
        for s in (sa, sb):
            for _ in range(20):
                s.run(None, feed)
        ta, tb = [], []
        for _ in range(reps):
            for s, t in ((sa, ta), (sb, tb)):
                t0 = time.perf_counter()
                s.run(None, feed)
                t.append(time.perf_counter() - t0)
        out[f"batch{bs}_ms"] = [round(1e3 * statistics.median(ta), 4), round(1e3 * statistics.median(tb), 4)]
        out[f"batch{bs}_ratio"] = round(statistics.median(tb) / statistics.median(ta), 3)
    return out


if args.latency:
    for b in [int(v) for v in args.bits.split(",")]:
        for seed in [int(v) for v in args.seeds.split(",")]:
            suffix = "" if args.model == "resnet" else f"_{args.model}"
            lsq, nq = (HERE / "runs" / f"w{b}a{b}_{v}_s{seed}{suffix}" for v in ("lsq", "plain"))
            if not ((lsq / "model_int8.onnx").exists() and (nq / "model_int8.onnx").exists()):
                continue
            reports = [json.loads((d / "results.json").read_text())["onnx"][0]["validation"] for d in (lsq, nq)]
            row = {"latency": f"w{b}a{b}_s{seed}{suffix}", "lsq_vs_nncf": _latency(lsq / "model_int8.onnx", nq / "model_int8.onnx"),
                   "kernels_lsq": reports[0]["node_counts"], "kernels_nncf": reports[1]["node_counts"],
                   "agreement_lsq_nncf": [reports[0]["top1_agreement"], reports[1]["top1_agreement"]]}
            print(json.dumps(row), flush=True)
            with open(HERE / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
