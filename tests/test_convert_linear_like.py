"""Hugging Face's Conv1D and torch's Conv1d as fastdfa layers, and fastdfa.convert's registry.

fastdfa.layers.Conv1D is Hugging Face's GPT-2 style layer (y = x W + b, W [in, out]) with the same bits;
fastdfa.layers.Conv1d is torch's Conv1d like fastdfa.Conv2d; register_conversion adds source types.
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastdfa
from fastdfa.convert import register_conversion
from fastdfa.layers import FASTDFA_LAYERS, Conv1D, Conv1d

convert_module = sys.modules["fastdfa.convert"]  # the attribute fastdfa.convert is the function

DT = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the conversion registry: registrations made by a test end with it."""
    monkeypatch.setattr(convert_module, "_CONVERTERS", dict(convert_module._CONVERTERS))


# ----------------------------------------------------------------- helpers
from test_convert import _check_kept, _conv_options, _snapshot  # noqa: E402  (one definition each)


def _structure(model):
    return [(n, m, type(m)) for n, m in model.named_modules()]


def _fa_grads(layer, x, grad_out, fa=True):
    """(dX, dW, db) of ``layer`` (its fa_forward, or its plain call) for the output gradient ``grad_out``."""
    x = x.clone().requires_grad_()
    layer.zero_grad()
    (layer.fa_forward(x) if fa else layer(x)).backward(grad_out)
    return x.grad, layer.weight.grad.clone(), None if layer.bias is None else layer.bias.grad.clone()


def _hf():
    return pytest.importorskip("transformers")


def _gpt2(transformers):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _openai_gpt(transformers):
    config = transformers.OpenAIGPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32)
    return transformers.OpenAIGPTLMHeadModel(config)


def _hf_conv1d_names(model):
    from transformers.pytorch_utils import Conv1D as HFConv1D
    return [n for n, m in model.named_modules() if type(m) is HFConv1D]


# ----------------------------------------------------- Hugging Face models
@pytest.mark.parametrize("build", [_gpt2, _openai_gpt], ids=["gpt2", "openai-gpt"])
def test_hugging_face_conv1d_models_bit_identical(build):
    transformers = _hf()
    torch.manual_seed(0)
    model = build(transformers).to(DT).eval()  # random weights from the config: no download
    ids = torch.randint(0, 97, (2, 9))
    ref = model(input_ids=ids).logits
    names = _hf_conv1d_names(model)
    assert len(names) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    head, wte = model.lm_head, model.get_input_embeddings()
    assert head.weight is wte.weight
    snap = _snapshot(model)
    rng = torch.get_rng_state()

    assert fastdfa.convert(model) is model
    assert torch.equal(torch.get_rng_state(), rng)  # built on the meta device: no init drew from the RNG
    _check_kept(model, snap)
    modules = dict(model.named_modules())
    assert _hf_conv1d_names(model) == []
    assert all(type(modules[n]) is Conv1D for n in names)
    assert type(model.lm_head) is fastdfa.Linear
    assert model.lm_head.weight is model.get_input_embeddings().weight  # the tie is kept
    assert not model.training
    calls = []
    for n in names:
        modules[n].register_forward_hook(lambda mod, i, o, n=n: calls.append(n))
    assert torch.equal(model(input_ids=ids).logits, ref)
    assert calls == names  # the fastdfa layers are the ones that ran


def test_conv1d_model_trains_after_convert():
    """The optimizer built before the conversion steps the converted Conv1D's Parameters."""
    transformers = _hf()
    model = _gpt2(transformers).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fastdfa.convert(model)
    layer = model.transformer.h[0].attn.c_attn
    assert type(layer) is Conv1D
    before = layer.weight.detach().clone()
    ids = torch.randint(0, 97, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(layer.weight, before)


def test_skip_with_conv1d_by_name_and_by_type():
    transformers = _hf()
    from transformers.pytorch_utils import Conv1D as HFConv1D
    model = _gpt2(transformers)
    fastdfa.convert(model, skip=["transformer.h.0"])
    assert _hf_conv1d_names(model) == [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj",
                                                                         "mlp.c_fc", "mlp.c_proj")]
    assert type(model.transformer.h[1].mlp.c_fc) is Conv1D
    model = _gpt2(transformers)
    fastdfa.convert(model, skip=HFConv1D)
    assert len(_hf_conv1d_names(model)) == 8 and type(model.lm_head) is fastdfa.Linear


