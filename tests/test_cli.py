"""``python -m fastdfa``: train, compare, info, and its errors."""

import json
import os
import subprocess
import sys

import pytest

from fastdfa.lab.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_writes_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["train", "--method", "dfa", "--data", "digits", "--epochs", "2", "--hidden", "32",
                 "--no-progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]
    assert result["test_accuracy"] == result["epochs"][-1]["test_accuracy"]
    assert result["epochs"][0]["step_ms_median"] > 0
    assert result["config"]["method"] == "dfa" and result["machine"]["torch"]
    printed = capsys.readouterr().out
    assert "epoch   2/2" in printed and "test acc" in printed


def test_train_cnn_fa(tmp_path):
    out = tmp_path / "cnn.json"
    assert main(["train", "--method", "fa", "--model", "cnn", "--epochs", "1", "--no-progress",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["model"] == "cnn"


def test_compare_prints_ratio(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert main(["compare", "--epochs", "2", "--hidden", "16", "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DFA/BP step-time ratio" in printed
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"bp", "dfa"}


def test_bad_input_exits_2_with_message(capsys):
    assert main(["train", "--data", "nowhere", "--epochs", "1", "--no-progress"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["compare", "--methods", "bp,xyz", "--epochs", "1"]) == 2
    assert "--methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--hidden", "0"])


def test_info_subprocess():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    proc = subprocess.run([sys.executable, "-m", "fastdfa", "info"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "cuda", "backends:"):
        assert word in proc.stdout


def test_a_record_names_the_commit_the_process_loaded(monkeypatch):
    """A run that outlives a commit records the code it ran; the checkout's commit at write time is added."""
    from fastdfa import info

    loaded = info.LOADED_COMMIT
    monkeypatch.setattr(info, "source_commit", lambda: "f00d")
    record = info.machine_info()
    assert record["commit"] == loaded and record["commit_at_write"] == "f00d"
    monkeypatch.setattr(info, "source_commit", lambda: loaded)
    assert "commit_at_write" not in info.machine_info()


def test_train_with_the_triton_backend(tmp_path):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not __import__("torch").cuda.is_available():
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    results = {}
    for backend in ("torch", "triton"):
        out = tmp_path / f"{backend}.json"
        assert main(["train", "--method", "dfa", "--backend", backend, "--epochs", "1", "--hidden", "32,32",
                     "--no-progress", "--json", str(out)]) == 0
        results[backend] = json.loads(out.read_text())
    assert results["triton"]["config"]["backend"] == "triton"
    # The same epoch of training: same loss up to fp32 summation order, same test accuracy.
    loss = {b: r["epochs"][0]["train_loss"] for b, r in results.items()}
    assert abs(loss["triton"] - loss["torch"]) < 1e-4 * abs(loss["torch"]), loss
    assert abs(results["triton"]["test_accuracy"] - results["torch"]["test_accuracy"]) <= 1 / 359


def test_unavailable_backend_exits_2_saying_why(capsys):
    assert main(["train", "--backend", "cuda", "--epochs", "1", "--no-progress"]) == 2
    assert "backend 'cuda' was requested" in capsys.readouterr().err
