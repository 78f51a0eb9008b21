"""Hugging Face models through fastdfa.prepare: the error point (error_at default, head=), HF's own
labels= loss and ModelOutput, tied embeddings, the no-site refusal, checkpointing, save/load.

Every gradient is checked in float64 against the rule written out: e from BP of HF's own loss to the
error point (a plain forward of the same weights), then for the output layer (or the head) BP's gradient,
and for a layer feeding a site ``dW = d(act(layer(x)))/dW`` applied to the site's projected error
``e F^T`` (broadcast over tokens for per-feature feedback).
"""

import copy
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import fastdfa

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel  # noqa: E402

DT = torch.float64
VOCAB, T, B = 37, 6, 3


def tiny_bert(**kw):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=12, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **kw)
    return BertForSequenceClassification(cfg).to(DT)


def tiny_gpt2(**kw):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **kw)
    return GPT2LMHeadModel(cfg).to(DT)


def _capture(model, names):
    """Forward hooks recording each named module's input and output, for the formula."""
    seen, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        def hook(m, args, out, name=name):
            seen[name] = (args[0], out)
        handles.append(modules[name].register_forward_hook(hook))
    return seen, handles


def _plain_reference(model, names, **inputs):
    """A BP forward of a copy of ``model`` (same weights): its loss, logits and the captured tensors."""
    ref = copy.deepcopy(model)
    seen, handles = _capture(ref, names)
    out = ref(**inputs)
    for h in handles:
        h.remove()
    return ref, out, seen


def _expected_layer_grad(layer, x, act, site_error):
    """dW of ``act(layer(x))`` for the error ``site_error`` at its output (the site), by autograd."""
    layer = copy.deepcopy(layer)
    with torch.enable_grad():
        y = act(layer.plain_forward(x.detach()) if hasattr(layer, "plain_forward") else layer(x.detach()))
        (grad,) = torch.autograd.grad(y, layer.weight, site_error)
    return grad


def _site(dfa, name):
    return next(s for s in dfa.sites if s.name == name)


# ------------------------------------------------------------------ error at the logits (the default)
def test_bert_default_takes_the_error_at_the_classifier_output_with_hfs_labels_loss():
    model = tiny_bert()
    ids, labels = torch.randint(0, VOCAB, (B, T)), torch.tensor([0, 2, 1])
    names = ["classifier", "bert.encoder.layer.1.intermediate.dense"]
    ref, ref_out, seen = _plain_reference(model, names, input_ids=ids, labels=labels)
    (e,) = torch.autograd.grad(ref_out.loss, ref_out.logits)

    dfa = fastdfa.prepare(model, seed=4)
    out = dfa(input_ids=ids, labels=labels)
    assert type(out).__name__ == "SequenceClassifierOutput"  # the model's own output object
    assert dfa.error_point == "the output of 'classifier'" and len(dfa.sites) == 13
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=0, atol=0)
    out.loss.backward()

    x_cls = seen["classifier"][0]
    torch.testing.assert_close(dfa.model.classifier.weight.grad, e.t() @ x_cls, rtol=1e-12, atol=1e-12)
    site = _site(dfa, "bert.encoder.layer.1.output.dense")  # the input of output.dense = gelu(intermediate)
    delta = (e @ site.feedback.t()).reshape(B, T, -1)
    layer = dfa.model.bert.encoder.layer[1].intermediate.dense
    act = dfa.model.bert.encoder.layer[1].intermediate.intermediate_act_fn
    want = _expected_layer_grad(layer, seen[names[1]][0], act, delta)
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-10, atol=1e-12)
    bp_grad = torch.autograd.grad(ref(input_ids=ids, labels=labels).loss,
                                  ref.bert.encoder.layer[1].intermediate.dense.weight)[0]
    assert not torch.allclose(layer.weight.grad, bp_grad, atol=1e-6)  # the rule is DFA's, not BP's


