"""fastdfa.metrics (WA, GA), fastdfa.init.feedback_weight_matching (FWM) and soft_align (IFA), float64 on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from rules import assert_rule_gives_bp_gradients
from torch import nn

import fastdfa
from fastdfa.init import feedback_weight_matching, soft_align
from fastdfa.metrics import gradient_alignment, weight_alignment
from fastdfa.models import make_cnn, make_mlp

DT = torch.float64


def _cos(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(a.detach() @ b.detach() / (a.norm() * b.norm()))


def _wrapped_mlp(widths=(12, 9, 7), n_in=10, n_out=4, activation="tanh", mode="dfa", seed=0):
    torch.manual_seed(seed)
    model = make_mlp(n_in, widths, n_out, activation).to(DT)
    return fastdfa.DFA(model, mode=mode, seed=seed, example_input=torch.randn(2, n_in, dtype=DT)), model


def _linears(model):
    return [m for m in model.modules() if isinstance(m, fastdfa.Linear)]


# ----------------------------------------------------------------- WA
def test_weight_alignment_definition():
    dfa, model = _wrapped_mlp()
    lin = _linears(model)
    f = [s.feedback for s in dfa.sites]  # f[l-1] = F_l, at the input of layer l+1
    wa = weight_alignment(dfa)
    assert set(wa) == {"2", "3", "4"}  # layer 1 has no WA
    assert wa["2"] == pytest.approx(_cos(lin[1].weight, f[1] @ f[0].T), abs=1e-12)
    assert wa["4"] == pytest.approx(_cos(lin[3].weight, f[2].T), abs=1e-12)


def test_weight_alignment_of_random_feedback_is_near_zero():
    dfa, model = _wrapped_mlp(widths=(64, 64), n_in=64, n_out=10)
    for name, value in weight_alignment(dfa).items():
        numel = dict(model.named_modules())[name].weight.numel()
        assert abs(value) < 5 / math.sqrt(numel), (name, value)  # 5 sigma of a random cosine


# ----------------------------------------------------------------- FWM
@pytest.mark.parametrize("method", ["lstsq", "svd"])
def test_fwm_exact_algebra(method):
    dfa, model = _wrapped_mlp()
    lin = _linears(model)
    w1, biases = lin[0].weight.clone(), [l.bias.clone() for l in lin]
    report = feedback_weight_matching(dfa, method=method)
    f = [s.feedback for s in dfa.sites]
    torch.testing.assert_close(f[-1], lin[-1].weight.T, rtol=0, atol=0)
    for l in (1, 2):  # layers 2 and 3: W_l = F_l F_(l-1)^T
        torch.testing.assert_close(lin[l].weight, f[l] @ f[l - 1].T, rtol=1e-12, atol=1e-12)
        assert _cos(lin[l].weight, f[l] @ f[l - 1].T) == pytest.approx(1, abs=1e-8)
    assert torch.equal(lin[0].weight, w1) and all(torch.equal(l.bias, b) for l, b in zip(lin, biases))
    assert all(v == pytest.approx(1, abs=1e-8) for v in weight_alignment(dfa).values())
    by_layer = {r.layer: r for r in report}
    assert by_layer["1"].action == "kept" and by_layer["4"].action == "feedback = weight^T"
    assert by_layer["2"].action == "weights matched" and by_layer["2"].wa_after == pytest.approx(1, abs=1e-8)
    # 12 x 9 weight, n_out 4: rank at most 4 < 9, so the match is approximate and says so.
    assert by_layer["3"].rank_limit == 4 and "approximate" in by_layer["3"].note
    assert by_layer["3"].reconstruction_error > 0.1


def test_fwm_solve_is_the_least_squares_solution():
    dfa, model = _wrapped_mlp()
    lin = _linears(model)
    w3 = lin[3].weight.clone()
    w2 = lin[2].weight.clone()
    report = feedback_weight_matching(dfa)
    f3 = w3.T  # F_3 = W_4^T
    x = torch.linalg.pinv(f3) @ w2  # F_2^T, the minimum-norm least-squares solution
    torch.testing.assert_close(dfa.sites[1].feedback.T, x, rtol=1e-9, atol=1e-12)
    err = float((f3 @ x - w2).norm() / w2.norm())
    assert {r.layer: r for r in report}["3"].reconstruction_error == pytest.approx(err, rel=1e-9)


def test_fwm_narrow_layers_match_exactly_and_svd_truncation_costs():
    """min(n_l, n_(l-1)) <= n_out: F_l F_(l-1)^T can equal W_l, error 0. Truncating to rank 1 cannot."""
    dfa, _ = _wrapped_mlp(widths=(3, 3, 3), n_in=5, n_out=4)
    errors = {r.layer: r.reconstruction_error for r in feedback_weight_matching(dfa, method="lstsq")}
    assert errors["2"] < 1e-10 and errors["3"] < 1e-10
    dfa, _ = _wrapped_mlp(widths=(3, 3, 3), n_in=5, n_out=4)
    truncated = {r.layer: r for r in feedback_weight_matching(dfa, method="svd", rank=1)}
    assert truncated["3"].rank == 1 and truncated["3"].reconstruction_error > 0.1


def test_fwm_on_a_cnn_matches_the_linear_head_only():
    torch.manual_seed(0)
    model = make_cnn((1, 8, 8), 4, channels=(3, 4), hidden=6).to(DT)
    dfa = fastdfa.DFA(model, example_input=torch.randn(2, 1, 8, 8, dtype=DT))
    convs = [m.weight.clone() for m in model if isinstance(m, fastdfa.Conv2d)]
    report = {r.layer: r for r in feedback_weight_matching(dfa)}
    assert report["0"].action == "kept" and report["2"].action == "kept"  # the convolutions
    assert report["5"].action == "weights matched" and report["6"].action == "feedback = weight^T"
    assert all(torch.equal(m.weight, c) for m, c in zip([m for m in model if isinstance(m, fastdfa.Conv2d)], convs))
    assert weight_alignment(dfa)["5"] == pytest.approx(1, abs=1e-8)


def test_fwm_bad_input_changes_nothing():
    torch.manual_seed(0)
    unbuilt = fastdfa.DFA(make_mlp(4, (3,), 2).to(DT))
    with pytest.raises(RuntimeError, match="not built"):
        feedback_weight_matching(unbuilt)
    dfa, model = _wrapped_mlp()
    before = {k: v.clone() for k, v in dfa.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="method"):
        feedback_weight_matching(dfa, method="qr")
    with pytest.raises(ValueError, match="rank= truncates"):
        feedback_weight_matching(dfa, method="lstsq", rank=2)
    conv_out = nn.Sequential(fastdfa.Linear(4, 8), nn.Unflatten(1, (2, 2, 2)), fastdfa.Conv2d(2, 3, 2)).to(DT)
    conv_dfa = fastdfa.DFA(conv_out, example_input=torch.randn(1, 4, dtype=DT))
    with pytest.raises(ValueError, match="output layer"):
        feedback_weight_matching(conv_dfa)
    after = {k: v for k, v in dfa.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------- soft_align
@pytest.mark.parametrize("angle", [0, 30, 60, 90, 135])
def test_soft_align_fa_sets_the_angle_and_norm(angle):
    torch.manual_seed(0)
    model = make_cnn((1, 8, 8), 4, channels=(3, 4), hidden=6)  # float32, convs included
    dfa = fastdfa.DFA(model, mode="fa")
    cosines = soft_align(dfa, angle)
    for m in model.modules():
        if isinstance(m, (fastdfa.Linear, fastdfa.Conv2d)):
            assert _cos(m.feedback_weight, m.weight) == pytest.approx(math.cos(math.radians(angle)), abs=1e-6)
            assert float(m.feedback_weight.norm()) == pytest.approx(float(m.weight.norm()), rel=1e-6)
    assert len(cosines) == 4 and all(c == pytest.approx(math.cos(math.radians(angle)), abs=1e-6)
                                     for c in cosines.values())


def test_soft_align_fa_angle_zero_gives_bp_gradients():
    dfa, model = _wrapped_mlp(mode="fa")
    soft_align(dfa, 0)
    assert_rule_gives_bp_gradients(dfa, model, torch.randn(6, 10, dtype=DT), torch.randint(0, 4, (6,)),
                                    rtol=1e-12, atol=1e-14)


def _deep_linear(depth=5, width=9, n_out=4, n_in=7):
    torch.manual_seed(1)
    layers = [fastdfa.Linear(n_in, width)] + [fastdfa.Linear(width, width) for _ in range(depth - 2)]
    model = nn.Sequential(*layers, fastdfa.Linear(width, n_out)).to(DT)
    return fastdfa.DFA(model, seed=4, example_input=torch.randn(2, n_in, dtype=DT)), model


def test_soft_align_dfa_angle_zero_on_a_linear_network_is_bp():
    dfa, model = _deep_linear()
    assert min(gradient_alignment(dfa, torch.randn(8, 7, dtype=DT), torch.randint(0, 4, (8,))).values()) < 0.9
    soft_align(dfa, 0)
    x, t = torch.randn(8, 7, dtype=DT), torch.randint(0, 4, (8,))
    ga = gradient_alignment(dfa, x, t)
    assert len(ga) == 5 and all(v == pytest.approx(1, abs=1e-10) for v in ga.values())
    assert_rule_gives_bp_gradients(dfa, model, x, t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("angle", [20, 45, 90])
def test_soft_align_dfa_sets_the_angle_to_the_bp_path(angle):
    dfa, model = _deep_linear()
    cosines = soft_align(dfa, angle)
    lin = _linears(model)
    path = lin[-1].weight
    for k in range(len(lin) - 1, 0, -1):  # site at the input of layer k (0-based) has P = (W_L ... W_k)^T
        site = dfa.sites[k - 1]
        assert _cos(site.feedback, path.T) == pytest.approx(math.cos(math.radians(angle)), abs=1e-9)
        assert float(site.feedback.norm()) == pytest.approx(float(path.norm()), rel=1e-9)
        path = path @ lin[k - 1].weight
    assert set(cosines) == {s.name for s in dfa.sites}


def test_soft_align_bad_input_changes_nothing():
    dfa, model = _wrapped_mlp()
    with pytest.raises(ValueError, match="angle"):
        soft_align(dfa, 200)
    with fastdfa.backprop(dfa), pytest.raises(ValueError, match="'bp'"):
        soft_align(dfa, 10)
    torch.manual_seed(0)
    cnn = fastdfa.DFA(make_cnn((1, 8, 8), 4, channels=(3, 4), hidden=6).to(DT),
                      example_input=torch.randn(2, 1, 8, 8, dtype=DT))
    before = cnn.feedback.flat.clone()
    with pytest.raises(ValueError, match="breaks the chain"):
        soft_align(cnn, 10)
    assert torch.equal(cnn.feedback.flat, before)


# ----------------------------------------------------------------- GA
def test_gradient_alignment_formula_dfa():
    """GA_1 of a 2-layer tanh MLP: per-sample cos((F_1 e) * g'(a_1), (W_2^T e) * g'(a_1)), averaged."""
    torch.manual_seed(0)
    model = nn.Sequential(fastdfa.Linear(5, 6, activation="tanh"), fastdfa.Linear(6, 3)).to(DT)
    dfa = fastdfa.DFA(model, seed=1)
    x, t = torch.randn(7, 5, dtype=DT), torch.randint(0, 3, (7,))
    ga = gradient_alignment(dfa, x, t)
    with torch.no_grad():
        a1 = F.linear(x, model[0].weight, model[0].bias)
        y = F.linear(torch.tanh(a1), model[1].weight, model[1].bias)
        e = torch.softmax(y, 1) - F.one_hot(t, 3).to(DT)
        e = e / 7  # mean reduction
        gp = 1 - torch.tanh(a1) ** 2
        rule = (e @ dfa.sites[0].feedback.T) * gp
        bp = (e @ model[1].weight) * gp
    want = F.cosine_similarity(rule, bp, dim=1).mean().item()
    assert ga["0"] == pytest.approx(want, abs=1e-12)
    assert ga["1"] == pytest.approx(1, abs=1e-12)  # the output layer gets the true error
    assert want < 0.9


def test_gradient_alignment_fa_with_feedback_equal_to_weight_is_one():
    dfa, model = _wrapped_mlp(mode="fa")
    with torch.no_grad():
        for m in _linears(model):
            m.feedback_weight.copy_(m.weight)
    ga = gradient_alignment(dfa, torch.randn(6, 10, dtype=DT), torch.randint(0, 4, (6,)))
    assert len(ga) == 4 and all(v == pytest.approx(1, abs=1e-12) for v in ga.values())


def test_metrics_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(fastdfa.Linear(5, 6, activation="relu"), nn.BatchNorm1d(6), nn.Dropout(0.5),
                          fastdfa.Linear(6, 3)).to(DT)
    dfa = fastdfa.DFA(model, seed=1)
    x, t = torch.randn(8, 5, dtype=DT), torch.randint(0, 3, (8,))
    F.cross_entropy(dfa(x), t).backward()  # some .grad to keep
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    ga = gradient_alignment(dfa, x, t)
    weight_alignment(dfa)
    assert ga and all(-1 <= v <= 1 for v in ga.values())
    assert dfa.mode == "dfa" and model.training and all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm stats too
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())
    with fastdfa.backprop(dfa), pytest.raises(ValueError, match="'bp'"):
        gradient_alignment(dfa, x, t)


def test_alignment_log_records_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from fastdfa.metrics import AlignmentLog
    dfa, model = _wrapped_mlp()
    x, t = torch.randn(16, 10, dtype=DT), torch.randint(0, 4, (16,))
    log = AlignmentLog(dfa, x, t)
    first = log(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(dfa(x), t).backward()
        opt.step()
    last = log(30)
    assert [r["step"] for r in log.records] == [0, 30]
    # Training with DFA turns the weights towards the feedback: WA of the output layer grows.
    assert last["weight"]["4"] > first["weight"]["4"]
    png = log.plot(tmp_path / "a.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
