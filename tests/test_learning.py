"""Learning on real data (small enough for CI): DFA on scikit-learn's digits."""

import pytest

from fastdfa.lab.data import load_digits
from fastdfa.lab.train import TrainConfig, train


@pytest.mark.slow
def test_dfa_learns_digits():
    # Issue "Core": digits, DFA >= 0.93 test accuracy (default MLP 64-256-256-256-10, Adam 3e-4;
    # an epoch is only 11 steps of 128, so 20 epochs: measured 0.958, 10 epochs gave 0.880).
    result = train(TrainConfig(method="dfa", epochs=20), load_digits(), progress=False, log=None)
    assert result.test_accuracy >= 0.93
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss


@pytest.mark.slow
def test_fa_learns_digits():
    result = train(TrainConfig(method="fa", epochs=20), load_digits(), progress=False, log=None)
    assert result.test_accuracy >= 0.90
