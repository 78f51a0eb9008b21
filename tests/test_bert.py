"""A transformers BERT (built from a small config, no weights) converted in one call and trained with
DFA and GrAPE: per-feature feedback over tokens, batches of different lengths with padding masks,
GrAPE's dual pass through BERT's own attention."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa

transformers = pytest.importorskip("transformers")


class Classifier(nn.Module):
    """BertForSequenceClassification returning its logits (fastdfa.DFA needs one tensor)."""

    def __init__(self):
        super().__init__()
        config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=32, num_labels=3,
                                         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, ids, mask):
        return self.bert(input_ids=ids, attention_mask=mask).logits


def _batch(gen, b, t):
    ids = torch.randint(1, 50, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t // 2:] = 0  # a padded sequence
    return ids, mask, torch.randint(0, 3, (b,), generator=gen)


@pytest.mark.parametrize("mode,jvp", [("dfa", "per-site"), ("grape", "per-site"), ("grape", "shared")])
def test_converted_bert_trains_on_batches_of_different_lengths(mode, jvp):
    torch.manual_seed(0)
    model = fastdfa.convert(Classifier())
    layers = list(model.bert.bert.encoder.layer)
    dfa = fastdfa.DFA(model, mode=mode, jvp=jvp, sites=layers, feedback_layout="per-feature", seed=1)
    opt = torch.optim.SGD(dfa.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in (7, 12, 5):  # the sites' feedback, built at length 7, serves every length
        ids, mask, y = _batch(gen, 3, t)
        opt.zero_grad()
        F.cross_entropy(dfa(ids, mask), y).backward()
        opt.step()
    # layer 0 runs first: its input (the embeddings) is not a site, and BP inside layer 0 reaches them
    assert [s.name for s in dfa.sites] == ["bert.bert.encoder.layer.1", "bert.bert.pooler.dense",
                                           "bert.classifier"]
    assert dfa.sites[0].feedback.shape == (16, 3)  # one row per hidden feature, broadcast over tokens
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    for part in ("embeddings.word_embeddings", "encoder.layer.0.attention", "encoder.layer.1.attention",
                 "pooler.dense", "classifier"):
        assert any(part in n for n in moved), part
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if mode == "grape":
        assert dfa.last_alignment is not None and torch.isfinite(dfa.last_alignment).all()
