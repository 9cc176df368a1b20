"""Datasets and batched tensor augmentations (CPU, no torchvision).

* :func:`load_digits_split` -- scikit-learn's embedded 8x8 digits, a fixed stratified split.
* :func:`read_idx` / :func:`load_idx_dataset` -- MNIST / Fashion-MNIST idx files (``.gz`` or raw),
  e.g. the Debian ``dataset-fashion-mnist`` layout under ``/usr/share/datasets/fashion-mnist``.
* :class:`RandomShift`, :class:`RandomFlip`, :class:`GaussianNoise`, :class:`Compose` --
  augmentations on batched ``(N, C, H, W)`` tensors with an optional ``torch.Generator``.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

__all__ = [
    "DataSplit", "load_digits_split", "read_idx", "load_idx_dataset", "load_fashion_mnist",
    "FASHION_MNIST_DIR", "RandomShift", "RandomFlip", "GaussianNoise", "Compose", "default_augment",
    "load_dataset", "iterate_batches",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class DataSplit:
    """Train and test tensors: images ``(N, 1, H, W)`` float32 standardised, labels int64."""

    train: TensorDataset
    test: TensorDataset
    num_classes: int
    name: str

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.tensors[0].shape[1:])


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(), train.std().clamp(min=1e-6)
    return (train - mean) / std, (test - mean) / std


def load_digits_split(*, test_fraction: float = 0.25, seed: int = 0, size: int = 8) -> DataSplit:
    """scikit-learn's 1,797 8x8 digits, split with a fixed seed (stratified), standardised.

    ``size`` > 8 upsamples bilinearly (e.g. 16 for deeper models).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    xtr_t, xte_t = torch.from_numpy(xtr)[:, None], torch.from_numpy(xte)[:, None]
    if size != 8:
        xtr_t = F.interpolate(xtr_t, size=(size, size), mode="bilinear", align_corners=False)
        xte_t = F.interpolate(xte_t, size=(size, size), mode="bilinear", align_corners=False)
    xtr_t, xte_t = _standardise(xtr_t, xte_t)
    return DataSplit(TensorDataset(xtr_t, torch.from_numpy(ytr)), TensorDataset(xte_t, torch.from_numpy(yte)),
                     10, "digits")


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one idx file (optionally gzip-compressed) into a numpy array.

    Raises ``ValueError`` naming the file when it is truncated or not an idx file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:  # type: ignore[operator]
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read idx file {path}: {e}; re-install or re-download it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number); expected MNIST-style idx data")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated (header); re-install or re-download it")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    n = int(np.prod(shape)) if shape else 0
    body = raw[4 + 4 * ndim:]
    if len(body) != n * dtype.itemsize:
        raise ValueError(f"{path} is truncated or corrupt: expected {n * dtype.itemsize} data bytes for "
                         f"shape {shape}, found {len(body)}; re-install or re-download it")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} has no {stem}[.gz]")


def load_idx_dataset(directory: str | os.PathLike[str], *, name: str = "idx", limit_train: int | None = None,
                     num_classes: int = 10) -> DataSplit:
    """MNIST-layout idx files (``train-images-idx3-ubyte[.gz]`` etc.) from ``directory``.

    Labels must be class indices in ``[0, num_classes)`` (default 10, the MNIST layout: *project choice*);
    images a 3-d array of one size in both splits. Errors name the file.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"dataset directory {d} does not exist")
    try:
        files = {k: _find(d, k) for k in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; expected MNIST-layout idx files in {d}") from None
    xtr, ytr = read_idx(files["train-images-idx3-ubyte"]), read_idx(files["train-labels-idx1-ubyte"])
    xte, yte = read_idx(files["t10k-images-idx3-ubyte"]), read_idx(files["t10k-labels-idx1-ubyte"])
    for key, arr in (("train-images-idx3-ubyte", xtr), ("t10k-images-idx3-ubyte", xte)):
        if arr.ndim != 3:
            raise ValueError(f"{files[key]}: images must be a 3-d idx array (count, height, width), got shape "
                             f"{arr.shape}")
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"{d}: train images are {xtr.shape[1]}x{xtr.shape[2]} but test images "
                         f"{xte.shape[1]}x{xte.shape[2]}; both splits must have one image size")
    if min(xtr.shape[1:]) < 4:
        raise ValueError(f"{files['train-images-idx3-ubyte']}: images of {xtr.shape[1]}x{xtr.shape[2]} pixels are "
                         "too small (at least 4x4)")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError(f"{d}: image and label counts differ; the files are inconsistent")
    if len(xtr) == 0 or len(xte) == 0:
        raise ValueError(f"{d}: the idx files hold no samples ({len(xtr)} train, {len(xte)} test images); "
                         "re-install or re-download them")
    for key, arr in (("train-images-idx3-ubyte", xtr), ("t10k-images-idx3-ubyte", xte)):
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"{files[key]}: images contain NaN/inf values")
    for key, lab in (("train-labels-idx1-ubyte", ytr), ("t10k-labels-idx1-ubyte", yte)):
        if lab.ndim != 1 or lab.dtype.kind not in "iu":
            raise ValueError(f"{files[key]}: labels must be a 1-d integer idx array, got shape {lab.shape} of "
                             f"{lab.dtype}")
        bad = (lab < 0) | (lab >= num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{files[key]}: label {int(lab[i])} at index {i} is outside [0, {num_classes}); labels "
                             f"must be class indices 0..{num_classes - 1}" +
                             (" (set data.num_classes for more classes)" if lab[i] >= num_classes else ""))
    if limit_train is not None:
        xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    xtr_t = torch.from_numpy(xtr.astype(np.float32) / 255.0)[:, None]
    xte_t = torch.from_numpy(xte.astype(np.float32) / 255.0)[:, None]
    xtr_t, xte_t = _standardise(xtr_t, xte_t)
    return DataSplit(TensorDataset(xtr_t, torch.from_numpy(ytr.astype(np.int64))),
                     TensorDataset(xte_t, torch.from_numpy(yte.astype(np.int64))), num_classes, name)


def load_fashion_mnist(directory: str | os.PathLike[str] = FASHION_MNIST_DIR, **kw: object) -> DataSplit:
    """Fashion-MNIST from the Debian package layout; says how to install it when missing."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {directory}; install it with "
            "`apt-get update && apt-get install -y dataset-fashion-mnist` or pass its directory")
    return load_idx_dataset(directory, name="fashion-mnist", **kw)  # type: ignore[arg-type]


