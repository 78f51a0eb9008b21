"""Per-feature feedback (``feedback_layout="per-feature"``): one feedback row per feature, broadcast over
tokens / space, so a site takes any sequence length or image size. The gradients equal the rule written
out in float64: every token of sample b receives ``F e_b`` (no division by the token count)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa
from fastdfa import grape
from fastdfa.models import make_cnn

DT = torch.float64


class TokenNet(nn.Module):
    """[B, T, 3] tokens -> a (tanh) -> b (gelu), token-wise -> mean over tokens -> head [B, C]."""

    def __init__(self, classes=4):
        super().__init__()
        self.a = fastdfa.Linear(3, 6, activation="tanh", dtype=DT)
        self.b = fastdfa.Linear(6, 5, activation="gelu", dtype=DT)
        self.head = fastdfa.Linear(5, classes, dtype=DT)

    def forward(self, x):
        return self.head(self.b(self.a(x)).mean(1))


def _reference(model, dfa, x, target):
    """The per-feature DFA rule written out: site s (input of b: [B, T, 6]; input of head: [B, 5])
    receives (e F_s^T) broadcast over tokens; each layer's local backward from there, input detached."""
    a, b, head = model.a, model.b, model.head
    F_b, F_head = (s.feedback for s in dfa.sites)
    with torch.no_grad():
        h1 = a(x)
        h2 = b(h1)
        pooled = h2.mean(1)
    out = head(pooled.detach().requires_grad_())
    e = torch.autograd.grad(F.cross_entropy(out, target), out)[0]          # [B, C]
    grads = {}
    # head: its input is the site [B, 5]; delta = e
    grads["head.weight"], grads["head.bias"] = e.T @ pooled, e.sum(0)
    # b: site at its input [B, T, 6] gets (e F_b^T) broadcast over tokens; b's own delta comes from the
    # head site: the projected error at b's OUTPUT, i.e. the head site's input, is (e F_head^T) [B, 5],
    # reaching b through mean(1) (autograd's local backward)
    h1d = h1.detach().requires_grad_()
    out_b = b(h1d).mean(1)
    gb = torch.autograd.grad(out_b, [b.weight, b.bias], e @ F_head.T)
    grads["b.weight"], grads["b.bias"] = gb
    xd = x.detach()
    out_a = a(xd)
    proj = (e @ F_b.T)[:, None, :].expand_as(out_a)                          # F e_b on every token
    ga = torch.autograd.grad(out_a, [a.weight, a.bias], proj)
    grads["a.weight"], grads["a.bias"] = ga
    return grads


@pytest.mark.parametrize("lengths", [(7,), (7, 3, 11)])
def test_per_feature_token_sites_follow_the_rule_at_any_length(lengths):
    torch.manual_seed(0)
    model = TokenNet()
    dfa = fastdfa.DFA(model, feedback_layout="per-feature", seed=2)
    for t_len in lengths:  # the feedback is built at the first length and used at the others
        x, target = torch.randn(3, t_len, 3, dtype=DT), torch.randint(0, 4, (3,))
        model.zero_grad()
        F.cross_entropy(dfa(x), target).backward()
        want = _reference(model, dfa, x, target)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=1e-12, atol=1e-12)
    assert [tuple(s.feedback.shape) for s in dfa.sites] == [(6, 4), (5, 4)]
    assert dfa.sites[0].feature_axis == 1


def test_dense_token_sites_are_tied_to_the_length_and_say_what_to_use():
    model = TokenNet()
    dfa = fastdfa.DFA(model)
    dfa(torch.randn(2, 5, 3, dtype=DT))
    with pytest.raises(ValueError, match="per-feature"):
        dfa(torch.randn(2, 6, 3, dtype=DT))


