"""What real training scripts do gets the rule's gradients or a clear error (issue "Reliability 3").

One test per class at least: inference mode and meta-device materialisation (every tensor fastdfa owns is
a normal, seeded tensor), checkpointing on the first step, builds that take the training forward's path,
GrAPE with keyword inputs and with two forwards in one backward, nonfinite="skip" under gradient
accumulation, a refused backward under head=, ambiguous batch axes, empty sequences, the deprecated
conv_feedback spelling, and the lazy subpackages. Gradients are checked in float64 against the rule.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa
from fastdfa.models import make_mlp

DT = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    return make_mlp(6, (5, 4), 3).to(DT)


def _dfa_formula(dfa, x, t):
    """The DFA gradients of a [Linear, ReLU]* Linear chain, written out: delta_l = (e F_l^T) * relu'(a_l)."""
    layers = [m for m in dfa.model if isinstance(m, nn.Linear)]
    hs, h = [x], x
    for i, layer in enumerate(layers):
        a = h @ layer.weight.t() + layer.bias
        h = a if i == len(layers) - 1 else torch.relu(a)
        hs.append(h)
    y = hs[-1].detach().requires_grad_()
    (e,) = torch.autograd.grad(F.cross_entropy(y, t), y)
    grads = {}
    for i, layer in enumerate(layers):
        if i == len(layers) - 1:
            delta = e
        else:
            delta = (e @ dfa.sites[i].feedback.t()) * (hs[i + 1] > 0)
        grads[layer] = (delta.t() @ hs[i], delta.sum(0))
    return grads


def _check_formula(dfa, x, t):
    for layer, (dw, db) in _dfa_formula(dfa, x, t).items():
        torch.testing.assert_close(layer.weight.grad, dw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, db, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ inference mode, meta device
def test_a_first_forward_under_inference_mode_leaves_normal_tensors():
    """Lightning's sanity check runs the first forward under torch.inference_mode(): the feedback built
    there must still take GrAPE's steps, load_state_dict, FWM and soft_align."""
    dfa = fastdfa.DFA(_mlp(), mode="grape", seed=1)
    x, t = torch.randn(8, 6, dtype=DT), torch.randint(0, 3, (8,))
    with torch.inference_mode():
        dfa(x)
    assert not dfa.feedback.flat.is_inference()
    assert not any(m.feedback_weight.is_inference() for m in dfa.model if isinstance(m, fastdfa.Linear))
    before = dfa.feedback.flat.clone()
    F.cross_entropy(dfa(x), t).backward()  # GrAPE steps the feedback in place
    assert not torch.equal(dfa.feedback.flat, before)
    dfa.load_state_dict(dfa.state_dict())
    dfa.mode = "dfa"
    fastdfa.init.soft_align(dfa, 30.0)
    fastdfa.init.feedback_weight_matching(dfa)


def test_a_model_converted_under_inference_mode_trains_with_fa():
    with torch.inference_mode():
        model = fastdfa.convert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))).to(DT)
    dfa = fastdfa.DFA(model, mode="fa")
    F.cross_entropy(dfa(torch.randn(4, 6, dtype=DT)), torch.tensor([0, 1, 2, 0])).backward()
    assert model[0].weight.grad is not None


def test_fa_feedback_of_a_meta_model_is_seeded_once_it_is_materialised():
    """Built on the meta device, wrapped, then to_empty(): FA's feedback is seeded as documented (the same
    values as a wrapper of a real model), not the uninitialised memory to_empty leaves."""
    with torch.device("meta"):
        meta = fastdfa.convert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
    dfa = fastdfa.DFA(meta, mode="fa", seed=3)
    dfa.to_empty(device="cpu")
    for m in dfa.model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight)
            nn.init.zeros_(m.bias)
    dfa(torch.randn(2, 6)).sum().backward()
    real = fastdfa.DFA(fastdfa.convert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))), mode="fa", seed=3)
    for a, b in zip(dfa.feedback.fa_layers, real.feedback.fa_layers):
        torch.testing.assert_close(a.feedback_weight, b.feedback_weight, rtol=0, atol=0)