def load_dataset(name: str, *, data_dir: str | None = None, size: int = 8, num_classes: int | None = None) -> DataSplit:
    """``"digits"`` (embedded), ``"fashion-mnist"`` or ``"idx"`` (needs ``data_dir``; ``num_classes`` default 10)."""
    if name == "digits":
        return load_digits_split(size=size)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
    if name == "idx":
        if not data_dir:
            raise ValueError("dataset 'idx' needs data_dir")
        return load_idx_dataset(data_dir, num_classes=num_classes or 10)
    raise ValueError(f"unknown dataset {name!r}; choose 'digits', 'fashion-mnist' or 'idx'")


# --- augmentations on batches -----------------------------------------------------------------
Augment = Callable[[torch.Tensor], torch.Tensor]


class RandomShift:
    """Random crop after edge padding: shifts each image by up to ``pad`` pixels in x and y."""

    def __init__(self, pad: int = 1, generator: torch.Generator | None = None) -> None:
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.pad, self.generator = pad, generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad == 0:
            return x
        n, _, h, w = x.shape
        p = self.pad
        xp = F.pad(x, (p, p, p, p), mode="replicate")  # background, not a zero border (data are standardised)
        dy = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
        rows = (dy[:, None] + torch.arange(h)[None])  # (n, h)
        cols = (dx[:, None] + torch.arange(w)[None])  # (n, w)
        idx_n = torch.arange(n)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
        return out.permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"RandomShift(pad={self.pad})"


class RandomFlip:
    """Horizontal flip with probability ``p`` (only where flips keep the label)."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p, self.generator = p, generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(x.shape[0], generator=self.generator) < self.p
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p})"


class GaussianNoise:
    """Adds ``N(0, std^2)`` noise."""

    def __init__(self, std: float = 0.1, generator: torch.Generator | None = None) -> None:
        self.std, self.generator = std, generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn(x.shape, generator=self.generator, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std})"


class Compose:
    """Apply augmentations in order."""

    def __init__(self, augments: Sequence[Augment]) -> None:
        self.augments = list(augments)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for a in self.augments:
            x = a(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.augments})"


def default_augment(generator: torch.Generator | None = None) -> Compose:
    """Default for small grayscale images: shift by up to 1 pixel, then N(0, 0.1^2) noise (no flips)."""
    return Compose([RandomShift(1, generator), GaussianNoise(0.1, generator)])


def iterate_batches(data: Any, batch_size: int = 512) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The package's one batch iterator: ``(inputs, targets)`` batches in order, without shuffling.

    ``data``: a :class:`DataSplit` (its test split), a ``TensorDataset``, an ``(inputs, targets)``
    tensor pair, a map-style ``Dataset`` (batched by a ``DataLoader``), or an iterable of ``(x, y)``
    batches such as a ``DataLoader``. One-hot / soft targets become class indices. ``TypeError`` /
    ``ValueError`` name the batch that is not an ``(inputs, targets)`` pair of matching length.
    """
    if isinstance(data, DataSplit):
        data = data.test
    if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        data = (data.tensors[0], data.tensors[1])
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data) \
            and data[0].dim() >= 1 and data[1].dim() >= 1 and data[0].shape[0] == data[1].shape[0]:
        x_all, y_all = data
        data = ((x_all[i:i + batch_size], y_all[i:i + batch_size]) for i in range(0, len(x_all), batch_size))
    elif isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of (inputs, targets) batches (a DataLoader or a list) "
                        f"or a torch Dataset, got {type(data).__name__}")
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[0], torch.Tensor):
            raise TypeError(f"batch {i} of data is not an (inputs, targets) pair of tensors "
                            f"(got {type(batch).__name__}); pass a DataLoader / list of (x, y) batches or a Dataset")
        x, y = batch[0], torch.as_tensor(batch[1])
        if y.dim() > 1:  # one-hot / soft targets
            y = y.argmax(dim=1)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"batch {i}: {x.shape[0]} inputs but {y.shape[0]} targets")
        yield x, y
