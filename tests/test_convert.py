"""fastdfa.convert: torch.nn.Linear / Conv2d swapped in place for fastdfa's, same Parameters, same outputs."""

import itertools

import pytest
import torch
from torch import nn

import fastdfa

DT = torch.float64


# ----------------------------------------------------------------- helpers
def _snapshot(model):
    """What conversion must keep: the state_dict keys, each Parameter object and the values."""
    return (list(model.state_dict()), {n: p for n, p in model.named_parameters(remove_duplicate=False)},
            {n: t.detach().clone() for n, t in model.state_dict().items()})


def _conv_options(model):
    """Every constructor option of each conv in ``model.convs`` (what convert must carry over)."""
    return [(c.stride, c.padding, c.dilation, c.groups, c.padding_mode, c.kernel_size,
             c._reversed_padding_repeated_twice) for c in model.convs]


def _check_kept(model, snapshot):
    keys, params, values = snapshot
    assert list(model.state_dict()) == keys
    now = dict(model.named_parameters(remove_duplicate=False))
    assert now.keys() == params.keys()
    assert all(now[n] is params[n] for n in params)  # the same Parameter objects, not copies
    assert all(torch.equal(t, values[n]) for n, t in model.state_dict().items())


def _plain(model):
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


def _count_calls(model):
    """Forward hooks on every fastdfa layer: proves the converted layers are the ones that ran."""
    calls = []
    for name, m in model.named_modules():
        if isinstance(m, (fastdfa.Linear, fastdfa.Conv2d)):
            m.register_forward_hook(lambda mod, i, o, name=name: calls.append(name))
    return calls


def _encoder(layers=2):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=DT)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _encoder_inputs():
    x = torch.randn(3, 5, 8, dtype=DT)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True: may not attend
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    return x, causal, padding


# ----------------------------------------------------------- outputs and state
def test_transformer_encoder_bit_identical_with_mask():
    enc = _encoder()
    x, causal, padding = _encoder_inputs()
    ref_train = enc(x, mask=causal, src_key_padding_mask=padding)
    enc.eval()
    with torch.no_grad():  # torch's inference fast path: reads the weights, calls no layer
        ref_fast = enc(x, mask=causal, src_key_padding_mask=padding)
    ref_eval = enc(x, mask=causal, src_key_padding_mask=padding)
    enc.train()
    snap = _snapshot(enc)

    assert fastdfa.convert(enc) is enc
    _check_kept(enc, snap)
    assert _plain(enc) == []
    for layer in enc.layers:
        assert type(layer.linear1) is fastdfa.Linear and type(layer.linear2) is fastdfa.Linear
        # MultiheadAttention reads out_proj.weight itself and never calls it: left as torch made it.
        assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    enc.eval()
    with torch.no_grad():  # first: a forward hook anywhere in a layer turns torch's fast path off
        assert torch.equal(enc(x, mask=causal, src_key_padding_mask=padding), ref_fast)
    calls = _count_calls(enc)
    assert torch.equal(enc(x, mask=causal, src_key_padding_mask=padding), ref_eval)
    enc.train()
    assert torch.equal(enc(x, mask=causal, src_key_padding_mask=padding), ref_train)
    assert calls == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"] * 2


# stride, padding (incl. the strings), dilation, groups, bias, padding_mode, kernel size: every combination
# torch accepts ("same" refuses a stride > 1).
CONV_OPTIONS = [dict(stride=s, padding=p, dilation=d, groups=g, bias=b, padding_mode=m, kernel_size=k)
                for s, p, d, g, b, m, k in itertools.product(
                    [1, 2, (2, 1)], [0, 1, (1, 2), "same", "valid"], [1, (2, 1)], [1, 2], [True, False],
                    ["zeros", "reflect", "replicate", "circular"], [3, (2, 3)])
                if not (p == "same" and s != 1)]