def test_load_state_dict_assign_onto_a_meta_wrapper_takes_the_fa_feedback():
    source = fastdfa.DFA(fastdfa.convert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))), seed=9)
    source(torch.randn(2, 6))
    with torch.device("meta"):
        meta = fastdfa.convert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
    target = fastdfa.DFA(meta, seed=0)
    target.load_state_dict(source.state_dict(), assign=True)
    for a, b in zip(target.feedback.fa_layers, source.feedback.fa_layers):
        assert not a.feedback_weight.is_meta
        torch.testing.assert_close(a.feedback_weight, b.feedback_weight, rtol=0, atol=0)


# ------------------------------------------------------------------ checkpointing on the first step
@pytest.mark.parametrize("mode", ["dfa", "grape"])
def test_fastdfa_checkpoint_after_an_embedding_works_on_the_first_step(mode):
    class Net(nn.Module):
        def __init__(self, checkpointed):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(11, 6, dtype=DT)
            self.a, self.b = fastdfa.Linear(6, 6, dtype=DT), fastdfa.Linear(6, 6, dtype=DT)
            self.head = fastdfa.Linear(6, 3, dtype=DT)
            self.checkpointed = checkpointed

        def block(self, h):
            return torch.relu(self.b(torch.relu(self.a(h))))

        def forward(self, ids):
            h = self.emb(ids).mean(1)
            return self.head(fastdfa.checkpoint(self.block, h) if self.checkpointed else self.block(h))

    ids, t = torch.randint(0, 11, (5, 4)), torch.tensor([0, 1, 2, 0, 1])
    grads = []
    for checkpointed in (False, True):
        dfa = fastdfa.DFA(Net(checkpointed), mode=mode, seed=2)
        F.cross_entropy(dfa(ids), t).backward()  # the first step
        grads.append([p.grad.clone() for p in dfa.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ builds take the training path
@pytest.mark.parametrize("error_at", [None, "1"])
def test_build_of_a_converted_transformer_encoder_records_every_site(error_at):
    """torch's TransformerEncoderLayer takes a fused fast path in eval mode under no_grad (what a build
    runs in), never calling its linear layers; the build must run them as a training forward does."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    model = fastdfa.convert(nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                                          nn.Linear(8, 3)))
    x = torch.randn(2, 5, 8)
    dfa = fastdfa.DFA(model, batch_dims=2, feedback_layout="per-feature", example_input=x, error_at=error_at)
    built = [s.name for s in dfa.sites]
    fresh = fastdfa.DFA(fastdfa.convert(nn.Sequential(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True), 2,
        enable_nested_tensor=False), nn.Linear(8, 3))), batch_dims=2, feedback_layout="per-feature")
    fresh(x).sum().backward()  # a training forward: every linear layer but the first is a site
    assert built == [s.name for s in fresh.sites] and len(built) == 2 * 2 + 1 - 1  # linear1, linear2 per layer, head
    dfa(x).sum().backward()  # and training after the build works


# ------------------------------------------------------------------ GrAPE
def test_grape_takes_keyword_inputs_and_aligns_as_with_positional_ones():
    """``dfa(features=..., mask=...)`` (HF style): the dual pass replicates the keyword batch like a
    positional one, so the alignment step is the same as for ``dfa(x, mask)``."""
    class KwNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = fastdfa.Linear(6, 5, dtype=DT), fastdfa.Linear(5, 3, dtype=DT)
            self.c = fastdfa.Linear(3, 3, dtype=DT)

        def forward(self, features, mask):
            return self.c(torch.relu(self.b(torch.relu(self.a(features * mask)))))

    x, mask, t = torch.randn(4, 6, dtype=DT), torch.ones(4, 6, dtype=DT), torch.tensor([0, 1, 2, 0])
    results = []
    for call in (lambda d: d(x, mask), lambda d: d(features=x, mask=mask)):
        dfa = fastdfa.DFA(KwNet(), mode="grape", seed=5)
        F.cross_entropy(call(dfa), t).backward()
        results.append((dfa.feedback.flat.clone(), dfa.last_alignment.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)


def test_grape_two_forwards_in_one_backward_project_with_the_feedback_each_forward_saw():
    """Two forwards, one backward of the summed losses: each projection uses the feedback as it was at
    the forwards (the DFA formula with F before any alignment step), the alignment steps come after."""
    dfa = fastdfa.DFA(_mlp(), mode="grape", seed=4)
    x1, x2 = torch.randn(4, 6, dtype=DT), torch.randn(4, 6, dtype=DT)
    t1, t2 = torch.randint(0, 3, (4,)), torch.randint(0, 3, (4,))
    dfa(x1)  # build
    f0 = dfa.feedback.flat.clone()
    (F.cross_entropy(dfa(x1), t1) + F.cross_entropy(dfa(x2), t2)).backward()
    assert not torch.equal(dfa.feedback.flat, f0)  # both alignment steps ran, after
    got = {m: (m.weight.grad.clone(), m.bias.grad.clone()) for m in dfa.model if isinstance(m, nn.Linear)}
    dfa.feedback.flat.copy_(f0)
    want = [_dfa_formula(dfa, x, t) for x, t in ((x1, t1), (x2, t2))]
    for layer, (dw, db) in got.items():
        torch.testing.assert_close(dw, want[0][layer][0] + want[1][layer][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(db, want[0][layer][1] + want[1][layer][1], rtol=1e-12, atol=1e-12)


def test_grape_on_an_empty_batch_is_a_step_with_no_gradient():
    dfa = fastdfa.DFA(_mlp(), mode="grape")
    dfa(torch.randn(4, 6, dtype=DT))
    F.cross_entropy(dfa(torch.randn(0, 6, dtype=DT)), torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    assert all(float(p.grad.abs().sum()) == 0 for p in dfa.parameters() if p.grad is not None)


# ------------------------------------------------------------------ NaN policy under accumulation
def test_skip_under_gradient_accumulation_skips_the_whole_step():
    """Micro-batches 1 and 3 finite, 2 non-finite: nothing of the step moves any weight (the finite
    micro-batches before AND after the bad one included); the next step trains normally, by the rule."""
    dfa = fastdfa.DFA(_mlp(), nonfinite="skip", seed=1)
    opt = torch.optim.SGD(dfa.parameters(), lr=0.1, momentum=0.9)
    xs = [torch.randn(4, 6, dtype=DT) for _ in range(3)]
    t = torch.randint(0, 3, (4,))
    before = [p.detach().clone() for p in dfa.parameters()]
    for i, x in enumerate(xs):
        loss = F.cross_entropy(dfa(x), t)
        (loss * float("nan") if i == 1 else loss).backward()
    assert all(p.grad is None for p in dfa.parameters()) and dfa.skipped_steps == 1
    opt.step()
    opt.zero_grad()
    for a, b in zip(dfa.parameters(), before):
        assert torch.equal(a, b)
    F.cross_entropy(dfa(xs[0]), t).backward()  # the skip ended with the optimizer step
    _check_formula(dfa, xs[0], t)
    assert dfa.skipped_steps == 1


def test_a_refused_backward_under_head_leaves_every_grad_as_it_was():
    """head=: the head's gradients accumulate before the output node's backward; when the node refuses
    a non-finite error, they are put back (here: an accumulated gradient from an earlier micro-batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(fastdfa.Linear(6, 5, dtype=DT), nn.ReLU(), fastdfa.Linear(5, 4, dtype=DT), nn.ReLU(),
                          nn.Linear(4, 3, dtype=DT))
    dfa = fastdfa.DFA(model, head="4")
    x, t = torch.randn(4, 6, dtype=DT), torch.randint(0, 3, (4,))
    F.cross_entropy(dfa(x), t).backward()
    saved = [None if p.grad is None else p.grad.clone() for p in dfa.parameters()]
    with pytest.raises(fastdfa.NonFiniteErrorSignal):
        (F.cross_entropy(dfa(x), t) * float("inf")).backward()
    for p, g in zip(dfa.parameters(), saved):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


# ------------------------------------------------------------------ shapes never guessed
def test_a_permuted_site_under_equal_batch_dim_sizes_is_refused():
    """batch_dims=2 with batch == tokens: a [tokens, batch, d] site passes the shape check, so its axes
    would be read swapped; a transposed view is refused (with distinct sizes the shape check refuses it)."""
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = fastdfa.Linear(4, 4), fastdfa.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x).transpose(0, 1)).transpose(0, 1)

    with pytest.raises(ValueError, match="permuted view.*cannot be checked"):
        fastdfa.DFA(SeqFirst(), batch_dims=2)(torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="differ in their first batch_dims"):
        fastdfa.DFA(SeqFirst(), batch_dims=2)(torch.randn(2, 3, 4))
    ok = fastdfa.DFA(make_seq_model(), batch_dims=2)
    ok(torch.randn(3, 3, 4)).sum().backward()  # batch-first sites: equal sizes are fine


def make_seq_model():
    return nn.Sequential(fastdfa.Linear(4, 4), nn.ReLU(), fastdfa.Linear(4, 2))


@pytest.mark.parametrize("layout", ["dense", "per-feature"])
def test_an_empty_sequence_on_the_first_forward_says_so(layout):
    dfa = fastdfa.DFA(make_seq_model(), feedback_layout=layout)  # batch_dims=1: the tokens are per-sample
    with pytest.raises(ValueError, match="empty sequence"):
        dfa(torch.randn(2, 0, 4))
    assert not dfa.built
    dfa(torch.randn(2, 3, 4)).sum().backward()  # nothing was built by the refused forward


# ------------------------------------------------------------------ options and the front
def test_conv_feedback_channel_is_a_deprecated_alias_of_per_feature():
    with pytest.warns(DeprecationWarning, match='feedback_layout="per-feature"') as record:
        config = fastdfa.DFAConfig(conv_feedback="channel")
    assert record[0].filename == __file__  # the warning points at the caller's line
    assert config.feedback_layout == "per-feature"


def test_one_config_plus_overrides_and_unknown_options_named():
    base = fastdfa.DFAConfig(mode="grape", seed=3)
    dfa = fastdfa.DFA(_mlp(), base, seed=4)
    assert dfa.dfa_config.mode == "grape" and dfa.dfa_config.seed == 4
    with pytest.raises(TypeError, match="'batchdims'.*did you mean 'batch_dims'"):
        fastdfa.DFA(_mlp(), batchdims=2)


def test_subpackages_are_attributes_of_fastdfa_loaded_lazily():
    code = ("import sys, fastdfa; assert 'fastdfa.distributed' not in sys.modules; "
            "print(fastdfa.distributed.DFAPipeline.__name__, fastdfa.models.make_mlp.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["DFAPipeline", "make_mlp"]


@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d"])
def test_fa_follows_autocast_after_a_float32_build(layer):
    """Mode "fa" under torch.autocast(bfloat16), the wrapper built in float32: the FA backward runs in the
    autocast dtype (as DFA's does) and gives FA's input gradient dX = dY B (here against float32 math)."""
    torch.manual_seed(0)
    if layer == "linear":
        model, x = nn.Sequential(fastdfa.Linear(6, 5), nn.ReLU(), fastdfa.Linear(5, 3)), torch.randn(4, 6)
    elif layer == "conv1d":
        model = nn.Sequential(fastdfa.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), fastdfa.Linear(3 * 7, 3))
        x = torch.randn(4, 2, 7)
    else:
        model = nn.Sequential(fastdfa.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), fastdfa.Linear(3 * 16, 3))
        x = torch.randn(4, 2, 4, 4)
    dfa = fastdfa.DFA(model, mode="fa", example_input=x)
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dfa(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32
    got = x.grad.clone()
    x.grad = None
    dfa(x).sum().backward()  # the same FA step in float32: bfloat16 rounding apart, the same dX
    cos = F.cosine_similarity(got.flatten(), x.grad.flatten(), dim=0)
    assert cos > 0.999, float(cos)


def test_a_trainable_layer_after_error_at_is_refused_head_is_the_way_to_say_bp():
    model = nn.Sequential(fastdfa.Linear(6, 5, dtype=DT), nn.ReLU(), fastdfa.Linear(5, 4, dtype=DT), nn.ReLU(),
                          fastdfa.Linear(4, 3, dtype=DT))
    x, t = torch.randn(4, 6, dtype=DT), torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match="'4' runs after the error point.*head="):
        fastdfa.DFA(model, error_at="2")(x)
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(fastdfa.DFA(model, head="4")(x), t).backward()  # the explicit form trains
    assert model[4].weight.grad is not None
