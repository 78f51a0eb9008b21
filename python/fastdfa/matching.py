"""Feedback-weight matching (FWM): the least-squares core, and its form for a transformer encoder.

``fastdfa.init.feedback_weight_matching`` is the entry point; it uses this module for a chain of dense
layers and, when the wrapped model holds encoder blocks, for the encoder form (docs/math.md,
"FWM on a transformer encoder"). Symbols: ``e`` the output error ``[N, C]``; a site's feedback
``F_s`` ``(rows, C)``; for a per-feature site on ``[N, T, H]`` every token of sample n receives ``F_s e_n``.

**The least-squares step** (``solve_feedback``): given the feedback ``G`` at a layer's output and its
weight ``W``, the feedback at its input is ``F^T = argmin_X ||G X - W||_F`` and weight matching sets
``W := G F^T``, the rank-``<= C`` matrix nearest to ``W`` among those of the form ``G X``.

**The encoder form** (post-LN blocks in BERT's layout, per-feature sites, every dense layer a site)::

    x1 = LN1(Wo attention(Wq x, Wk x, Wv x) + x)       ctx = attention(...) is Wo's input
    u  = gelu(Wi x1)                                     x1 is Wi's input, u is Wd's input
    x' = LN2(Wd u + x1)                                  x' is the next block's input

With activation derivatives dropped (as in the dense chain) and each LayerNorm's Jacobian taken as the
identity, DFA's error at a residual-stream tensor is ``R e`` with ``R`` the sum of the feedback of every
site that reads the residual stream at or above it (a residual add passes its output's error to both
inputs; a tensor read by several sites gets the sum of their projections). Top down, with the head
``h_1 .. h_m`` (e.g. pooler, classifier) matched as a dense chain and ``R = F_in(h_1)``, per block:

    Wd:  F_u^T = argmin ||R F_u^T - Wd||      Wd := R F_u^T         (output feedback R)
    Wi:  F_1^T = argmin ||F_u F_1^T - Wi||    Wi := F_u F_1^T       (output feedback F_u: u is a site)
         R1 = F_1 + R                                                (x1 feeds Wi and the residual)
    Wo:  F_c^T = argmin ||R1 F_c^T - Wo||     Wo := R1 F_c^T        (output feedback R1)
    Q/K/V: weights kept: their outputs are not sites (their error is attention's backward of the ctx
         site's F_c e, bilinear in the data), so no fixed matrix is their output feedback; the feedback
         at their input is set by ``attention_feedback``:
           "keep"  the random feedback stays;
           "zero"  F = 0 (the residual stream alone carries the error into the block below);
           "value" (the default) F_v = Wv^T F_c (the value path's BP with attention's token mixing
                   taken as the identity on a token-broadcast error), F_q = F_k = 0 (the query / key
                   paths' error is a softmax-Jacobian term with zero sum over the keys; no fixed matrix
                   stands for it). On all-MiniLM-L6-v2 it gave the highest gradient alignment of the three
                   (docs/design.md).
         R = R1 + F_q + F_k + F_v                                    (x feeds Q, K, V and the residual)

Weight alignment of a matched layer is ``cos(W, G F_in^T)`` with ``G`` its output feedback as above
(``encoder_weight_alignment``); it is 1 right after weight matching.

**What is checked before anything is written.** Module names prove nothing about the data flow, so
``encoder_layout`` refuses decoder blocks (transformers' ``is_decoder``, cross-attention: the derivation
assumes one error per sequence broadcast to every token, ``batch_dims=1``), and ``check_encoder_flow``
verifies the flow above: with ``example_input`` against one forward (``fastdfa.metrics.trace_flow``),
without it by requiring transformers' own block classes, whose forward is known.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .dfa import DFA, Site
from .layers import Linear
from .metrics import DATA, LOOKUP, OUTPUT, describe, error_space_feedback, link_problem, trace_flow

__all__ = ["FWM_METHODS", "ATTENTION_FEEDBACK", "LayerMatch", "solve_feedback", "ErrorBasis", "solve_pair",
           "solve_chain_jointly", "EncoderBlock", "encoder_blocks",
           "EncoderLayout", "encoder_layout", "check_encoder_flow", "encoder_weight_alignment", "match_encoder"]

FWM_METHODS = ("lstsq", "svd", "joint")
JOINT_SWEEPS = 200        # most alternating least-squares sweeps of the chain's joint solve
JOINT_TOLERANCE = 1e-10   # ... stopped when a sweep lowers the objective by less than this, relatively
PAIR_RTOL = 1e-4          # solve_pair: g's singular values below this fraction of its largest are left out
ATTENTION_FEEDBACK = ("keep", "zero", "value")


@dataclass
class LayerMatch:
    """What feedback_weight_matching did to one layer."""

    layer: str
    action: str                       # "feedback = weight^T", "weights matched", "kept"
    reconstruction_error: float | None  # ||G F_in^T - W||_F / ||W||_F before weight matching (G: output feedback)
    rank: int | None                  # rank of the least-squares solve
    rank_limit: int | None            # min(n_out_features, n_in_features, C): the most G F_in^T can have
    wa_before: float | None
    wa_after: float | None
    note: str = ""
    # GA (fastdfa.metrics.gradient_alignment) on a fixed batch before and after matching, where the caller
    # measured it (the finetune command does); feedback_weight_matching has no batch with labels to use
    ga_before: float | None = None
    ga_after: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def solve_feedback(f_out: torch.Tensor, w: torch.Tensor, method: str, rank: int | None) -> tuple[torch.Tensor, int]:
    """X minimising ||f_out X - w||_F, in float64 on the CPU: ``(X, rank used)``.

    "lstsq": LAPACK's gelsd (minimum-norm solution, numerical rank);
    "svd": truncated pseudo-inverse, keeping the ``rank`` largest singular
    values of ``f_out`` (default: its numerical rank, as gelsd).
    """
    a, b = f_out.double().cpu(), w.double().cpu()
    if method == "lstsq":
        if rank is not None:
            raise ValueError("rank= truncates the SVD solve; use method='svd' with it")
        result = torch.linalg.lstsq(a, b, driver="gelsd")
        return result.solution, int(result.rank)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    tol = s.max() * max(a.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    numerical = int((s > tol).sum())
    r = numerical if rank is None else min(int(rank), numerical)
    if r < 1:
        raise ValueError("the feedback above this layer is zero: nothing to match against")
    x = vh[:r].t() @ torch.diag(1.0 / s[:r]) @ u[:, :r].t() @ b
    return x, r


@dataclass(frozen=True)
class ErrorBasis:
    """The error space the feedback can express, and the map between the stored feedback and it.

    A site's feedback ``F`` ``(rows, k)`` acts on ``P e`` under ``error_rank=k`` (``P`` ``[k, n_e]``, fixed), so
    in the error's own coordinates it is ``G = F P`` ``(rows, n_e)``, of rank at most ``r = rank(P) =
    min(k, n_e)``. With the thin SVD ``P = U diag(s) V^T`` (``U`` ``[k, r]``, ``V`` ``[n_e, r]``, orthonormal
    columns), ``G = H V^T`` with ``H = F U diag(s)`` ``(rows, r)``: every matching product is
    ``G_l G_(l-1)^T = H_l H_(l-1)^T`` (``V^T V = I``), so FWM runs on ``H`` as on a ``r``-wide error, and writes
    back ``F = H diag(1/s) U^T`` (the minimum-norm F with ``F P = H V^T``: a part of F orthogonal to
    ``U`` never meets ``P e``). The one target that lives in the error's coordinates is the output layer's
    ``G_(L-1) = W_L^T``: its nearest ``H V^T`` is ``H = W_L^T V``, exact when ``r = n_e``
    (``error_rank >= n_e``: expanding the error adds no rank). Without ``error_rank``: ``U = V = I``,
    ``H = F``."""

    u: torch.Tensor | None = None   # [k, r]
    s: torch.Tensor | None = None   # [r]
    v: torch.Tensor | None = None   # [n_e, r]

    @classmethod
    def of(cls, dfa: DFA) -> ErrorBasis:
        p = dfa.feedback.error_projection
        if p is None:
            return cls()
        u, s, vh = torch.linalg.svd(p.detach().double().cpu(), full_matrices=False)
        keep = s > s.max() * max(p.shape) * torch.finfo(torch.float64).eps
        return cls(u[:, keep], s[keep], vh[keep].t())

    def width(self, n_e: int) -> int:
        """``r``: the rank the feedback's error space has."""
        return n_e if self.s is None else int(self.s.numel())

    def to_basis(self, f: torch.Tensor) -> torch.Tensor:
        """``H = F U diag(s)`` from a stored feedback ``F`` ``(rows, k)``."""
        f = f.double().cpu()
        return f if self.u is None else (f @ self.u) * self.s

    def from_basis(self, h: torch.Tensor) -> torch.Tensor:
        """``F = H diag(1/s) U^T``: the feedback to store for ``H``."""
        return h if self.u is None else (h / self.s) @ self.u.t()

    def of_output(self, w_out: torch.Tensor) -> torch.Tensor:
        """``H`` nearest to ``G = W_L^T`` (``w_out``: the output layer's ``[n_e, features]``): ``W_L^T V``."""
        w = w_out.double().cpu()
        return w.t().clone() if self.v is None else w.t() @ self.v


