"""The Jane Austen corpus (``fastdfa.lab.data``: Debian's r-cran-janeaustenr read with rdata): the R
lazy-load reader, the vocabulary and UNK, the held-out novel with no text shared with training, the
``data austen`` command, and the LM training command at CI size. Tests on the real package skip, saying
how to set it up, where it is not there."""

import bz2
import json
import lzma
import math
import struct
import time
import zlib

import pytest
import torch

from fastdfa.lab import data as data_mod
from fastdfa.lab.cli import main
from fastdfa.lab.data import austen as austen_mod  # a helper is patched in the module that looks it up

SETUP = "set it up with: apt-get update -qq && python -m fastdfa data austen"


def _package():
    return data_mod.find_austen_r_package()


def _cached():
    return all((data_mod.austen_cache_dir() / f"{n}.txt").is_file() for n in data_mod.AUSTEN_NOVELS)


needs_package = pytest.mark.skipif(_package() is None, reason=f"Debian's r-cran-janeaustenr is not extracted; {SETUP}")
needs_corpus = pytest.mark.skipif(_package() is None and not _cached(),
                                  reason=f"the Jane Austen corpus is not set up; {SETUP}")


@pytest.fixture(scope="module")
def austen():
    return data_mod.load_austen(context=64)


def _decode(vocab, ids):
    return "".join(vocab[i] for i in ids.tolist())


# ------------------------------------------------------------------ without the package


def test_char_windows_shift_by_one_and_map_unseen_characters_to_unk():
    vocab = data_mod.build_vocab(["abca"])
    assert vocab == (data_mod.UNK, "a", "b", "c")
    x, y = data_mod.char_windows("abcazab", vocab, context=3)  # 'z' is not in the vocabulary
    assert x.tolist() == [[1, 2, 3], [1, 0, 1]] and y.tolist() == [[2, 3, 1], [0, 1, 2]]
    assert x.dtype == torch.int64
    with pytest.raises(ValueError, match="shorter"):
        data_mod.char_windows("ab", vocab, context=3)


@pytest.mark.parametrize("compression,kind", [(1, None), (2, b"2"), (2, b"1"), (3, b"Z"), (3, b"1"), (3, b"0")])
def test_lazyload_chunks_of_every_r_compression(compression, kind):
    # R_decompress2/3's type bytes: Z raw LZMA2 (xz), 2 bzip2, 1 zlib, 0 stored
    body = b"R serialisation " * 50
    packed = {None: zlib.compress(body), b"1": zlib.compress(body), b"2": bz2.compress(body), b"0": body,
              b"Z": lzma.compress(body, format=lzma.FORMAT_RAW,
                                  filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])}[kind]
    chunk = struct.pack(">I", len(body)) + (kind or b"") + packed
    assert data_mod.decompress_lazyload_chunk(chunk, compression) == body
    with pytest.raises(ValueError, match="header says"):
        data_mod.decompress_lazyload_chunk(struct.pack(">I", len(body) + 1) + (kind or b"") + packed, compression)


def test_missing_corpus_says_the_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(austen_mod, "austen_r_package_candidates", lambda root=None: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError) as info:
        data_mod.load_austen(root=tmp_path)
    text = str(info.value)
    for words in ("apt-get update -qq", "apt-get download r-cran-janeaustenr", "dpkg-deb -x",
                  "pip install rdata", "python -m fastdfa data austen", str(tmp_path)):
        assert words in text
    assert main(["data", "austen", "--dir", str(tmp_path), "--no-download"]) == 2


# ------------------------------------------------------------------ on the real package


@needs_package
def test_the_r_package_reads_with_rdata(tmp_path):
    pytest.importorskip("rdata", reason="pip install rdata")
    sizes = data_mod.extract_austen(_package(), tmp_path)
    assert set(sizes) == set(data_mod.AUSTEN_NOVELS)
    assert 3_900_000 < sum(sizes.values()) < 4_200_000            # about 4M characters
    assert all(sizes[n] > 400_000 for n in sizes)
    persuasion = (tmp_path / "persuasion.txt").read_text(encoding="utf-8")
    assert persuasion.startswith("Persuasion\n") and "Anne Elliot" in persuasion
    assert (tmp_path / "prideprejudice.txt").read_text(encoding="utf-8").startswith("PRIDE AND PREJUDICE\n")