class _Branches(nn.Module):
    """One conv per option set, each applied to the same input (a CNN covering every combination)."""

    def __init__(self, options):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 6, dtype=DT, **o) for o in options)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, dtype=DT), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 9 * 9, 5, dtype=DT))

    def forward(self, x):
        return [conv(x) for conv in self.convs] + [self.head(x)]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_cnn_every_conv2d_option_bit_identical():
    model = _Branches(CONV_OPTIONS)
    x = torch.randn(2, 4, 9, 9, dtype=DT)
    ref = model(x)
    options = _conv_options(model)
    snap = _snapshot(model)
    fastdfa.convert(model)
    _check_kept(model, snap)
    assert _plain(model) == []
    assert _conv_options(model) == options
    assert [c.bias is None for c in model.convs] == [not o["bias"] for o in CONV_OPTIONS]
    calls = _count_calls(model)
    out = model(x)
    assert len(calls) == len(CONV_OPTIONS) + 2
    assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize("options", [dict(stride=2, padding=(1, 2), dilation=(2, 1), groups=2, bias=False,
                                          padding_mode="reflect", kernel_size=(2, 3)),
                                     dict(padding="same", dilation=2, padding_mode="circular", kernel_size=4),
                                     dict(padding="valid", kernel_size=3)])
def test_converted_conv_fa_forward_matches(options):
    """The converted conv also runs fastdfa's own FA forward (explicit padding) to the same result."""
    conv = fastdfa.convert(nn.Conv2d(4, 6, dtype=DT, **options))
    x = torch.randn(2, 4, 9, 9, dtype=DT)
    assert torch.equal(conv.fa_forward(x), conv.plain_forward(x))


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bias", [True, False])
def test_converted_layer_equals_a_fresh_fastdfa_layer_but_for_parameters(kind, bias):
    if kind == "linear":
        args, kw = (6, 5), {}
        old, fresh_cls = nn.Linear(*args, bias=bias, dtype=DT), fastdfa.Linear
    else:
        args, kw = (4, 6, (2, 3)), dict(stride=2, padding=1, dilation=(1, 2), groups=2, padding_mode="replicate")
        old, fresh_cls = nn.Conv2d(*args, bias=bias, dtype=DT, **kw), fastdfa.Conv2d
    new = fastdfa.convert(old)
    fresh = fresh_cls(*args, bias=bias, dtype=DT, **kw)
    assert type(new) is fresh_cls and new is not old
    assert new.__dict__.keys() == fresh.__dict__.keys()
    skip = {"_parameters", "_buffers"} | {k for k in fresh.__dict__ if "hook" in k}
    assert {k: v for k, v in new.__dict__.items() if k not in skip} == \
           {k: v for k, v in fresh.__dict__.items() if k not in skip}
    assert new.activation is None
    assert new._parameters.keys() == fresh._parameters.keys()
    assert new.weight is old.weight and new.bias is old.bias
    assert new._buffers.keys() == fresh._buffers.keys() == {"feedback_weight"}
    fb = new.feedback_weight
    assert (fb.shape, fb.dtype, fb.device, fb.requires_grad) == (old.weight.shape, DT, old.weight.device, False)
    assert torch.equal(fb, fresh.feedback_weight)  # seeded as the constructor seeds it
    assert list(new.state_dict()) == list(old.state_dict())


def test_hugging_face_bert_bit_identical():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, type_vocab_size=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForMaskedLM(config).to(DT).eval()  # random weights from the config: no download
    ids = torch.randint(0, 50, (2, 7))
    attention = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    ref = model(input_ids=ids, attention_mask=attention).logits
    tied = model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    n_linear = len(_plain(model))
    snap = _snapshot(model)

    assert fastdfa.convert(model) is model
    _check_kept(model, snap)
    assert _plain(model) == [] and n_linear == 14
    assert (model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight) == tied
    assert not model.training
    calls = _count_calls(model)
    assert torch.equal(model(input_ids=ids, attention_mask=attention).logits, ref)
    assert len(calls) == n_linear


def test_parameters_keep_requires_grad_and_optimizer_references():
    model = nn.Sequential(nn.Linear(4, 6, dtype=DT), nn.ReLU(), nn.Linear(6, 3, dtype=DT))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the conversion
    fastdfa.convert(model)
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    before = model[2].weight.detach().clone()
    model(torch.randn(5, 4, dtype=DT)).sum().backward()
    opt.step()
    assert not torch.equal(model[2].weight, before)


def test_a_meta_model_converts_without_allocating():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 4096), nn.Conv2d(64, 64, 3))
    rng = torch.get_rng_state()
    fastdfa.convert(model)
    assert torch.equal(torch.get_rng_state(), rng)  # no random initialisation drew from the global RNG
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    assert model[0].feedback_weight.device.type == "meta" and model[1].feedback_weight.shape == (64, 64, 3, 3)


