"""Datasets that need no download.

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images), the embedded
  default; a fixed seeded split of 1438 train / 359 test.
* ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` package
  (``apt-get install dataset-fashion-mnist``), IDX files under
  ``/usr/share/datasets/fashion-mnist``.
* a directory of IDX files in the MNIST layout (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``), each gzipped (``.gz``) or not.

Images become float32 tensors ``[N, 1, H, W]`` scaled to [0, 1] and then
standardised with the training set's mean and standard deviation.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type codes (http://yann.lecun.com/exdb/mnist/ format description)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # [N, C, H, W] float32
    y_train: torch.Tensor  # [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in .gz) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} has no {stem} or {stem}.gz (expected the MNIST file layout)")


def _standardise(name: str, x_train: np.ndarray, y_train, x_test, y_test, scale: float) -> Dataset:
    xtr = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32) / scale)
    xte = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32) / scale)
    mean, std = xtr.mean(), xtr.std()
    if xtr.dim() == 3:  # [N, H, W] -> [N, 1, H, W]
        xtr, xte = xtr.unsqueeze(1), xte.unsqueeze(1)
    ytr = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    yte = torch.from_numpy(np.asarray(y_test, dtype=np.int64))
    n_classes = int(max(ytr.max(), yte.max())) + 1
    return Dataset(name, (xtr - mean) / std, ytr, (xte - mean) / std, yte, n_classes)


def load_idx_dir(directory: str | os.PathLike, name: str | None = None) -> Dataset:
    """Load a directory of MNIST-layout IDX files (gzipped or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    arrays = {key: read_idx(_find_idx(directory, stem)) for key, stem in IDX_FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise ValueError(f"{directory}: {split} images and labels differ in count")
    return _standardise(name or directory.name, arrays["train_images"], arrays["train_labels"],
                        arrays["test_images"], arrays["test_labels"], scale=255.0)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits with a fixed seeded split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images, labels = bunch.images, bunch.target
    order = np.random.RandomState(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return _standardise("digits", images[train], labels[train], images[test], labels[test], scale=16.0)


def load_fashion_mnist(directory: str | os.PathLike = FASHION_MNIST_DIR) -> Dataset:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST not found at {directory}: install Debian's package "
                                "(apt-get install dataset-fashion-mnist) or pass --data DIR with the IDX files")
    return load_idx_dir(directory, name="fashion-mnist")


def parse_classes(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"1,3,5"`` -> [1, 3, 5]; ranges and lists mix (``"0-2,7"``)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = (int(v) for v in part.split("-", 1))
            if hi < lo:
                raise ValueError(f"class range {part!r} runs backwards")
            out.extend(range(lo, hi + 1))
        elif part:
            out.append(int(part))
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f"classes {text!r}: give distinct non-negative labels like 0-4 or 1,3,5")
    if len(out) < 2:
        raise ValueError(f"classes {text!r} keep one class: a classification task needs at least two "
                         "(its accuracy would be 1.0 whatever the model learns); give a range like 0-4")
    return out


def select_classes(data: Dataset, classes: list[int]) -> Dataset:
    """The samples of ``classes`` only, relabelled 0..k-1 in the order given (a new task for fine-tuning)."""
    missing = [c for c in classes if c >= data.n_classes]
    if missing:
        raise ValueError(f"{data.name} has classes 0-{data.n_classes - 1}; {missing} do not exist")
    remap = torch.full((data.n_classes,), -1, dtype=torch.int64)
    remap[torch.tensor(classes)] = torch.arange(len(classes))

    def pick(x, y):
        keep = remap[y] >= 0
        return x[keep], remap[y[keep]]

    x_train, y_train = pick(data.x_train, data.y_train)
    x_test, y_test = pick(data.x_test, data.y_test)
    label = ",".join(str(c) for c in classes)
    return Dataset(f"{data.name}:{label}", x_train, y_train, x_test, y_test, len(classes))


def load_dataset(spec: str) -> Dataset:
    """``digits``, ``fashion-mnist``, or a directory of IDX files; ``SPEC:CLASSES`` (``digits:0-4``)
    keeps only those classes, relabelled 0..k-1."""
    if ":" in spec and not Path(spec).is_dir():
        base, _, classes = spec.rpartition(":")
        if classes and all(ch.isdigit() or ch in ",-" for ch in classes):
            return select_classes(load_dataset(base), parse_classes(classes))
    if spec == "digits":
        return load_digits()
    if spec == "fashion-mnist":
        return load_fashion_mnist()
    if Path(spec).is_dir():
        return load_idx_dir(spec)
    raise ValueError(f"unknown dataset {spec!r}: use 'digits', 'fashion-mnist' or a directory of IDX files, "
                     "optionally with :CLASSES (digits:0-4)")


def subsample_train(data: Dataset, n: int, seed: int = 0) -> Dataset:
    """A seeded random ``n`` of the training samples (the test set is kept whole)."""
    if not 0 < n <= len(data.x_train):
        raise ValueError(f"--train-samples must be in 1..{len(data.x_train)} for {data.name}, got {n}")
    keep = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))[:n]
    return Dataset(f"{data.name}[{n} train]", data.x_train[keep], data.y_train[keep], data.x_test, data.y_test,
                   data.n_classes)
