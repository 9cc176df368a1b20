"""Fixtures of the regularizer tests: the trained FP reference models and their W2A2 QAT copies."""

from __future__ import annotations

import pytest
import torch

import qat_plugins as qp
from reg_models import MODES, NAMES


@pytest.fixture(scope="module")
def fps(fp_resnet, fp_cnn):
    return {"resnet": fp_resnet, "cnn": fp_cnn}


@pytest.fixture(scope="module")
def qats(fps, batch):
    """(name, mode) -> W2A2 QAT model prepared from the trained FP model, quantizers initialised."""
    x, _ = batch
    out = {}
    for name in NAMES:
        for mode in MODES:
            torch.manual_seed(0)
            q = qp.prepare_qat(fps[name], weight_bits=2, act_bits=2, mode=mode, example_inputs=(x,))
            q(x)
            out[name, mode] = q
    return out