def test_conversion_draws_nothing_from_the_global_rng():
    model = nn.Sequential(nn.Linear(4, 6), nn.Conv2d(3, 4, 3))
    rng = torch.get_rng_state()
    fastdfa.convert(model)
    assert torch.equal(torch.get_rng_state(), rng)


# ----------------------------------------------------------------- skip
def test_skip_by_name_leaves_that_subtree():
    model = nn.Sequential(_encoder(), nn.Linear(8, 3, dtype=DT))
    fastdfa.convert(model, skip=["0.layers.1"])
    assert _plain(model) == ["0.layers.1.linear1", "0.layers.1.linear2"]
    assert type(model[0].layers[0].linear1) is fastdfa.Linear and type(model[1]) is fastdfa.Linear


def test_skip_by_type_and_a_single_entry():
    model = nn.Sequential(_encoder(), nn.Linear(8, 3, dtype=DT))
    fastdfa.convert(model, skip=nn.TransformerEncoderLayer)
    assert len(_plain(model)) == 4 and type(model[1]) is fastdfa.Linear
    model = nn.Sequential(_encoder(), nn.Linear(8, 3, dtype=DT))
    fastdfa.convert(model, skip="1")
    assert _plain(model) == ["1"]
    lin = nn.Linear(3, 3)
    assert fastdfa.convert(lin, skip=[nn.Linear]) is lin and fastdfa.convert(lin, skip=[""]) is lin


def test_a_module_under_two_names_gets_one_layer_and_one_skip_decision():
    shared = nn.Linear(4, 4, dtype=DT)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    fastdfa.convert(model)
    assert type(model[0]) is fastdfa.Linear and model[0] is model[2] and model[0].weight is shared.weight
    model = nn.Sequential(shared, nn.Sequential(shared))
    fastdfa.convert(model, skip=["1"])  # skipped under one name: skipped everywhere
    assert model[0] is shared and model[1][0] is shared


def test_tied_parameters_stay_tied():
    enc, dec = nn.Linear(5, 5, dtype=DT), nn.Linear(5, 5, dtype=DT)
    dec.weight = enc.weight
    model = nn.Sequential(enc, nn.Tanh(), dec)
    x = torch.randn(3, 5, dtype=DT)
    ref = model(x)
    fastdfa.convert(model)
    assert model[0].weight is model[2].weight is enc.weight
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(list(model.parameters())) == 3
    assert torch.equal(model(x), ref)


def test_idempotent():
    model = nn.Sequential(_encoder(), nn.Conv2d(3, 3, 3, dtype=DT), nn.Linear(8, 3, dtype=DT))
    fastdfa.convert(model)
    modules = list(model.modules())
    state = model.state_dict(keep_vars=True)
    assert fastdfa.convert(model) is model
    assert list(model.modules()) == modules  # the very same layer objects: nothing replaced twice
    assert all(a is b for a, b in zip(model.modules(), modules))
    assert all(state[k] is v for k, v in model.state_dict(keep_vars=True).items())
    lin = fastdfa.Linear(3, 3)
    assert fastdfa.convert(lin) is lin


