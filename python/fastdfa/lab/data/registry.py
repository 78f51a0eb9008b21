"""The one registry of data sources, ``DATASETS``: each name with its kind, its loader and the set-up that
``python -m fastdfa data NAME`` runs. The CLI's ``--data`` names, ``data`` choices and ``load_dataset``
are read from it (fastdfa.lab.cli); a new source is one entry here."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .austen import load_austen, setup_austen
from .base import Dataset
from .bpe import BPE_NAME, load_austen_bpe, setup_austen_bpe
from .hf_models import minilm_dir, setup_minilm
from .images import load_digits, load_fashion_mnist, load_idx_dir, parse_classes, select_classes
from .text_tasks import load_text_task, setup_bbc, setup_reviews

TRAIN_KINDS = ("images", "text")  # what train / compare / finetune take as --data NAME


@dataclass(frozen=True)
class DataSource:
    """One named data source.

    ``kind``: ``images`` (classification), ``text`` (next-token windows), ``text task`` (labelled documents,
    for ``finetune --model minilm``) or ``model`` (a pretrained model directory). ``load`` reads it: for
    ``images`` and ``text`` (``--data NAME``) ``load(context)`` returns a ``Dataset`` (``context``: tokens per
    text window, unused by images); for a ``text task`` ``load(root=None)`` returns a ``TextClassification``;
    for a ``model`` ``load()`` returns its directory. ``prepare(root=None, download=True, log=print)`` is
    ``python -m fastdfa data NAME``: it sets the source up once (idempotent; ``download=False``: only what is
    already on the machine) and returns the summary lines to print; None when there is nothing to set up
    (bundled with scikit-learn, or installed by a system package)."""

    kind: str
    load: Callable
    prepare: Callable[..., str] | None = None


DATASETS: dict[str, DataSource] = {
    "digits": DataSource("images", lambda context=64: load_digits()),
    "fashion-mnist": DataSource("images", lambda context=64: load_fashion_mnist()),
    "austen": DataSource("text", lambda context=64: load_austen(context), setup_austen),
    BPE_NAME: DataSource("text", lambda context=64: load_austen_bpe(context), setup_austen_bpe),
    "reviews": DataSource("text task", partial(load_text_task, "reviews"), setup_reviews),
    "bbc": DataSource("text task", partial(load_text_task, "bbc"), setup_bbc),
    "minilm": DataSource("model", minilm_dir, setup_minilm),
}

DATA_NAMES = tuple(n for n, s in DATASETS.items() if s.kind in TRAIN_KINDS)  # --data NAME, besides a directory
SETUP_NAMES = tuple(n for n, s in DATASETS.items() if s.prepare is not None)  # python -m fastdfa data NAME


def setup_data(name: str, root: str | os.PathLike | None = None, download: bool = True, log=print) -> str:
    """``python -m fastdfa data NAME`` (idempotent): set ``name`` up (``DATASETS[name].prepare``), return the
    summary to print."""
    source = DATASETS.get(name)
    if source is None or source.prepare is None:
        raise ValueError(f"unknown data set {name!r}: use one of {', '.join(SETUP_NAMES)}")
    return source.prepare(root, download=download, log=log)


def load_dataset(spec: str, context: int = 64) -> Dataset:
    """A ``DATASETS`` name of kind images or text (``DATA_NAMES``: ``digits``, ``fashion-mnist``, ``austen``:
    character windows of ``context`` characters from Jane Austen's novels, "Persuasion" held out;
    ``austen-bpe``: windows of ``context`` byte-level BPE tokens of the same split), or a directory of IDX
    files; ``SPEC:CLASSES`` (``digits:0-4``) keeps only those classes, relabelled 0..k-1."""
    source = DATASETS.get(spec)
    if source is not None and source.kind in TRAIN_KINDS:
        return source.load(context)
    if ":" in spec and not Path(spec).is_dir():
        base, _, classes = spec.rpartition(":")
        if classes and all(ch.isdigit() or ch in ",-" for ch in classes):
            return select_classes(load_dataset(base), parse_classes(classes))
    if Path(spec).is_dir():
        return load_idx_dir(spec)
    raise ValueError(f"unknown dataset {spec!r}: use {', '.join(repr(n) for n in DATA_NAMES)} or a directory of "
                     "IDX files, optionally with :CLASSES (digits:0-4)")
