"""Feedback-weight matching in a chosen error space, float64 on CPU: under ``error_rank=k`` (the feedback acts on
P e, so in the error's coordinates it is G = F P), under ``head=`` (the error is the head's input, as wide as
it), and the joint solver (``method="joint"``: fastdfa.matching.solve_chain_jointly / solve_pair) against the
optimality conditions it claims."""

import pytest
import torch
from torch import nn

import fastdfa
from fastdfa.init import feedback_weight_matching, soft_align
from fastdfa.matching import encoder_blocks, encoder_weight_alignment, solve_chain_jointly, solve_pair
from fastdfa.metrics import error_space_feedback, weight_alignment
from fastdfa.models import make_mlp

DT = torch.float64
transformers = pytest.importorskip("transformers")


def _x(n=5, d=6):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(3), dtype=DT)


def _mlp_dfa(**options):
    torch.manual_seed(0)
    model = make_mlp(6, (9, 7, 5), 4, "tanh").double()
    return fastdfa.DFA(model, seed=1, example_input=_x(), **options), model


def _linears(model):
    return [m for m in model.modules() if isinstance(m, fastdfa.Linear)]


def _greedy(h_top, weights):
    """The paper's top-down solve written out: H_(l-1)^T = pinv(H_l) W_l."""
    hs, above = [], h_top
    for w in weights:
        above = (torch.linalg.pinv(above) @ w).t()
        hs.append(above)
    return hs