# ----------------------------------------------------- subclasses and the root
def test_subclasses_are_left_alone():
    class Mine(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    lazy = nn.LazyLinear(3)
    mha = nn.MultiheadAttention(4, 2)
    model = nn.Sequential(Mine(4, 4), lazy, mha)
    fastdfa.convert(model)
    assert type(model[0]) is Mine and model[1] is lazy and type(mha.out_proj) is not fastdfa.Linear
    model[1](torch.randn(2, 4))  # materialised: LazyLinear becomes a plain nn.Linear, then converts
    assert type(model[1]) is nn.Linear
    fastdfa.convert(model)
    assert type(model[1]) is fastdfa.Linear


@pytest.mark.parametrize("layer", [nn.Linear(4, 3, dtype=DT), nn.Conv2d(2, 3, 3, padding="same", dtype=DT)])
def test_the_module_itself_returns_a_new_layer_with_the_same_parameters(layer):
    params = list(layer.parameters())
    x = torch.randn(2, 4, dtype=DT) if isinstance(layer, nn.Linear) else torch.randn(2, 2, 5, 5, dtype=DT)
    ref = layer(x)
    new = fastdfa.convert(layer)
    assert new is not layer and type(new).__module__ == "fastdfa.layers"
    assert all(a is b for a, b in zip(new.parameters(), params))
    assert torch.equal(new(x), ref)


# ------------------------------------------------- hooks, training flag, attributes
def test_hooks_training_flag_buffers_and_attributes_are_carried_over():
    lin = nn.Linear(4, 3, dtype=DT)
    seen = []
    h_pre = lin.register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m))))
    lin.register_forward_hook(lambda m, args, kwargs, out: seen.append(("post", type(m))), with_kwargs=True)
    lin.register_full_backward_hook(lambda m, gi, go: seen.append(("backward", type(m))))
    lin.register_state_dict_post_hook(lambda m, sd, prefix, local: sd.__setitem__(prefix + "tag", torch.ones(1)))
    lin.register_buffer("scale", torch.full((3,), 2.0, dtype=DT))
    lin.note = "kept"
    model = nn.Sequential(lin).eval()
    fastdfa.convert(model)
    new = model[0]
    assert type(new) is fastdfa.Linear and not new.training and new.note == "kept"
    assert list(model.state_dict()) == ["0.weight", "0.bias", "0.scale", "0.tag"]
    assert torch.equal(new.scale, lin.scale)
    model(torch.randn(2, 4, dtype=DT, requires_grad=True)).sum().backward()
    assert seen == [("pre", fastdfa.Linear), ("post", fastdfa.Linear), ("backward", fastdfa.Linear)]
    h_pre.remove()  # a handle taken on the torch layer still removes the hook from the fastdfa one
    seen.clear()
    with torch.no_grad():
        model(torch.randn(2, 4, dtype=DT))
    assert seen == [("post", fastdfa.Linear)]


# ----------------------------------------------------------------- errors
def _structure(model):
    return [(n, m, type(m)) for n, m in model.named_modules()]


def test_errors_name_the_problem_and_leave_the_model_untouched():
    model = nn.Sequential(_encoder(), nn.Linear(8, 3, dtype=DT))
    before = _structure(model)
    with pytest.raises(TypeError, match="nn.Module"):
        fastdfa.convert(torch.randn(3))
    with pytest.raises(TypeError, match="skip entries"):
        fastdfa.convert(model, skip=["1", 3])
    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        fastdfa.convert(model, skip=[int])
    with pytest.raises(TypeError, match="skip must be"):
        fastdfa.convert(model, skip=3)
    with pytest.raises(ValueError, match=r"'0\.layers\.O\.linear1'.*close names: .*'0\.layers\.0\.linear1'"):
        fastdfa.convert(model, skip=["1", "0.layers.O.linear1"])
    with pytest.raises(ValueError, match="'nope'.*children are: '0', '1'"):
        fastdfa.convert(model, skip=["nope"])
    assert _structure(model) == before


def test_a_patched_forward_raises_before_anything_changes():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].forward = lambda x: x  # e.g. accelerate's hooks wrap the instance's forward
    before = _structure(model)
    with pytest.raises(ValueError, match=r"'1' has 'forward' set on the instance.*skip=\['1'\]"):
        fastdfa.convert(model)
    assert _structure(model) == before
    fastdfa.convert(model, skip=["1"])
    assert type(model[0]) is fastdfa.Linear and type(model[1]) is nn.Linear


# ------------------------------------------------------------ training with DFA
def test_a_converted_transformer_trains_under_dfa():
    model = nn.Sequential(_encoder(), nn.Linear(8, 3, dtype=DT))
    fastdfa.convert(model)
    dfa = fastdfa.DFA(model, mode="dfa", batch_dims=2, backend="torch")
    opt = torch.optim.SGD(dfa.parameters(), lr=0.1)
    x, causal, _ = _encoder_inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = dfa(x)
    nn.functional.mse_loss(out, torch.zeros_like(out)).backward()
    opt.step()
    assert [s.name for s in dfa.sites] == ["0.layers.0.linear2", "0.layers.1.linear1", "0.layers.1.linear2", "1"]
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert {"1.weight", "0.layers.0.linear1.weight", "0.layers.1.linear2.weight"} <= set(changed)


def test_a_converted_cnn_trains_under_dfa():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same", dtype=DT), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="reflect", dtype=DT), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 2 * 2, 5, dtype=DT))
    fastdfa.convert(model)
    dfa = fastdfa.DFA(model, mode="dfa", backend="torch")
    opt = torch.optim.SGD(dfa.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(dfa(torch.randn(6, 1, 8, 8, dtype=DT)), torch.randint(0, 5, (6,))).backward()
    opt.step()
    assert len(dfa.sites) == 2
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