def test_a_hugging_face_conv1d_itself_returns_a_new_layer():
    _hf()
    from transformers.pytorch_utils import Conv1D as HFConv1D
    torch.manual_seed(0)
    old = HFConv1D(5, 3).to(DT)
    seen = []
    old.register_forward_hook(lambda m, i, o: seen.append(type(m)))
    x = torch.randn(2, 4, 3, dtype=DT)
    ref = old(x)
    new = fastdfa.convert(old)
    assert type(new) is Conv1D and new.weight is old.weight and new.bias is old.bias
    assert (new.nf, new.nx, new.in_features, new.out_features, new.activation) == (5, 3, 3, 5, None)
    assert list(new.state_dict()) == ["weight", "bias"]
    assert torch.equal(new(x), ref) and seen == [HFConv1D, Conv1D]  # the hook came along


def test_a_meta_conv1d_model_converts_without_allocating():
    _hf()
    from transformers.pytorch_utils import Conv1D as HFConv1D
    with torch.device("meta"):
        model = nn.Sequential(HFConv1D(4096, 1024), nn.Conv1d(64, 64, 3))
    rng = torch.get_rng_state()
    fastdfa.convert(model)
    assert torch.equal(torch.get_rng_state(), rng)  # no random initialisation drew from the global RNG
    assert type(model[0]) is Conv1D and type(model[1]) is Conv1d
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    assert model[0].feedback_weight.shape == (1024, 4096) and model[0].feedback_weight.device.type == "meta"


# ----------------------------------------------------- the Conv1D layer
def test_conv1d_layer_is_hugging_face_conv1d():
    """Same constructor (nf, nx), init, attributes, state_dict keys and forward bits as Hugging Face's."""
    _hf()
    from transformers.pytorch_utils import Conv1D as HFConv1D
    torch.manual_seed(0)
    ref = HFConv1D(5, 3)
    torch.manual_seed(0)
    ours = Conv1D(5, 3)
    assert (ours.nf, ours.nx) == (ref.nf, ref.nx) and ours.weight.shape == ref.weight.shape == (3, 5)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)  # the same init draws
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    assert repr(ours) == repr(ref) == "Conv1D(nf=5, nx=3)"
    assert repr(Conv1D(5, 3, activation="gelu")) == "Conv1D(nf=5, nx=3, activation='gelu')"
    ref, ours = ref.to(DT), ours.to(DT)
    with torch.no_grad():
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    back = HFConv1D(5, 3).to(DT)
    back.load_state_dict(ours.state_dict(), strict=True)  # a fastdfa checkpoint loads back
    for shape in [(7, 3), (2, 4, 3), (2, 2, 2, 3)]:
        x = torch.randn(shape, dtype=DT)
        assert torch.equal(ours(x), ref(x)) and torch.equal(ours.fa_forward(x), ref(x))
        assert torch.equal(back(x), ref(x))


def test_conv1d_dtype_device_and_activation():
    layer = Conv1D(6, 4, dtype=DT, activation="tanh")
    assert layer.weight.dtype == layer.bias.dtype == layer.feedback_weight.dtype == DT
    assert layer.feedback_weight.shape == (4, 6) and "feedback_weight" not in layer.state_dict()
    x = torch.randn(3, 4, dtype=DT)
    assert torch.equal(layer(x), torch.tanh(torch.addmm(layer.bias, x, layer.weight)))
    assert torch.equal(layer.fa_forward(x), layer(x))
    with pytest.raises(ValueError):
        Conv1D(6, 4, activation="swish")
    assert Conv1D(6, 4, device="meta").weight.device.type == "meta"


