"""The transformer character LM (``fastdfa.models.TransformerLM``): causal logits, fastdfa projections,
per-token DFA with ``batch_dims=2`` equal to the rule written out in float64 (sites at blocks and at
sub-layers), GrAPE, and the ``train --model transformer`` command on a small synthetic corpus."""

import copy
import json
import math
import time

import pytest
import torch
from torch import nn

import fastdfa
from fastdfa.lab import data as data_mod
from fastdfa.lab.cli import main
from fastdfa.lab.train import TrainConfig, token_cross_entropy
from fastdfa.models import TransformerLM, make_transformer_lm

DT = torch.float64


def _tiny(layers=3, vocab=7, context=5, d_model=8, heads=2):
    torch.manual_seed(0)
    return make_transformer_lm(vocab, context, d_model, heads, layers, mlp_ratio=2).to(DT)


def test_logits_are_causal():
    model = _tiny()
    x = torch.randint(0, 7, (2, 5))
    out = model(x)
    assert out.shape == (2, 5, 7) and out.dtype == DT
    for t in range(5):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 7                      # change token t only
        out2 = model(x2)
        torch.testing.assert_close(out2[:, :t], out[:, :t], rtol=0, atol=0)   # earlier logits unchanged
        assert not torch.allclose(out2[:, t], out[:, t])                      # token t's own logits move
    assert model(x[:, :3]).shape == (2, 3, 7)                                 # shorter sequences work
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 6, dtype=torch.long))


def test_every_projection_is_a_fastdfa_linear_inside_a_named_site():
    model = _tiny(layers=2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, fastdfa.Linear) for m in linears)
    assert len(linears) == 4 * 2 + 1                 # qkv, attention out, MLP up, down per block; the head
    for kind, n_sites in (("blocks", 2), ("layers", 4)):
        named = model.sites(kind)
        assert all(not isinstance(m, fastdfa.Linear) for m in named)
        inside = {id(sub) for m in named for sub in m.modules()}
        assert all(id(m) in inside for m in linears)  # every fastdfa layer is inside a named site
        dfa = fastdfa.DFA(model, sites=named, batch_dims=2, example_input=torch.zeros(1, 5, dtype=torch.long))
        # the first named module's input is the data (the embeddings): every other one is a site
        assert [s.module for s in dfa.sites] == named[1:] and len(dfa.sites) == n_sites
        assert all(tuple(s.feedback.shape) == (8, 7) for s in dfa.sites)     # per token: (d_model, vocab)
    with pytest.raises(ValueError, match="sites kind"):
        model.sites("heads")
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerLM(7, 5, d_model=6, heads=4)


def _rule_gradients(model, dfa, x, target, named):
    """The DFA rule with sites at ``named`` (a chain h_{j+1} = m_j(h_j), the head last) written out:
    every module after the first computes on its detached input; module j's output receives the next
    site's projected error e F_{j+1}^T per token; the head gets e; the first module (input: the
    embeddings, not a site) passes its gradient on into the embeddings."""
    feedback = [s.feedback for s in dfa.sites]                     # F of the inputs of named[1:]
    with torch.no_grad():
        hs = [model.tok(x) + model.pos(torch.arange(x.shape[1]))]
        for m in named[:-1]:
            hs.append(m(hs[-1]))
    out = named[-1](hs[-1].detach().requires_grad_())
    loss = token_cross_entropy(out, target)
    e = torch.autograd.grad(loss, out, retain_graph=True)[0]      # [B, T, V]
    head = named[-1]
    grads = dict(zip((id(p) for p in head.parameters()), torch.autograd.grad(loss, list(head.parameters()))))
    projections = [e @ f.T for f in feedback]                      # [B, T, d] each: token t gets e[b, t] F^T
    for j, m in enumerate(named[:-1]):
        params = list(m.parameters())
        if j == 0:   # its input is the data: BP continues into the embeddings
            params += [model.tok.weight, model.pos.weight]
            out_j = m(model.tok(x) + model.pos(torch.arange(x.shape[1])))
        else:
            out_j = m(hs[j].detach())
        g = torch.autograd.grad(out_j, params, projections[j])
        grads.update(zip((id(p) for p in params), g))
    return grads, projections


