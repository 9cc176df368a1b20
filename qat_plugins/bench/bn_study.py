"""``python -m qat_plugins.bench.bn_study``: why QAT collapses in eval mode, and which BN handling fixes it.

A plain public-API loop (digits, SmallResNet, W2A2 eager, SGD + cosine as the trainer) per seed and
variant: calibration forward in eval or train mode; BN statistics left alone, frozen after QAT epoch
1, or re-estimated on clean batches before each evaluation. Printed per epoch: eval-mode test top-1,
test top-1 with batch statistics, and the lag of the running variance. Results in docs/bn.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import prepare_qat
from ..quant import LSQFakeQuantize
from ..training import (BNSchedule, build_fp_model, build_loader, evaluate, load_config, load_data,
                        reestimate_bn_stats, seed_everything, train_fp)

VARIANTS = {
    "eval-calib": ("eval", None, False),
    "train-calib": ("train", None, False),
    "eval-calib+freeze1": ("eval", 1, False),
    "train-calib+freeze1": ("train", 1, False),
    "eval-calib+reest": ("eval", None, True),
    "train-calib+reest": ("train", None, True),
    "train-calib+freeze1+reest": ("train", 1, True),
}


def _act_scales(model: nn.Module) -> dict[str, float]:
    return {n: float(m.scale.detach().abs().mean()) for n, m in model.named_modules()
            if isinstance(m, LSQFakeQuantize) and not n.endswith("weight_fake_quant")}


def _bn_lag(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Lag of the running std behind the current model: |log(running std / std re-estimated on `batches`)|
    per BN channel (eps included, as BN divides by it): (median, fraction of channels off by > 25 %)."""
    ref = copy.deepcopy(model)
    reestimate_bn_stats(ref, batches, None, keep_weight_grid=False)
    a = [(m.running_var + m.eps).sqrt() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    b = [(m.running_var + m.eps).sqrt() for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    r = torch.cat([(x / y).log().abs() for x, y in zip(a, b)])
    return float(r.median()), float((r > math.log(1.25)).float().mean())


def _batch_stat_acc(model: nn.Module, test: Any) -> float:
    """Test top-1 with BN normalising by the statistics of each test batch (512), quantizers as trained."""
    m = copy.deepcopy(model)
    m.eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.train()
            mod.momentum = 0.0
    x, y = test.tensors
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 512):
            correct += int((m(x[i:i + 512]).argmax(-1) == y[i:i + 512]).sum())
    return correct / len(x)


def run_one(seed: int, variant: str, bits: int = 2, qat_epochs: int = 6, fp_epochs: int = 15,
            reest_batches: int = 10) -> dict[str, Any]:
    calib, freeze_epochs, reest = VARIANTS[variant]
    cfg = load_config({"seed": seed, "model": {"name": "resnet"}, "fp": {"epochs": fp_epochs},
                       "output_dir": None, "progress": False})
    data = load_data(cfg)
    fp = build_fp_model(cfg, data)
    train_fp(fp, data, cfg)
    fp_acc = evaluate(fp, data.test)
    seed_everything(seed + 1)
    x0 = data.train.tensors[0][:64]
    qat = prepare_qat(fp, weight_bits=bits, act_bits=bits)
    qat.train(calib == "train")
    with torch.no_grad():
        qat(x0)
    qat.train()
    scales = _act_scales(qat)
    opt = torch.optim.SGD([{"params": [p for p in qat.parameters() if p.dim() > 1], "weight_decay": 5e-5},
                           {"params": [p for p in qat.parameters() if p.dim() <= 1], "weight_decay": 0.0}],
                          lr=0.01, momentum=0.9)
    spe = math.ceil(len(data.train) / 64)
    total = qat_epochs * spe
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    bn_sched = BNSchedule.from_epochs(freeze_epochs, spe)
    xs, ys = data.train.tensors
    clean = [(xs[i:i + 64], ys[i:i + 64]) for i in range(0, 64 * reest_batches, 64)]
    hist = []
    step = 0
    for epoch in range(qat_epochs):
        correct = n = 0
        for x, y in build_loader(data.train, 64, seed=seed, epoch=epoch):
            bn_sched(qat, step)
            out = qat(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            correct += int((out.argmax(-1) == y).sum())
            n += len(y)
        if reest:
            reestimate_bn_stats(qat, clean, reest_batches)
        hist.append({"epoch": epoch + 1, "train_acc": correct / n, "test_eval": evaluate(qat, data.test),
                     "test_batch_stats": _batch_stat_acc(qat, data.test), "bn_lag": _bn_lag(qat, clean),
                     "act_step_change": statistics.fmean(abs(math.log(v / scales[k])) for k, v in _act_scales(qat).items())})
    return {"seed": seed, "variant": variant, "fp_acc": fp_acc, "act_scales_after_calib": scales, "history": hist}


def calibration_diagnostics(seed: int, bits: int = 2, fp_epochs: int = 15) -> dict[str, Any]:
    """Activation step sizes after an eval- vs a train-mode calibration forward, and how far the
    quantized convs' batch std is from the FP running std (why the two differ)."""
    cfg = load_config({"seed": seed, "model": {"name": "resnet"}, "fp": {"epochs": fp_epochs},
                       "output_dir": None, "progress": False})
    data = load_data(cfg)
    fp = build_fp_model(cfg, data)
    train_fp(fp, data, cfg)
    x0 = data.train.tensors[0][:64]
    out: dict[str, Any] = {"seed": seed}
    for mode in ("eval", "train"):
        q = prepare_qat(fp, weight_bits=bits, act_bits=bits)
        q.train(mode == "train")
        ratios: list[float] = []

        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            z = args[0]
            bstd = z.transpose(0, 1).reshape(z.shape[1], -1).std(1)
            ratios.extend((bstd / torch.sqrt(mod.running_var + mod.eps)).tolist())

        hs = [m.register_forward_pre_hook(hook) for m in q.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            q(x0)
        for h in hs:
            h.remove()
        out[mode] = {"act_scales": _act_scales(q), "batch_std_over_running_std": ratios}
    r = out["eval"]["batch_std_over_running_std"]
    out["std_ratio_median"] = statistics.median(r)
    out["std_ratio_q10_q90"] = [sorted(r)[len(r) // 10], sorted(r)[9 * len(r) // 10]]
    ev, tr = out["eval"]["act_scales"], out["train"]["act_scales"]
    out["act_scale_ratio_eval_over_train"] = {k: ev[k] / tr[k] for k in ev}
    return out


def fold_feedback(seed: int, bits: int = 2, epochs: int = 3, fp_epochs: int = 15) -> list[dict[str, Any]]:
    """Eval-calibrated W2A2 run for `epochs`, then training-mode forwards with the weights fixed (lr 0):
    does the running-std gap close by itself, and does it when the weight grid follows the running std?"""
    cfg = load_config({"seed": seed, "model": {"name": "resnet"}, "fp": {"epochs": fp_epochs},
                       "output_dir": None, "progress": False})
    data = load_data(cfg)
    fp = build_fp_model(cfg, data)
    train_fp(fp, data, cfg)
    seed_everything(seed + 1)
    q = prepare_qat(fp, weight_bits=bits, act_bits=bits)
    q.eval()
    with torch.no_grad():
        q(data.train.tensors[0][:64])
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    for ep in range(epochs):
        for x, y in build_loader(data.train, 64, seed=seed, epoch=ep):
            loss = F.cross_entropy(q(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    xs, ys = data.train.tensors
    clean = [(xs[i:i + 64], ys[i:i + 64]) for i in range(0, 640, 64)]
    recs = [{"forwards": 0, "keep_grid": None, "bn_lag": _bn_lag(q, clean), "test_eval": evaluate(q, data.test)}]
    batches = [b for e in range(10, 14) for b in build_loader(data.train, 64, seed=seed, epoch=e)][:88]
    for keep in (False, True):
        m = copy.deepcopy(q)
        fused = [f for f in m.modules() if hasattr(f, "weight_fake_quant") and hasattr(f, "bn")]
        with torch.no_grad():
            for i, (x, _) in enumerate(batches, 1):
                old = [torch.sqrt(f.bn.running_var + f.bn.eps).clone() for f in fused]
                m(x)
                if keep:
                    for f, o in zip(fused, old):
                        f.weight_fake_quant.scale.mul_(o / torch.sqrt(f.bn.running_var + f.bn.eps))
                if i in (22, 44, 88):
                    recs.append({"forwards": i, "keep_grid": keep, "bn_lag": _bn_lag(m, clean),
                                 "test_eval": evaluate(m, data.test)})
    return recs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qat_plugins.bench.bn_study")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--qat-epochs", type=int, default=6)
    p.add_argument("--json", help="write all records to this file")
    p.add_argument("--diagnostics", action="store_true", help="only the calibration diagnostics")
    p.add_argument("--fold-feedback", action="store_true",
                   help="only the running-std feedback experiment (weights fixed, grid fixed or following)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    recs: list[dict[str, Any]] = []
    if a.fold_feedback:
        for s in seeds:
            for r in fold_feedback(s, a.bits):
                recs.append({"seed": s, **r})
                print(f"seed {s}: after {r['forwards']:3d} lr-0 train forwards (weight grid follows sigma: "
                      f"{r['keep_grid']}): BN gap median {r['bn_lag'][0]:.3f}, channels >25% off "
                      f"{r['bn_lag'][1]:.2f}; eval {100 * r['test_eval']:.1f}%", flush=True)
    elif a.diagnostics:
        for s in seeds:
            d = calibration_diagnostics(s, a.bits)
            recs.append(d)
            print(f"seed {s}: quantized-conv batch std / FP running std: median {d['std_ratio_median']:.3f}, "
                  f"10-90% {d['std_ratio_q10_q90'][0]:.3f}..{d['std_ratio_q10_q90'][1]:.3f}; act step eval/train "
                  + " ".join(f"{k}:{v:.2f}" for k, v in d["act_scale_ratio_eval_over_train"].items()), flush=True)
    else:
        for v in a.variants.split(","):
            for s in seeds:
                t0 = time.perf_counter()
                r = run_one(s, v, a.bits, a.qat_epochs)
                recs.append(r)
                h = r["history"]
                print(f"{v:22s} seed {s}: eval " + " ".join(f"{100 * e['test_eval']:5.1f}" for e in h)
                      + " | batch-stat " + " ".join(f"{100 * e['test_batch_stats']:5.1f}" for e in h)
                      + " | lag med/frac>25% " + " ".join(f"{e['bn_lag'][0]:.2f}/{e['bn_lag'][1]:.2f}" for e in h)
                      + " | act-step drift " + " ".join(f"{e['act_step_change']:.2f}" for e in h)
                      + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
