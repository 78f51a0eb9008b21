"""The DFA / FA / BP rules against their formulas, in float64 on CPU."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def _derivative(name, a):
    """g'(a) in closed form (independent of autograd)."""
    if name == "tanh":
        return 1 - torch.tanh(a) ** 2
    if name == "relu":
        return (a > 0).to(a.dtype)
    if name == "gelu":  # exact GELU: Phi(a) + a * phi(a)
        return 0.5 * (1 + torch.erf(a / math.sqrt(2))) + a * torch.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    raise ValueError(name)


ACT = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def _mlp(act, widths=(7, 9, 8, 6, 4)):
    layers = []
    for i in range(len(widths) - 1):
        layers.append(fastdfa.Linear(widths[i], widths[i + 1], dtype=DT))
        if i < len(widths) - 2:
            layers.append(ACT[act]())
    return nn.Sequential(*layers)


def _mlp_dfa_reference(model, act, x, e):
    """dW_l, db_l from delta_l = (F_l e) * g'(a_l), delta_L = e, dW_l = delta_l^T h_{l-1}."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    h, hs, pre = x, [x], []
    with torch.no_grad():
        for i, lin in enumerate(linears):
            a = h @ lin.weight.T + lin.bias
            pre.append(a)
            h = ACT[act]()(a) if i < len(linears) - 1 else a
            hs.append(h)
    return linears, hs, pre


@pytest.mark.parametrize("act", ["tanh", "relu", "gelu"])
@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
def test_dfa_mlp_gradients_equal_formula(act, loss_kind):
    model = _mlp(act)
    dfa = fastdfa.DFA(model, seed=3)
    x = torch.randn(5, 7, dtype=DT)
    y = dfa(x)
    y.retain_grad()
    if loss_kind == "mse":
        loss = F.mse_loss(y, torch.randn(5, 4, dtype=DT))
    else:
        loss = F.cross_entropy(y, torch.tensor([0, 1, 2, 3, 1]))
    loss.backward()
    e = y.grad
    linears, hs, pre = _mlp_dfa_reference(model, act, x, e)
    assert [s.module for s in dfa.sites] == linears[1:]
    for l, lin in enumerate(linears):
        if l == len(linears) - 1:
            delta = e  # the output layer gets the true error
        else:
            F_l = dfa.sites[l].feedback.reshape(-1, 4)  # the site at the input of layer l+1 holds h_l
            delta = (e @ F_l.T) * _derivative(act, pre[l])
        torch.testing.assert_close(lin.weight.grad, delta.T @ hs[l], **TOL)
        torch.testing.assert_close(lin.bias.grad, delta.sum(0), **TOL)


def test_output_layer_gradient_is_the_true_one():
    model = _mlp("tanh")
    bp_model = _mlp("tanh")
    bp_model.load_state_dict(model.state_dict())
    x, t = torch.randn(6, 7, dtype=DT), torch.randn(6, 4, dtype=DT)
    F.mse_loss(fastdfa.DFA(model)(x), t).backward()
    F.mse_loss(bp_model(x), t).backward()
    torch.testing.assert_close(model[-1].weight.grad, bp_model[-1].weight.grad, **TOL)
    assert not torch.allclose(model[0].weight.grad, bp_model[0].weight.grad)


def _cnn(pool=nn.MaxPool2d):
    return nn.Sequential(
        fastdfa.Conv2d(2, 3, 3, padding=1, dtype=DT), nn.ReLU(), pool(2),
        fastdfa.Conv2d(3, 4, 3, padding=1, dtype=DT), nn.Tanh(), pool(2),
        nn.Flatten(), fastdfa.Linear(4 * 2 * 2, 6, dtype=DT), nn.ReLU(), fastdfa.Linear(6, 5, dtype=DT))


@pytest.mark.parametrize("conv_feedback", ["dense", "channel"])
@pytest.mark.parametrize("pool", [nn.MaxPool2d, nn.AvgPool2d])
def test_dfa_conv_net_gradients_equal_formula(conv_feedback, pool):
    model = _cnn(pool)
    dfa = fastdfa.DFA(model, conv_feedback=conv_feedback, seed=1)
    x = torch.randn(3, 2, 8, 8, dtype=DT)
    y = dfa(x)
    y.retain_grad()
    F.cross_entropy(y, torch.tensor([0, 2, 4])).backward()
    e = y.grad
    conv1, conv2, lin1, lin2 = model[0], model[3], model[7], model[9]
    assert [s.module for s in dfa.sites] == [conv2, lin1, lin2]
    s_conv2, s_lin1, s_lin2 = dfa.sites
    if conv_feedback == "channel":
        assert s_conv2.feedback.shape == (3, 5)  # O(C * n_out) memory
        proj = (e @ s_conv2.feedback.T)[:, :, None, None].expand(3, 3, 4, 4)
    else:
        assert s_conv2.feedback.shape == (3 * 4 * 4, 5)
        proj = (e @ s_conv2.feedback.T).reshape(3, 3, 4, 4)
    assert s_lin1.feedback.shape == (16, 5)  # linear sites stay dense
    with torch.no_grad():
        a1 = F.conv2d(x, conv1.weight, conv1.bias, padding=1)
        h1 = pool(2)(F.relu(a1))
        a2 = F.conv2d(h1, conv2.weight, conv2.bias, padding=1)
        h2 = pool(2)(torch.tanh(a2)).flatten(1)
        a3 = h2 @ lin1.weight.T + lin1.bias
        h3 = F.relu(a3)
    # Site at conv2's input: F e lands on the pooled map; the pool's backward is BP (local),
    # then g'(a1), then dW1 = conv2d_weight(x, delta1).
    pooled = F.relu(a1).requires_grad_()
    (grad_relu,) = torch.autograd.grad(pool(2)(pooled), pooled, proj)
    delta1 = grad_relu * (a1 > 0)
    torch.testing.assert_close(conv1.weight.grad, torch.nn.grad.conv2d_weight(x, conv1.weight.shape, delta1,
                                                                              padding=1), **TOL)
    torch.testing.assert_close(conv1.bias.grad, delta1.sum((0, 2, 3)), **TOL)
    t2 = torch.tanh(a2).requires_grad_()
    (grad_t2,) = torch.autograd.grad(pool(2)(t2).flatten(1), t2, e @ s_lin1.feedback.T)
    delta2 = grad_t2 * (1 - torch.tanh(a2) ** 2)
    torch.testing.assert_close(conv2.weight.grad, torch.nn.grad.conv2d_weight(h1, conv2.weight.shape, delta2,
                                                                              padding=1), **TOL)
    delta3 = (e @ s_lin2.feedback.T) * (a3 > 0)
    torch.testing.assert_close(lin1.weight.grad, delta3.T @ h2, **TOL)
    torch.testing.assert_close(lin2.weight.grad, e.T @ h3, **TOL)


def _loss_and_grads(model, x, t, wrap=None):
    model.zero_grad(set_to_none=True)
    out = (wrap or model)(x)
    F.mse_loss(out, t).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_mode_bp_equals_plain_pytorch():
    model = _cnn()
    x, t = torch.randn(3, 2, 8, 8, dtype=DT), torch.randn(3, 5, dtype=DT)
    plain = _loss_and_grads(model, x, t)
    dfa = fastdfa.DFA(model, mode="bp")
    for a, b in zip(_loss_and_grads(model, x, t, dfa), plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fa_with_feedback_weight_equal_to_weight_is_bp():
    model = _cnn()
    x, t = torch.randn(3, 2, 8, 8, dtype=DT), torch.randn(3, 5, dtype=DT)
    plain = _loss_and_grads(model, x, t)
    dfa = fastdfa.DFA(model, mode="fa")
    fa_random = _loss_and_grads(model, x, t, dfa)
    assert not torch.allclose(fa_random[0], plain[0])  # random B: FA differs from BP below the top
    for layer in model:
        if isinstance(layer, (fastdfa.Linear, fastdfa.Conv2d)):
            with torch.no_grad():
                layer.feedback_weight.copy_(layer.weight)
    for a, b in zip(_loss_and_grads(model, x, t, dfa), plain):
        torch.testing.assert_close(a, b, **TOL)


def test_fa_mlp_formula():
    """delta_l = (B_{l+1} delta_{l+1}) * g'(a_l) (B stored with W's shape: B^T applied as delta @ B)."""
    model = _mlp("tanh", widths=(5, 6, 4, 3))
    dfa = fastdfa.DFA(model, mode="fa", seed=9)
    x = torch.randn(4, 5, dtype=DT)
    y = dfa(x)
    y.retain_grad()
    F.mse_loss(y, torch.randn(4, 3, dtype=DT)).backward()
    l1, l2, l3 = model[0], model[2], model[4]
    with torch.no_grad():
        a1 = x @ l1.weight.T + l1.bias
        a2 = torch.tanh(a1) @ l2.weight.T + l2.bias
    d3 = y.grad
    d2 = (d3 @ l3.feedback_weight) * (1 - torch.tanh(a2) ** 2)
    d1 = (d2 @ l2.feedback_weight) * (1 - torch.tanh(a1) ** 2)
    torch.testing.assert_close(l1.weight.grad, d1.T @ x, **TOL)
    torch.testing.assert_close(l2.weight.grad, d2.T @ torch.tanh(a1), **TOL)


class _Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, width, dtype=DT)
        self.fc2 = fastdfa.Linear(width, width, dtype=DT)  # inside a named site: BP, not a site

    def forward(self, h):
        return h + self.fc2(torch.tanh(self.fc1(h)))


def test_user_sites_dfa_between_bp_inside():
    block = _Residual(6)
    model = nn.Sequential(fastdfa.Linear(5, 6, dtype=DT), nn.ReLU(), block, nn.ReLU(), fastdfa.Linear(6, 3, dtype=DT))
    dfa = fastdfa.DFA(model, sites=[block], seed=2)
    x = torch.randn(4, 5, dtype=DT)
    y = dfa(x)
    y.retain_grad()
    F.mse_loss(y, torch.randn(4, 3, dtype=DT)).backward()
    e = y.grad
    assert [s.name for s in dfa.sites] == ["2", "4"]
    s_block, s_out = dfa.sites
    with torch.no_grad():
        a0 = model[0](x)
    h0 = F.relu(a0)
    # BP inside the block from the projected error at the block's output site, stopping at its input.
    h0_ = h0.clone().requires_grad_()
    ref_block = _Residual(6)
    ref_block.load_state_dict(block.state_dict())
    out = F.relu(ref_block(h0_))
    out.backward(e @ s_out.feedback.T)
    torch.testing.assert_close(block.fc1.weight.grad, ref_block.fc1.weight.grad, **TOL)
    torch.testing.assert_close(block.fc2.weight.grad, ref_block.fc2.weight.grad, **TOL)
    # The first layer is trained by the block's site, not by BP through the block.
    delta0 = (e @ s_block.feedback.T) * (a0 > 0)
    torch.testing.assert_close(model[0].weight.grad, delta0.T @ x, **TOL)
    assert not torch.allclose(model[0].weight.grad, (h0_.grad * (a0 > 0)).T @ x)


def test_site_projection_is_one_gemm_of_concatenated_feedback():
    model = _mlp("relu")
    dfa = fastdfa.DFA(model)
    dfa(torch.randn(2, 7, dtype=DT))
    flat = dfa.feedback.flat
    assert flat.shape == (sum(s.rows for s in dfa.sites), 4)
    for s in dfa.sites:  # each site's feedback is a view into the one buffer
        assert s.feedback.data_ptr() == flat[s.offset].data_ptr()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_optimizers_step_with_dfa_gradients(opt_name):
    """One optimizer step from DFA gradients equals the optimizer's update on the formula gradients."""
    torch.manual_seed(0)
    model = _mlp("tanh")
    twin = _mlp("tanh")
    twin.load_state_dict(model.state_dict())
    dfa = fastdfa.DFA(model, seed=4)
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if opt_name == "sgd" else \
        (lambda p: torch.optim.Adam(p, lr=0.01))
    opt, twin_opt = make(dfa.parameters()), make(twin.parameters())
    x, t = torch.randn(5, 7, dtype=DT), torch.randn(5, 4, dtype=DT)
    for _ in range(2):
        opt.zero_grad()
        y = dfa(x)
        y.retain_grad()
        F.mse_loss(y, t).backward()
        _, hs, pre = _mlp_dfa_reference(twin, "tanh", x, y.grad)
        twin_lin = [m for m in twin if isinstance(m, nn.Linear)]
        for l, lin in enumerate(twin_lin):
            delta = y.grad if l == len(twin_lin) - 1 else \
                (y.grad @ dfa.sites[l].feedback.T) * _derivative("tanh", pre[l])
            lin.weight.grad, lin.bias.grad = delta.T @ hs[l], delta.sum(0)
        opt.step()
        twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, **TOL)