def solve_pair(g: torch.Tensor, w_top: torch.Tensor, w_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared factor of two matched weights, jointly: ``(X, Y)`` minimising

        ||g X^T - w_top||^2 / ||w_top||^2 + ||X Y^T - w_low||^2 / ||w_low||^2

    (``g`` ``(a, r)`` the output feedback of ``w_top`` ``(a, b)``, ``X`` ``(b, r)`` the feedback between the two,
    ``Y`` ``(c, r)`` the input feedback of ``w_low`` ``(b, c)``): an encoder block's ``Wd = R F_u^T`` and
    ``Wi = F_u F_1^T`` share ``F_u``. With ``g = Q T`` (thin QR), both terms depend on ``X`` only through its
    column space ``S`` (dim ``<= r``) once ``T`` is invertible: ``||Q^T w_top (I - P_S)||`` and
    ``||(I - P_S) w_low||`` (plus ``||(I - QQ^T) w_top||``, which no ``X`` changes), so the best ``S`` is the
    leading ``r`` left singular vectors of ``[(Q^T w_top)^T / ||w_top||, w_low / ||w_low||]`` (Eckart-Young),
    ``X = P_S w_top^T g^{+T}`` and ``Y^T = X^+ w_low``: the optimum when ``g`` has full column rank. The
    pseudo-inverse leaves out ``g``'s directions below ``PAIR_RTOL`` of its largest singular value: fitting
    ``w_top`` there would take a feedback that float32 cannot hold beside the rest, and the next block's
    residual feedback (a sum with it) would inherit the ill-conditioning. Float64, CPU."""
    g, w_top, w_low = g.double().cpu(), w_top.double().cpu(), w_low.double().cpu()
    a_top, a_low = w_top.norm().clamp_min(1e-300), w_low.norm().clamp_min(1e-300)
    r = g.shape[1]
    q, _ = torch.linalg.qr(g)
    stacked = torch.cat([(q.t() @ w_top).t() / a_top, w_low / a_low], dim=1)
    left, _, _ = torch.linalg.svd(stacked, full_matrices=False)
    basis = left[:, :r]
    x = basis @ (basis.t() @ w_top.t()) @ torch.linalg.pinv(g, rtol=PAIR_RTOL).t()
    y = torch.linalg.lstsq(x, w_low, driver="gelsd").solution.t()
    return x, y


def solve_chain_jointly(h_top: torch.Tensor, weights: list[torch.Tensor],
                        start: list[torch.Tensor]) -> list[torch.Tensor]:
    """The feedback of a dense chain matched jointly: ``H_0 .. H_m`` (``H_0 = h_top`` fixed, the output layer's
    input feedback) minimising ``sum_j ||H_j H_(j+1)^T - W_j||^2 / ||W_j||^2`` over ``H_1 .. H_m``, with
    ``weights`` ``W_0 .. W_(m-1)`` the matched layers from the top down (``W_j`` between ``H_(j+1)`` below and
    ``H_j`` above) and ``start`` the greedy top-down solution ``H_1 .. H_m`` (``fastdfa.init``'s lstsq).

    Block-coordinate descent: the objective is quadratic in each ``H_j`` with the others fixed, and ``H_j``
    (``1 <= j < m``) sits on the right of ``W_(j-1)``'s product and on the left of ``W_j``'s, so its optimum is
    one least-squares solve ``H_j [H_(j-1)^T / a, H_(j+1)^T / b] ~ [W_(j-1)^T / a, W_j / b]``
    (``a, b`` the weights' norms); ``H_m`` is in ``W_(m-1)``'s term alone. Sweeps from the top down, each
    lowering the objective, until one lowers it by less than ``JOINT_TOLERANCE`` (relatively) or after
    ``JOINT_SWEEPS``: never worse than the greedy start, but not always at a stationary point (alternating
    least squares converges linearly: on a random 4-layer chain the gradient is still 3e-3 of the objective
    after 200 sweeps). Float64, CPU."""
    w = [x.double().cpu() for x in weights]
    norms = [x.norm().clamp_min(1e-300) for x in w]
    h = [h_top.double().cpu()] + [x.double().cpu() for x in start]

    def objective():
        return sum(float(((h[j] @ h[j + 1].t() - w[j]).norm() / norms[j]) ** 2) for j in range(len(w)))

    best = objective()
    for _ in range(JOINT_SWEEPS):
        for j in range(1, len(h)):
            if j < len(w):
                lhs = torch.cat([h[j - 1] / norms[j - 1], h[j + 1] / norms[j]], dim=0)
                rhs = torch.cat([w[j - 1] / norms[j - 1], w[j].t() / norms[j]], dim=0)
            else:
                lhs, rhs = h[j - 1], w[j - 1]
            h[j] = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution.t()
        now = objective()
        if best - now <= JOINT_TOLERANCE * max(best, 1e-300):
            break
        best = now
    return h[1:]


def _relative_error(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    w = w.double().cpu()
    return float((g @ x - w).norm() / w.norm().clamp_min(1e-300))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu().flatten(), b.double().cpu().flatten()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 0.0


# ----------------------------------------------------------------------------- the encoder's structure

@dataclass(frozen=True)
class EncoderBlock:
    """The six dense layers of one post-LN encoder block (BERT's layout)."""

    name: str
    query: nn.Module
    key: nn.Module
    value: nn.Module
    attn_out: nn.Module   # attention.output.dense: Wo, input ctx
    ffn_up: nn.Module     # intermediate.dense: Wi, input x1
    ffn_down: nn.Module   # output.dense: Wd, input u
    module: nn.Module | None = None  # the block itself

    @property
    def attention(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return (self.query, self.key, self.value)

    @property
    def layers(self) -> tuple[nn.Module, ...]:
        return (self.query, self.key, self.value, self.attn_out, self.ffn_up, self.ffn_down)


_BLOCK_PATHS = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                "attn_out": "attention.output.dense", "ffn_up": "intermediate.dense", "ffn_down": "output.dense"}
_LAYER_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")  # post-LN: after each residual add


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def encoder_blocks(model: nn.Module) -> list[EncoderBlock]:
    """The post-LN encoder blocks of ``model`` in module order: every submodule with BERT's attributes
    ``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}``, ``intermediate.dense``
    and ``output.{dense,LayerNorm}`` (Hugging Face BERT, RoBERTa, ELECTRA and their relatives). Raises if
    such a block's dense layers are not fastdfa.Linear (the model was not converted)."""
    blocks = []
    for name, module in model.named_modules():
        layers = {key: _get(module, path) for key, path in _BLOCK_PATHS.items()}
        if any(v is None for v in layers.values()) or any(_get(module, p) is None for p in _LAYER_NORMS):
            continue
        plain = [(f"{name}.{_BLOCK_PATHS[k]}", v) for k, v in layers.items() if not isinstance(v, Linear)]
        if plain:
            raise ValueError(f"encoder block {name!r} has dense layers that are not fastdfa.Linear: "
                             f"{plain[0][0]!r} is a {describe(plain[0][1])}"
                             f"{f' (and {len(plain) - 1} more)' if len(plain) > 1 else ''}; convert the model "
                             "first (fastdfa.convert(model)), then wrap it")
        blocks.append(EncoderBlock(name, **layers, module=module))
    return blocks


@dataclass
class EncoderLayout:
    """An encoder as a DFA wrapper runs it: the blocks and the head (the dense layers executed after the
    last block, the output layer last), each layer's input site."""

    blocks: list[EncoderBlock]
    head: list[nn.Module]
    site: dict[int, Site]  # id(layer) -> the site at its input (absent: the layer whose input is the data)

    def feedback(self, layer: nn.Module) -> torch.Tensor | None:
        s = self.site.get(id(layer))
        return None if s is None else s.feedback


def _decoder_refusal(block: EncoderBlock) -> str | None:
    """Why ``block``, though in BERT's layout, is not an encoder block (None: it is one, as far as its module
    tells): a decoder's causal self-attention or cross-attention (transformers' ``is_decoder``,
    ``crossattention``)."""
    module = block.module
    if module is None:
        return None
    cross = _get(module, "crossattention") is not None or bool(getattr(module, "add_cross_attention", False))
    if getattr(module, "is_decoder", False) or cross:
        what = "cross-attention" if cross else "causal self-attention"
        return (f"block {block.name!r} ({type(module).__name__}) is a decoder block (is_decoder="
                f"{bool(getattr(module, 'is_decoder', False))}, {what}); the encoder form of feedback-weight matching "
                "is derived for encoder blocks whose one error per sequence reaches every token (docs/design.md, "
                "'FWM on a transformer encoder'), and a decoder has no plain-chain form either")
    return None


def encoder_layout(dfa: DFA) -> EncoderLayout | None:
    """The wrapped model's encoder layout, None if it has no encoder block; raises (naming the layer and the
    fix) if it has blocks but is not an encoder as the encoder form of FWM needs, or the wrapper does not
    run it so: no decoder block (``is_decoder``, cross-attention), one error per sequence
    (``batch_dims=1``), every dense layer of the blocks and head a site (no ``sites=``), feedback rows equal
    to the input features (per-feature over tokens, ``feedback_layout="per-feature"``), blocks then the head
    of fastdfa.Linear layers in the execution order. The data flow itself is ``check_encoder_flow``'s."""
    blocks = encoder_blocks(dfa.model)
    if not blocks:
        return None
    if not dfa.built:
        raise RuntimeError("the feedback is not built yet: run one forward of the wrapper first, or pass "
                           "example_input= to fastdfa.DFA")
    for block in blocks:
        why = _decoder_refusal(block)
        if why is not None:
            raise ValueError(why)
    if dfa.batch_dims != 1:
        raise ValueError(f"the encoder form of feedback-weight matching needs one error per sequence (batch_dims=1, "
                         "e.g. a sequence classifier: every token of sample n receives F e_n); this wrapper has "
                         f"batch_dims={dfa.batch_dims}, an error per token, which attention mixes across tokens")
    order = list(dfa.execution_order)
    position = {id(m): i for i, m in enumerate(order)}
    site = {id(s.module): s for s in dfa.sites}
    for block in blocks:
        for layer in (block.attn_out, block.ffn_up, block.ffn_down):
            if id(layer) not in site:
                raise ValueError(f"{dfa.name_of(layer)!r} has no feedback site at its input: the encoder form of "
                                 "feedback-weight matching needs every dense layer's input to be a site; wrap the "
                                 "converted model without sites= (fastdfa.DFA(model, feedback_layout='per-feature'))")
    blocks.sort(key=lambda b: position[id(b.attn_out)])
    in_blocks = {id(m) for b in blocks for m in b.layers}
    last = max(position[id(m)] for m in blocks[-1].layers if id(m) in position)
    stray = [m for m in order[:last + 1] if id(m) not in in_blocks]
    head = list(order[last + 1:])
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        raise ValueError(f"{dfa.name_of(stray[0])!r} ({describe(stray[0])}){more} runs among the encoder blocks but "
                         "belongs to none (e.g. a decoder's cross-attention); the encoder form of feedback-weight "
                         "matching handles blocks followed by a dense head")
    if not head:
        raise ValueError("the encoder form of feedback-weight matching needs a head of fastdfa.Linear layers after "
                         f"the last block (e.g. pooler and classifier); nothing runs after {blocks[-1].name!r}")
    for layer in head:
        if not isinstance(layer, Linear):
            raise ValueError("the encoder form of feedback-weight matching needs a head of fastdfa.Linear layers "
                             f"after the last block (e.g. pooler and classifier); {dfa.name_of(layer)!r} is a "
                             f"{describe(layer)}")
    for prev, layer in zip(head, head[1:]):
        if prev.out_features != layer.in_features:
            raise ValueError(f"head layers {dfa.name_of(prev)!r} ({describe(prev)}) -> {dfa.name_of(layer)!r} "
                             f"({describe(layer)}) do not chain ({prev.out_features} != {layer.in_features})")
    for layer in [m for b in blocks for m in b.layers] + head:
        s = site.get(id(layer))
        if s is not None and s.rows != layer.in_features:
            raise ValueError(f"site {s.name!r} (the input of {describe(layer)}) has {s.rows} feedback rows for "
                             f"{layer.in_features} input features: the encoder form needs one row per feature, "
                             "broadcast over tokens; wrap with feedback_layout='per-feature'")
    return EncoderLayout(blocks, head, site)


def check_encoder_flow(dfa: DFA, layout: EncoderLayout, example_input=None) -> None:
    """Raise ``ValueError``, naming the first layer that breaks it, unless the model computes what the encoder
    form assumes (the module docstring), with ``S_b`` the residual stream entering block ``b`` (the data and the
    outputs of every earlier block's Wo and Wd):

        Q, K, V of block b read S_b;   Wo reads the outputs of Q, K, V alone (attention);
        Wi reads S_b and Wo's output;  Wd reads Wi's output alone, through elementwise ops (a chain link);
        the head's first layer reads S_B (after the last block); the head and the output are a chain.

    With ``example_input`` one forward decides (``fastdfa.metrics.trace_flow``; a pre-LN block has the same
    data flow, and LayerNorm is the identity of the derivation, so it is accepted). Without it, the names
    alone prove nothing, so every block must be one of transformers' own classes (BERT and its relatives),
    whose forward is known; a hand-written block in BERT's layout needs ``example_input=``. Changes
    nothing."""
    name = dfa.name_of
    if example_input is None:
        for block in layout.blocks:
            kind = type(block.module)
            if block.module is not None and not kind.__module__.startswith("transformers."):
                raise ValueError(f"the encoder form of feedback-weight matching cannot tell from the modules alone "
                                 f"that block {block.name!r} ({kind.__name__}) computes BERT's encoder block: only "
                                 "transformers' own classes have a known forward. Pass example_input= (a small batch "
                                 "the model takes) so that one forward shows the data flow. Nothing was changed.")
        return
    flow = trace_flow(dfa, example_input)

    def refuse(layer, why):
        raise ValueError(f"the encoder form of feedback-weight matching needs BERT's data flow, and "
                         f"{name(layer)!r} ({describe(layer)}) breaks it: {why} (docs/design.md, 'FWM on a "
                         "transformer encoder'). Nothing was changed.")

    def reads_of(layer):
        r = flow.inputs.get(id(layer))
        if r is None:
            refuse(layer, "it did not run on the example input")
        return r

    def outs(modules) -> str:
        return ", ".join(f"{name(m)!r}'s output" for m in modules)

    def expect(layer, outputs, data: bool, what: str):
        """``layer``'s input must read exactly the ``outputs`` (and the data, if ``data``)."""
        r = reads_of(layer)
        extra = [m for m in r.outputs if m not in outputs]
        missing = [m for m in outputs if m not in r.outputs]
        odd = sorted(d for d in r.data if d not in (DATA, LOOKUP) or not data)  # e.g. a shared fastdfa weight
        parts = ([f"it also reads {outs(extra)}"] if extra else []) + \
                ([f"it does not read {outs(missing)}"] if missing else []) + \
                ([f"it reads {', '.join(odd)}"] if odd else []) + \
                (["it does not read the data"] if data and not r.data else [])
        if parts:
            refuse(layer, f"its input should be {what}, but {'; '.join(parts)}")

    stream: list[nn.Module] = []  # the module outputs added to the residual stream so far (the data besides)
    for block in layout.blocks:
        for a in block.attention:
            expect(a, stream, True, "the residual stream entering its block")
        expect(block.attn_out, list(block.attention), False, "attention over its block's q, k, v outputs alone")
        expect(block.ffn_up, stream + [block.attn_out], True, "the residual stream plus the attention output")
        why = link_problem(dfa, block.ffn_up, block.ffn_down, reads_of(block.ffn_down))
        if why is not None:
            refuse(block.ffn_down, why)
        stream += [block.attn_out, block.ffn_down]
    expect(layout.head[0], stream, True, "the residual stream leaving the last block")
    for lower, upper in zip(layout.head, layout.head[1:]):
        why = link_problem(dfa, lower, upper, reads_of(upper))
        if why is not None:
            refuse(upper, why)
    if flow.output is not None:
        why = link_problem(dfa, layout.head[-1], OUTPUT, flow.output)
        if why is not None:
            refuse(layout.head[-1], why)


def _output_feedback(layout: EncoderLayout, fb) -> dict[int, torch.Tensor | None]:
    """Each matched layer's output feedback G (module docstring), from the input feedback ``fb(layer)``;
    None for the output layer (its error is e itself)."""
    head = layout.head
    out: dict[int, torch.Tensor | None] = {id(head[-1]): None}
    for lower, upper in zip(head, head[1:]):
        out[id(lower)] = fb(upper)
    r = fb(head[0])
    for block in reversed(layout.blocks):
        out[id(block.ffn_down)] = r
        out[id(block.ffn_up)] = fb(block.ffn_down)
        r = fb(block.ffn_up) + r
        out[id(block.attn_out)] = r
        for a in block.attention:
            if fb(a) is not None:
                r = r + fb(a)
    return out


@torch.no_grad()
def encoder_weight_alignment(dfa: DFA, layout: EncoderLayout | None = None) -> dict[str, float]:
    """WA of the head and of each block's Wo, Wi, Wd: ``cos(W, G F_in^T)`` with ``G`` the layer's output
    feedback (the module docstring; the output layer: ``cos(W, F_in^T)``). Q/K/V have none."""
    layout = layout or encoder_layout(dfa)
    if layout is None:
        raise ValueError("the model has no encoder block (BERT layout); use fastdfa.metrics.weight_alignment")

    def fb(layer):  # in the error's coordinates: G = F P under error_rank
        s = layout.site.get(id(layer))
        return None if s is None else error_space_feedback(dfa, s)

    out_fb = _output_feedback(layout, fb)
    result = {}
    for layer in [m for b in layout.blocks for m in (b.attn_out, b.ffn_up, b.ffn_down)] + layout.head:
        f_in, g = fb(layer), out_fb[id(layer)]
        result[dfa.name_of(layer)] = _cos(layer.weight, f_in.t() if g is None else g @ f_in.t())
    return result


@torch.no_grad()
def match_encoder(dfa: DFA, layout: EncoderLayout, method: str, rank: int | None,
                  attention_feedback: str = "value", match_weights: bool = True, *,
                  example_input=None) -> list[LayerMatch]:
    """FWM's encoder form (module docstring), in place; one report per layer in execution order.
    The data flow is checked first (``check_encoder_flow``, with ``example_input`` if given); everything is
    solved in float64 and written only once all of it succeeded.
    ``match_weights=False``: feedback matching only, every weight kept."""
    if attention_feedback not in ATTENTION_FEEDBACK:
        raise ValueError(f"attention_feedback must be one of {ATTENTION_FEEDBACK}, got {attention_feedback!r}")
    check_encoder_flow(dfa, layout, example_input)
    n_out = layout.head[-1].out_features
    basis = ErrorBasis.of(dfa)  # everything below is in its coordinates H (= F without error_rank)
    wa_before = encoder_weight_alignment(dfa, layout)
    feedback: dict[int, torch.Tensor] = {}   # id(layer) -> new input feedback H (float64, CPU)
    weights: dict[int, torch.Tensor] = {}    # id(layer) -> matched weight
    solved: dict[int, tuple[float, int]] = {}

    def fb(layer):
        if id(layer) in feedback:
            return feedback[id(layer)]
        f = layout.feedback(layer)
        return None if f is None else basis.to_basis(f)

    def match(layer, g):  # F_in^T = argmin ||g X - W||, W := g F_in^T (joint: greedy outside the FFN pair)
        x, r = solve_feedback(g, layer.weight, "lstsq" if method == "joint" else method, rank)
        solved[id(layer)] = (_relative_error(g, x, layer.weight), r)
        feedback[id(layer)] = x.t()
        weights[id(layer)] = g @ x

    def match_ffn(block, g):  # joint: Wd = g F_u^T and Wi = F_u F_1^T share F_u (solve_pair)
        f_u, f_1 = solve_pair(g, block.ffn_down.weight, block.ffn_up.weight)
        for layer, above, below in ((block.ffn_down, g, f_u), (block.ffn_up, f_u, f_1)):
            solved[id(layer)] = (_relative_error(above, below.t(), layer.weight), int(torch.linalg.matrix_rank(above)))
            feedback[id(layer)] = below
            weights[id(layer)] = above @ below.t()

    head = layout.head
    top = head[-1].weight
    feedback[id(head[-1])] = basis.of_output(top)   # F_in(output layer) P = W^T, exact unless rank(P) < n_e
    solved_top = 0.0 if basis.v is None else _relative_error(feedback[id(head[-1])], basis.v.t(), top.t())
    for lower, upper in reversed(list(zip(head, head[1:]))):
        match(lower, fb(upper))
    r = fb(head[0])
    for block in reversed(layout.blocks):
        if method == "joint":
            match_ffn(block, r)
        else:
            match(block.ffn_down, r)
            match(block.ffn_up, fb(block.ffn_down))
        r = fb(block.ffn_up) + r
        match(block.attn_out, r)
        f_c = fb(block.attn_out)
        for a in block.attention:
            f = fb(a)
            if f is None:  # the first layer executed: its input is the data, no site
                continue
            if attention_feedback == "zero" or (attention_feedback == "value" and a is not block.value):
                feedback[id(a)] = torch.zeros_like(f)
            elif attention_feedback == "value":
                feedback[id(a)] = a.weight.double().cpu().t() @ f_c
            r = r + fb(a)

    for s in dfa.sites:
        if id(s.module) in feedback:
            s.feedback.copy_(basis.from_basis(feedback[id(s.module)]))
    for layer in [m for b in layout.blocks for m in b.layers] + head if match_weights else ():
        if id(layer) in weights:
            layer.weight.copy_(weights[id(layer)])
    wa_after = encoder_weight_alignment(dfa, layout)
    return _reports(dfa, layout, solved, wa_before, wa_after, basis.width(n_out), solved_top, attention_feedback,
                    match_weights)


def _reports(dfa, layout, solved, wa_before, wa_after, n_out, top_error, attention_feedback,
             match_weights) -> list[LayerMatch]:
    qkv = {id(a) for b in layout.blocks for a in b.attention}
    why_attention = {"keep": "its input feedback kept", "zero": "its input feedback set to 0",
                     "value": "its input feedback set to Wv^T F_c (value) or 0 (query, key)"}[attention_feedback]
    reports = []
    for module in dfa.execution_order:
        name = dfa.name_of(module)
        if module is layout.head[-1]:
            reports.append(LayerMatch(name, "feedback = weight^T", top_error, None, None, wa_before.get(name),
                                      wa_after.get(name)))
        elif id(module) in solved:
            err, r = solved[id(module)]
            limit = min(module.out_features, module.in_features, n_out)
            wide = min(module.out_features, module.in_features)
            note = (f"rank of G F_in^T is at most the error space's {n_out} < {wide}: the match is approximate"
                    if limit < wide else "")
            action = "weights matched" if match_weights else "feedback matched, weights kept"
            reports.append(LayerMatch(name, action, err, r, limit, wa_before.get(name),
                                      wa_after.get(name), note))
        elif id(module) in qkv:
            note = ("attention input: weights kept (its output is not a site; its error is attention's "
                    f"backward of the ctx site's); {why_attention if id(module) in layout.site else 'no input site'}")
            reports.append(LayerMatch(name, "kept", None, None, None, None, None, note))
        else:
            reports.append(LayerMatch(name, "kept", None, None, None, None, None, "not part of the encoder form"))
    return reports
