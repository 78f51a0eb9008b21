"""Jane Austen in byte-level BPE tokens (``fastdfa.lab.data``: ``train_bpe``, ``build_bpe_cache``,
``load_austen_bpe``, ``bits_per_character``; ``python -m fastdfa data austen-bpe``; ``--data austen-bpe``).

Without the corpus everything runs on made-up text: a 200 kB tokenizer of 512 tokens (well under a second
on 2 cores), and six small fake "novels" in a temporary data dir for the commands. Tests on the real cache
skip, saying how to build it, where it is not there."""

import json
import math
import random

import numpy as np
import pytest
import torch

from fastdfa.lab import data as data_mod
from fastdfa.lab.cli import main
from fastdfa.lab.data import austen as austen_mod  # a helper is patched in the module that looks it up
from fastdfa.lab.data import bpe as bpe_mod

pytest.importorskip("tokenizers", reason="pip install tokenizers")

BUILD = "build it with: python -m fastdfa data austen-bpe"
SYLLABLES = ("an", "el", "li", "ot", "wen", "ce", "ma", "ry", "ford", "ham", "dar", "cy", "ben", "net", "ton",
             "sis", "ter", "mis", "ed", "ing", "the", "of", "and", "to", "her", "was", "be", "ha", "ve", "in")
PUNCT = (".", ",", ";", "!", "?", " --", ":")


