"""Reference networks built from fastdfa layers (used by the CLI, tests and benchmarks)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, Linear

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def make_mlp(in_features: int, hidden: tuple[int, ...], n_out: int, activation: str = "relu") -> nn.Sequential:
    """Flatten -> fastdfa.Linear(activation=...) * len(hidden) -> fastdfa.Linear.

    The activation lives in the layers (``activation=``) so a kernel backend
    fuses it (``fastdfa.fused``); the math is that of separate modules.
    """
    _check_activation(activation)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers.append(Linear(width, h, activation=activation))
        width = h
    layers.append(Linear(width, n_out))
    return nn.Sequential(*layers)


def make_cnn(input_shape: tuple[int, int, int], n_out: int, channels: tuple[int, int] = (32, 64),
             hidden: int = 128, activation: str = "relu") -> nn.Sequential:
    """Two conv blocks (3x3 conv with its activation, 2x2 max-pool), then an MLP head
    (fastdfa.Linear with its activation fused, then the output layer).

    For 28x28 inputs: 32x14x14 -> 64x7x7 -> 128 -> n_out; for 8x8: 32x4x4 -> 64x2x2 -> 128 -> n_out.
    """
    _check_activation(activation)
    c_in, height, width = input_shape
    c1, c2 = channels
    flat = c2 * (height // 4) * (width // 4)
    if flat == 0:
        raise ValueError(f"input {input_shape} is too small for two 2x2 poolings")
    return nn.Sequential(
        Conv2d(c_in, c1, 3, padding=1, activation=activation), nn.MaxPool2d(2),
        Conv2d(c1, c2, 3, padding=1, activation=activation), nn.MaxPool2d(2),
        nn.Flatten(),
        Linear(flat, hidden, activation=activation),
        Linear(hidden, n_out),
    )


class ResidualBlock(nn.Module):
    """He et al.'s basic block: ``g(BN(conv3x3(g(BN(conv3x3_s(x))))) + shortcut(x))``.

    The shortcut is the identity, or a strided 1x1 fastdfa.Conv2d + BN where the shape changes. The
    convolutions have no bias (BN follows) and no fused activation (BN sits between them and g). Under
    DFA each convolution's input is a site; the identity shortcut is not a layer, so the error reaching
    a block's output also flows, exactly, down the shortcut into the block below.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, activation: str = "relu"):
        _check_activation(activation)
        super().__init__()
        self.conv1 = Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = ACTIVATIONS[activation]()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(y)) + self.shortcut(x))


def make_resnet(input_shape: tuple[int, int, int], n_out: int, blocks: int = 1,
                channels: tuple[int, int, int] = (16, 32, 64), activation: str = "relu") -> nn.Sequential:
    """The CIFAR ResNet of He et al. (2016) with ``blocks`` basic blocks per stage (3 gives ResNet-20,
    the net of GrAPE's calibration result; 1 gives ResNet-8): a 3x3 conv + BN + g stem, three stages of
    ``channels`` (the 2nd and 3rd halve the resolution), global average pooling, a fastdfa.Linear head.

    For 28x28 inputs: 16x28x28 -> 32x14x14 -> 64x7x7 -> 64 -> n_out.
    """
    _check_activation(activation)
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    if len(input_shape) != 3:
        raise ValueError(f"a ResNet needs image inputs [C, H, W], got {input_shape}")
    c_in = input_shape[0]
    layers: list[nn.Module] = [Conv2d(c_in, channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(channels[0]),
                               ACTIVATIONS[activation]()]
    width = channels[0]
    for stage, c in enumerate(channels):
        for b in range(blocks):
            layers.append(ResidualBlock(width, c, stride=2 if stage > 0 and b == 0 else 1, activation=activation))
            width = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), Linear(width, n_out)]
    return nn.Sequential(*layers)


# --model: name -> ResNet blocks per stage
RESNETS = {"resnet8": 1, "resnet20": 3}
MODELS = ("mlp", "cnn", *RESNETS, "transformer")


