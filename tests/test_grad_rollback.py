"""A failed backward leaves every .grad of the wrapped model as it was before it (fastdfa.engine.rollback):
a user's hook that raises, a refused error under head=, any mode; a backward that succeeds is untouched."""

import pickle

import pytest
import torch
from torch import nn

import fastdfa

transformers = pytest.importorskip("transformers")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(fastdfa.Linear(4, 8), nn.Tanh(), fastdfa.Linear(8, 8), nn.Tanh(),
                         fastdfa.Linear(8, 3)).double()


def raising(g):
    raise RuntimeError("user hook failed")


def grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same(before, model):
    for n, p in model.named_parameters():
        if before[n] is None:
            assert p.grad is None, n
        else:
            assert p.grad is not None and torch.equal(p.grad, before[n]), n


@pytest.mark.parametrize("mode", ["dfa", "fa", "grape", "bp"])
@pytest.mark.parametrize("accumulated", [False, True])
def test_failed_backward_restores_every_grad(mode, accumulated):
    model = mlp()
    dfa = fastdfa.DFA(model, mode=mode)
    x = torch.randn(5, 4, dtype=torch.float64)
    if accumulated:  # a micro-batch already accumulated
        dfa(x).sum().backward()
    before = grads(model)
    # the hook on the FIRST layer fails last: every later layer has its gradient accumulated by then
    handle = model[0].weight.register_hook(raising)
    with pytest.raises(RuntimeError, match="user hook failed"):
        dfa(x).pow(2).sum().backward()
    handle.remove()
    assert_same(before, model)
    # and the wrapper trains on: the next backward accumulates as if the failed one never ran
    dfa(x).pow(2).sum().backward()
    reference = mlp()
    ref = fastdfa.DFA(reference, mode=mode)
    if accumulated:
        ref(x).sum().backward()
    ref(x).pow(2).sum().backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-12), n


def gpt2():
    """Untied: a tied lm_head's gradient waits for the embedding's, so it is accumulated last anyway."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=31, n_positions=8,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double()


def test_head_grads_restored_when_a_block_hook_fails():
    """head=: autograd accumulates lm_head's gradient before the DFA output node runs; the rollback is taken
    at the head's output, so a failure later in the backward puts the head's gradient back too."""
    model = fastdfa.prepare(gpt2(), head="lm_head", batch_dims=2)
    ids = torch.randint(0, 31, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    before = grads(model.model)
    handle = model.model.transformer.h[0].mlp.c_fc.weight.register_hook(raising)
    with pytest.raises(RuntimeError, match="user hook failed"):
        model(input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    assert_same(before, model.model)


def test_nan_refusal_under_head_restores_head_grads():
    model = fastdfa.prepare(gpt2(), head="lm_head", batch_dims=2)
    ids = torch.randint(0, 31, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    before = grads(model.model)
    with pytest.raises(fastdfa.NonFiniteErrorSignal):
        (model(input_ids=ids).logits.sum() * float("nan")).backward()
    assert_same(before, model.model)


def test_success_leaves_nothing_behind_and_the_wrapper_pickles():
    model = mlp()
    dfa = fastdfa.DFA(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    dfa(x).sum().backward()
    first = grads(model)
    dfa(x).sum().backward()  # the success callback ran: no restore, the sum is accumulated
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, 2 * first[n]), n
    rollbacks = dfa._router.rollbacks
    assert rollbacks.current() is None  # autograd's engine dropped the rollback with its graph task
    copy = pickle.loads(pickle.dumps(dfa))
    copy(x).sum().backward()


def test_autograd_grad_writes_no_grad():
    model = mlp()
    dfa = fastdfa.DFA(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    out = dfa(x).sum()
    gs = torch.autograd.grad(out, list(model.parameters()), allow_unused=True)
    assert any(g is not None for g in gs)
    assert all(p.grad is None for p in model.parameters())
