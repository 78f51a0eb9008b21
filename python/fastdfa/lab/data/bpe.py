"""Jane Austen in byte-level BPE tokens (``--data austen-bpe``): a tokenizer trained on the five training
novels (``train_bpe``), every novel encoded into a cache beside them (``build_bpe_cache``; ``python -m fastdfa
data austen-bpe``: ``setup_austen_bpe``), read as windows of tokens (``load_austen_bpe``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .austen import AUSTEN_NOVELS, AUSTEN_TEST, austen_cache_dir, austen_cached, austen_texts, prepare_austen
from .base import DATA_ENV, TextDataset, token_windows

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
    if austen_cached(root):  # the novels are there: check the tokens were made from them
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


def setup_austen_bpe(root: str | os.PathLike | None = None, download: bool = True, log=print) -> str:
    """``python -m fastdfa data austen-bpe`` (idempotent): ``prepare_austen_bpe`` (the novels first), then the
    summary to print (``austen_bpe_summary``)."""
    directory = prepare_austen_bpe(root, download=download, log=log)
    return austen_bpe_summary(load_austen_bpe(root=root), directory)
