"""Benchmark settings: presets (full / quick / tiny), the method columns and the training configs.

Every QAT column of a (dataset, model, seed) starts from the same FP model and sees the same data
order (the run's seed); only the method (regularizers, or NNCF's quantizers) changes, so each
method is compared with LSQ seed by seed (paired differences). QAT inputs are not augmented for any
method (the consistency regularizer augments them itself); FP pre-training uses the default
augmentation. BatchNorm statistics are re-estimated on 10 clean batches before every evaluation
(the trainer's default, docs/bn.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BenchSettings", "METHODS", "DEFAULT_METHODS", "MODELS", "preset", "regularizer_specs", "train_config",
           "data_spec", "fp_cache_key", "DATASETS", "COMBO_DEFAULT", "seeds_for", "fp_seed", "fp_seeds"]

DATASETS = ("fashion-mnist", "digits")
MODELS = ("resnet20", "resnet", "cnn")
# method ids in column order (labels: qat_plugins.bench.report.method_label); "nncf" is NNCF at the row's
# widths, "nncf8" NNCF at W8A8 (one run per dataset / model / seed; not in the default columns)
METHODS = ("lsq", "kd", "cr", "fpq", "br", "combo", "nncf", "nncf8")
DEFAULT_METHODS = ("lsq", "kd", "cr", "fpq", "br", "combo", "nncf")
COMBO_DEFAULT = ("cr", "fpq", "br")

_BR_BLOCKS = {"resnet20": ["layer1", "layer2", "layer3"], "resnet": ["layer1", "layer2", "layer3"],
              "cnn": ["conv1", "conv2"]}


@dataclass
class BenchSettings:
    """What one ``bench`` invocation runs (serialised into ``results.json``)."""

    mode: str = "full"                      # full | quick | tiny
    datasets: list[str] = field(default_factory=lambda: ["fashion-mnist"])
    models: list[str] = field(default_factory=lambda: ["resnet20", "resnet"])
    bits: list[int] = field(default_factory=lambda: [2, 4])
    # seeds per row (bits -> number of seeds 0..N-1); rows not listed use `default_seeds`
    seeds: dict[int, int] = field(default_factory=lambda: {2: 5, 4: 3})
    default_seeds: int = 3
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    combo: list[str] = field(default_factory=lambda: list(COMBO_DEFAULT))
    width: int = 16
    # Fashion-MNIST: the first `fashion_train` training images, full 10k test set, `fashion_pool` x
    # `fashion_pool` average pooling (2: 28x28 -> 14x14, a quarter of the step cost)
    fashion_train: int = 20000
    fashion_pool: int = 2
    digits_limit: int | None = None
    batch_size: dict[str, int] = field(default_factory=lambda: {"fashion-mnist": 128, "digits": 64})
    # Fashion FP 15 epochs: 88.3 % (8 epochs: 87.0 %); QAT 3 epochs: LSQ W2A2 seed spread 0.6 points (pilot, docs)
    fp_epochs: dict[str, int] = field(default_factory=lambda: {"fashion-mnist": 15, "digits": 15})
    qat_epochs: dict[str, int] = field(default_factory=lambda: {"fashion-mnist": 3, "digits": 6})
    fp_lr: float = 0.01
    # one FP model (seed 0's) for every seed: the seeds then vary the QAT run only (data order, calibration
    # batch, regularizer randomness), as when fine-tuning one pretrained checkpoint (the papers' setting).
    # The full preset's choice: with per-seed FP models ResNet-20's LSQ W2A2 spread is 2.3 points, with
    # one 0.5 (BENCHMARKS.md)
    shared_fp: bool = False
    qat_lr: float = 0.01
    bn_reestimate_batches: int = 10
    bn_freeze_after_epochs: int | None = None
    deploy_bits: list[int] = field(default_factory=lambda: [4])
    deploy_seeds: int = 1                   # export / ORT-validate the models of the first N seeds
    timing_steps: int = 15                  # measured steps per method in the interleaved micro-benchmark
    timing_warmup: int = 3
    memory_steps: int = 5
    workers: int = 2

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"] = {str(k): v for k, v in self.seeds.items()}  # JSON object keys are strings
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchSettings":
        d = dict(d)
        if isinstance(d.get("seeds"), dict):
            d["seeds"] = {int(k): int(v) for k, v in d["seeds"].items()}
        return cls(**d)


def seeds_for(s: BenchSettings, bits: int) -> int:
    """Number of seeds of the W``bits``A``bits`` row."""
    return int(s.seeds.get(bits, s.default_seeds))


def fp_seed(s: BenchSettings, seed: int) -> int:
    """The seed of the FP model that the QAT runs of ``seed`` start from (0 with ``shared_fp``)."""
    return 0 if s.shared_fp else seed


def fp_seeds(s: BenchSettings) -> list[int]:
    """The seeds of the FP models a run needs."""
    return sorted({fp_seed(s, k) for k in range(max(seeds_for(s, b) for b in s.bits))})


def preset(mode: str) -> BenchSettings:
    """``full`` (the BENCHMARKS.md run: Fashion-MNIST 14x14, ResNet-20 + SmallResNet, W2A2 x 5 seeds,
    W4A4 x 3 seeds, every column, one FP model per architecture; about 2 h on 2 cores), ``quick`` (digits,
    SmallResNet, 1 seed, W4A4 + W2A2, a few minutes) or ``tiny`` (the test suite's end-to-end check: a few steps on 256 digits)."""
    if mode == "full":
        return BenchSettings(shared_fp=True)
    if mode == "quick":
        return BenchSettings(mode="quick", datasets=["digits"], models=["resnet"], bits=[2, 4], seeds={},
                             default_seeds=1, fp_epochs={"fashion-mnist": 2, "digits": 6},
                             qat_epochs={"fashion-mnist": 1, "digits": 2}, timing_steps=6, timing_warmup=2,
                             memory_steps=3)
    if mode == "tiny":
        return BenchSettings(mode="tiny", datasets=["digits"], models=["resnet"], bits=[2, 4], seeds={2: 2},
                             default_seeds=1, width=8, digits_limit=256, fashion_train=512,
                             fp_epochs={"fashion-mnist": 1, "digits": 2}, qat_epochs={"fashion-mnist": 1, "digits": 2},
                             bn_reestimate_batches=2, timing_steps=2, timing_warmup=1, memory_steps=2, workers=1)
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
    if method in ("kd", "cr", "fpq", "br"):
        return [one(method)]
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def train_config(s: BenchSettings, dataset: str, model: str, seed: int, bits: int = 4,
                 regularizers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The TrainConfig dict of one run (same optimizer / schedule / epochs / BN handling for every method)."""
    return {
        "seed": seed,
        "data": {"name": dataset, "batch_size": s.batch_size[dataset],
                 "limit_train": s.fashion_train if dataset == "fashion-mnist" else s.digits_limit},
        "model": {"name": model, "width": s.width},
        "fp": {"epochs": s.fp_epochs[dataset], "lr": s.fp_lr, "optimizer": "adam", "weight_decay": 0.0,
               "augment": True},
        "qat": {"weight_bits": bits, "act_bits": bits, "mode": "eager", "epochs": s.qat_epochs[dataset],
                "lr": s.qat_lr, "momentum": 0.9, "weight_decay": 5e-5, "schedule": "cosine",
                "keep_first_last_8bit": True, "per_channel": True, "learnable": True, "augment": False,
                "bn": {"freeze_after_epochs": s.bn_freeze_after_epochs, "reestimate_batches": s.bn_reestimate_batches}},
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
