"""Helpers shared by the learning-rule tests: a rule checked against BP on the same batch."""

import torch
import torch.nn.functional as F

import fastdfa


def assert_rule_gives_bp_gradients(dfa, model, x, t, rtol, atol):
    """One backward with the wrapper's rule, one with BP: the parameter gradients are equal."""
    F.cross_entropy(dfa(x), t).backward()
    rule_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with fastdfa.backprop(dfa):
        F.cross_entropy(dfa(x), t).backward()
    for g, b in zip(rule_grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(g, b, rtol=rtol, atol=atol)
