"""interleaved_step_ms: methods take turns every round; statistics over the timed rounds only."""

import pytest

from fastdfa.lab.steptime import interleaved_step_ms


def test_methods_alternate_and_warmup_is_excluded():
    calls = []
    steps = {"bp": lambda r: calls.append(("bp", r)), "dfa": lambda r: calls.append(("dfa", r))}
    out = interleaved_step_ms(steps, rounds=4, warmup=2)
    assert calls == [(m, r) for r in range(6) for m in ("bp", "dfa")]
    assert out["bp"]["rounds"] == out["dfa"]["rounds"] == 4
    for stats in out.values():
        assert 0 <= stats["q1_ms"] <= stats["median_ms"] <= stats["q3_ms"]


def test_rounds_must_be_positive():
    with pytest.raises(ValueError):
        interleaved_step_ms({"bp": lambda r: None}, rounds=0)
