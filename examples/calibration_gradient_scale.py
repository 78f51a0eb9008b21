"""How large a calibration BP gradient is next to the rule's gradient, layer by layer.

Trains the 784-256x8-10 ReLU MLP with DFA and with GrAPE for 3 epochs (Fashion-MNIST 10k, seed 0,
``fastdfa.lab.train``), then on one batch of 128 prints, per weight matrix: the norms of the rule's
gradient and of BP's, their ratio and cosine. Under Adam, whose moments the rule's gradients built,
a raw BP step moves a layer by roughly that ratio of a rule step; this is why
``fastdfa.grape.calibrate(..., scale="rule")`` exists (README, GrAPE section).

    python examples/calibration_gradient_scale.py
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from fastdfa.dfa import using_mode  # noqa: E402
from fastdfa.grape import rule_mode  # noqa: E402
from fastdfa.lab.data import load_dataset, subsample_train  # noqa: E402
from fastdfa.lab.train import TrainConfig, train  # noqa: E402


def weight_grads(dfa, x, y, mode: str):
    """The weight-matrix gradients of ``mode`` on (x, y); GrAPE's are taken as DFA's (``rule_mode``), so its
    feedback does not move."""
    dfa.zero_grad(set_to_none=True)
    with using_mode(dfa, mode):
        F.cross_entropy(dfa(x), y).backward()
    return [p.grad.clone() for p in dfa.parameters() if p.dim() > 1]


def main():
    torch.set_num_threads(2)
    data = subsample_train(load_dataset("fashion-mnist"), 10000)
    x, y = data.x_train[:128], data.y_train[:128]
    for method in ("dfa", "grape"):
        result = train(TrainConfig(method=method, hidden=(256,) * 8, epochs=3, seed=0), data, log=None)
        rule = weight_grads(result.model, x, y, rule_mode(method))
        exact = weight_grads(result.model, x, y, "bp")
        print(f"{method}: test accuracy {result.test_accuracy:.4f} after 3 epochs")
        for i, (g, b) in enumerate(zip(rule, exact)):
            cos = float((g * b).sum() / (g.norm() * b.norm()))
            print(f"  layer {i}: |g_rule| {g.norm():.3e}  |g_bp| {b.norm():.3e}  "
                  f"ratio {float(b.norm() / g.norm()):.2f}  cos {cos:+.3f}")


if __name__ == "__main__":
    main()