def test_conv_feedback_channel_is_the_per_feature_layout_on_a_cnn():
    torch.manual_seed(0)
    model = make_cnn((1, 8, 8), 4, channels=(3, 4), hidden=6).to(DT)
    x, t = torch.randn(5, 1, 8, 8, dtype=DT), torch.randint(0, 4, (5,))
    grads = []
    for kwargs in (dict(conv_feedback="channel"), dict(feedback_layout="per-feature")):
        m = copy.deepcopy(model)
        dfa = fastdfa.DFA(m, seed=3, **kwargs)
        F.cross_entropy(dfa(x), t).backward()
        grads.append([p.grad for p in m.parameters()])
        assert dfa.config.feedback_layout == "per-feature"
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_per_feature_cnn_takes_other_image_sizes():
    """A fully convolutional net (global pooling) with per-feature feedback trains on 8x8 and 12x12."""
    net = nn.Sequential(fastdfa.Conv2d(1, 3, 3, padding=1, activation="relu", dtype=DT),
                        fastdfa.Conv2d(3, 4, 3, padding=1, activation="relu", dtype=DT),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), fastdfa.Linear(4, 2, dtype=DT))
    dfa = fastdfa.DFA(net, feedback_layout="per-feature")
    for size in (8, 12):
        F.cross_entropy(dfa(torch.randn(3, 1, size, size, dtype=DT)), torch.tensor([0, 1, 0])).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_causal_lm_with_token_outputs_and_per_feature_sites():
    """batch_dims=2 ([B, T] per-token outputs): each token's error is projected to that token; lengths vary."""
    torch.manual_seed(0)
    l1, l2 = fastdfa.Linear(3, 6, activation="tanh", dtype=DT), fastdfa.Linear(6, 5, dtype=DT)
    model = nn.Sequential(l1, l2)
    dfa = fastdfa.DFA(model, batch_dims=2, feedback_layout="per-feature", seed=1)
    for t_len in (4, 9):
        x = torch.randn(2, t_len, 3, dtype=DT)
        target = torch.randint(0, 5, (2, t_len))
        model.zero_grad()
        out = dfa(x)
        F.cross_entropy(out.reshape(-1, 5), target.reshape(-1)).backward()
        with torch.no_grad():
            h = l1(x)
        o = l2(h).detach().requires_grad_()
        e = torch.autograd.grad(F.cross_entropy(o.reshape(-1, 5), target.reshape(-1)), o)[0]  # [B, T, 5]
        torch.testing.assert_close(l2.weight.grad, e.reshape(-1, 5).T @ h.reshape(-1, 6), rtol=1e-12, atol=1e-12)
        proj = e @ dfa.sites[0].feedback.T                                    # token-wise [B, T, 6]
        ga = torch.autograd.grad(l1(x), l1.weight, proj)[0]
        torch.testing.assert_close(l1.weight.grad, ga, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("jvp", ["per-site", "shared"])
def test_grape_on_per_feature_sites_aligns_with_the_token_summed_jacobian(jvp):
    """The dual pass's perturbation for a per-feature site is the per-token perturbation summed over
    tokens, and its tangent is torch.func.jvp's: E[T^T P / N] is then the token-summed Jacobian."""
    torch.manual_seed(0)
    model = TokenNet()
    x = torch.randn(3, 5, 3, dtype=DT)
    dfa = fastdfa.DFA(model, mode="grape", jvp=jvp, feedback_layout="per-feature", example_input=x)
    gen_state = dfa.perturbations.generator(x.device).get_state()
    est = grape.dual_pass(dfa, (x,), {}, 3)
    assert est.perturbations[0].shape == (3, 6)
    # replay the draws: the site-0 perturbation of replica 0 in token layout
    g = torch.Generator().manual_seed(0)
    g.set_state(gen_state)
    p_tokens = torch.randn(3, 5, 6, generator=g, dtype=torch.float32).to(DT)
    torch.testing.assert_close(est.perturbations[0], p_tokens.sum(1))
    with torch.no_grad():
        h1 = model.a(x)
    want = torch.func.jvp(lambda h: model.head(model.b(h).mean(1)), (h1,), (p_tokens,))[1]
    if jvp == "per-site":
        torch.testing.assert_close(est.tangents[0], want, rtol=1e-10, atol=1e-12)
    for _ in range(3):  # and a training step moves the per-feature feedback
        F.cross_entropy(dfa(torch.randn(3, 7, 3, dtype=DT)), torch.randint(0, 4, (3,))).backward()
    assert dfa.last_alignment is not None and dfa.last_alignment.shape == (2,)


def test_triton_backend_equals_torch_on_per_feature_sites():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the Triton interpreter on CPU tensors; on a GPU, compiled Triton is covered by the kernel "
                    "and engine tests (tests/test_triton_engine.py)")
    torch.manual_seed(0)
    model = TokenNet().float()
    x, t = torch.randn(3, 6, 3), torch.randint(0, 4, (3,))
    grads = {}
    for backend in ("torch", "triton"):
        m = copy.deepcopy(model)
        dfa = fastdfa.DFA(m, feedback_layout="per-feature", backend=backend, seed=5)
        F.cross_entropy(dfa(x), t).backward()
        grads[backend] = [p.grad for p in m.parameters()]
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
