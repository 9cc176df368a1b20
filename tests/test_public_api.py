"""The README's training-loop snippet, as written, on digits: prepare, attach three regularizers,
train a few steps, detach, export and validate in ONNX Runtime."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import qat_plugins as qp


def test_public_names_are_exported():
    for name in qp.__all__:
        assert getattr(qp, name) is not None, name


def test_readme_loop(fp_resnet, digits, tmp_path):
    x_all, y_all = digits.train.tensors
    loader = [(x_all[i:i + 64], y_all[i:i + 64]) for i in range(0, 320, 64)]
    qat = qp.prepare_qat(fp_resnet, weight_bits=4, act_bits=4)
    before = set(qat.state_dict())
    regs = [qp.ConsistencyRegularizer(), qp.FeaturePerturbationRegularizer(),
            qp.BlockReplacementRegularizer(["layer1", "layer2", "layer3"])]
    opt = torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9)
    with qp.attach(qat, regs, fp_model=fp_resnet) as r:
        for x, y in loader:
            out = qat(x)
            loss = F.cross_entropy(out, y) + r.loss(x, y, out)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert set(r.last_losses) == {"cr", "fpq", "br"}
    assert set(qat.state_dict()) == before
    qat.eval()
    path = qp.export_onnx(qat, tmp_path / "model.onnx", (x_all[:1],), weight_format="int4")
    report = qp.validate_onnx(path, qat, digits.test).to_dict()
    assert report["top1_agreement"] >= 0.99 and report["size_bytes"] == path.stat().st_size
