"""Shared by the regularizer test modules: model names, blocks, and helpers for fresh model pairs and
for comparing hooks, state and flags (fixtures ``fps`` / ``qats``: conftest.py)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import qat_plugins as qp
from qat_plugins.regularizers import Regularizer

KINDS = ["cr", "fpq", "br"]
NAMES = ["resnet", "cnn"]
MODES = ["eager", "fx"]
BLOCKS = {"resnet": ["layer1", "layer2", "layer3"], "cnn": ["conv2", "conv3"]}
# the FP module that reads each block's output (forward guidance check)
NEXT = {"resnet": {"layer1": "layer2", "layer2": "layer3", "layer3": "pool"},
        "cnn": {"conv2": "conv3", "conv3": "pool"}}


def make(kind: str, name: str, **kw) -> Regularizer:
    if kind == "cr":
        return qp.ConsistencyRegularizer(**kw)
    if kind == "fpq":
        return qp.FeaturePerturbationRegularizer(**kw)
    return qp.BlockReplacementRegularizer(BLOCKS[name], **kw)


def pair(qats, fps, name, mode):
    """Fresh deep copies of the QAT model and of its FP model (train mode, one frozen param)."""
    q = copy.deepcopy(qats[name, mode]).train()
    fp = copy.deepcopy(fps[name]).train()
    next(fp.parameters()).requires_grad_(False)  # mixed flags: restored exactly on detach
    return q, fp


def hooks(model: nn.Module) -> dict[str, tuple]:
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._forward_hooks_with_kwargs))
            for n, m in model.named_modules()}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def layouts(model: nn.Module) -> list[tuple[int, ...]]:
    """Strides of every parameter and buffer (memory layout, e.g. channels_last)."""
    return [t.stride() for t in [*model.parameters(), *model.buffers()]]


def flags(model: nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


class Counter:
    """Counts forward calls of a model (and records its training flag at each call)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[bool] = []
        self.handle = model.register_forward_pre_hook(lambda m, a: self.calls.append(m.training))

    def remove(self) -> None:
        self.handle.remove()
