"""The chain FWM's plain form and soft_align's BP path assume (fastdfa.metrics.check_chain), float64 on CPU.

FWM writes W_l := F_l F_(l-1)^T and soft_align sets F_l at an angle from (W_L ... W_(l+1))^T: both are right
only if each layer's input is computed from the previous layer's output alone, through elementwise ops. A
residual add, parallel q/k/v or gate/up branches, attention or a LayerNorm break that, and widths do not show
it (every width below is equal where it matters). Each refusal must name the FIRST link that breaks and leave
every weight and feedback as it was; a plain chain must still match as before; a converted BERT keeps the
encoder form, and decoders are refused.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa
from fastdfa.init import feedback_weight_matching, soft_align
from fastdfa.layers import Conv1D
from fastdfa.matching import encoder_layout
from fastdfa.metrics import check_chain, trace_flow, weight_alignment
from fastdfa.models import make_cnn, make_mlp

DT = torch.float64


def _state(dfa):
    return {k: v.detach().clone() for k, v in dfa.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_unchanged(dfa, before):
    after = _state(dfa)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _refuses(dfa, call, match, **kw):
    """``call(dfa, **kw)`` raises ValueError matching ``match``; every weight and feedback is unchanged."""
    before = _state(dfa)
    with pytest.raises(ValueError, match=match) as info:
        call(dfa, **kw)
    _assert_unchanged(dfa, before)
    return str(info.value)


def _fwm(dfa, **kw):
    return feedback_weight_matching(dfa, **kw)


def _align(dfa, **kw):
    return soft_align(dfa, 30, **kw)


# ----------------------------------------------------------------- models that are not a chain
class ResidualMLP(nn.Module):
    """a -> b with a residual add (the first break: c reads a's output too) -> c -> LayerNorm (a second break)
    -> d. Every hidden width is 8."""

    def __init__(self):
        super().__init__()
        self.a = fastdfa.Linear(6, 8, activation="tanh")
        self.b = fastdfa.Linear(8, 8, activation="tanh")
        self.c = fastdfa.Linear(8, 8, activation="tanh")
        self.norm = nn.LayerNorm(8)
        self.d = fastdfa.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        h = self.b(h) + h
        return self.d(self.norm(self.c(h)))


class Branches(nn.Module):
    """p, then q, k, v of equal width reading the same tensor (attention's projections), combined elementwise."""

    def __init__(self):
        super().__init__()
        self.p = fastdfa.Linear(6, 8, activation="tanh")
        self.q, self.k, self.v = fastdfa.Linear(8, 8), fastdfa.Linear(8, 8), fastdfa.Linear(8, 8)
        self.o = fastdfa.Linear(8, 3)

    def forward(self, x):
        h = self.p(x)
        return self.o(torch.tanh(self.q(h)) * torch.sigmoid(self.k(h)) + self.v(h))


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class DecoderBlock(nn.Module):
    """A Llama-like pre-norm block of nn.Linear: causal attention (q, k, v, o), a SwiGLU MLP (gate, up, down),
    two residual adds. With d = f every projection has the same width: the widths chain everywhere."""

    def __init__(self, d, heads, f):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (m(h).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(ctx)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyDecoder(nn.Module):
    def __init__(self, vocab=20, d=8, heads=2, f=8, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(DecoderBlock(d, heads, f) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _wrap(model, x, **options):
    return fastdfa.DFA(model.to(DT), seed=3, example_input=x, **options)


def _x(n_in=6):
    return torch.randn(2, n_in, dtype=DT, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------- a chain still matches
def _fwm_formula(model):
    """FWM on the dense chain written out (float64): F_(L-1) = W_L^T, F_(l-1)^T = pinv(F_l) W_l, W_l := F_l F_(l-1)^T
    for 1 <= l < L (0-based; layer 0 kept). Returns (feedback per site from the input, weights per layer)."""
    w = [m.weight.detach().clone() for m in model.modules() if isinstance(m, fastdfa.Linear)]
    feedback = [None] * (len(w) - 1)
    feedback[-1] = w[-1].t()
    for lay in range(len(w) - 2, 0, -1):
        feedback[lay - 1] = (torch.linalg.pinv(feedback[lay]) @ w[lay]).t()
    weights = [w[0]] + [feedback[lay] @ feedback[lay - 1].t() for lay in range(1, len(w) - 1)] + [w[-1]]
    return feedback, weights


@pytest.mark.parametrize("with_input", [False, True])
def test_a_plain_mlp_chain_still_matches_its_formula(with_input):
    """nn.Sequential: proven by its modules (no input needed) or by one forward; the result is the formula's."""
    torch.manual_seed(0)
    model = make_mlp(6, (9, 7, 5), 4, "tanh")
    dfa = _wrap(model, _x())
    want_feedback, want_weights = _fwm_formula(model)
    report = feedback_weight_matching(dfa, **({"example_input": _x()} if with_input else {}))
    for site, want in zip(dfa.sites, want_feedback):
        torch.testing.assert_close(site.feedback, want, rtol=1e-9, atol=1e-12)
    for m, want in zip([m for m in model.modules() if isinstance(m, fastdfa.Linear)], want_weights):
        torch.testing.assert_close(m.weight.detach(), want, rtol=1e-9, atol=1e-12)
    assert [r.action for r in report] == ["kept", "weights matched", "weights matched", "feedback = weight^T"]
    assert all(v == pytest.approx(1, abs=1e-9) for v in weight_alignment(dfa).values())


def test_batchnorm_and_dropout_between_layers_keep_the_chain_and_the_check_leaves_the_model_alone():
    """BatchNorm is per feature (a diagonal Jacobian, like g'), so it is elementwise for the chain. The check's
    forward leaves the training flags, BatchNorm's statistics, the RNG and every .grad as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(fastdfa.Linear(6, 8, activation="relu"), nn.BatchNorm1d(8), nn.Dropout(0.3),
                          fastdfa.Linear(8, 8), nn.GELU(), fastdfa.Linear(8, 3)).to(DT)
    dfa = fastdfa.DFA(model, seed=1)
    x = torch.randn(5, 6, dtype=DT)
    dfa(x).sum().backward()  # a training step's .grad, and BatchNorm statistics that moved
    before, grads, rng = _state(dfa), [p.grad.clone() for p in model.parameters()], torch.get_rng_state()
    check_chain(dfa, 0, x, who="test")
    check_chain(dfa, 0, None, who="test")
    _assert_unchanged(dfa, before)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state()) and model.training and all(m.training for m in model.modules())
    assert [r.action for r in feedback_weight_matching(dfa, example_input=x)][1] == "weights matched"


def test_the_check_runs_a_model_that_works_in_place():
    """The check's forward hands every layer's output on as a clone of a fresh leaf, so an in-place op after
    a layer (nn.ReLU(inplace=True)) runs; the chain is then matched as without the check."""

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = fastdfa.Linear(6, 8), fastdfa.Linear(8, 5), fastdfa.Linear(5, 3)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.c(self.act(self.b(self.act(self.a(x)))))

    torch.manual_seed(0)
    dfa = _wrap(InPlace(), _x())
    report = feedback_weight_matching(dfa, example_input=_x())
    assert [r.action for r in report] == ["kept", "weights matched", "feedback = weight^T"]


def test_conv1d_layers_match_as_their_transposed_linear():
    """fastdfa.Conv1D (Hugging Face's [in, out] weight) is a dense layer with W = weight^T: the same chain of
    Linear layers gives the same feedback and the transposed weights."""
    torch.manual_seed(0)
    lin = make_mlp(6, (9, 7), 4, "tanh").to(DT)
    conv = nn.Sequential(nn.Flatten(), Conv1D(9, 6), nn.Tanh(), Conv1D(7, 9), nn.Tanh(), Conv1D(4, 7)).to(DT)
    with torch.no_grad():
        for c, l in zip([m for m in conv if isinstance(m, Conv1D)], [m for m in lin if isinstance(m, fastdfa.Linear)]):
            c.weight.copy_(l.weight.t())
            c.bias.copy_(l.bias)
    a, b = _wrap(lin, _x()), _wrap(conv, _x())
    feedback_weight_matching(a)
    report = feedback_weight_matching(b, example_input=_x())
    torch.testing.assert_close(b.feedback.flat, a.feedback.flat, rtol=1e-12, atol=1e-14)
    for c, l in zip([m for m in conv if isinstance(m, Conv1D)], [m for m in lin if isinstance(m, fastdfa.Linear)]):
        torch.testing.assert_close(c.weight.t(), l.weight, rtol=1e-12, atol=1e-14)
    assert report[1].action == "weights matched" and weight_alignment(b)["3"] == pytest.approx(1, abs=1e-9)


# ----------------------------------------------------------------- refusals, naming the first break
@pytest.mark.parametrize("call", [_fwm, _align], ids=["fwm", "soft_align"])
def test_a_residual_add_is_refused_at_the_first_break(call):
    dfa = _wrap(ResidualMLP(), _x())
    msg = _refuses(dfa, call, r"'b' -> 'c' breaks the chain", example_input=_x())
    assert "also reads 'a''s output" in msg and "residual" in msg and "fastdfa.Linear 8 -> 8" in msg
    assert "LayerNorm" not in msg  # the later break (c -> norm -> d) is not the first
    # Without an input, a model that is not an nn.Sequential cannot prove its data flow: it is asked for.
    msg = _refuses(dfa, call, r"example_input=")
    assert "'a' -> 'b'" in msg and "not an nn.Sequential" in msg


class InputSkip(nn.Module):
    """b reads a's output plus the model input itself (a skip from the data, widths equal)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = fastdfa.Linear(6, 6, activation="tanh"), fastdfa.Linear(6, 6), fastdfa.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(self.a(x) + x)))


@pytest.mark.parametrize("call", [_fwm, _align], ids=["fwm", "soft_align"])
def test_a_skip_from_the_model_input_is_refused(call):
    """A float input is a leaf of the check's graph (made with gradients on, though FWM runs under no_grad)."""
    dfa = _wrap(InputSkip(), _x())
    msg = _refuses(dfa, call, r"'a' -> 'b' breaks the chain", example_input=_x())
    assert "also reads the model input" in msg


@pytest.mark.parametrize("call", [_fwm, _align], ids=["fwm", "soft_align"])
def test_parallel_branches_of_equal_width_are_refused(call):
    dfa = _wrap(Branches(), _x())
    msg = _refuses(dfa, call, r"'q' -> 'k' breaks the chain", example_input=_x())
    assert "also the input of 'q'" in msg and "parallel branches" in msg


@pytest.mark.parametrize("call", [_fwm, _align], ids=["fwm", "soft_align"])
def test_a_decoder_of_linear_layers_is_refused(call):
    """The bug: FWM took q -> k -> v -> o -> gate -> up -> down as a chain (every width 8) and rewrote the
    pretrained q/k/v/gate weights. Now it names the first link, q -> k, and changes nothing."""
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    dfa = _wrap(fastdfa.convert(TinyDecoder()), ids, batch_dims=2)
    msg = _refuses(dfa, call, r"'layers\.0\.q' -> 'layers\.0\.k' breaks the chain", example_input=ids)
    assert "parallel branches" in msg
    assert "'layers.0.q' -> 'layers.0.k'" in _refuses(dfa, call, "example_input=")


def test_each_break_of_the_decoder_is_named_for_what_it_is():
    """The data flow of one forward, link by link: what each layer's input reads and which ops mix it."""
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    dfa = _wrap(fastdfa.convert(TinyDecoder(layers=1)), ids, batch_dims=2)
    flow = trace_flow(dfa, ids)
    layers = {dfa.name_of(m): m for m in dfa.execution_order}
    reads = {name: flow.inputs[id(m)] for name, m in layers.items()}
    assert reads["layers.0.o"].outputs == {layers["layers.0.q"], layers["layers.0.k"], layers["layers.0.v"]}
    assert any("Attention" in op for op in reads["layers.0.o"].ops)  # attention is not elementwise
    assert reads["layers.0.gate"].outputs == {layers["layers.0.o"]} and reads["layers.0.gate"].data  # residual
    assert any(op.startswith("Mean") for op in reads["layers.0.gate"].ops)  # RMSNorm's mean over features
    assert reads["layers.0.down"].outputs == {layers["layers.0.gate"], layers["layers.0.up"]}
    assert reads["layers.0.up"].same_input_as is layers["layers.0.gate"]
    assert reads["lm_head"].outputs == {layers["layers.0.o"], layers["layers.0.down"]}  # the residual stream
    assert flow.output.outputs == {layers["lm_head"]} and not flow.output.ops


@pytest.mark.parametrize("with_input", [False, True])
def test_a_layernorm_between_two_linears_breaks_the_chain(with_input):
    """Decided (docs in fastdfa.metrics): LayerNorm's Jacobian is not diagonal, so exact matching fails; the
    plain form refuses it, from the modules of an nn.Sequential or from one forward."""
    model = nn.Sequential(fastdfa.Linear(6, 8, activation="tanh"), nn.LayerNorm(8), fastdfa.Linear(8, 8),
                          fastdfa.Linear(8, 3))
    dfa = _wrap(model, _x())
    msg = _refuses(dfa, _fwm, r"'0' -> '2' breaks the chain", **({"example_input": _x()} if with_input else {}))
    assert "LayerNorm" in msg


def test_hugging_face_decoders_are_refused_naming_the_first_link():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    ids = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(0))

    class LM(nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, ids):
            return self.hf(input_ids=ids).logits

    torch.manual_seed(0)
    llama = transformers.LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    dfa = _wrap(fastdfa.convert(LM(transformers.LlamaForCausalLM(llama))), ids, batch_dims=2)
    _refuses(dfa, _fwm, r"'hf\.model\.layers\.0\.self_attn\.q_proj' -> 'hf\.model\.layers\.0\.self_attn\.k_proj' "
                        r"breaks the chain", example_input=ids)

    gpt2 = transformers.GPT2Config(vocab_size=30, n_positions=16, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0,
                                   embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0)
    model = fastdfa.convert(LM(transformers.GPT2LMHeadModel(gpt2)))
    dfa = _wrap(model, ids, batch_dims=2)
    if isinstance(model.hf.transformer.h[0].attn.c_attn, Conv1D):  # GPT-2's Conv1D converted
        msg = _refuses(dfa, _fwm, r"'hf\.transformer\.h\.0\.attn\.c_attn' -> 'hf\.transformer\.h\.0\.attn\.c_proj' "
                                  r"breaks the chain", example_input=ids)
        assert "matrix product (attention" in msg
        assert "'hf.transformer.h.0.attn.c_attn' -> 'hf.transformer.h.0.attn.c_proj'" in _refuses(
            dfa, _fwm, "example_input=")
    else:  # only lm_head is a fastdfa layer
        _refuses(dfa, _fwm, r"one fastdfa layer, 'hf\.lm_head'")


# ----------------------------------------------------------------- soft_align's mode
def test_soft_align_names_the_real_mode_and_aligns_grape_like_dfa():
    torch.manual_seed(0)
    dfa = _wrap(make_mlp(6, (9, 7), 4, "tanh"), _x())
    with fastdfa.backprop(dfa):
        msg = _refuses(dfa, lambda d: soft_align(d, 10), "dfa.mode is 'bp'")
    assert "'grape'" in msg  # the modes it does align
    other = _wrap(make_mlp(6, (9, 7), 4, "tanh"), _x())
    other.load_state_dict(dfa.state_dict())
    other.mode = "grape"
    got, want = soft_align(other, 40), soft_align(dfa, 40)
    assert got == pytest.approx(want, abs=1e-12) and all(c == pytest.approx(math.cos(math.radians(40)), abs=1e-9)
                                                         for c in got.values())
    torch.testing.assert_close(other.feedback.flat, dfa.feedback.flat, rtol=0, atol=0)


# ----------------------------------------------------------------- the other refusals name the right layer
def test_refusals_name_the_layer_that_breaks_the_assumption():
    one = _wrap(nn.Sequential(fastdfa.Linear(6, 3)), _x())
    _refuses(one, _fwm, r"one fastdfa layer, '0' \(fastdfa.Linear 6 -> 3")
    conv_out = nn.Sequential(fastdfa.Linear(4, 8), nn.Unflatten(1, (2, 2, 2)), fastdfa.Conv2d(2, 3, 2))
    dfa = _wrap(conv_out, torch.randn(1, 4, dtype=DT))
    _refuses(dfa, _fwm, r"output layer '2' \(fastdfa.Conv2d \(weight \(3, 2, 2, 2\)\)\) is not")
    # A CNN: the head is matched; the report names where the matched chain stops, and the layers below it.
    torch.manual_seed(0)
    cnn = _wrap(make_cnn((1, 8, 8), 4, channels=(3, 4), hidden=6), torch.randn(2, 1, 8, 8, dtype=DT))
    report = {r.layer: r for r in feedback_weight_matching(cnn)}
    assert report["5"].action == "weights matched"
    assert report["2"].note.startswith("the matched chain stops here: '2' is a fastdfa.Conv2d")
    assert report["0"].note == "below the matched chain, which stops at '2'"
    # soft_align on the CNN: the first layer above the first site that is not dense, with its type and shape.
    _refuses(cnn, _align, r"'2' \(fastdfa.Conv2d \(weight \(4, 3, 3, 3\)\)\) breaks the chain: not a dense layer")


# ----------------------------------------------------------------- the encoder form
C = 3


def _bert(layers=2, **config):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=layers, num_attention_heads=2,
                                          intermediate_size=16, max_position_embeddings=16, num_labels=C,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **config)
            self.bert = transformers.BertForSequenceClassification(cfg)

        def forward(self, ids, mask):
            return self.bert(input_ids=ids, attention_mask=mask).logits

    torch.manual_seed(0)
    ids = torch.randint(1, 40, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return _wrap(fastdfa.convert(Classifier()), (ids, mask), feedback_layout="per-feature"), (ids, mask)


def test_a_converted_bert_takes_the_encoder_form_with_or_without_an_input():
    dfa, x = _bert()
    other, _ = _bert()
    report = feedback_weight_matching(dfa)
    checked = feedback_weight_matching(other, example_input=x)  # its data flow checked by one forward
    torch.testing.assert_close(other.feedback.flat, dfa.feedback.flat, rtol=0, atol=0)
    assert [r.to_dict() for r in checked] == [r.to_dict() for r in report]
    matched = [r.layer for r in report if r.action == "weights matched"]
    assert len(matched) == 7 and all(any(k in n for n in matched) for k in ("attention.output.dense",
                                                                            "intermediate.dense", "output.dense",
                                                                            "pooler.dense"))


def test_a_bert_decoder_is_refused():
    dfa, x = _bert(is_decoder=True)
    assert "is_decoder=True" in _refuses(dfa, _fwm, r"block 'bert\.bert\.encoder\.layer\.0' \(BertLayer\) is a "
                                                    "decoder block", example_input=x)


class HandBlock(nn.Module):
    """A hand-written post-LN block in BERT's layout (its names), with or without the FFN's residual add."""

    def __init__(self, d=8, f=16, residual=True):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for n in ("query", "key", "value"):
            setattr(self.attention.self, n, nn.Linear(d, d))
        self.attention.output = nn.Module()
        self.attention.output.dense, self.attention.output.LayerNorm = nn.Linear(d, d), nn.LayerNorm(d)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, f)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(f, d), nn.LayerNorm(d)
        self.residual = residual

    def forward(self, x):
        s = self.attention.self
        q, k, v = s.query(x), s.key(x), s.value(x)
        ctx = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1) @ v
        x1 = self.attention.output.LayerNorm(self.attention.output.dense(ctx) + x)
        y = self.output.dense(F.gelu(self.intermediate.dense(x1)))
        return self.output.LayerNorm(y + x1 if self.residual else y)


class HandEncoder(nn.Module):
    def __init__(self, residual=True):
        super().__init__()
        self.blocks = nn.ModuleList(HandBlock(residual=residual) for _ in range(2))
        self.pooler, self.classifier = nn.Linear(8, 8), nn.Linear(8, C)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def test_a_hand_written_encoder_needs_an_input_and_is_checked_against_bert_data_flow():
    x = torch.randn(2, 5, 8, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    good = _wrap(fastdfa.convert(HandEncoder()), x, feedback_layout="per-feature")
    assert encoder_layout(good) is not None
    _refuses(good, _fwm, r"cannot tell from the modules alone that block 'blocks\.0' \(HandBlock\)")
    report = feedback_weight_matching(good, example_input=x)
    assert sum(r.action == "weights matched" for r in report) == 7
    torch.manual_seed(0)
    broken = _wrap(fastdfa.convert(HandEncoder(residual=False)), x, feedback_layout="per-feature")
    msg = _refuses(broken, _fwm, r"'blocks\.1\.attention\.self\.query' \(fastdfa.Linear 8 -> 8", example_input=x)
    assert "does not read 'blocks.0.attention.output.dense''s output" in msg