@needs_package
def test_data_command_extracts_once(tmp_path, monkeypatch, capsys):
    pytest.importorskip("rdata", reason="pip install rdata")
    # the found package, seen under a fresh data dir (no download, nothing written to the real cache)
    link = tmp_path / data_mod.AUSTEN_DEB / "usr/lib/R/site-library"
    link.mkdir(parents=True)
    (link / "janeaustenr").symlink_to(_package(), target_is_directory=True)
    monkeypatch.setattr(austen_mod, "austen_r_package_candidates",
                        lambda root=None: [tmp_path / data_mod.AUSTEN_DEB / "usr/lib/R/site-library/janeaustenr"])
    assert main(["data", "austen", "--dir", str(tmp_path), "--no-download"]) == 0
    assert "extracted 6 novels" in capsys.readouterr().out
    assert main(["data", "austen", "--dir", str(tmp_path), "--no-download"]) == 0
    printed = capsys.readouterr().out
    assert "already in" in printed and "Persuasion" in printed and "(test)" in printed


@needs_corpus
def test_vocabulary_and_held_out_novel(austen):
    vocab = austen.vocab
    assert vocab[0] == data_mod.UNK and list(vocab[1:]) == sorted(set(vocab[1:]))
    assert austen.n_classes == len(vocab) and 70 <= len(vocab) <= 120
    assert austen.test_texts == ("persuasion",) and "persuasion" not in austen.train_texts
    assert len(austen.train_texts) == 5
    texts = data_mod.austen_texts()
    train_text = "".join(texts[n] for n in austen.train_texts)
    assert set(vocab[1:]) == set(train_text)                      # the vocabulary is the training novels'
    # the windows are the texts in order, targets shifted by one character
    n_train = (len(train_text) - 1) // 64
    assert austen.x_train.shape == (n_train, 64) and austen.y_train.shape == (n_train, 64)
    assert _decode(vocab, austen.x_train[:3].flatten()) == train_text[:192]
    assert _decode(vocab, austen.y_train[:3].flatten()) == train_text[1:193]
    test_text = texts["persuasion"]
    assert austen.x_test.shape == ((len(test_text) - 1) // 64, 64)
    assert _decode(vocab, austen.y_test[-1]) == test_text[len(austen.x_test) * 64 - 63:len(austen.x_test) * 64 + 1]
    assert int((austen.x_train == 0).sum()) == 0                  # no UNK in training
    unseen = set(test_text) - set(train_text)
    assert int((austen.y_test == 0).sum()) == sum(test_text[1:len(austen.x_test) * 64 + 1].count(c) for c in unseen)
    assert austen.chars["persuasion"] == len(test_text)


@needs_corpus
def test_no_test_text_in_training(austen):
    texts = data_mod.austen_texts()
    train_text = "".join(texts[n] for n in austen.train_texts)
    assert texts["persuasion"] not in train_text
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, len(austen.x_test), (40,), generator=g)
    for r in rows.tolist():  # 40 random test windows of 64 characters: none occurs in the training novels
        assert _decode(austen.vocab, austen.x_test[r]) not in train_text


@needs_corpus
def test_lm_training_command_at_ci_size(tmp_path):
    out = tmp_path / "austen.json"
    start = time.perf_counter()
    assert main(["train", "--data", "austen", "--model", "transformer", "--method", "dfa", "--train-samples", "256",
                 "--epochs", "1", "--d-model", "32", "--layers", "1", "--threads", "1", "--no-progress",
                 "--json", str(out)]) == 0
    seconds = time.perf_counter() - start
    assert seconds < 60, f"{seconds:.1f} s"
    result = json.loads(out.read_text())
    assert 1 < result["test_perplexity"] < 200
    assert math.isclose(result["bits_per_character"], math.log2(result["test_perplexity"]), rel_tol=1e-9)
    assert result["dataset"] == "austen[256 train]" and result["config"]["sites"] == "blocks"
