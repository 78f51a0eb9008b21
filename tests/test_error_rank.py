"""error_rank=k: each site receives ``F_l (P e)`` with P a fixed, seeded ``[k, n_e]`` projection.

Written out in float64: the gradient at a site is ``((e P^T) F^T) * g'`` (dense and per-feature feedback,
batch_dims 1 and 2), P depends on the seed alone and is saved in the state_dict, GrAPE aligns F with the
Jacobian seen through P (align_step on ``T P^T``), and the kernel backend's fused route gives the torch
backend's gradients.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa
from fastdfa.ops.align_step import AlignSite, align_step_reference

DT = torch.float64


def _mlp(seed=0, out=7):
    torch.manual_seed(seed)
    return nn.Sequential(fastdfa.Linear(6, 5, dtype=DT), nn.ReLU(), fastdfa.Linear(5, 4, dtype=DT), nn.Tanh(),
                         fastdfa.Linear(4, out, dtype=DT))


def test_the_gradient_of_each_layer_is_the_rank_k_rule_written_out():
    dfa = fastdfa.DFA(_mlp(), error_rank=3, seed=2)
    x, t = torch.randn(9, 6, dtype=DT), torch.randint(0, 7, (9,))
    y = dfa(x)
    F.cross_entropy(y, t).backward()
    m = dfa.model
    p = dfa.feedback.error_projection
    assert p.shape == (3, 7) and [s.feedback.shape for s in dfa.sites] == [(5, 3), (4, 3)]
    a1 = m[0](x)
    h1 = torch.relu(a1)
    a2 = m[2](h1)
    h2 = torch.tanh(a2)
    out = m[4](h2).detach().requires_grad_()
    (e,) = torch.autograd.grad(F.cross_entropy(out, t), out)
    pe = e @ p.t()                                             # [N, k]
    d1 = (pe @ dfa.sites[0].feedback.t()) * (a1 > 0)           # ((e P^T) F_1^T) * relu'
    d2 = (pe @ dfa.sites[1].feedback.t()) * (1 - h2 ** 2)      # ((e P^T) F_2^T) * tanh'
    for layer, delta, h in ((m[0], d1, x), (m[2], d2, h1), (m[4], e, h2)):
        torch.testing.assert_close(layer.weight.grad, delta.t() @ h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, delta.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_dims", [1, 2])
def test_per_feature_tokens_rank_k(batch_dims):
    """[batch, tokens, d] sites, per-feature feedback: the token's (or with batch_dims=1, the sample's)
    compressed error broadcast over the tokens."""
    torch.manual_seed(1)
    model = nn.Sequential(fastdfa.Linear(4, 6, dtype=DT), nn.ReLU(), fastdfa.Linear(6, 3, dtype=DT))
    dfa = fastdfa.DFA(model, error_rank=2, batch_dims=batch_dims, feedback_layout="per-feature")
    x = torch.randn(2, 5, 4, dtype=DT)
    y = dfa(x)
    (y ** 2).sum().backward()
    a = model[0](x)
    e = 2 * model[2](torch.relu(a)).detach()                   # dLoss/dy, [2, 5, 3]
    p, f = dfa.feedback.error_projection, dfa.sites[0].feedback
    if batch_dims == 2:
        delta = ((e.reshape(-1, 3) @ p.t()) @ f.t()).reshape(2, 5, 6)
    else:  # the error is the whole sample's (5 x 3 = 15 wide); per-feature: one row per feature
        assert p.shape == (2, 15)
        delta = ((e.reshape(2, 15) @ p.t()) @ f.t())[:, None, :].expand(2, 5, 6)
    delta = delta * (a > 0)
    torch.testing.assert_close(model[0].weight.grad, delta.reshape(-1, 6).t() @ x.reshape(-1, 4), rtol=1e-12,
                               atol=1e-12)


def test_p_is_fixed_by_the_seed_and_saved_in_the_state_dict():
    x = torch.randn(4, 6, dtype=DT)
    ps = []
    for seed in (5, 5, 6):
        dfa = fastdfa.DFA(_mlp(), error_rank=3, seed=seed)
        dfa(x)
        ps.append(dfa.feedback.error_projection.clone())
    assert torch.equal(ps[0], ps[1]) and not torch.equal(ps[0], ps[2])
    source = fastdfa.DFA(_mlp(), error_rank=3, seed=5)
    source(x)
    source.feedback.error_projection.mul_(2.0)  # a saved P wins over the seed's
    state = source.state_dict()
    assert torch.equal(state["feedback.error_projection"], source.feedback.error_projection)
    target = fastdfa.DFA(_mlp(), error_rank=3, seed=5)
    target.load_state_dict(state)  # before the build: kept and used by it
    target(x)
    torch.testing.assert_close(target.feedback.error_projection, source.feedback.error_projection, rtol=0, atol=0)
    wrong = fastdfa.DFA(_mlp(), error_rank=4, seed=5)
    wrong(x)
    with pytest.raises(RuntimeError, match="error_projection"):
        wrong.load_state_dict(state)


def test_grape_aligns_the_feedback_with_the_jacobian_seen_through_p():
    dfa = fastdfa.DFA(_mlp(), mode="grape", error_rank=3, seed=3, feedback_lr=0.3)
    x, t = torch.randn(8, 6, dtype=DT), torch.randint(0, 7, (8,))
    dfa(x)  # build
    before = dfa.feedback.flat.clone()
    snapshot = dfa.perturbations.snapshot()
    est = dfa.jacobian_estimate((x,), {}, 8)  # the estimate the next step will draw
    dfa.perturbations.restore(snapshot)
    p = dfa.feedback.error_projection
    sites = [AlignSite(s.offset, s.rows, pert, tan @ p.t()) for s, pert, tan in
             zip(dfa.sites, est.perturbations, est.tangents)]
    want, _ = align_step_reference(before, sites, 0.3)
    F.cross_entropy(dfa(x), t).backward()
    torch.testing.assert_close(dfa.feedback.flat, want, rtol=1e-12, atol=1e-12)


def test_error_rank_must_be_a_positive_int():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="error_rank"):
            fastdfa.DFAConfig(error_rank=bad)


def test_the_fused_route_with_error_rank_equals_torch():
    pytest.importorskip("triton")
    x, t = torch.randn(11, 6), torch.randint(0, 7, (11,))
    grads = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = nn.Sequential(fastdfa.Linear(6, 5, activation="relu"), fastdfa.Linear(5, 4, activation="tanh"),
                              fastdfa.Linear(4, 7))
        dfa = fastdfa.DFA(model, error_rank=3, backend=backend, seed=1)
        F.cross_entropy(dfa(x), t).backward()
        grads[backend] = [q.grad.clone() for q in model.parameters()]
        if backend == "triton":
            assert dfa.fused_layers == ["0", "1", "2"]
    for a, b in zip(grads["torch"], grads["triton"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_soft_align_refuses_error_rank_and_changes_nothing():
    # IFA's angle is set in the error's own coordinates, unreachable through P e for k < n_e. (Feedback-weight
    # matching takes error_rank=k since it matches in P's SVD basis: tests/test_fwm_error_space.py.)
    dfa = fastdfa.DFA(_mlp(), error_rank=3)
    dfa(torch.randn(4, 6, dtype=DT))
    before = {k: v.clone() for k, v in dfa.state_dict().items()}
    with pytest.raises(ValueError, match="error_rank=3"):
        fastdfa.init.soft_align(dfa, 30.0)
    for k, v in dfa.state_dict().items():
        assert torch.equal(v, before[k]), k