def test_conv1d_fa_gradients_are_the_formula():
    """dX = dY B^T with B = feedback_weight [in, out]; dW = x^T dY; db = sum of dY (float64)."""
    layer = Conv1D(5, 6, dtype=DT)
    x = torch.randn(3, 4, 6, dtype=DT)  # extra leading dim: dW and db sum over both
    g = torch.randn(3, 4, 5, dtype=DT)
    dx, dw, db = _fa_grads(layer, x, g)
    B = layer.feedback_weight
    torch.testing.assert_close(dx, g @ B.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, x.reshape(-1, 6).T @ g.reshape(-1, 5), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, g.reshape(-1, 5).sum(0), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(dx, g @ layer.weight.T)  # not BP's dX
    with torch.no_grad():
        layer.feedback_weight.copy_(layer.weight)  # B = W: FA is BP
    for got, want in zip(_fa_grads(layer, x, g), _fa_grads(layer, x, g, fa=False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _jvp_pairs(layer, x):
    """(output, tangent) from torch.func.jvp of fa_forward and of plain_forward, in the input and every
    Parameter at once (the Parameters swapped for the transform's dual tensors for the call)."""
    params = {k: v.detach() for k, v in layer.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    x_t = torch.randn_like(x)

    def jvp(method):
        def call(x, p):
            saved = dict(layer._parameters)
            layer._parameters.update(p)
            try:
                return getattr(layer, method)(x)
            finally:
                layer._parameters.update(saved)
        return torch.func.jvp(call, (x, params), (x_t, tangents))

    return jvp("fa_forward"), jvp("plain_forward")


@pytest.mark.parametrize("kind", ["Conv1D", "Conv1d"])
def test_jvp_of_fa_forward_is_that_of_plain_forward(kind):
    """Forward-mode AD through the FA Function (its jvp staticmethod) gives the plain forward's tangent:
    dy = dx W + x dW + db (Conv1D), conv(dx, W) + conv(x, dW) + db (Conv1d)."""
    if kind == "Conv1D":
        layer, x = Conv1D(5, 6, dtype=DT), torch.randn(3, 4, 6, dtype=DT)
        with torch.no_grad():
            layer.bias.normal_()
    else:
        layer, x = Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, dtype=DT), torch.randn(2, 4, 11, dtype=DT)
    (fa_y, fa_t), (y, t) = _jvp_pairs(layer, x)
    assert torch.equal(fa_y, y)
    torch.testing.assert_close(fa_t, t, rtol=1e-12, atol=1e-12)
    x_t = torch.randn_like(x)  # the input's tangent alone (the Parameters' None)
    fa_only = torch.func.jvp(layer.fa_forward, (x,), (x_t,))[1]
    torch.testing.assert_close(fa_only, torch.func.jvp(layer.plain_forward, (x,), (x_t,))[1], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------- feedback init per layer type
@pytest.mark.parametrize("layer, fan_in", [(Conv1D(4, 100), 100), (Conv1D(100, 4), 4),
                                           (Conv1d(6, 8, 5, groups=2), 3 * 5)],
                         ids=["Conv1D-wide-in", "Conv1D-wide-out", "Conv1d"])
def test_feedback_weight_bound_is_the_layer_fan_in(layer, fan_in):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in the inputs per output: nx for Conv1D's [nx, nf]."""
    bound = fan_in ** -0.5
    fb = layer.feedback_weight.abs().max().item()
    assert 0.8 * bound < fb <= bound


# ----------------------------------------------------- the Conv1d layer
CONV1D_OPTIONS = [dict(stride=s, padding=p, dilation=d, groups=g, bias=b, padding_mode=m, kernel_size=k)
                  for s, p, d, g, b, m, k in itertools.product(
                      [1, 2], [0, 2, "same", "valid"], [1, 2], [1, 2], [True, False],
                      ["zeros", "reflect", "replicate", "circular"], [3, 4])
                  if not (p == "same" and s != 1)]


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(4, 6, dtype=DT, **o) for o in CONV1D_OPTIONS)

    def forward(self, x):
        return [conv(x) for conv in self.convs]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_conv1d_every_option_bit_identical_after_convert():
    model = _Branches()
    x = torch.randn(2, 4, 13, dtype=DT)
    ref = model(x)
    options = _conv_options(model)
    snap = _snapshot(model)
    fastdfa.convert(model)
    _check_kept(model, snap)
    assert all(type(c) is Conv1d for c in model.convs)
    assert _conv_options(model) == options
    out = model(x)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert all(torch.equal(c.fa_forward(x), r) for c, r in zip(model.convs, ref))  # explicit padding too


def test_conv1d_state_dict_round_trip():
    torch.manual_seed(0)
    ref = nn.Conv1d(3, 4, 3, padding=1, dtype=DT)
    ours = Conv1d(3, 4, 3, padding=1, dtype=DT)
    assert isinstance(ours, nn.Conv1d) and list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    back = nn.Conv1d(3, 4, 3, padding=1, dtype=DT)
    back.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 7, dtype=DT)
    assert torch.equal(ours(x), ref(x)) and torch.equal(back(x), ref(x))
    assert ours.feedback_weight.shape == ours.weight.shape == (4, 3, 3)


FA_CASES = [dict(padding=1), dict(padding=0, stride=2), dict(padding=3, dilation=2, groups=2),
            dict(padding=2, stride=2, dilation=3, groups=2, bias=False)]


@pytest.mark.parametrize("case", FA_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_conv1d_fa_dx_is_the_transposed_conv_with_b(case):
    """dX = conv1d_input(dY, B); dW = conv1d_weight(x, dY); db = sum of dY over batch and length."""
    layer = Conv1d(4, 6, 3, dtype=DT, **case)
    x = torch.randn(2, 4, 12, dtype=DT)
    g = torch.randn_like(layer(x))
    dx, dw, db = _fa_grads(layer, x, g)
    conf = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    torch.testing.assert_close(dx, torch.nn.grad.conv1d_input(x.shape, layer.feedback_weight, g, **conf),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, torch.nn.grad.conv1d_weight(x, layer.weight.shape, g, **conf),
                               rtol=1e-12, atol=1e-12)
    if layer.bias is not None:
        torch.testing.assert_close(db, g.sum((0, 2)), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(dx, torch.nn.grad.conv1d_input(x.shape, layer.weight, g, **conf))


@pytest.mark.parametrize("case", [dict(padding="same", kernel_size=4), dict(padding="same", dilation=3),
                                  dict(padding="valid", stride=2), dict(padding=2, padding_mode="reflect"),
                                  dict(padding=1, padding_mode="circular", groups=2),
                                  dict(padding="same", padding_mode="replicate", kernel_size=4)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_conv1d_fa_with_b_equal_w_is_bp(case):
    """Through the explicit padding (string paddings, padding modes), FA with B = W is BP exactly."""
    kw = dict(case)
    k = kw.pop("kernel_size", 3)
    torch.manual_seed(0)
    ref = nn.Conv1d(4, 6, k, dtype=DT, **kw)
    ours = Conv1d(4, 6, k, dtype=DT, **kw)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ours.feedback_weight.copy_(ours.weight)
    x = torch.randn(2, 4, 11, dtype=DT)
    g = torch.randn_like(ref(x))
    for got, want in zip(_fa_grads(ours, x, g), _fa_grads(ref, x, g, fa=False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fastdfa_layers_lists_every_layer():
    assert FASTDFA_LAYERS == (fastdfa.Linear, fastdfa.Conv2d, Conv1d, Conv1D)


# ----------------------------------------------------- register_conversion
class MyLinear(nn.Linear):
    """A user subclass that adds an attribute, not a different forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = "mine"


def _to_fastdfa(m):
    layer = fastdfa.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                           dtype=m.weight.dtype)
    layer.weight, layer.bias = m.weight, m.bias
    return layer


def test_register_a_user_subclass(registry):
    model = nn.Sequential(MyLinear(4, 5, dtype=DT), nn.Tanh(), nn.Linear(5, 3, dtype=DT))
    x = torch.randn(2, 4, dtype=DT)
    ref = model(x)
    snap = _snapshot(model)
    fastdfa.convert(model)
    assert type(model[0]) is MyLinear  # not registered: left alone (exact-type matching)
    register_conversion(MyLinear, _to_fastdfa)
    fastdfa.convert(model)
    _check_kept(model, snap)
    assert type(model[0]) is fastdfa.Linear and type(model[2]) is fastdfa.Linear
    assert torch.equal(model(x), ref)

    class Sub(MyLinear):
        pass

    sub = nn.Sequential(Sub(4, 4))
    fastdfa.convert(sub)
    assert type(sub[0]) is Sub  # a subclass of a registered type is not matched


def test_re_registering_replaces_the_converter(registry):
    made = []

    def counting(m):
        made.append(type(m))
        return _to_fastdfa(m)

    register_conversion(MyLinear, _to_fastdfa)
    register_conversion(MyLinear, counting)
    register_conversion(nn.Linear, counting)  # a built-in's converter can be replaced too
    model = nn.Sequential(MyLinear(3, 3), nn.Linear(3, 3))
    fastdfa.convert(model)
    assert made == [MyLinear, nn.Linear]
    assert all(type(m) is fastdfa.Linear for m in model)


def test_a_user_registration_of_hugging_face_conv1d_wins(registry):
    _hf()
    from transformers.pytorch_utils import Conv1D as HFConv1D
    seen = []

    def mine(m):
        seen.append(m)
        return convert_module._from_hf_conv1d(m)

    register_conversion(HFConv1D, mine)
    old = HFConv1D(3, 2)
    new = fastdfa.convert(nn.Sequential(old))[0]
    assert seen == [old] and type(new) is Conv1D and new.weight is old.weight


@pytest.mark.parametrize("source, fn, match", [
    ("Linear", _to_fastdfa, "nn.Module subclass.*'Linear' \\(str\\)"),
    (nn.Linear(2, 2), _to_fastdfa, "nn.Module subclass.*\\(Linear\\)"),
    (int, _to_fastdfa, "nn.Module subclass.*the class int"),
    (fastdfa.Linear, _to_fastdfa, "Linear is already a fastdfa layer type"),
    (Conv1D, _to_fastdfa, "Conv1D is already a fastdfa layer type"),
    (MyLinear, "not callable", "callable fn.*MyLinear.*'not callable'"),
])
def test_register_conversion_refuses_bad_arguments(registry, source, fn, match):
    before = dict(convert_module._CONVERTERS)
    with pytest.raises(TypeError, match=match):
        register_conversion(source, fn)
    assert convert_module._CONVERTERS == before


def _copied_weight(m):
    layer = _to_fastdfa(m)
    layer.weight = nn.Parameter(m.weight.detach().clone())
    return layer


def _copied_bias(m):
    layer = _to_fastdfa(m)
    layer.bias = nn.Parameter(m.bias.detach().clone())
    return layer


def _dropped_bias(m):
    layer = _to_fastdfa(m)
    layer.bias = None
    return layer


def _meta_feedback(m):
    layer = fastdfa.Linear(m.in_features, m.out_features, device="meta")
    layer.weight, layer.bias = m.weight, m.bias
    return layer


def _raises(m):
    raise RuntimeError("converter failed")


@pytest.mark.parametrize("fn, error, match", [
    (lambda m: m, TypeError, "registered for .*MyLinear returned a MyLinear for '2', not a fastdfa layer"),
    (lambda m: nn.Linear(4, 4), TypeError, "returned a Linear for '2', not a fastdfa layer.*Conv1D"),
    (_copied_weight, ValueError, "MyLinear returned a Linear for '2' whose 'weight' is not the original's "
                                 "Parameter object: set layer.weight = old.weight"),
    (_copied_bias, ValueError, "whose 'bias' is not the original's.*layer.bias = old.bias"),
    (_dropped_bias, ValueError, "whose 'bias' is not the original's"),
    (_meta_feedback, ValueError, "feedback_weight .*meta.* is not like its weight.*device and dtype"),
    (_raises, RuntimeError, "converter failed"),
])
def test_a_bad_converter_raises_and_leaves_the_model_untouched(registry, fn, error, match):
    # a built-in conversion before the bad one and one after it: neither may have been set
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1), MyLinear(4, 4), nn.Linear(4, 4))
    before = _structure(model)
    register_conversion(MyLinear, fn)
    with pytest.raises(error, match=match):
        fastdfa.convert(model)
    assert _structure(model) == before
    assert [type(m) for m in model] == [nn.Linear, nn.Conv1d, MyLinear, nn.Linear]


def test_a_bad_converter_on_the_root_names_it(registry):
    register_conversion(MyLinear, lambda m: None)
    with pytest.raises(TypeError, match="NoneType for the module itself"):
        fastdfa.convert(MyLinear(2, 2))


def test_a_patched_forward_is_refused_for_conv1d_too():
    transformers = _hf()
    model = _gpt2(transformers)
    model.transformer.h[1].mlp.c_fc.forward = lambda x: x
    before = _structure(model)
    with pytest.raises(ValueError, match=r"'transformer\.h\.1\.mlp\.c_fc' has 'forward' set on the instance"):
        fastdfa.convert(model)
    assert _structure(model) == before


# ----------------------------------------------------- lean import
def test_fastdfa_does_not_import_transformers():
    """Neither import fastdfa nor a convert of a model without Hugging Face layers loads transformers."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    code = ("import sys, torch, fastdfa, fastdfa.convert, fastdfa.layers\n"
            "m = fastdfa.convert(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Conv1d(2, 2, 1)))\n"
            "print('transformers' in sys.modules, type(m[1]).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False Conv1d"
