"""Data side of training: the config's dataset, deterministic samplers, the one batch iterator, evaluate.

The data order of epoch ``e`` is ``randperm(n, manual_seed(seed + e))`` (the order ``DistributedSampler``
uses), so a resumed epoch can skip exactly the batches already seen. Reasoning: docs/reliability.md.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from ..data import DataSplit, iterate_batches, load_dataset
from ..taps import first_tensor, unwrap
from .config import TrainConfig, as_train_config
from .distributed import is_distributed

__all__ = ["EpochPermutationSampler", "SkipFirst", "build_loader", "steps_per_epoch", "iterate_batches",
           "first_batch", "evaluate", "load_data", "check_labels"]


class EpochPermutationSampler(Sampler[int]):
    """Indices of epoch ``e`` in the order ``randperm(n, manual_seed(seed + e))`` (or 0..n-1).

    The same order as ``DistributedSampler`` with one replica; call :meth:`set_epoch` per epoch.
    """

    def __init__(self, n: int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = int(n), shuffle, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class SkipFirst(Sampler[int]):
    """The indices of ``base`` without the first ``skip`` (resume mid-epoch)."""

    def __init__(self, base: Sampler[int], skip: int) -> None:
        self.base, self.skip = base, int(skip)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]


def build_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 skip_batches: int = 0, drop_last: bool = False,
                 generator: torch.Generator | None = None) -> DataLoader:
    """A single-process DataLoader with a deterministic per-epoch order.

    Uses ``DistributedSampler`` (this rank's shard) when ``torch.distributed`` is initialised, else
    :class:`EpochPermutationSampler`; ``skip_batches`` drops the first batches of the epoch (resume).
    ``generator`` (default: seeded with ``seed + epoch``, *project choice*) is handed to the DataLoader
    so creating its iterator does not draw from torch's global RNG. A last batch of a single sample is
    dropped (BatchNorm cannot train on it; *project choice*).
    """
    sampler: Sampler[int]
    if is_distributed():
        from torch.utils.data.distributed import DistributedSampler

        ds = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)  # type: ignore[arg-type]
        ds.set_epoch(epoch)
        sampler = ds
    else:
        es = EpochPermutationSampler(len(dataset), shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        es.set_epoch(epoch)
        sampler = es
    if len(sampler) % batch_size == 1:  # type: ignore[arg-type]
        drop_last = True  # a final batch of one sample cannot train BatchNorm: leave it out of this epoch
    if skip_batches:
        sampler = SkipFirst(sampler, skip_batches * batch_size)
    if generator is None:
        generator = torch.Generator().manual_seed(seed + epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=0,
                      generator=generator)


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    """Optimizer steps per epoch on this rank (``ceil(shard / batch_size)``)."""
    n = len(dataset)  # type: ignore[arg-type]
    if is_distributed():
        n = math.ceil(n / torch.distributed.get_world_size())
    return n // batch_size if n % batch_size == 1 else math.ceil(n / batch_size)  # as build_loader


def first_batch(data: DataSplit | Dataset, batch_size: int) -> torch.Tensor:
    """The inputs of the first ``batch_size`` training samples (calibration / tracing batch)."""
    ds = data.train if isinstance(data, DataSplit) else data
    return next(iterate_batches(ds, batch_size))[0]


def evaluate(model: nn.Module, dataset_or_loader: Any, *, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] in eval mode without gradients (the model's mode is restored).

    ``dataset_or_loader``: anything :func:`iterate_batches` takes. ``batch_size`` 512 (*project choice*).
    """
    m = unwrap(model)
    was_training = m.training
    m.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for x, y in iterate_batches(dataset_or_loader, batch_size):
                pred = first_tensor(m(x)).argmax(-1)
                correct += int((pred == y).sum())
                total += int(y.numel())
    finally:
        if was_training:
            m.train()
    if total == 0:
        raise ValueError("evaluate: the dataset is empty")
    return correct / total


def check_labels(data: DataSplit, where: str = "data") -> None:
    """Raise ``ValueError`` naming ``where`` unless every label is an integer in ``[0, num_classes)``."""
    for split, ds in (("train", data.train), ("test", data.test)):
        y = ds.tensors[1]
        if y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"{where}: {split} labels must be integers, got {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= data.num_classes):
            raise ValueError(f"{where}: {split} labels must be in [0, {data.num_classes}), found "
                             f"{int(y.min())}..{int(y.max())}")


def load_data(cfg: TrainConfig | Mapping[str, Any] | str) -> DataSplit:
    """The config's dataset (``data.limit_train`` keeps the first N training samples); labels checked."""
    cfg = as_train_config(cfg)
    d = cfg.data
    try:
        split = load_dataset(d.name, data_dir=d.data_dir, size=d.size, num_classes=d.num_classes)
    except (FileNotFoundError, ValueError) as e:
        if d.name == "digits":
            raise
        msg = str(e)
        raise type(e)(msg if msg.startswith("data.data_dir") else f"data.data_dir: {msg}") from None
    if d.limit_train is not None and d.limit_train < len(split.train):
        split = DataSplit(TensorDataset(*(t[:d.limit_train] for t in split.train.tensors)), split.test,
                          split.num_classes, split.name)
    check_labels(split, "data.data_dir" if d.name != "digits" else "data")
    return split
