"""LSQ W2A2 seed spread vs the quantizers' initialisation, on the benchmark's ResNet-20 protocol.

One benchmark LSQ run (Fashion-MNIST 14x14, 3 QAT epochs, eager, first/last layer 8 bit, BN
re-estimation) per seed and init, from the FP models a ``qat-plugins bench`` run left in its cache;
``mse`` is the benchmark's default, ``lsq`` the LSQ paper's ``2<|v|>/sqrt(Q_P)``, ``minmax100`` FPQ's
base QAT (min/max over 100 images). One result line per run; finished runs are skipped.

    OMP_NUM_THREADS=1 python benchmarks/init_spread.py --cache bench-results/cache --out /tmp/init-spread
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from qat_plugins.bench.runner import load_bench_data, load_fp_model, quiet_worker
from qat_plugins.bench.settings import preset, train_config
from qat_plugins.training import load_config, prepare_student, train_qat

INITS = {"mse": {}, "lsq": {"init": "lsq"}, "minmax100": {"init": "minmax", "calib_samples": 100}}


def run(init: str, seed: int, cache: str, model: str, bits: int, epochs: int | None) -> float:
    s = preset("full")
    if epochs is not None:
        s.qat_epochs = {**s.qat_epochs, "fashion-mnist": epochs}
    data = load_bench_data(s, "fashion-mnist")
    fp = load_fp_model(cache, s, "fashion-mnist", model, seed, data)
    cfg = load_config(train_config(s, "fashion-mnist", model, seed, bits, []))

    def prepare(fp_model: torch.nn.Module, data: Any, cfg: Any) -> torch.nn.Module:
        return prepare_student(fp_model, data, cfg, **INITS[init])

    return train_qat(fp, data, cfg, regularizers=[], prepare_fn=prepare).test_accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="FP model cache of a qat-plugins bench run")
    ap.add_argument("--out", required=True, help="directory for one JSON file per run")
    ap.add_argument("--inits", default="lsq,mse")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--qat-epochs", type=int, default=None, help="default: the benchmark's (3)")
    args = ap.parse_args()
    quiet_worker()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inits = args.inits.split(",")
    for seed in range(args.seeds):
        for init in inits:
            path = out / f"{init}_s{seed}.json"
            if not path.exists():
                acc = run(init, seed, args.cache, args.model, args.bits, args.qat_epochs)
                path.write_text(json.dumps({"init": init, "seed": seed, "test_accuracy": acc}))
            print(path.stem, json.loads(path.read_text())["test_accuracy"], flush=True)
    for init in inits:
        accs = [json.loads((out / f"{init}_s{s}.json").read_text())["test_accuracy"] * 100 for s in range(args.seeds)]
        print(f"{init}: " + " / ".join(f"{a:.2f}" for a in accs)
              + f"  mean {statistics.mean(accs):.2f}  spread {max(accs) - min(accs):.2f}")


if __name__ == "__main__":
    main()
