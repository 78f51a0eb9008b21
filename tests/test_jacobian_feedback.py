"""fastdfa.init.jacobian_feedback against its formula in float64: F_s = mean_n J_{s,n}^T (per-feature sites:
the mean over positions too), F_s = M_s P^+ under error_rank (checked against torch.linalg.lstsq); DFA's
gradients are BP's on a linear network; the weights are kept; refusals change nothing."""

import pytest
import torch
from rules import assert_rule_gives_bp_gradients
from torch import nn

import fastdfa

DT = torch.float64


def _mlp(activation="tanh"):
    torch.manual_seed(0)
    return nn.Sequential(fastdfa.Linear(6, 5, activation=activation), fastdfa.Linear(5, 4, activation=activation),
                         fastdfa.Linear(4, 3)).to(DT)


def _mean_jacobian_t(fn, h: torch.Tensor) -> torch.Tensor:
    """mean_n (dz_n/dh_n)^T for z = fn(h) row by row: (features, n_e), by torch.autograd.functional."""
    out = []
    for row in h:
        out.append(torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], row).t())
    return torch.stack(out).mean(0)


def test_mlp_feedback_is_the_mean_transposed_jacobian():
    model = _mlp()
    dfa = fastdfa.DFA(model, seed=1)
    x = torch.randn(7, 6, dtype=DT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fits = fastdfa.init.jacobian_feedback(dfa, x)
    assert fits == {"1": 0.0, "2": 0.0}
    with torch.no_grad():
        h1 = model[0].plain_forward(x)
        h2 = model[1].plain_forward(h1)
    expected = {"1": _mean_jacobian_t(lambda v: model[2].plain_forward(model[1].plain_forward(v)), h1),
                "2": model[2].weight.detach().clone()}  # the top site's Jacobian is W_3, the same for every n
    expected["2"] = expected["2"].t()
    for site in dfa.feedback.sites:
        torch.testing.assert_close(site.feedback, expected[site.name], rtol=1e-10, atol=1e-12)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the weights are kept
    assert h2.shape == (7, 4)


def test_on_a_linear_network_dfa_gradients_become_bps():
    model = _mlp(None)
    dfa = fastdfa.DFA(model, seed=2)
    x, t = torch.randn(9, 6, dtype=DT), torch.randint(0, 3, (9,))
    fastdfa.init.jacobian_feedback(dfa, x[:4])  # a linear net's Jacobian does not depend on the batch
    assert_rule_gives_bp_gradients(dfa, model, x, t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [2, 5])
def test_under_error_rank_the_feedback_is_the_least_squares_fit_through_p(rank):
    model = _mlp()
    dfa = fastdfa.DFA(model, seed=3, error_rank=rank)  # a 3-wide error: rank 2 compresses, 5 expands
    x = torch.randn(5, 6, dtype=DT)
    fits = fastdfa.init.jacobian_feedback(dfa, x)
    plain = fastdfa.DFA(_mlp(), seed=3)  # the same model: its M_s, by the basis route
    fastdfa.init.jacobian_feedback(plain, x)
    p = dfa.feedback.error_projection.double()
    for site, ref in zip(dfa.feedback.sites, plain.feedback.sites):
        m = ref.feedback.double()
        best = torch.linalg.lstsq(p.t(), m.t(), driver="gelsd").solution.t()  # min ||F P - M||, least norm
        torch.testing.assert_close(site.feedback, best, rtol=1e-8, atol=1e-10)
        if rank < 3:
            assert fits[site.name] is None  # M_s not measured: k backward passes along P's rows
            assert float((best @ p - m).norm() / m.norm()) > 1e-3  # rank 2 of a 3-wide error: approximate
        else:
            assert fits[site.name] == pytest.approx(0.0, abs=1e-10)
            torch.testing.assert_close(site.feedback @ p, m, rtol=1e-8, atol=1e-10)


class _Tokens(nn.Module):
    """[N, T, 4] -> per-token Linear (per-feature site over tokens) -> mean over T -> Linear -> 3 logits."""

    def __init__(self, reached=None):
        super().__init__()
        self.reached = reached  # the tokens that reach the output (the others: padding behind a mask)
        self.a = fastdfa.Linear(4, 5, activation="tanh")
        self.b = fastdfa.Linear(5, 5, activation="tanh")
        self.out = fastdfa.Linear(5, 3)

    def forward(self, x):
        return self.out(self.b(self.a(x))[:, :self.reached].mean(1))


@pytest.mark.parametrize("reached", [6, 4])
def test_per_feature_sites_take_the_mean_over_the_positions_that_reach_the_error(reached):
    torch.manual_seed(0)
    model = _Tokens(reached).to(DT)
    dfa = fastdfa.DFA(model, seed=4, feedback_layout="per-feature")
    x = torch.randn(3, 6, 4, dtype=DT)
    fastdfa.init.jacobian_feedback(dfa, x)
    site = next(s for s in dfa.feedback.sites if s.name == "b")
    assert site.channelwise
    with torch.no_grad():
        h = model.a.plain_forward(x)  # [3, 6, 5]: the input of site b
    # per sample, per token t: J_{n,t} = dz_n / dh_{n,t} (3 x 5); the feedback is their mean over n and t
    jac = []
    for n in range(3):
        full = torch.autograd.functional.jacobian(lambda v: model.out(model.b.plain_forward(v)[:reached].mean(0)),
                                                  h[n])
        jac += [full[:, t, :].t() for t in range(reached)]  # full: (3, T, 5); tokens >= reached: J = 0
    torch.testing.assert_close(site.feedback, torch.stack(jac).mean(0), rtol=1e-10, atol=1e-12)


def test_keyword_inputs_and_a_head_error_point():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(fastdfa.Linear(6, 5, activation="tanh"), fastdfa.Linear(5, 4, activation="tanh"))
            self.classifier = nn.Linear(4, 2)

        def forward(self, *, inputs):
            return self.classifier(self.body(inputs))

    model = Net().to(DT)
    dfa = fastdfa.DFA(model, head="classifier", seed=5)
    x = torch.randn(6, 6, dtype=DT)
    fastdfa.init.jacobian_feedback(dfa, {"inputs": x})
    site = dfa.feedback.sites[0]  # the input of body.1; the error is the head's 4-wide input
    assert site.feedback.shape == (5, 4)
    with torch.no_grad():
        h = model.body[0].plain_forward(x)
    torch.testing.assert_close(site.feedback, _mean_jacobian_t(model.body[1].plain_forward, h), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("case", ["fa", "batch_dims", "not a wrapper"])
def test_refusals_change_nothing(case):
    model = _mlp()
    if case == "not a wrapper":
        with pytest.raises(TypeError, match="fastdfa.DFA"):
            fastdfa.init.jacobian_feedback(model, torch.randn(2, 6, dtype=DT))
        return
    dfa = fastdfa.DFA(model, mode="fa" if case == "fa" else "dfa", seed=1,
                      batch_dims=2 if case == "batch_dims" else 1)
    dfa(torch.randn(2, 3, 6, dtype=DT) if case == "batch_dims" else torch.randn(2, 6, dtype=DT))
    before = {k: v.clone() for k, v in dfa.state_dict().items()}
    with pytest.raises(ValueError, match="mode 'fa'" if case == "fa" else "batch_dims=2"):
        fastdfa.init.jacobian_feedback(dfa, torch.randn(2, 6, dtype=DT))
    for k, v in dfa.state_dict().items():
        assert torch.equal(v, before[k]), k
