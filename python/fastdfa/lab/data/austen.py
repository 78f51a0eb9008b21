"""Jane Austen's six novels, character level (``--data austen``): Debian's r-cran-janeaustenr, set up once
by ``python -m fastdfa data austen`` (``setup_austen``) into ``<data dir>/austen/<novel>.txt``, and read as
windows of characters, "Persuasion" held out (``load_austen``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .base import DATA_ENV, TextDataset, data_dir, token_windows
from .downloads import download_r_package, find_r_package, r_deb_setup_lines, r_package_candidates
from .lazyload import read_lazyload_db

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


def austen_setup_lines(root: str | os.PathLike | None = None) -> str:
    """The shell lines that set the corpus up by hand (what ``python -m fastdfa data austen`` does)."""
    return r_deb_setup_lines(AUSTEN_DEB, "austen", root)


def austen_r_package_candidates(root: str | os.PathLike | None = None) -> list[Path]:
    """Where the R package janeaustenr is looked for: extracted with ``dpkg-deb -x`` under the data dir
    (what ``python -m fastdfa data austen`` does), or installed with ``apt-get install r-cran-janeaustenr``."""
    return r_package_candidates(AUSTEN_DEB, "janeaustenr", root)


def find_austen_r_package(root: str | os.PathLike | None = None) -> Path | None:
    return find_r_package(austen_r_package_candidates(root))


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


def austen_cached(root) -> bool:
    return all((austen_cache_dir(root) / f"{n}.txt").is_file() for n in AUSTEN_NOVELS)


def download_austen_deb(root: str | os.PathLike | None = None) -> Path:
    """``apt-get download r-cran-janeaustenr`` and ``dpkg-deb -x`` it under the data dir; returns the
    extracted R package. Needs Debian's apt and its package lists (run as root, it fetches them with
    ``apt-get update`` when the download finds none)."""
    return download_r_package(AUSTEN_DEB, "janeaustenr", root, austen_setup_lines(root))


def prepare_austen(root: str | os.PathLike | None = None, download: bool = True, log=print) -> Path:
    """Set the corpus up (idempotent; ``python -m fastdfa data austen``): find the R package (else
    download and extract the Debian package when ``download``), extract the six novels as text into
    ``austen_cache_dir(root)``. Returns that directory."""
    cache = austen_cache_dir(root)
    if austen_cached(root):
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
    if not austen_cached(root):
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


def austen_summary(data: TextDataset, cache: str | os.PathLike) -> str:
    """The lines ``python -m fastdfa data austen`` prints: each novel's characters and role, the total, the
    vocabulary and the windows."""
    cache = Path(cache)
    sizes = {n: len((cache / f"{n}.txt").read_text(encoding="utf-8")) for n in AUSTEN_NOVELS}
    lines = []
    for name, title in AUSTEN_NOVELS.items():
        role = "test" if name == AUSTEN_TEST else "train"
        lines.append(f"  {title:<24}{sizes[name]:>10,} characters  ({role})")
    lines.append(f"  {'total':<24}{sum(sizes.values()):>10,} characters in {cache}")
    lines.append(f"  vocabulary {data.n_classes} (the training novels' characters and <unk>); "
                 f"{len(data.x_train)} train / {len(data.x_test)} test windows of {data.context} characters")
    return "\n".join(lines)


def setup_austen(root: str | os.PathLike | None = None, download: bool = True, log=print) -> str:
    """``python -m fastdfa data austen`` (idempotent): ``prepare_austen``, then the summary to print."""
    cache = prepare_austen(root, download=download, log=log)
    return austen_summary(load_austen(root=root), cache)