@pytest.mark.parametrize("kind", ["blocks", "layers"])
def test_per_token_dfa_gradients_equal_the_rule(kind):
    model = _tiny(layers=3)
    named = model.sites(kind)
    dfa = fastdfa.DFA(model, sites=named, batch_dims=2, seed=3)
    x, target = torch.randint(0, 7, (4, 5)), torch.randint(0, 7, (4, 5))
    # the gradient arriving at each site module's output (= the next site's input) in the real backward
    arriving = {}

    def keep(module, args, output):
        output.register_hook(lambda g, m=module: arriving.__setitem__(m, g))

    handles = [m.register_forward_hook(keep) for m in named[:-1]]
    token_cross_entropy(dfa(x), target).backward()
    for h in handles:
        h.remove()
    want, projections = _rule_gradients(model, dfa, x, target, named)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[id(p)], rtol=1e-10, atol=1e-12, msg=name)
    # the projected error of site k (the input of named[k]) is e F_k^T per token, and it is all that
    # reaches named[k-1]'s output: the residual stream is cut at every site
    for j, m in enumerate(named[:-1]):
        torch.testing.assert_close(arriving[m], projections[j], rtol=1e-12, atol=1e-14)


def test_mode_bp_with_named_sites_is_plain_bp():
    """Naming the blocks changes nothing in mode "bp": the BP baseline of the CLI is exact BP."""
    model = _tiny(layers=2)
    ref = copy.deepcopy(model)
    x, target = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))
    dfa = fastdfa.DFA(model, sites=model.sites("blocks"), batch_dims=2, mode="bp")
    token_cross_entropy(dfa(x), target).backward()
    token_cross_entropy(ref(x), target).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_grape_trains_steps_on_the_lm():
    model = _tiny(layers=2)
    x, target = torch.randint(0, 7, (8, 5)), torch.randint(0, 7, (8, 5))
    twin = copy.deepcopy(model)
    dfa = fastdfa.DFA(model, mode="grape", sites=model.sites("blocks"), batch_dims=2, seed=1)
    ref = fastdfa.DFA(twin, mode="dfa", sites=twin.sites("blocks"), batch_dims=2, seed=1)
    token_cross_entropy(dfa(x), target).backward()
    token_cross_entropy(ref(x), target).backward()
    # GrAPE's weight gradients are DFA's with the feedback as it was before its alignment step
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    assert not torch.equal(dfa.feedback.flat, ref.feedback.flat)       # the feedback took its step
    assert dfa.last_alignment.shape == (len(dfa.sites),) and torch.isfinite(dfa.last_alignment).all()
    opt = torch.optim.Adam(dfa.parameters(), lr=1e-2)
    with torch.no_grad():
        before = float(token_cross_entropy(dfa(x), target))
    for _ in range(15):
        opt.zero_grad()
        token_cross_entropy(dfa(x), target).backward()
        opt.step()
    with torch.no_grad():
        after = float(token_cross_entropy(dfa(x), target))
    assert after < before


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch):
    """A synthetic six-"novel" cache in a temporary FASTDFA_DATA (the loader and CLI without Debian's package)."""
    root = tmp_path / "data"
    cache = data_mod.austen_cache_dir(root)
    cache.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    words = ["the ", "of ", "Anne ", "Elliot ", "was ", "and ", "a ", "very ", "good ", "day", ".\n", ", "]
    for i, name in enumerate(data_mod.AUSTEN_NOVELS):
        picks = torch.randint(0, len(words), (3000,), generator=g).tolist()
        text = "".join(words[k] for k in picks) + ("Z!\n" if name == data_mod.AUSTEN_TEST else "")
        (cache / f"{name}.txt").write_text(text, encoding="utf-8")
    monkeypatch.setenv(data_mod.DATA_ENV, str(root))
    return root


def test_train_transformer_command_writes_perplexity(tiny_corpus, tmp_path):
    out = tmp_path / "lm.json"
    start = time.perf_counter()
    assert main(["train", "--data", "austen", "--model", "transformer", "--method", "grape", "--sites", "layers",
                 "--train-samples", "64", "--epochs", "1", "--batch-size", "32", "--d-model", "16", "--heads", "2",
                 "--layers", "1", "--context", "32", "--threads", "1", "--no-progress", "--json", str(out)]) == 0
    assert time.perf_counter() - start < 60
    result = json.loads(out.read_text())
    assert result["config"]["model"] == "transformer" and result["config"]["sites"] == "layers"
    assert result["test_perplexity"] > 1
    assert math.isclose(result["bits_per_character"], math.log2(result["test_perplexity"]), rel_tol=1e-9)
    assert math.isclose(result["epochs"][-1]["test_loss"], math.log(result["test_perplexity"]), rel_tol=1e-9)
    assert result["dataset"] == "austen[64 train]"


