"""fastdfa.lab.bench's GPU methods and target verdicts, as far as they can be checked on the CPU."""

from dataclasses import asdict

import torch

from fastdfa.lab import bench


def test_gpu_only_methods_are_skipped_with_the_reason_on_cpu():
    c = bench.BenchConfig("mlp", 32, 3, 8)
    r = bench.run_config(c, ["bp", "dfa", "dfa-cuda", "dfa-cuda-s2", "bp-graph", "dfa-triton-graph",
                             "dfa-cuda-nocheck"], torch.device("cpu"), rounds=1, warmup=0, log=None)
    assert set(r["methods"]) == {"bp", "dfa"}
    assert r["skipped"]["dfa-cuda-nocheck"].startswith("cuda:")
    assert r["skipped"]["bp-graph"] == r["skipped"]["dfa-triton-graph"] == "CUDA graphs need a CUDA device"
    assert r["skipped"]["dfa-cuda"].startswith("cuda:") and r["skipped"]["dfa-cuda-s2"].startswith("cuda:")


def test_the_targets_preset_is_the_issue_s_three_models():
    labels = [c.label for c in bench.preset("targets")]
    assert labels[:2] == list(bench.TARGETS) and len(labels) == 3 and labels[2].startswith("cnn")
    assert bench.preset("gpu")[:3] == bench.preset("targets")
    assert set(bench.default_methods("targets")) <= set(bench.ALL_METHODS)


def _result(label_config, ratios):
    return {"config": label_config, "methods": {m: {"ratio_to_bp": r} for m, r in ratios.items()}}


def test_target_verdicts_take_the_fastest_dfa_method():
    gemm, latency, cnn = (asdict(c) for c in bench.preset("targets"))
    results = [_result(gemm, {"bp": 1.0, "dfa": 0.9, "dfa-cuda": 0.72, "dfa-triton-graph": 0.69,
                              "dfa-hooks": 0.1, "bp-graph": 0.5}),
               _result(latency, {"bp": 1.0, "dfa-triton": 0.5, "dfa-cuda-graph": 0.36}),
               _result(cnn, {"bp": 1.0, "dfa": 0.2})]
    verdicts = bench.target_verdicts(results)
    assert [(v["best_method"], v["meets"]) for v in verdicts] == [("dfa-triton-graph", True),
                                                                  ("dfa-cuda-graph", False)]
    assert "MISSES" in verdicts[1]["text"] and verdicts[0]["target"] == 0.70
