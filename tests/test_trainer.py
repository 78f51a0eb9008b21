"""A real client: ``transformers.Trainer`` on a ``fastdfa.prepare``d model, unmodified.

Tiny BERT (sequence classification) and tiny GPT-2 (causal LM) from configs, HF's own ``labels=`` loss,
gradient accumulation and HF's gradient checkpointing: ``train()`` runs 8 optimizer steps and the loss
falls; the first step's gradient of a block layer is DFA's (the rule written out, in float64; Trainer's
accumulation and loss scaling only multiply it) and not BP's; ``evaluate()`` reports the loss;
``save_model()`` writes a directory the wrapper reloads from, with an identical next step.
"""

import copy

import pytest
import torch

import fastdfa

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

DT = torch.float64
VOCAB, T, BATCH = 29, 6, 4


def make_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).to(DT)


def make_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0)).to(DT)


CASES = {  # family: (model, options, the layer checked, the site its activation feeds, its activation)
    "bert": (make_bert, {}, "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense",
             lambda m: m.bert.encoder.layer[1].intermediate.intermediate_act_fn),
    "gpt2": (make_gpt2, dict(batch_dims=2), "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj",
             lambda m: m.transformer.h[1].mlp.act),
}


def _example(family):
    ids = torch.tensor([3, 7, 1, 12, 5, 9])
    return {"input_ids": ids, "labels": ids.clone() if family == "gpt2" else torch.tensor(2)}


def _dfa_gradient(wrapper, family, layer_name, site_name, act, batch):
    """The rule for ``layer_name``'s weight on one batch: e from BP of HF's loss to the error point (the
    logits), the site's projected error e F^T, then the layer's local backward."""
    model = copy.deepcopy(wrapper.model)
    modules = dict(model.named_modules())
    seen = {}
    modules[layer_name].register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    out = model(**batch)
    (e,) = torch.autograd.grad(out.loss, out.logits, retain_graph=True)
    site = next(s for s in wrapper.sites if s.name == site_name)
    n_e = e.shape[-1]
    delta = (e.reshape(-1, n_e) @ site.feedback.t()).reshape(*seen["x"].shape[:-1], -1)
    layer = copy.deepcopy(dict(wrapper.model.named_modules())[layer_name])
    y = act(model)(layer.plain_forward(seen["x"].detach()))
    bp = torch.autograd.grad(out.loss, modules[layer_name].weight)[0]
    return torch.autograd.grad(y, layer.weight, delta)[0], bp


class _CheckFirstStep(TrainerCallback):
    def __init__(self, family):
        self.family, self.checked = family, None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step != 0:
            return
        _, _, layer_name, site_name, act = CASES[self.family]
        got = dict(model.model.named_modules())[layer_name].weight.grad.clone()
        batch = {k: torch.stack([v] * BATCH) for k, v in _example(self.family).items()}
        want, bp = _dfa_gradient(model, self.family, layer_name, site_name, act, batch)
        scale = float((got * want).sum() / (want * want).sum())  # Trainer's loss scaling
        self.checked = (got, want, bp, scale, model.mode)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_trainer_trains_evaluates_saves_and_reloads_a_prepared_model(family, tmp_path):
    make, options, *_ = CASES[family]
    model = make()
    wrapper = fastdfa.prepare(model, seed=3, **options)
    data = [_example(family) for _ in range(2 * BATCH * 8)]  # 8 optimizer steps of 2 micro-batches
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=BATCH, gradient_accumulation_steps=2, max_steps=8,
                             learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, gradient_checkpointing=True, disable_tqdm=True, seed=0,
                             max_grad_norm=0.0)  # no clipping: the gradient is checked as the rule made it
    check = _CheckFirstStep(family)
    trainer = Trainer(model=wrapper, args=args, train_dataset=data, eval_dataset=data[:BATCH], callbacks=[check])
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]
    got, want, bp, scale, mode = check.checked
    assert mode == "dfa" and wrapper.mode == "dfa" and wrapper.built and len(wrapper.sites) > 0
    # Trainer scales the loss (accumulation, num_items_in_batch: x2 for BERT, 40/48 tokens for GPT-2); the
    # rule fixes the gradient up to that factor. HF computes the causal LM loss in float32: 1e-6 there.
    assert scale > 0
    residual = float((got - scale * want).norm() / got.norm())
    assert residual < (1e-6 if family == "gpt2" else 1e-12), residual
    assert not torch.allclose(got / got.norm(), bp / bp.norm(), rtol=1e-3)  # DFA's rule, not BP's
    assert model.is_gradient_checkpointing  # Trainer switched HF's checkpointing on, through the wrapper

    metrics = trainer.evaluate()
    assert "eval_loss" in metrics  # the labels column was kept and HF's loss returned

    trainer.save_model(str(tmp_path / "saved"))
    again = fastdfa.DFA.from_pretrained(tmp_path / "saved", model=fastdfa.prepare(make(), seed=3, **options))
    batch = {k: torch.stack([v] * BATCH) for k, v in _example(family).items()}
    grads = []
    for w in (wrapper, again):
        w.zero_grad(set_to_none=True)
        w(**batch).loss.backward()
        grads.append([p.grad for p in w.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