def test_gpt2_default_takes_the_error_at_the_logits_every_conv1d_a_site():
    model = tiny_gpt2(tie_word_embeddings=False)
    ids = torch.randint(0, VOCAB, (B, T))
    names = ["lm_head", "transformer.h.1.mlp.c_fc"]
    ref, ref_out, seen = _plain_reference(model, names, input_ids=ids, labels=ids)
    (e,) = torch.autograd.grad(ref_out.loss, ref_out.logits)

    dfa = fastdfa.prepare(model, batch_dims=2, seed=1)
    out = dfa(input_ids=ids, labels=ids)
    assert dfa.error_point == "the output of 'lm_head'"
    assert len(dfa.sites) == 2 * 4  # every Conv1D of the 2 blocks and lm_head, less the first layer to run
    out.loss.backward()

    z = seen["lm_head"][0]
    torch.testing.assert_close(dfa.model.lm_head.weight.grad, e.reshape(-1, VOCAB).t() @ z.reshape(-1, 8),
                               rtol=1e-12, atol=1e-12)
    site = _site(dfa, "transformer.h.1.mlp.c_proj")
    delta = (e.reshape(-1, VOCAB) @ site.feedback.t()).reshape(B, T, -1)
    block = dfa.model.transformer.h[1].mlp
    want = _expected_layer_grad(block.c_fc, seen[names[1]][0], block.act, delta)
    torch.testing.assert_close(block.c_fc.weight.grad, want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ head=: the error at the head's input
@pytest.mark.parametrize("family", ["gpt2", "bert", "bert-per-feature"])
def test_head_trains_by_bp_and_the_blocks_by_dfa_with_the_head_input_error(family):
    per_feature = family.endswith("per-feature")
    family = family.split("-")[0]
    if family == "gpt2":
        model, head, layer_name, site_name = tiny_gpt2(tie_word_embeddings=False), "lm_head", \
            "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"
        ids = torch.randint(0, VOCAB, (B, T))
        inputs, options = dict(input_ids=ids, labels=ids), dict(batch_dims=2)
    else:
        model, head, layer_name, site_name = tiny_bert(), "classifier", \
            "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense"
        inputs, options = dict(input_ids=torch.randint(0, VOCAB, (B, T)), labels=torch.tensor([1, 0, 2])), {}
    ref, ref_out, seen = _plain_reference(model, [head, layer_name], **inputs)
    z = seen[head][0]
    e, head_grad = torch.autograd.grad(ref_out.loss, (z, dict(ref.named_modules())[head].weight))

    if per_feature:
        options["feedback_layout"] = "per-feature"
    dfa = fastdfa.prepare(model, head=head, seed=2, **options)
    assert not isinstance(dict(dfa.model.named_modules())[head], fastdfa.layers.FASTDFA_LAYERS)  # not converted
    out = dfa(**inputs)
    out.loss.backward()
    assert dfa.error_point == f"the input of {head!r}" and dfa.out_features == z.shape[-1]
    torch.testing.assert_close(dict(dfa.model.named_modules())[head].weight.grad, head_grad, rtol=1e-12,
                               atol=1e-12)  # the head: exact BP
    site = _site(dfa, site_name)
    n_e = z.shape[-1]
    if per_feature:  # one row per feature, the sample's error broadcast over its tokens
        assert site.channelwise
        delta = (e.reshape(-1, n_e) @ site.feedback.t())[:, None, :].expand(B, T, -1)
    else:
        delta = (e.reshape(-1, n_e) @ site.feedback.t()).reshape(B, T, -1)
    layer = dict(dfa.model.named_modules())[layer_name]
    act = dfa.model.transformer.h[1].mlp.act if family == "gpt2" else \
        dfa.model.bert.encoder.layer[1].intermediate.intermediate_act_fn
    want = _expected_layer_grad(layer, seen[layer_name][0], act, delta)
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-10, atol=1e-12)


def test_tied_lm_head_gets_the_sum_of_both_uses_gradients():
    """GPT-2's lm_head is tied to the input embedding: after prepare it still is, and the shared weight's
    gradient is the untied model's lm_head gradient plus its embedding gradient (same weights, same feedback)."""
    tied = tiny_gpt2()
    untied = tiny_gpt2(tie_word_embeddings=False)
    untied.load_state_dict(tied.state_dict())
    untied.lm_head.weight.data.copy_(tied.transformer.wte.weight.data)
    ids = torch.randint(0, VOCAB, (B, T))
    grads = []
    for model in (tied, untied):
        dfa = fastdfa.prepare(model, batch_dims=2, head="lm_head", seed=5)
        dfa(input_ids=ids, labels=ids).loss.backward()
        grads.append(dfa.model)
    t, u = grads
    assert t.lm_head.weight is t.transformer.wte.weight
    torch.testing.assert_close(t.transformer.wte.weight.grad, u.lm_head.weight.grad + u.transformer.wte.weight.grad,
                               rtol=1e-12, atol=1e-12)