def test_backprop_context_restores_mode_even_on_error():
    dfa = fastdfa.DFA(_mlp("relu"), mode="fa")
    x = torch.randn(3, dfa.model[0].in_features, dtype=DT, requires_grad=True)
    with fastdfa.backprop(dfa):
        assert dfa.mode == "bp"
        dfa(x).sum().backward()  # BP inside: the input gradient goes through the weights, not FA's B
    bp_x = x.grad.clone()
    x.grad = None
    copy.deepcopy(dfa.model)(x).sum().backward()
    torch.testing.assert_close(bp_x, x.grad)
    assert dfa.mode == "fa"
    with pytest.raises(KeyError):
        with fastdfa.backprop(dfa):
            raise KeyError("boom")
    assert dfa.mode == "fa"
    with pytest.raises(ValueError, match="mode must be one of"):
        dfa.mode = "dfaa"
    assert dfa.mode == "fa"


def test_batch_dims_two_projects_per_token():
    model = nn.Sequential(fastdfa.Linear(5, 6, dtype=DT), nn.Tanh(), fastdfa.Linear(6, 3, dtype=DT))
    dfa = fastdfa.DFA(model, batch_dims=2)
    x = torch.randn(2, 4, 5, dtype=DT)
    y = dfa(x)
    y.retain_grad()
    y.pow(2).sum().backward()
    F1 = dfa.sites[0].feedback
    assert F1.shape == (6, 3)
    a = model[0](x).detach()
    delta = (y.grad @ F1.T) * (1 - torch.tanh(a) ** 2)
    torch.testing.assert_close(model[0].weight.grad, delta.reshape(-1, 6).T @ x.reshape(-1, 5), **TOL)
