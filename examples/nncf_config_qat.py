"""Config-driven NNCF QAT in Python: W4A4 on the embedded 8x8 digits with CR + FPQ + BR (about 1 min on CPU).

    pip install -e ".[nncf]"
    python examples/nncf_config_qat.py [--out DIR]

``examples/nncf_config_qat.json`` is an NNCF-style config: ``compression`` is mapped onto
``nncf.quantize`` (NNCF inserts 8-bit quantizers; qat_plugins sets them to 4 bit),
``qat_plugins.regularizers`` lists the regularizers, ``qat_plugins.train`` the run settings. This script
does the steps by hand, with your own training loop:

1. the float model, trained with the qat_plugins trainer using the config's ``qat_plugins.train``;
2. ``from_config(fp_model, CONFIG, calibration_data)`` -> the NNCF QAT model with the regularizers
   attached (``setup.regularizers``, a ``RegularizerSet``; the float model is their frozen teacher);
3. a short loop: ``loss = cross_entropy + regs.loss(x, y, out)``;
4. ``regs.detach()``, ``qat_plugins.export.export_onnx`` (NNCF models go to the exporter the NNCF
   plugin registered: the same fused QDQ graph as torch.ao models) and ``validate_onnx`` in ONNX Runtime.

The command-line equivalent (FP training, the trainer's QAT loop with checkpoints / ``--resume``,
``nncf_qat.pt``, ONNX export + ORT validation, ``results.json``)::

    qat-plugins train --config examples/nncf_config_qat.json [--output-dir DIR] [--resume]
"""

import argparse
import math
import pathlib
import tempfile

import torch
import torch.nn.functional as F

from qat_plugins.export import export_onnx, validate_onnx
from qat_plugins.integrations import nncf as qn
from qat_plugins.training import build_fp_model, evaluate, load_data, train_fp

CONFIG = pathlib.Path(__file__).with_name("nncf_config_qat.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for the ONNX file (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    # 1. data + float model, from the config's qat_plugins.train section (a TrainConfig)
    cfg = qn.train_config(CONFIG)
    data = load_data(cfg)
    fp_model = build_fp_model(cfg, data)
    train_fp(fp_model, data, cfg)
    print(f"FP test accuracy:            {evaluate(fp_model, data.test):.2%}")

    # 2. NNCF QAT model + attached regularizers (calibration: the first 300 training samples)
    setup = qn.from_config(fp_model, CONFIG, data.train)
    model, regs = setup.model, setup.regularizers
    print(f"W4A4 after nncf.quantize:    {evaluate(model, data.test):.2%}   "
          f"(regularizers: {', '.join(r.name for r in regs)})")

    # 3. your training loop: SGD + cosine schedule, the regularizers' term added to the task loss
    x_train, y_train = data.train.tensors
    bs, epochs = cfg.data.batch_size, cfg.qat.epochs
    steps = epochs * math.ceil(len(x_train) / bs)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.qat.lr, momentum=cfg.qat.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    with regs:  # detaches the regularizers (removes their hooks, unfreezes fp_model) at the end
        for epoch in range(epochs):
            sums: dict[str, float] = {}
            batches = torch.randperm(len(x_train), generator=gen).split(bs)
            for idx in batches:
                x, y = x_train[idx], y_train[idx]
                out = model(x)
                task = F.cross_entropy(out, y)
                loss = task + regs.loss(x, y, out)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                for k, v in {"loss": loss.item(), "task": task.item(), **regs.last_losses}.items():
                    sums[k] = sums.get(k, 0.0) + v / len(batches)
            print(f"epoch {epoch + 1}/{epochs}  " + "  ".join(f"{k} {v:.4f}" for k, v in sums.items())
                  + f"  test {evaluate(model, data.test):.2%}")
    model.eval()
    print(f"W4A4 + CR + FPQ + BR:        {evaluate(model, data.test):.2%}")

    # 4. ONNX (int8 QDQ; weight_format="int4" packs the 4-bit weights) and ONNX Runtime
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = pathlib.Path(args.out or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = export_onnx(model, out_dir / "nncf_w4a4_int8.onnx", data.test.tensors[0][:1], weight_format="int8")
        report = validate_onnx(path, model, data.test, num_threads=1)
        print(f"ONNX Runtime top-1 {report.onnx_top1:.2%}, agreement with PyTorch {report.top1_agreement:.2%}, "
              f"{report.size_bytes / 1024:.0f} KB" + (f" -> {path}" if args.out else ""))
    print(f"\nsame flow from the command line: qat-plugins train --config examples/{CONFIG.name}")


if __name__ == "__main__":
    main()
