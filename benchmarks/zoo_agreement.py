"""ORT vs PyTorch top-1 agreement of the zoo models (tests/export/test_zoo.py) after a longer QAT run.

FP: 600 Adam steps on digits upsampled to 32x32 RGB; QAT: 300 SGD steps, BN re-estimated, biases snapped
to ORT's int32 grid (``--no-snap``: not), int8 export, `validate_onnx` on the 450 test images.
Single-threaded, about ten minutes.

    OMP_NUM_THREADS=1 python benchmarks/zoo_agreement.py [eager,fx,pt2e,nncf] [--no-snap]
"""
import copy
import importlib.util
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

import qat_plugins as qp
from qat_plugins.data import load_digits_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _zoo_module():
    """The zoo definitions of the test suite (one source for the models and their data)."""
    spec = importlib.util.spec_from_file_location("zoo", os.path.join(ROOT, "tests", "export", "test_zoo.py"))
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    return zoo


def main(modes: list[str], snap: bool = True) -> None:
    torch.set_num_threads(1)
    zoo = _zoo_module()
    d = load_digits_split()
    (x, y), (xt, yt) = d.train.tensors, d.test.tensors
    x, xt = zoo._rgb32(x), zoo._rgb32(xt)
    for name, (build, _) in zoo.ZOO.items():
        torch.manual_seed(0)
        fp = zoo._train(build(), x, y, steps=600, lr=1e-2, seed=0)
        fp_acc = (fp(xt).argmax(1) == yt).float().mean().item()
        for mode in modes:
            for bits in (8, 4):
                q = zoo._qat(copy.deepcopy(fp), mode, bits, x)
                g = torch.Generator().manual_seed(1)
                opt = torch.optim.SGD(q.parameters(), 0.01, momentum=0.9)
                for _ in range(300):
                    i = torch.randint(0, len(x), (32,), generator=g)
                    loss = F.cross_entropy(q(x[i]), y[i])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                qp.reestimate_bn_stats(q, [(x[j:j + 64], y[j:j + 64]) for j in range(0, 640, 64)])
                if snap:
                    qp.snap_biases(q, x[:2])
                with tempfile.TemporaryDirectory() as td:
                    path = os.path.join(td, "m.onnx")
                    qp.export_onnx(q, path, (xt[:1],), weight_format="int8")
                    r = qp.validate_onnx(path, q, (xt, yt))
                print(f"| {name} | {mode} | W{bits}A{bits} | {100 * fp_acc:.2f} | {100 * r.torch_top1:.2f} | "
                      f"{100 * r.onnx_top1:.2f} | {100 * r.top1_agreement:.2f} |", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args[0].split(",") if args else ["eager", "fx", "pt2e", "nncf"], snap="--no-snap" not in sys.argv)
