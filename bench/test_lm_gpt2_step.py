"""Whole training steps of a GPT-2-shaped LM with a real vocabulary: BP and the DFA variants, interleaved,
beside each one's FLOP floor (issue "A language model with a real vocabulary", item 4's timing half).

The model: transformers' ``GPT2LMHeadModel`` from a ``GPT2Config`` (4 blocks, n_embd 256, 4 heads, context
128, vocabulary 16,384, random init, dropout 0), batch 8 x 128 tokens, AdamW, float32, HF's own ``labels=``
loss. DFA variants: where the error is taken (``logits``: the LM head's output, 16,384 wide; ``head``: its
input, 256 wide, the head trained by BP) x the error's rank (``full`` or ``error_rank`` 32 / 128) x where
the sites are (``blocks``: ``sites=`` the four blocks, Conv1D unconverted; ``linear``: every Conv1D
converted by ``fastdfa.prepare``). Pruned: the logits' full 16,384-wide error at every linear layer
(7,168 site rows x 16,384 = 117 M multiply-adds per token for the projection alone, four times BP's whole
step): clearly dominated. GrAPE (``GRAPES``) on the error at the head's input: one shared dual pass at
every linear layer, and exact per-site tangents at the blocks. BP is the same model run plainly, same
initial weights. A step is zero_grad, forward, loss, backward, optimizer step; the methods alternate
round after round (``interleaved_step_ms``).

FLOP floor: the step's floating-point operations counted by ``FlopCounterMode``, over BP's.

    python -m pytest bench/test_lm_gpt2_step.py -q -p no:cacheprovider \\
        --fastdfa-record bench/results/lm-gpt2-step-cpu.json

On a GPU (``-m gpu``, run by ``bash bench/gpu_check.sh`` stage b): GPT-2 small (12 x 768, 12 heads,
vocabulary 50,257, context 1024, batch 8) under ``torch.autocast(bfloat16)``, float32 weights, BP and the
variants that scale to its vocabulary (the logits' full error is left out: its per-token feedback is
9,216 x 50,257).
"""


import pytest
import torch
from test_lm_step import step_flops  # one FLOP count for both LM benches

import fastdfa
from fastdfa.lab.steptime import interleaved_step_ms

transformers = pytest.importorskip("transformers")

THREADS, ROUNDS = 2, 8
FULL = dict(vocab=16384, d_model=256, layers=4, heads=4, context=128, batch=8)
SMOKE = dict(vocab=97, d_model=16, layers=2, heads=2, context=8, batch=2)  # --benchmark-disable: plumbing only
VARIANTS = [(point, rank, sites) for point in ("logits", "head") for rank in (None, 32, 128)
            for sites in ("blocks", "linear") if not (point == "logits" and rank is None and sites == "linear")]


# GrAPE on the head-input variants: one shared dual pass at every linear layer, and the exact per-site
# tangents at the blocks only (per site at all 24 linear layers: 44x BP's step, measured at c093426)
GRAPES = [("head", None, "linear", "shared"), ("head", None, "blocks", "per-site")]


def variant_name(point: str, rank, sites: str) -> str:
    return f"dfa-{point}-{'full' if rank is None else f'r{rank}'}-{sites}"


def build(size: dict, point: str | None, rank, sites: str | None, mode: str = "dfa", jvp: str = "per-site"):
    """BP's plain model (``point`` None) or one DFA variant, all from the same initial weights."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=size["layers"], n_embd=size["d_model"], n_head=size["heads"],
                                     vocab_size=size["vocab"], n_positions=size["context"], resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    if point is None:
        return model
    options = dict(mode=mode, batch_dims=2, seed=0, error_rank=rank, backend="torch")
    if mode == "grape":
        options["jvp"] = jvp
    if point == "head":
        options["head"] = "lm_head"
    if sites == "linear":
        return fastdfa.prepare(model, **options)
    if point == "logits":  # the blocks as sites and lm_head as the output layer (its input a site)
        fastdfa.convert(model, skip=[n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"])
    return fastdfa.DFA(model, sites=list(model.transformer.h), **options)


def steps_for(size: dict, variants, grapes=(), device: str = "cpu", autocast=None):
    """Each method's whole step (``autocast``: a dtype to run the forward under ``torch.autocast`` with);
    ``grapes``: GrAPE's (point, rank, sites, jvp) rows."""
    x = torch.randint(0, size["vocab"], (size["batch"], size["context"]), device=device)
    nets = {"bp": build(size, None, None, None).to(device)}
    for point, rank, sites in variants:
        nets[variant_name(point, rank, sites)] = build(size, point, rank, sites).to(device)
    for *variant, jvp in grapes:
        nets[f"grape-{jvp}-" + variant_name(*variant)[4:]] = build(size, *variant, mode="grape", jvp=jvp).to(device)

    def step_of(net, lr):
        opt = torch.optim.AdamW(net.parameters(), lr=lr)

        def step(_round=None):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
                loss = net(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
        return step

    return {name: step_of(net, 1e-3 if name == "bp" else 3e-4) for name, net in nets.items()}


def test_lm_gpt2_step_interleaved(request, record_interleaved, record_flops):
    disabled = request.config.getoption("benchmark_disable")
    size = SMOKE if disabled else FULL
    group = "lm-gpt2-{layers}x{d_model}-v{vocab}-t{context}-b{batch}".format(**size)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        steps = steps_for(size, VARIANTS, grapes=GRAPES)
        flops = step_flops(steps)
        timing = interleaved_step_ms(steps, rounds=1 if disabled else ROUNDS, warmup=0 if disabled else 1)
    finally:
        torch.set_num_threads(threads)
    assert set(timing) == set(flops) and len(timing) == len(VARIANTS) + 1 + len(GRAPES)
    if not disabled:
        record_interleaved(group, timing)
        record_flops(group, flops)


GPT2_SMALL = dict(vocab=50257, d_model=768, layers=12, heads=12, context=1024, batch=8)
GPU_VARIANTS = [("logits", 32, "linear"), ("logits", 128, "linear"), ("head", None, "blocks"),
                ("head", None, "linear"), ("head", 32, "linear")]


@pytest.mark.gpu
def test_lm_gpt2_small_step_gpu(request, record_interleaved):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    disabled = request.config.getoption("benchmark_disable")
    group = "lm-gpt2-small-{layers}x{d_model}-v{vocab}-t{context}-b{batch}-bf16".format(**GPT2_SMALL)
    steps = steps_for(GPT2_SMALL, GPU_VARIANTS, device="cuda", autocast=torch.bfloat16)
    timing = interleaved_step_ms(steps, rounds=1 if disabled else ROUNDS, warmup=0 if disabled else 2,
                                 device=torch.device("cuda"))
    assert set(timing) == {"bp"} | {variant_name(*v) for v in GPU_VARIANTS}
    if not disabled:
        record_interleaved(group, timing)