def test_error_at_names_the_module_and_hfs_problem_type_loss_flows_into_e():
    """error_at='classifier' with problem_type='multi_label_classification': HF's BCE-with-logits loss (not
    cross-entropy) is what e is the gradient of."""
    model = tiny_bert(problem_type="multi_label_classification")
    inputs = dict(input_ids=torch.randint(0, VOCAB, (B, T)), labels=torch.tensor([[0., 1, 1], [1, 0, 0], [0, 0, 1]],
                                                                                   dtype=DT))
    ref, ref_out, seen = _plain_reference(model, ["classifier"], **inputs)
    (e,) = torch.autograd.grad(ref_out.loss, ref_out.logits)
    bce = F.binary_cross_entropy_with_logits(ref_out.logits, inputs["labels"])
    torch.testing.assert_close(ref_out.loss, bce)
    dfa = fastdfa.prepare(model, error_at="classifier")
    dfa(**inputs).loss.backward()
    assert dfa.error_point == "the output of 'classifier'"
    torch.testing.assert_close(dfa.model.classifier.weight.grad, e.t() @ seen["classifier"][0], rtol=1e-12,
                               atol=1e-12)
    with pytest.raises(ValueError, match="not a submodule.*close names"):
        fastdfa.prepare(tiny_bert(), error_at="clasifier")
    with pytest.raises(ValueError, match="error_at= or head=, not both"):
        fastdfa.DFAConfig(error_at="a", head="b")


# ------------------------------------------------------------------ no silent BP
def test_a_model_whose_blocks_would_train_by_bp_raises_naming_the_cause():
    """Only lm_head converted (GPT-2 before Conv1D conversion): it is the first fastdfa layer to run, so
    there is no site, and every block would train by exact BP; that is refused, not trained."""
    model = tiny_gpt2()
    dfa = fastdfa.prepare(model, targets=["lm_head"], batch_dims=2)
    ids = torch.randint(0, VOCAB, (B, T))
    with pytest.raises(RuntimeError, match="no site.*exact BP, silently.*Conv1D"):
        dfa(input_ids=ids, labels=ids)
    assert all(p.grad is None for p in model.parameters())
    one_layer = fastdfa.DFA(torch.nn.Sequential(fastdfa.Linear(4, 3)))  # DFA and BP coincide: valid
    one_layer(torch.randn(2, 4)).sum().backward()


# ------------------------------------------------------------------ HF's gradient checkpointing
@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("mode", ["dfa", "grape"])
def test_hf_gradient_checkpointing_gives_the_same_gradients_from_the_first_step(family, mode):
    make = tiny_gpt2 if family == "gpt2" else tiny_bert
    ids = torch.randint(0, VOCAB, (B, T))
    labels = ids if family == "gpt2" else torch.tensor([0, 1, 2])
    options = dict(batch_dims=2) if family == "gpt2" else {}
    grads = []
    for checkpointing in (False, True):
        model = make()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        dfa = fastdfa.prepare(model, mode=mode, seed=3, **options)
        dfa(input_ids=ids, labels=labels).loss.backward()  # the FIRST step (the feedback is built here)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------------ attributes, pickling, saving
def test_attributes_fall_through_to_the_model_and_fastdfas_config_is_dfa_config():
    model = tiny_gpt2()
    dfa = fastdfa.prepare(model, batch_dims=2)
    assert dfa.config is model.config and dfa.dfa_config.batch_dims == 2
    dfa.config.use_cache = False  # what Trainer does: the HF config is writable
    assert model.config.use_cache is False
    assert dfa.generate is not None and dfa.main_input_name == "input_ids"
    import inspect
    assert "labels" in inspect.signature(dfa.forward).parameters  # Trainer keeps the labels column


def _same_step(dfa, other, ids):
    """``other`` trains on its own: its step touches none of ``dfa``'s gradients, and equals ``dfa``'s."""
    other.zero_grad(set_to_none=True)
    dfa.zero_grad(set_to_none=True)
    other(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in dfa.parameters())
    dfa(input_ids=ids, labels=ids).loss.backward()
    for (n, a), b in zip(other.named_parameters(), dfa.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=n)


def test_the_wrapper_pickles_and_torch_saves_built_or_not(tmp_path):
    dfa = fastdfa.prepare(tiny_gpt2(), batch_dims=2, seed=7, mode="grape")
    ids = torch.randint(0, VOCAB, (B, T))
    unbuilt = pickle.loads(pickle.dumps(dfa))
    dfa(input_ids=ids, labels=ids).loss.backward()
    torch.save(dfa, tmp_path / "w.pt")
    copies = [pickle.loads(pickle.dumps(dfa)), torch.load(tmp_path / "w.pt", weights_only=False)]
    references = [copy.deepcopy(dfa) for _ in copies]  # GrAPE steps the feedback: compare from one state
    for other, reference in zip(copies, references):
        assert type(other) is type(dfa) and other.mode == "grape"
        _same_step(reference, other, ids)
    _same_step(fastdfa.prepare(tiny_gpt2(), batch_dims=2, seed=7, mode="grape"), unbuilt, ids)


