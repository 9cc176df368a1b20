"""Shared fixtures: single-threaded torch (fast and deterministic on 2 cores), digits, a trained FP model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    """torch.ao's deprecation and quantized-tensor notices are noise in test output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def batch(digits):
    """The first 64 training digits and labels."""
    x, y = digits.train.tensors
    return x[:64], y[:64]


@pytest.fixture(scope="session")
def digits():
    from qat_plugins.data import load_digits_split

    return load_digits_split()


def train_fp(model: torch.nn.Module, data, steps: int = 200, seed: int = 0) -> torch.nn.Module:
    """A few hundred Adam steps on digits with the default augmentation (about 2 s)."""
    from qat_plugins.data import default_augment

    torch.manual_seed(seed)
    x, y = data.train.tensors
    aug = default_augment()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(aug(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def fp_resnet(digits):
    from qat_plugins.models import SmallResNet

    torch.manual_seed(0)
    return train_fp(SmallResNet(width=8), digits)


@pytest.fixture(scope="session")
def fp_cnn(digits):
    from qat_plugins.models import SmallCNN

    torch.manual_seed(0)
    return train_fp(SmallCNN(width=8), digits)
