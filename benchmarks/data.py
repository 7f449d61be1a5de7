"""Image-classification data for the deep-learning experiments, with no torchvision.

:func:`load_fashion_mnist` reads the IDX files of Fashion-MNIST (Xiao, Rasul and
Vollgraf 2017) as shipped by the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``; ``apt-get install
dataset-fashion-mnist``, which ``make bench`` does where it can). When the files are
missing, :func:`load_dataset` falls back to scikit-learn's 8x8 digits (upsampled to
28x28 so that the same models apply) and says so.

The IDX format: a big-endian header ``0x00 0x00 <dtype code> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the data (here uint8).
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "FASHION_MNIST_DIR",
    "Dataset",
    "load_dataset",
    "load_digits_28",
    "load_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Mean and standard deviation of the Fashion-MNIST training pixels (in [0, 1]).
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530


class Dataset(NamedTuple):
    """Train/test tensors: images ``[N, 1, 28, 28]`` (normalized floats), labels ``[N]`` (int64)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Dataset:
        """The same data on ``device`` (images cast to ``dtype`` when given)."""
        cast = {"device": device, "dtype": dtype} if dtype is not None else {"device": device}
        return self._replace(
            train_x=self.train_x.to(**cast),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(**cast),
            test_y=self.test_y.to(device),
        )


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).exists():
            return directory / name
    return None


def fashion_mnist_available(directory: str | Path = FASHION_MNIST_DIR) -> bool:
    """Whether all four Fashion-MNIST IDX files are in ``directory``."""
    directory = Path(directory)
    return all(_find(directory, stem) for pair in _FILES.values() for stem in pair)


def load_fashion_mnist(directory: str | Path = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST from its IDX files: 60000 train and 10000 test 28x28 images, 10 classes.

    Pixels are scaled to [0, 1] and standardized with the training-set mean and std.
    """
    directory = Path(directory)
    arrays = {}
    for split, (images, labels) in _FILES.items():
        paths = [_find(directory, images), _find(directory, labels)]
        if None in paths:
            raise FileNotFoundError(
                f"Fashion-MNIST IDX files not found in {directory}: install them with "
                "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or set FASHION_MNIST_DIR"
            )
        x = torch.from_numpy(read_idx(paths[0]).astype(np.float32) / 255.0)
        x = ((x - _FMNIST_MEAN) / _FMNIST_STD).unsqueeze(1)
        y = torch.from_numpy(read_idx(paths[1]).astype(np.int64))
        arrays[split] = (x, y)
    return Dataset("fashion-mnist", *arrays["train"], *arrays["test"], num_classes=10)


def load_digits_28(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images), upsampled to 28x28 and standardized."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    num_test = round(test_fraction * len(y))
    test, train = order[:num_test], order[num_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10)


def load_dataset(
    name: str = "fashion-mnist",
    *,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    directory: str | Path = FASHION_MNIST_DIR,
) -> Dataset:
    """Load ``name`` ("fashion-mnist" or "digits"), optionally a random subset of each split.

    ``"fashion-mnist"`` falls back to the digits (with a warning naming the fix) when
    its files are missing. Subsets are drawn with a fixed ``seed``.
    """
    if name not in ("fashion-mnist", "digits"):
        raise ValueError(f"unknown dataset {name!r}: use 'fashion-mnist' or 'digits'")
    if name == "fashion-mnist" and fashion_mnist_available(directory):
        data = load_fashion_mnist(directory)
    else:
        if name == "fashion-mnist":
            warnings.warn(
                f"Fashion-MNIST not found in {directory}; using scikit-learn's digits instead. "
                "Install it with `apt-get install dataset-fashion-mnist` (or `make bench` as root).",
                stacklevel=2,
            )
        data = load_digits_28(seed=seed)
    gen = torch.Generator().manual_seed(seed)

    def subset(x, y, size):
        if size is None or size >= len(y):
            return x, y
        if size <= 0:
            raise ValueError(f"subset size must be positive, got {size}")
        keep = torch.randperm(len(y), generator=gen)[:size]
        return x[keep], y[keep]

    train_x, train_y = subset(data.train_x, data.train_y, train_size)
    test_x, test_y = subset(data.test_x, data.test_y, test_size)
    return data._replace(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