def test_a_deep_copy_is_an_independent_wrapper_under_hf_checkpointing():
    """The copy's checkpoint recomputation goes to the copy's own recorder, not the original's."""
    model = tiny_gpt2()
    model.gradient_checkpointing_enable()
    model.train()
    dfa = fastdfa.prepare(model, batch_dims=2, seed=7)
    ids = torch.randint(0, VOCAB, (B, T))
    dfa(input_ids=ids, labels=ids).loss.backward()
    _same_step(dfa, copy.deepcopy(dfa), ids)


def test_state_dict_is_tensors_only_and_safetensors_saves_it(tmp_path):
    from safetensors.torch import load_file, save_file
    dfa = fastdfa.prepare(tiny_gpt2(), batch_dims=2, mode="grape")
    ids = torch.randint(0, VOCAB, (B, T))
    dfa(input_ids=ids, labels=ids).loss.backward()
    state = dfa.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")  # ties saved once
    fresh = fastdfa.prepare(tiny_gpt2(), batch_dims=2, mode="grape")
    fresh.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert fresh.model.lm_head.weight is fresh.model.transformer.wte.weight


def _step_grads(dfa, ids):
    dfa.zero_grad(set_to_none=True)
    dfa(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in dfa.parameters()]


def test_save_pretrained_loads_in_transformers_and_from_pretrained_resumes_bit_identically(tmp_path):
    dfa = fastdfa.prepare(tiny_gpt2(), batch_dims=2, mode="grape", seed=11)
    ids = torch.randint(0, VOCAB, (B, T))
    _step_grads(dfa, ids)  # built, GrAPE's stream and feedback moved
    dfa.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "fastdfa_config.json", "fastdfa_state.safetensors"} <= \
        set(os.listdir(tmp_path))
    plain = GPT2LMHeadModel.from_pretrained(tmp_path).to(DT)  # transformers alone reads it
    assert not any(isinstance(m, fastdfa.layers.FASTDFA_LAYERS) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, dfa.model(ids).logits, rtol=0, atol=0)
    for again in (fastdfa.DFA.from_pretrained(tmp_path), fastdfa.prepare(GPT2LMHeadModel.from_pretrained(tmp_path))):
        again = again.to(DT)
        assert again.mode == "grape" and again.dfa_config.seed == 11
        want = _step_grads(copy.deepcopy(dfa), ids)
        got = _step_grads(again, ids)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ prepare's default for causal LMs
def test_prepare_gives_a_causal_lm_the_default_of_the_gpt2_table():
    from fastdfa.prepare import CAUSAL_LM_DEFAULT, causal_lm_defaults, is_causal_lm

    model = tiny_gpt2(tie_word_embeddings=False)
    assert is_causal_lm(model) and not is_causal_lm(model.transformer)
    assert not is_causal_lm(BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)))
    expected = {**CAUSAL_LM_DEFAULT, **({"head": "lm_head"} if CAUSAL_LM_DEFAULT.get("head") is True else {})}
    assert causal_lm_defaults(model) == expected
    dfa = fastdfa.prepare(model, seed=2)  # no option that shapes the rule: the default
    assert dfa.dfa_config.batch_dims == 2  # a causal LM's error is per token, whatever variant the table chose
    for key, value in expected.items():
        assert getattr(dfa.dfa_config, key) == value, key
    ids = torch.randint(0, VOCAB, (B, T))
    dfa(input_ids=ids, labels=ids).loss.backward()  # it trains as it is
    assert all(p.grad is not None for n, p in dfa.model.named_parameters() if "wpe" not in n)


@pytest.mark.parametrize("given", [dict(batch_dims=2), dict(error_at="lm_head", batch_dims=2),
                                   dict(targets=["c_fc"], batch_dims=2)])
def test_prepare_adds_nothing_to_options_that_shape_the_rule(given):
    dfa = fastdfa.prepare(tiny_gpt2(tie_word_embeddings=False), **given)
    assert dfa.dfa_config.head is None and dfa.dfa_config.error_rank is None
    assert dfa.dfa_config.error_at == given.get("error_at")


def test_prepare_with_a_config_adds_nothing():
    dfa = fastdfa.prepare(tiny_gpt2(), fastdfa.DFAConfig(batch_dims=2, seed=1))
    assert dfa.dfa_config.head is None