def test_lm_and_image_options_are_not_mixed(tiny_corpus, capsys):
    assert main(["train", "--model", "transformer", "--data", "digits", "--epochs", "1", "--no-progress"]) == 2
    assert "--data austen" in capsys.readouterr().err
    assert main(["train", "--model", "mlp", "--data", "austen", "--epochs", "1", "--no-progress"]) == 2
    assert "--model transformer" in capsys.readouterr().err
    assert main(["train", "--model", "transformer", "--data", "austen", "--d-model", "30", "--heads", "4",
                 "--epochs", "1", "--no-progress"]) == 2
    assert "multiple of heads" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["dfa", "grape"])
@pytest.mark.parametrize("kind", ["blocks", "layers"])
def test_triton_backend_equals_torch_on_the_lm(kind, mode):
    """The triton backend (interpreter on a CPU) gives the torch backend's gradients on the transformer LM."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the Triton interpreter on CPU tensors; on a GPU, compiled Triton is covered by the kernel "
                    "and engine tests")
    torch.manual_seed(0)
    model = make_transformer_lm(11, 8, d_model=16, heads=2, layers=2)
    x, y = torch.randint(0, 11, (3, 8)), torch.randint(0, 11, (3, 8))
    grads, feedback = {}, {}
    for backend in ("torch", "triton"):
        m = copy.deepcopy(model)
        dfa = fastdfa.DFA(m, mode=mode, sites=m.sites(kind), batch_dims=2, backend=backend, seed=3)
        torch.nn.functional.cross_entropy(dfa(x).reshape(-1, 11), y.reshape(-1)).backward()
        grads[backend] = [p.grad for p in m.parameters()]
        feedback[backend] = dfa.feedback.flat.clone()
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feedback["triton"], feedback["torch"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", [["--sites", "layers", "--error-point", "head", "--error-rank", "4"],
                                     ["--sites", "blocks", "--error-point", "logits"]])
def test_train_gpt2_command_through_prepare(tiny_corpus, tmp_path, variant):
    """--model gpt2: transformers' GPT2LMHeadModel through fastdfa.prepare (every Conv1D a site, or the blocks),
    the error at the logits or at the LM head's input, optionally compressed; at CI size in under a minute."""
    pytest.importorskip("transformers")
    out = tmp_path / "gpt2.json"
    start = time.perf_counter()
    assert main(["train", "--data", "austen", "--model", "gpt2", "--method", "dfa", *variant, "--train-samples", "64",
                 "--epochs", "1", "--batch-size", "32", "--d-model", "16", "--heads", "2", "--layers", "1",
                 "--context", "32", "--threads", "1", "--no-progress", "--json", str(out)]) == 0
    assert time.perf_counter() - start < 60
    result = json.loads(out.read_text())
    config = result["config"]
    assert config["model"] == "gpt2" and config["error_point"] == variant[3]
    assert config["error_rank"] == (4 if "--error-rank" in variant else None)
    assert result["test_perplexity"] > 1 and math.isfinite(result["test_perplexity"])
    with pytest.raises(SystemExit):
        main(["train", "--model", "gpt2", "--error-point", "middle"])


def test_eval_every_records_the_perplexity_curve(tiny_corpus, tmp_path):
    """--eval-every N: the whole test text evaluated every N steps and at each epoch's end, with the tokens
    seen and the training seconds so far (the x axes of a perplexity-against-time plot); the last point is
    the epoch's own evaluation."""
    out = tmp_path / "curve.json"
    assert main(["train", "--data", "austen", "--model", "transformer", "--method", "dfa", "--train-samples", "40",
                 "--epochs", "2", "--batch-size", "8", "--d-model", "16", "--heads", "2", "--layers", "1",
                 "--context", "16", "--eval-every", "2", "--threads", "1", "--no-progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    evals = result["evals"]
    # 5 steps per epoch, N counted over the whole run: steps 2, 4, the first epoch's end, 6, 8, the second's
    assert [e["step"] for e in evals] == [2, 4, 5, 6, 8, 10]
    assert [e["tokens"] for e in evals] == [s * 8 * 16 for s in (2, 4, 5, 6, 8, 10)]
    seconds = [e["train_seconds"] for e in evals]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert evals[-1]["test_loss"] == result["epochs"][-1]["test_loss"]
    assert math.isclose(math.exp(evals[-1]["test_loss"]), result["test_perplexity"])
    assert all(math.isfinite(e["test_loss"]) for e in evals)


def test_eval_every_is_for_language_models():
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(model="mlp", eval_every=5).validate()
