"""Dataset loaders: IDX (gzipped or not), bundled digits, Debian's Fashion-MNIST."""

import gzip
import struct

import numpy as np
import pytest
import torch

from fastdfa.lab import data


def _write_idx(path, array, gz):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + body)


def _make_idx_dir(root, gz, n_train=20, n_test=10, size=5):
    rng = np.random.RandomState(0)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, size, size)).astype(np.uint8),
        "train-labels-idx1-ubyte": rng.randint(0, 3, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_test, size, size)).astype(np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 3).astype(np.uint8),
    }
    for name, arr in arrays.items():
        _write_idx(root / (name + (".gz" if gz else "")), arr, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    _write_idx(path, arr, gz)
    out = data.read_idx(path)
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="bytes"):
        data.read_idx(short)


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dir(tmp_path, gz):
    arrays = _make_idx_dir(tmp_path, gz)
    ds = data.load_dataset(str(tmp_path))
    assert ds.x_train.shape == (20, 1, 5, 5) and ds.x_test.shape == (10, 1, 5, 5)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.n_classes == 3
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    # standardised with the training set's statistics
    assert abs(ds.x_train.mean().item()) < 1e-5 and abs(ds.x_train.std().item() - 1) < 1e-5
    raw = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    expected = (raw - raw.mean()) / raw.std(ddof=1)
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_missing_files_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_idx_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("not-a-dataset")


def test_digits_is_embedded_and_split_fixed():
    ds = data.load_digits()
    assert ds.x_train.shape == (1438, 1, 8, 8) and ds.x_test.shape == (359, 1, 8, 8)
    assert ds.n_classes == 10
    again = data.load_digits()
    assert torch.equal(ds.y_test, again.y_test)


def test_fashion_mnist_from_debian_package():
    if not data.FASHION_MNIST_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    ds = data.load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.n_classes == 10


def test_one_registry_names_every_source(tmp_path, monkeypatch):
    """``DATASETS`` is the one registry: ``--data``'s names, ``data``'s choices, ``load_dataset`` and
    ``setup_data`` all read it, so a source is added in one place."""
    from fastdfa.lab import cli

    assert data.DATA_NAMES == ("digits", "fashion-mnist", "austen", "austen-bpe")
    assert data.SETUP_NAMES == ("austen", "austen-bpe", "reviews", "bbc", "minilm")
    assert tuple(n for n, s in data.DATASETS.items() if s.kind == "text task") == data.TEXT_TASKS
    assert all(s.kind in (*data.TRAIN_KINDS, "text task", "model") for s in data.DATASETS.values())
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    name = next(a for a in sub.choices["data"]._actions if a.dest == "name")
    assert tuple(name.choices) == data.SETUP_NAMES
    monkeypatch.chdir(tmp_path)  # no folder named like a source here
    with pytest.raises(ValueError, match="use 'digits', 'fashion-mnist', 'austen', 'austen-bpe' or a directory"):
        data.load_dataset("reviews")  # a text task, for finetune --model minilm: no --data of train
    with pytest.raises(ValueError, match="unknown data set 'digits'"):
        data.setup_data("digits")  # bundled: nothing to set up
    fake = data.load_digits()
    monkeypatch.setitem(data.DATASETS, "fake", data.DataSource("images", lambda context=64: fake))
    assert data.load_dataset("fake") is fake
    assert data.load_dataset("fake:1,3").n_classes == 2
