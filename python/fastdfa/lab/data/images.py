"""Images: scikit-learn's bundled digits, Debian's Fashion-MNIST and directories of MNIST-layout IDX files
(``read_idx``), as standardised float32 ``Dataset``s; ``parse_classes`` / ``select_classes`` for
``SPEC:CLASSES`` (``digits:0-4``)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .base import Dataset

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