def make_model(kind: str, input_shape: tuple[int, ...], n_out: int, hidden: tuple[int, ...] = (256, 256, 256),
               activation: str = "relu") -> nn.Sequential:
    if kind == "mlp":
        return make_mlp(math.prod(input_shape), hidden, n_out, activation)
    if kind in ("cnn", *RESNETS):
        if len(input_shape) != 3:
            raise ValueError(f"--model {kind} needs image inputs [C, H, W], got {input_shape}")
        if kind == "cnn":
            return make_cnn(input_shape, n_out, activation=activation)
        return make_resnet(input_shape, n_out, RESNETS[kind], activation=activation)
    if kind == "transformer":
        raise ValueError("the transformer is a character LM: build it with make_transformer_lm(vocab, context, "
                         "...) (the CLI does so for --data austen)")
    raise ValueError(f"unknown model {kind!r}: use one of {', '.join(MODELS)}")


# ----------------------------------------------------------------------------- transformer LM

TRANSFORMER_SITES = ("blocks", "layers")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``qkv`` (one fastdfa.Linear d -> 3d), the attention core
    ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``, then ``out`` (fastdfa.Linear d -> d).
    ``[B, T, d] -> [B, T, d]``."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.qkv = Linear(d_model, 3 * d_model)
        self.out = Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)          # [B, heads, T, d/heads]
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class AttentionSublayer(nn.Module):
    """``h + attn(LN(h))``: pre-LayerNorm causal self-attention WITH its residual add, so that as a
    DFA site it computes on its detached input and cuts the residual stream (see TransformerLM)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.attn(self.ln(h))


class MLPSublayer(nn.Module):
    """``h + down(GELU(up(LN(h))))`` with ``up`` (d -> ratio*d, GELU fused) and ``down`` (ratio*d -> d)
    fastdfa.Linear layers, residual add included (see AttentionSublayer)."""

    def __init__(self, d_model: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.up = Linear(d_model, mlp_ratio * d_model, activation="gelu")
        self.down = Linear(mlp_ratio * d_model, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(self.up(self.ln(h)))


class TransformerBlock(nn.Module):
    """A pre-LN GPT block: ``mlp(attn(h))`` with both sub-layers holding their residual adds."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.attn = AttentionSublayer(d_model, heads)
        self.mlp = MLPSublayer(d_model, mlp_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(h))


class LMHead(nn.Module):
    """The final LayerNorm and the LM head ``proj`` (fastdfa.Linear d -> vocab): ``[B, T, d] -> [B, T, V]``."""

    def __init__(self, d_model: int, vocab: int):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.proj = Linear(d_model, vocab)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln(h))


