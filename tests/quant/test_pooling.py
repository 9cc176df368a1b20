"""FX and PT2E give average pooling's output a quantizer of its own (not the input's shared grid)."""

from __future__ import annotations

import warnings

import pytest
import torch

import qat_plugins as qp
from qat_plugins.models import MobileNetV3


@pytest.mark.parametrize("mode", ["fx", "pt2e"])
def test_average_pool_output_has_its_own_quantizer(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qp.prepare_qat(MobileNetV3(num_classes=10, in_channels=3).eval(), weight_bits=4, act_bits=4,
                           mode=mode, example_inputs=(x,))
    pools = [n for n in q.graph.nodes if "avg_pool" in str(n.target) or "avgpool" in str(n.target)]
    assert len(pools) >= 2  # the squeeze-excitation pools and the head's
    mods = dict(q.named_modules(remove_duplicate=False))
    for node in pools:
        before, after = node.args[0], next(iter(node.users))
        assert before.op == after.op == "call_module"
        assert mods[str(before.target)] is not mods[str(after.target)], node.name
