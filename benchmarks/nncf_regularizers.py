"""NNCF QAT vs NNCF QAT + CR / FPQ / BR on digits through the config-driven flow (run_config).

Run: python benchmarks/nncf_regularizers.py BITS SEEDS [VARIANTS], e.g. `4,2 0,1,2`; rows go to
benchmarks/nncf_runs/rows.jsonl (configs and run outputs beside it).
"""
import json, logging, pathlib, sys, time
import torch

torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING)
from qat_plugins.integrations.nncf import run_config  # noqa: E402

HERE = pathlib.Path(__file__).parent / "nncf_runs"
HERE.mkdir(exist_ok=True)
VARIANTS = {
    "plain": [],
    "cr": [{"name": "cr"}],
    "fpq": [{"name": "fpq"}],
    "br": [{"name": "br", "blocks": ["layer1", "layer2", "layer3"]}],
}
bits = [int(b) for b in sys.argv[1].split(",")]
seeds = [int(s) for s in sys.argv[2].split(",")]
names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(VARIANTS)
for b in bits:
    for seed in seeds:
        for name in names:
            tag = f"w{b}a{b}_{name}_s{seed}"
            cfg = {
                "input_info": {"sample_size": [1, 1, 8, 8]},
                "compression": {"algorithm": "quantization", "weights": {"bits": b}, "activations": {"bits": b}},
                "qat_plugins": {"regularizers": VARIANTS[name],
                                "train": {"seed": seed, "dataset": "digits", "model": "resnet", "width": 16,
                                          "fp_epochs": 15, "epochs": 6, "lr": 0.01, "batch_size": 64}},
            }
            path = HERE / f"{tag}.json"
            path.write_text(json.dumps(cfg, indent=2))
            out = HERE / "runs" / tag
            if (out / "results.json").exists():
                res = json.loads((out / "results.json").read_text())
            else:
                t = time.time()
                res = run_config(path, output_dir=out)
            row = {"tag": tag, "bits": b, "seed": seed, "variant": name, "fp": res["fp_test_accuracy"],
                   "qat": res["test_accuracy"], "ort": res["onnx"]["validation"]["onnx_top1"],
                   "agree": res["onnx"]["validation"]["top1_agreement"], "ms_step": 1000 * res["mean_step_time_s"],
                   "wall_s": res["wall_time_s"]}
            print(json.dumps(row), flush=True)
            with open(HERE / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