class TransformerLM(nn.Module):
    """A GPT-style causal character LM: token ids ``[B, T]`` (``T <= context``) -> logits ``[B, T, vocab]``.

    ``h_0 = tok(x) + pos(0..T-1)``; ``layers`` blocks ``h <- h + attn(LN(h))``, ``h <- h + mlp(LN(h))``
    (pre-LN, causal attention through ``F.scaled_dot_product_attention(is_causal=True)``); then the
    head ``proj(LN(h))``. Every projection (qkv, attention out, MLP up / down, the LM head) is a
    ``fastdfa.Linear``; the embeddings and LayerNorms are torch modules. No weight tying (a module
    that runs twice cannot be a DFA site).

    Train it with ``fastdfa.DFA(model, sites=model.sites(kind), batch_dims=2)``: the output is per
    token, so each token's error ``e[b, t]`` (``[V]``) is projected to that token of every site,
    ``e[b, t] F_s^T``, with ``F_s`` of shape ``(d_model, vocab)``. The fastdfa layers all sit inside
    the named sites, so none is a site itself (BP runs inside a site).

    What flows along the residual stream. Every site module computes on its detached input, and every
    block and sub-layer that ``sites()`` returns holds its residual add, so the residual stream is cut
    at every site. Below ``F_k`` is the feedback of the site at ``h_k``, the input of block (or
    sub-layer) k for ``k >= 1`` and of the head for ``k = L``: ``dfa.sites[k - 1].feedback``.

    * ``sites("blocks")`` = ``[block_0, ..., block_{L-1}, head]`` (DFA between blocks, BP inside them:
      GrAPE's "macro" setting). Block k's output ``h_{k+1}`` is the input of the next site (block k+1,
      or the head for the last block), so the gradient reaching block k's output is exactly that
      site's projected error ``e F_{k+1}^T`` per token. Autograd runs exact BP of it through the block:
      the MLP branch and its identity, LayerNorm, the attention core (softmax, q, k, v, so a token's
      error also reaches the earlier tokens it attended to) and its identity, down to the detached
      input ``h_k``, where it stops. The block's own input site gets ``e F_k^T``, which goes to block
      k-1's output and nowhere else: the identity path carries a gradient only within one block, and
      no block sees a sum of several sites' errors. Block 0's input is the data (the embeddings),
      not a site: block 0 trains on ``e F_1^T`` and its backward continues into the token and
      position embeddings. The head computes on the detached ``h_L``: it (final LayerNorm and
      projection) gets the true error ``e``, as DFA's output layer does.
    * ``sites("layers")`` = ``[block_0.attn, block_0.mlp, ..., block_{L-1}.mlp, head]`` (DFA at every
      sub-layer): the same with the cut at every sub-layer. Sub-layer j's output receives the next
      site's ``e F_{j+1}^T``; BP runs only inside a sub-layer (LayerNorm, the branch, its identity),
      for attention through its core (out, SDPA, qkv). The first attention sub-layer's input is the
      data: the embeddings train through it by BP.

    Naming only the branches ``f(LN(h))`` as sites would leave the identity uncut; the gradient at
    ``h_k`` would then be the sum of the projected errors of every site above k. The modules here
    keep one projected error per site output instead.

    Under GrAPE (``mode="grape"``) each site's perturbation is per token, so the batch estimate
    ``mean_(b,t) t_(b,t) p_(b,t)^T`` pairs each token's output tangent with its own perturbation: it
    aligns ``F_s`` with the same-token Jacobian ``d y_t / d h_t`` averaged over tokens (the tangent
    that perturbations of earlier tokens add through attention averages out, being independent of
    ``p_(b,t)``), the matrix the per-token projection stands in for.
    """

    def __init__(self, vocab: int, context: int, d_model: int = 128, heads: int = 4, layers: int = 2,
                 mlp_ratio: int = 4):
        super().__init__()
        for name, value in (("vocab", vocab), ("context", context), ("d_model", d_model), ("heads", heads),
                            ("layers", layers), ("mlp_ratio", mlp_ratio)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.vocab, self.context = vocab, context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        nn.init.normal_(self.tok.weight, std=0.02)  # GPT-2's embedding scale, not N(0, 1)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, heads, mlp_ratio) for _ in range(layers))
        self.head = LMHead(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"TransformerLM takes token ids [B, T], got shape {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def sites(self, kind: str = "blocks") -> list[nn.Module]:
        """The modules to name in ``fastdfa.DFA(model, sites=...)``: ``"blocks"`` (every block, then
        the head) or ``"layers"`` (every attention and MLP sub-layer, then the head); see the class
        docstring for what flows along the residual stream in each."""
        if kind == "blocks":
            return [*self.blocks, self.head]
        if kind == "layers":
            return [m for b in self.blocks for m in (b.attn, b.mlp)] + [self.head]
        raise ValueError(f"sites kind must be one of {TRANSFORMER_SITES}, got {kind!r}")


def make_transformer_lm(vocab: int, context: int, d_model: int = 128, heads: int = 4, layers: int = 2,
                        mlp_ratio: int = 4) -> TransformerLM:
    """A GPT-style causal character LM of fastdfa.Linear layers (``TransformerLM``); logits ``[B, T, vocab]``.
    Train with ``fastdfa.DFA(model, sites=model.sites("blocks" | "layers"), batch_dims=2)``."""
    return TransformerLM(vocab, context, d_model, heads, layers, mlp_ratio)