def _fake_text(n_chars: int, seed: int) -> str:
    """Made-up prose of about ``n_chars`` characters: pseudo-words of two or three syllables, sentences,
    capitals, lines of about 70 characters, blank lines between paragraphs, and now and then a character
    that UTF-8 writes in two or three bytes ("£", "é", "—")."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    out, line, length = [], [], 0
    while length < n_chars:
        word = rng.choice(words)
        if rng.random() < 0.1:
            word = word.capitalize()
        if rng.random() < 0.12:
            word += rng.choice(PUNCT)
        if rng.random() < 0.01:
            word = rng.choice(("£", "é", "—")) + word
        line.append(word)
        if sum(len(w) + 1 for w in line) > 70:
            text = " ".join(line) + ("\n\n" if rng.random() < 0.15 else "\n")
            out.append(text)
            length += len(text)
            line = []
    return "".join(out)


@pytest.fixture(scope="module")
def corpus():
    """200 kB of training text and a held-out 20 kB."""
    return _fake_text(200_000, seed=0), _fake_text(20_000, seed=1)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return data_mod.train_bpe([corpus[0]], vocab_size=512)


def _fake_novels(root, size=30_000):
    """Six fake novels where the text cache of ``python -m fastdfa data austen`` lives under ``root``."""
    cache = data_mod.austen_cache_dir(root)
    cache.mkdir(parents=True)
    for i, name in enumerate(data_mod.AUSTEN_NOVELS):
        (cache / f"{name}.txt").write_text(_fake_text(size, seed=10 + i), encoding="utf-8")
    return cache


# ------------------------------------------------------------------ the tokenizer


def test_training_is_deterministic(corpus, tokenizer):
    again = data_mod.train_bpe([corpus[0]], vocab_size=512)
    assert tokenizer.get_vocab_size() == 512                       # 256 bytes + 256 merges, all filled
    assert again.to_str() == tokenizer.to_str()                    # the same tokenizer.json, byte for byte
    other = data_mod.train_bpe([corpus[0][:100_000]], vocab_size=512)
    assert other.to_str() != tokenizer.to_str()                    # the comparison can tell tokenizers apart


def test_round_trip_and_character_counts(corpus, tokenizer):
    held_out = corpus[1] + "Ünseen: 漢字, emoji 🙂, tabs\tand\r\nCRLF,  double  spaces, \x00 and a trailing space "
    ids = tokenizer.encode(held_out).ids
    assert tokenizer.decode(ids) == held_out                       # byte level: any text, no UNK
    assert len(ids) < len(held_out.encode("utf-8")) / 2            # the merges compress the made-up prose
    raw = data_mod.bpe_token_bytes(tokenizer)
    assert b"".join(raw[i] for i in ids) == held_out.encode("utf-8")
    assert all(len(raw[i]) == 1 for i in range(256))               # the 256 bytes come first
    starts = data_mod.bpe_char_starts(tokenizer)
    assert int(starts[ids].sum()) == len(held_out)                 # characters, not bytes ("🙂" is 4 bytes)
    two = tokenizer.encode("ß").ids                                # C3 9F, never seen: two byte tokens
    assert starts[two].tolist() == [1, 0]


def test_vocab_size_is_checked():
    with pytest.raises(ValueError, match="at least one merge"):
        data_mod.train_bpe(["some text"], vocab_size=256)


# ------------------------------------------------------------------ windows and bits per character


def test_token_windows_shift_by_one():
    ids = np.arange(23, dtype=np.uint16) * 7
    x, y = data_mod.token_windows(ids, context=5)
    assert x.dtype == torch.int64 and x.shape == y.shape == (4, 5)  # (23 - 1) // 5 windows, a tail of 2 dropped
    assert x.flatten().tolist() == (np.arange(20) * 7).tolist()
    assert y.flatten().tolist() == (np.arange(1, 21) * 7).tolist()
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:-1, -1], x[1:, 0])
    with pytest.raises(ValueError, match="5 tokens is shorter than context 5"):
        data_mod.token_windows(ids[:5], context=5)


def test_bits_per_character_by_hand():
    # 100 tokens at 2 nats each: 200 nats = 288.539 bits, over 400 characters
    assert math.isclose(data_mod.bits_per_character(2.0, 100, 400), 200 / math.log(2) / 400, rel_tol=1e-12)
    assert math.isclose(data_mod.bits_per_character(2.0, 100, 400), 0.7213475204444817, rel_tol=1e-12)
    assert data_mod.bits_per_character(1.5, 7, 7) == 1.5 / math.log(2)  # characters: bits per token
    with pytest.raises(ValueError, match="positive"):
        data_mod.bits_per_character(1.0, 10, 0)


def test_cache_windows_and_their_character_counts(tmp_path, corpus):
    train, test = corpus[0][:60_000], corpus[1]
    texts = {"a": train[:30_000], "b": train[30_000:], "held": test}
    meta = data_mod.build_bpe_cache(texts, tmp_path, test="held", vocab_size=400, log=lambda _: None)
    assert meta["train"] == ["a", "b"] and meta["vocab_size"] == 400
    data = data_mod.load_bpe_cache(tmp_path, context=16)
    assert data.n_classes == 400 and data.context == 16 and data.is_text
    assert data.x_train.dtype == torch.int64 and data.train_texts == ("a", "b") and data.test_texts == ("held",)
    tok = data_mod._tokenizers().Tokenizer.from_file(data.tokenizer)
    for x, y, text in ((data.x_train, data.y_train, texts["a"] + texts["b"]), (data.x_test, data.y_test, test)):
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:-1, -1], x[1:, 0])
        assert text.startswith(tok.decode(x[:3].flatten().tolist()))
        # the targets spell the text less its first token and the dropped tail: counted by decoding those two
        ids = np.load(tmp_path / ("train.npy" if x is data.x_train else "test.npy")).tolist()
        n = y.numel()
        split = "train" if x is data.x_train else "test"
        first, tail = tok.decode(ids[:1]), tok.decode(ids[n + 1:])
        assert data.split_tokens[split] == n
        assert data.split_chars[split] == len(text) - len(first) - len(tail)
    # bpc = nats * tokens / characters / ln 2, with the test windows' counts
    nats = 3.0
    assert math.isclose(data.bits_per_character(nats),
                        nats * data.split_tokens["test"] / data.split_chars["test"] / math.log(2), rel_tol=1e-12)
    assert data.bits_per_character(nats) < nats / math.log(2)     # more than one character per token
    assert data.chars_per_token == data.split_chars["test"] / data.split_tokens["test"] > 2
    # a cache whose ids do not match its meta.json is refused
    np.save(tmp_path / "test.npy", np.load(tmp_path / "test.npy")[:-1])
    with pytest.raises(ValueError, match="delete the folder"):
        data_mod.load_bpe_cache(tmp_path, context=16)


def test_char_level_counts_give_bits_per_token(tmp_path):
    # the character LM's data object: one token per character, so bpc is the per-token loss in bits
    _fake_novels(tmp_path, size=5_000)
    data = data_mod.load_austen(context=32, root=tmp_path)
    assert data.split_tokens == data.split_chars == {"train": data.y_train.numel(), "test": data.y_test.numel()}
    assert data.bits_per_character(2.0) == 2.0 / math.log(2)


# ------------------------------------------------------------------ the commands, on fake novels


def test_loading_before_building_says_the_command(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="python -m fastdfa data austen-bpe --dir"):
        data_mod.load_austen_bpe(root=tmp_path)
    monkeypatch.setenv(data_mod.DATA_ENV, str(tmp_path))
    assert main(["train", "--data", "austen-bpe", "--model", "transformer", "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not built" in err and "python -m fastdfa data austen-bpe\n" in err + "\n"


def test_data_command_builds_once_and_rebuilds_a_changed_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bpe_mod, "AUSTEN_BPE_VOCAB", 400)  # the command's vocabulary, small for 180 kB
    cache = _fake_novels(tmp_path)
    assert main(["data", "austen-bpe", "--dir", str(tmp_path), "--no-download"]) == 0
    out = capsys.readouterr().out
    assert "trained a byte-level BPE of 400 tokens on 5 training documents" in out
    assert "Persuasion" in out and "(test)" in out and "characters/token" in out and "vocabulary 400" in out
    built = cache / "bpe-400"
    first = {f: (built / f).read_bytes() for f in ("tokenizer.json", "train.npy", "test.npy", "meta.json")}
    assert main(["data", "austen-bpe", "--dir", str(tmp_path), "--no-download"]) == 0
    assert "already in" in capsys.readouterr().out
    data = data_mod.load_austen_bpe(context=16, root=tmp_path)
    assert data.name == "austen-bpe" and data.n_classes == 400 and data.test_texts == ("persuasion",)
    assert data.chars == {n: len((cache / f"{n}.txt").read_text(encoding="utf-8")) for n in data_mod.AUSTEN_NOVELS}
    meta = json.loads(first["meta.json"])
    assert sum(meta["tokens"][n] for n in meta["train"]) == len(np.load(built / "train.npy"))
    # a changed novel: loading refuses the old tokens, the command rebuilds them
    (cache / "emma.txt").write_text(_fake_text(30_000, seed=99), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="out of date"):
        data_mod.load_austen_bpe(root=tmp_path)
    assert main(["data", "austen-bpe", "--dir", str(tmp_path), "--no-download"]) == 0
    assert "rebuilding" in capsys.readouterr().out
    assert (built / "train.npy").read_bytes() != first["train.npy"]
    # deterministic: the first corpus again gives the first files again, byte for byte
    (cache / "emma.txt").write_text(_fake_text(30_000, seed=10 + list(data_mod.AUSTEN_NOVELS).index("emma")),
                                    encoding="utf-8")
    assert main(["data", "austen-bpe", "--dir", str(tmp_path), "--no-download"]) == 0
    assert {f: (built / f).read_bytes() for f in first} == first


def test_data_command_without_the_novels_says_how_to_set_them_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(austen_mod, "austen_r_package_candidates", lambda root=None: [tmp_path / "nowhere"])
    assert main(["data", "austen-bpe", "--dir", str(tmp_path), "--no-download"]) == 2
    assert "python -m fastdfa data austen" in capsys.readouterr().err


def test_lm_trains_on_austen_bpe(tmp_path, monkeypatch):
    monkeypatch.setattr(bpe_mod, "AUSTEN_BPE_VOCAB", 400)
    monkeypatch.setenv(data_mod.DATA_ENV, str(tmp_path))
    _fake_novels(tmp_path)
    assert main(["data", "austen-bpe", "--no-download"]) == 0
    out = tmp_path / "run.json"
    assert main(["train", "--data", "austen-bpe", "--model", "transformer", "--method", "dfa", "--context", "16",
                 "--train-samples", "64", "--epochs", "1", "--d-model", "16", "--layers", "1", "--heads", "2",
                 "--threads", "1", "--no-progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "austen-bpe[64 train]" and result["config"]["context"] == 16
    assert 1 < result["test_perplexity"] < 2 * 400                 # per token; untrained: about 400


# ------------------------------------------------------------------ on the real cache


def _real_cache():
    return data_mod._read_bpe_meta(data_mod.austen_bpe_dir()) is not None


needs_bpe = pytest.mark.skipif(not _real_cache(), reason=f"the Jane Austen BPE tokens are not built; {BUILD}")


@needs_bpe
def test_the_real_tokens():
    data = data_mod.load_austen_bpe(context=64)
    assert data.n_classes == data_mod.AUSTEN_BPE_VOCAB == 16_384
    assert data.train_texts == tuple(n for n in data_mod.AUSTEN_NOVELS if n != "persuasion")
    assert 3.5 < data.chars_per_token < 5                           # 4.05 on Persuasion
    texts = data_mod.austen_texts()
    tok = data_mod._tokenizers().Tokenizer.from_file(data.tokenizer)
    assert tok.decode(data.x_test[:4].flatten().tolist()) == texts["persuasion"][:len(tok.decode(
        data.x_test[:4].flatten().tolist()))]
    assert tok.decode(np.load(data_mod.austen_bpe_dir() / "test.npy").tolist()) == texts["persuasion"]
    # the cached tokenizer is what training on the five novels gives again (about 1.5 s)
    again = data_mod.train_bpe([texts[n] for n in data.train_texts])
    assert again.to_str() == open(data.tokenizer, encoding="utf-8").read()