@pytest.mark.parametrize("rank", [2, 4, 6])
def test_fwm_under_error_rank_is_the_formula_in_the_error_space(rank):
    """P = U diag(s) V^T: H_top = W_L^T V, the chain solved on H, G = H V^T = F P written back, W_l := G_l
    G_(l-1)^T. rank >= n_e = 4 reproduces the full error's matching exactly; rank 2 projects W_L^T on V."""
    dfa, model = _mlp_dfa(error_rank=rank)
    layers = _linears(model)
    p = dfa.feedback.error_projection.double()
    assert p.shape == (rank, 4)
    _, s, vh = torch.linalg.svd(p, full_matrices=False)
    v = vh[: min(rank, 4)].t()
    w = [m.weight.detach().clone() for m in layers]
    h_top = w[-1].t() @ v
    hs = _greedy(h_top, [w[2], w[1]])               # W_3 (7 -> 5) then W_2 (9 -> 7)
    report = feedback_weight_matching(dfa)
    g = [error_space_feedback(dfa, site) for site in dfa.sites]   # sites at the inputs of layers 2, 3, 4
    for got, want in zip(g, [hs[1], hs[0], h_top]):
        torch.testing.assert_close(got, want @ v.t(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layers[2].weight.detach(), h_top @ hs[0].t(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layers[1].weight.detach(), hs[0] @ hs[1].t(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layers[0].weight.detach(), w[0])
    rows = {r.layer: r for r in report}
    top = rows[dfa.name_of(layers[-1])]
    want_top = float((w[-1].t() - w[-1].t() @ v @ v.t()).norm() / w[-1].norm())
    assert top.reconstruction_error == pytest.approx(want_top, abs=1e-9)
    assert (top.reconstruction_error > 0.1) == (rank < 4)
    assert rows[dfa.name_of(layers[1])].rank_limit == min(rank, 4)
    wa = weight_alignment(dfa)
    for m in layers[1:3]:
        assert wa[dfa.name_of(m)] == pytest.approx(1, abs=1e-9)
    if rank >= 4:  # the same matching as without error_rank
        plain, plain_model = _mlp_dfa()
        feedback_weight_matching(plain)
        for a, b in zip(_linears(model), _linears(plain_model)):
            torch.testing.assert_close(a.weight.detach(), b.weight.detach(), rtol=1e-7, atol=1e-9)
        for site, other in zip(dfa.sites, plain.sites):
            torch.testing.assert_close(error_space_feedback(dfa, site), other.feedback.detach(), rtol=1e-7,
                                       atol=1e-9)


def test_fwm_with_a_head_matches_in_the_head_input_space():
    """head=: the last fastdfa layer is DFA's output layer and e is as wide as the head's input (8 here, 2
    classes), so a square 8 x 8 layer is matched exactly (rank 8) where the class error gives rank 2."""
    def build(**options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                              nn.Linear(8, 2)).double()
        return fastdfa.prepare(model, example_input=_x(), seed=1, **options)

    wide, narrow = build(head="6"), build()
    wide_rows = {r.layer: r for r in feedback_weight_matching(wide)}
    narrow_rows = {r.layer: r for r in feedback_weight_matching(narrow)}
    assert wide_rows["4"].action == "feedback = weight^T"
    assert wide_rows["2"].rank == 8 and wide_rows["2"].reconstruction_error == pytest.approx(0, abs=1e-9)
    assert narrow_rows["2"].rank == 2 and narrow_rows["2"].reconstruction_error > 0.5
    assert "6" not in wide_rows  # the head: BP, not matched
    assert all(v == pytest.approx(1, abs=1e-9) for k, v in weight_alignment(wide).items() if k != "0")


def _chain_objective(h, w):
    return sum(((h[j] @ h[j + 1].t() - w[j]).norm() / w[j].norm()) ** 2 for j in range(len(w)))


def test_the_joint_chain_solve_lowers_the_objective_sweep_after_sweep(monkeypatch):
    """Block-coordinate descent: strictly below the greedy start here, lower with more sweeps, and the last
    factor (updated last, its one neighbour fixed since) exactly its least-squares optimum: zero gradient."""
    from fastdfa import matching

    gen = torch.Generator().manual_seed(0)
    widths = [5, 9, 7, 8, 6]   # H_0 (fixed) .. H_4
    h_top = torch.randn(widths[0], 3, generator=gen, dtype=DT)
    weights = [torch.randn(widths[j], widths[j + 1], generator=gen, dtype=DT) for j in range(len(widths) - 1)]
    start = _greedy(h_top, weights)
    values = {}
    for sweeps in (1, 20, 200):
        monkeypatch.setattr(matching, "JOINT_SWEEPS", sweeps)
        joint = [h.clone().requires_grad_(True) for h in solve_chain_jointly(h_top, weights, start)]
        value = _chain_objective([h_top] + joint, weights)
        value.backward()
        values[sweeps] = float(value)
        assert float(joint[-1].grad.norm()) < 1e-10
    assert values[200] < values[20] < values[1] < float(_chain_objective([h_top] + start, weights)) - 1e-3


def test_the_pair_solve_attains_the_eckart_young_bound():
    """With g invertible, min ||g X^T - A||^2/||A||^2 + ||X Y^T - B||^2/||B||^2 is the sum of the squared singular
    values of [A^T / ||A||, B / ||B||] beyond the r-th (g's QR factor is square: Q^T A = A in norm)."""
    gen = torch.Generator().manual_seed(1)
    a, b, c = 6, 11, 6
    g = torch.randn(a, a, generator=gen, dtype=DT)
    w_top = torch.randn(a, b, generator=gen, dtype=DT)   # Wd: a x b
    w_low = torch.randn(b, c, generator=gen, dtype=DT)   # Wi: b x c
    x, y = solve_pair(g, w_top, w_low)
    value = ((g @ x.t() - w_top).norm() / w_top.norm()) ** 2 + ((x @ y.t() - w_low).norm() / w_low.norm()) ** 2
    s = torch.linalg.svdvals(torch.cat([w_top.t() / w_top.norm(), w_low / w_low.norm()], dim=1))
    assert float(value) == pytest.approx(float((s[a:] ** 2).sum()), rel=1e-8)
    greedy_x = (torch.linalg.pinv(g) @ w_top).t()                  # Wd exact, Wi then projected
    greedy_y = (torch.linalg.pinv(greedy_x) @ w_low).t()
    greedy = ((greedy_x @ greedy_y.t() - w_low).norm() / w_low.norm()) ** 2
    assert float(value) < float(greedy)


def test_the_encoder_form_joint_and_error_rank_keep_its_equations():
    """A converted BERT (float64): under error_rank=2 with the joint solve, every matched weight is its output
    feedback times its input feedback in the error's coordinates (WA 1), and each block's FFN pair is
    solve_pair's."""
    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertForSequenceClassification(config)

        def forward(self, ids):
            return self.bert(input_ids=ids).logits

    model = fastdfa.convert(Classifier()).double()
    ids = torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(0))
    dfa = fastdfa.DFA(model, seed=1, feedback_layout="per-feature", error_rank=2, example_input=(ids,))
    blocks = encoder_blocks(model)
    report = feedback_weight_matching(dfa, method="joint")
    wa = encoder_weight_alignment(dfa)
    rows = {r.layer: r for r in report}
    assert rows[dfa.name_of(blocks[0].ffn_up)].rank_limit == 2
    top = rows["bert.classifier"]
    assert top.action == "feedback = weight^T" and top.reconstruction_error > 0.1  # rank(P) = 2 < 3 classes
    assert wa.pop("bert.classifier") == pytest.approx((1 - top.reconstruction_error ** 2) ** 0.5, abs=1e-9)
    assert wa and all(v == pytest.approx(1, abs=1e-9) for v in wa.values())
    g = {id(s.module): error_space_feedback(dfa, s) for s in dfa.sites}
    for block in blocks:  # Wi's input feedback F_1 and Wd's F_u: W = G_out G_in^T
        torch.testing.assert_close(block.ffn_up.weight.detach(), g[id(block.ffn_down)] @ g[id(block.ffn_up)].t(),
                                   rtol=1e-8, atol=1e-10)


def test_bad_combinations_are_refused_and_change_nothing():
    dfa, model = _mlp_dfa(error_rank=3)
    before = {k: v.clone() for k, v in dfa.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="rank= truncates the SVD solve; use method='svd'"):
        feedback_weight_matching(dfa, method="joint", rank=2)
    with pytest.raises(ValueError, match="error_rank=3"):
        soft_align(dfa, 30)
    for k, v in dfa.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def test_joint_matching_reconstructs_better_than_the_greedy_solve():
    """End to end: on the MLP the joint solve's summed squared relative errors are below lstsq's; on a BERT under
    head= (e as wide as the pooler's output) the last block's FFN up projection, which the greedy solve can only
    project on the down projection's row space, is reconstructed better, with the pair's error no larger."""
    def mlp_errors(method):
        dfa, _ = _mlp_dfa()
        return [r.reconstruction_error for r in feedback_weight_matching(dfa, method=method)
                if r.action == "weights matched"]

    greedy, joint = mlp_errors("lstsq"), mlp_errors("joint")
    assert sum(e * e for e in joint) < sum(e * e for e in greedy) - 1e-3

    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)

    def bert_rows(method):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(config).double()
        dfa = fastdfa.prepare(model, head="classifier", feedback_layout="per-feature", seed=1)
        dfa.build((torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(0)),))
        return {r.layer: r.reconstruction_error for r in feedback_weight_matching(dfa, method=method)}

    greedy, joint = bert_rows("lstsq"), bert_rows("joint")
    up, down = "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense"
    assert greedy[down] == pytest.approx(0, abs=1e-9) and greedy[up] > 0.3
    assert joint[up] < greedy[up] - 0.05
    assert joint[up] ** 2 + joint[down] ** 2 < greedy[up] ** 2
