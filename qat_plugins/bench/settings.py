"""Benchmark settings: presets (full / quick / tiny), the method columns and the training configs.

Every QAT row of a dataset uses the same FP model (per seed), seeds, epochs, optimizer, schedule and
inputs; only the method (regularizers, or NNCF's quantizers) changes. QAT inputs are not augmented
(``qat.augment: false``) for every method, because the consistency regularizer augments them itself
and collapsed on doubly augmented inputs; FP pre-training uses the default augmentation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BenchSettings", "METHODS", "preset", "regularizer_specs", "train_config", "data_spec",
           "fp_cache_key", "DATASETS", "COMBO_DEFAULT"]

DATASETS = ("fashion-mnist", "digits")
# method ids in column order (labels: qat_plugins.bench.report.method_label); "nncf8" is NNCF at W8A8
# (one run per dataset / model / seed, shown in every row), "nncf" NNCF at the row's bits
METHODS = ("lsq", "cr", "fpq", "br", "combo", "nncf8", "nncf")
COMBO_DEFAULT = ("cr", "fpq", "br")

_BR_BLOCKS = {"resnet": ["layer1", "layer2", "layer3"], "cnn": ["conv1", "conv2"]}


@dataclass
class BenchSettings:
    """What one ``bench`` invocation runs (serialised into ``results.json``)."""

    mode: str = "full"                      # full | quick | tiny
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    models: list[str] = field(default_factory=lambda: ["resnet"])
    seeds: int = 2
    bits: list[int] = field(default_factory=lambda: [4, 3, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    combo: list[str] = field(default_factory=lambda: list(COMBO_DEFAULT))
    width: int = 16
    # Fashion-MNIST: the first `fashion_train` training images, full 10k test set, 2x2 average pool
    fashion_train: int = 10000
    fashion_pool: int = 2
    digits_limit: int | None = None
    batch_size: dict[str, int] = field(default_factory=lambda: {"fashion-mnist": 128, "digits": 64})
    fp_epochs: dict[str, int] = field(default_factory=lambda: {"fashion-mnist": 8, "digits": 15})
    qat_epochs: dict[str, int] = field(default_factory=lambda: {"fashion-mnist": 2, "digits": 6})
    fp_lr: float = 0.01
    qat_lr: float = 0.01
    deploy_bits: list[int] = field(default_factory=lambda: [4])
    deploy_seeds: int = 1                   # export / ORT-validate the models of the first N seeds
    timing_steps: int = 15                  # measured steps per method in the interleaved micro-benchmark
    timing_warmup: int = 3
    memory_steps: int = 5
    workers: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchSettings":
        return cls(**d)


def preset(mode: str) -> BenchSettings:
    """``full`` (the BENCHMARKS.md run), ``quick`` (digits, 1 seed, W4A4 + W2A2, < 3 min) or ``tiny``
    (the test suite's end-to-end check: a few steps on 256 digits)."""
    if mode == "full":
        return BenchSettings()
    if mode == "quick":
        return BenchSettings(mode="quick", datasets=["digits"], seeds=1, bits=[4, 2],
                             fp_epochs={"fashion-mnist": 2, "digits": 6}, qat_epochs={"fashion-mnist": 1, "digits": 2},
                             timing_steps=6, timing_warmup=2, memory_steps=3)
    if mode == "tiny":
        return BenchSettings(mode="tiny", datasets=["digits"], seeds=1, bits=[4, 2], width=8, digits_limit=256,
                             fashion_train=512, fp_epochs={"fashion-mnist": 1, "digits": 2},
                             qat_epochs={"fashion-mnist": 1, "digits": 1}, timing_steps=2, timing_warmup=1,
                             memory_steps=2, workers=1)
    raise ValueError(f"unknown benchmark mode {mode!r}; choose full, quick or tiny")


def regularizer_specs(method: str, model: str, seed: int, combo: list[str]) -> list[dict[str, Any]]:
    """The regularizer entries of a method (defaults of each regularizer; BR gets the model's blocks)."""
    def one(name: str) -> dict[str, Any]:
        if name == "br":
            return {"name": "br", "blocks": list(_BR_BLOCKS[model]), "seed": seed}
        return {"name": name}

    if method in ("lsq", "nncf", "nncf8"):
        return []
    if method == "combo":
        return [one(n) for n in combo]
    if method in ("cr", "fpq", "br"):
        return [one(method)]
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def train_config(s: BenchSettings, dataset: str, model: str, seed: int, bits: int = 4,
                 regularizers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The TrainConfig dict of one run (same optimizer / schedule / epochs for every method)."""
    return {
        "seed": seed,
        "data": {"name": dataset, "batch_size": s.batch_size[dataset],
                 "limit_train": s.fashion_train if dataset == "fashion-mnist" else s.digits_limit},
        "model": {"name": model, "width": s.width},
        "fp": {"epochs": s.fp_epochs[dataset], "lr": s.fp_lr, "optimizer": "adam", "weight_decay": 0.0,
               "augment": True},
        "qat": {"weight_bits": bits, "act_bits": bits, "mode": "eager", "epochs": s.qat_epochs[dataset],
                "lr": s.qat_lr, "momentum": 0.9, "weight_decay": 5e-5, "schedule": "cosine",
                "keep_first_last_8bit": True, "per_channel": True, "learnable": True, "augment": False},
        "regularizers": regularizers or [],
        "output_dir": None, "progress": False, "num_threads": 1, "nan_policy": "raise",
    }


def data_spec(s: BenchSettings, dataset: str) -> dict[str, Any]:
    """How the benchmark builds a dataset (part of the FP cache key)."""
    if dataset == "fashion-mnist":
        return {"name": dataset, "limit_train": s.fashion_train, "avg_pool": s.fashion_pool}
    return {"name": dataset, "limit_train": s.digits_limit, "size": 8}


def fp_cache_key(s: BenchSettings, dataset: str, model: str, seed: int) -> str:
    """Hash of everything the FP model depends on: the FP-relevant config fields and the data spec."""
    cfg = train_config(s, dataset, model, seed)
    relevant = {"seed": cfg["seed"], "data": cfg["data"], "model": cfg["model"], "fp": cfg["fp"],
                "data_spec": data_spec(s, dataset), "format": 1}
    blob = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
