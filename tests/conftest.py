"""Shared fixtures and the suite's rules, enforced (see tests/README.md).

* single-threaded torch (fast and deterministic on 2 cores);
* every test body and every fixture starts from a global RNG state derived from its own name, so no
  result depends on which tests ran before (tests still use explicit generators where they can);
* the shared session models (``fp_resnet``, ``fp_cnn``) and ``digits`` must come out of every test
  exactly as they went in (weights, buffers, mode, ``requires_grad`` flags, hooks): a test that
  trains, attaches to or switches the mode of one works on a ``copy.deepcopy``. A violation fails
  the test that did it and the fixture is restored, so later tests are not affected.
"""

from __future__ import annotations

import random
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)


def seed_everything(key: str) -> int:
    """Seed torch, numpy and ``random`` from a stable hash of ``key``; returns the seed."""
    seed = zlib.crc32(key.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    # a fixture's global RNG draws do not depend on which test happened to create it first
    seed_everything(f"fixture:{fixturedef.baseid}:{fixturedef.argname}")
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    seed_everything(f"test:{item.nodeid}")
    return (yield)


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
    opt.zero_grad(set_to_none=True)  # no stale .grad on a shared model
    return model.eval()


@pytest.fixture(scope="session")
def fp_resnet(digits):
    """SmallResNet (width 8) trained on digits, eval mode. Shared: never modify it, deep-copy it."""
    from qat_plugins.models import SmallResNet

    torch.manual_seed(0)
    return train_fp(SmallResNet(width=8), digits)


@pytest.fixture(scope="session")
def fp_cnn(digits):
    """SmallCNN (width 8) trained on digits, eval mode. Shared: never modify it, deep-copy it."""
    from qat_plugins.models import SmallCNN

    torch.manual_seed(0)
    return train_fp(SmallCNN(width=8), digits)


# --- shared-fixture guard -------------------------------------------------------------------------
def _module_snapshot(m: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()},
        "training": {n: s.training for n, s in m.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in m.named_parameters()},
        "hooks": {n: (len(s._forward_hooks), len(s._forward_pre_hooks), len(s._backward_hooks))
                  for n, s in m.named_modules()},
        "grads": {n: None if p.grad is None else p.grad.detach().clone() for n, p in m.named_parameters()},
        "keys": sorted(m.state_dict()),
        "modules": sorted(n for n, _ in m.named_modules()),
    }


def _module_changes(m: torch.nn.Module, snap: dict) -> list[str]:
    now = _module_snapshot(m)
    changes = [what for what in ("training", "requires_grad", "hooks", "keys", "modules") if now[what] != snap[what]]
    if any((g is None) != (snap["grads"].get(n) is None) or (g is not None and not torch.equal(g, snap["grads"][n]))
           for n, g in now["grads"].items()):
        changes.append("grads")
    if now["keys"] == snap["keys"]:
        changed = [k for k in snap["keys"] if not torch.equal(now["state"][k], snap["state"][k])]
        if changed:
            changes.append(f"values of {changed[:3]}")
    return changes


def _restore(m: torch.nn.Module, snap: dict) -> None:
    """Best effort: put a shared model back as it was so that one bad test does not spoil the rest."""
    with torch.no_grad():
        for k, v in m.state_dict(keep_vars=True).items():
            if k in snap["state"] and v.shape == snap["state"][k].shape:
                v.copy_(snap["state"][k])
    for n, s in m.named_modules():
        s.training = snap["training"].get(n, s.training)
    for n, p in m.named_parameters():
        p.requires_grad_(snap["requires_grad"].get(n, p.requires_grad))
        p.grad = snap["grads"].get(n)


_GUARDED_MODELS = ("fp_resnet", "fp_cnn")


@pytest.fixture(autouse=True)
def _shared_fixtures_untouched(request):
    used = [n for n in _GUARDED_MODELS if n in request.fixturenames]
    models = {n: request.getfixturevalue(n) for n in used}
    snaps = {n: _module_snapshot(m) for n, m in models.items()}
    data = None
    if "digits" in request.fixturenames:
        d = request.getfixturevalue("digits")
        data = (d, [t.clone() for split in (d.train, d.test) for t in split.tensors])
    yield
    problems = []
    for n, m in models.items():
        changes = _module_changes(m, snaps[n])
        if changes:
            problems.append(f"{n}: {', '.join(changes)}")
            _restore(m, snaps[n])
    if data is not None:
        d, saved = data
        now = [t for split in (d.train, d.test) for t in split.tensors]
        if len(now) != len(saved) or not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(now, saved)):
            problems.append("digits: tensors changed")
    if problems:
        pytest.fail("a test modified a shared session fixture (work on a copy.deepcopy): " + "; ".join(problems))
