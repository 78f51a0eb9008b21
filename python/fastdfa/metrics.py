"""Alignment metrics: weight alignment (WA) and gradient alignment (GA), and the chain check.

Refinetti et al., "Align, then memorise": DFA learns because the forward
weights turn towards the feedback. With layers ``W_1 .. W_L`` executed in
order and the site feedback ``F_l`` at the input of layer ``l + 1`` (holding
``h_l``, shape ``(n_l, n_out)``, ``fastdfa.DFA.sites[l - 1]``):

    WA_l = cos(W_l, F_l F_{l-1}^T)      1 < l < L
    WA_L = cos(W_L, F_{L-1}^T)
    GA_l = mean over samples of cos(delta_l^rule, delta_l^BP)

with ``cos`` the Frobenius cosine and ``delta_l`` the error signal at layer
l's pre-activation (the gradient of the loss with respect to ``a_l``; the
rule's one for DFA / FA, autograd's for BP).

WA is defined for the dense fastdfa layers (``fastdfa.Linear``, and
``fastdfa.Conv1D`` with ``W`` its transposed weight) whose input and output
sites are dense and match the weight's shape (a convolution's weight is not a
product of site feedbacks); layers where it is not defined are left out of
the result.

**The chain check** (``check_chain``). ``chain(dfa)`` is the execution order,
and the formulas above, FWM's plain form and ``soft_align``'s BP path
``(W_L ... W_{l+1})^T`` read it as the chain ``h_l = g(W_l h_{l-1} + b_l)``:
layer ``l + 1``'s input is computed from layer ``l``'s output *alone*, through
elementwise ops only (whose Jacobian is diagonal, like ``g'``, which the
rules drop). Widths do not show it (q, k and v of equal width chain by shape),
so ``check_chain`` looks at the data flow itself:

* with ``example_input``, one forward of the model (eval mode, nothing kept)
  with each wrapper module's output replaced by a fresh autograd leaf; the
  graph from each module's input back to those leaves (``grad_fn.next_functions``)
  shows what the input is computed from (``trace_flow``). A link ``A -> B`` is
  a chain link exactly when every data path into ``B``'s input starts at
  ``A``'s output (parameters of other modules and constants are fine; the model
  input, an embedding lookup, another module's output or a fastdfa layer's
  weight read outside it are not) and runs through elementwise ops only;
* without it, only an ``nn.Sequential`` proves its data flow by its modules:
  consecutive children, with only known elementwise modules between them.
  For any other model the check asks for ``example_input=``.

LayerNorm (and RMSNorm, GroupNorm) breaks the chain: its per-sample Jacobian
``(gamma / sigma) (I - 1 1^T / n - x_hat x_hat^T / n)`` is not diagonal, so
W_l's output error does not reach layer ``l + 1``'s input as the plain chain
assumes, and exact matching (WA = 1 being BP's direction at angle 0 on a linear
network) no longer holds. The transformer encoder form of FWM
(``fastdfa.matching``) is the one that takes LayerNorm as the identity, as a
stated approximation. BatchNorm is per feature (its Jacobian over a sample's
features is diagonal; in eval mode it is an affine map per feature), so it
counts as elementwise, like ``g'``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .activations import CAPTURE
from .dfa import DFA, Site
from .engine.error_point import error_tensor
from .engine.guard import evaluating
from .grape import rule_mode
from .layers import FASTDFA_LAYERS, Conv1D, Linear
from .plots import plot_alignment_records

# The dense fastdfa layers: a matrix W [out, in] maps the input's last axis (Conv1D stores W^T).
DENSE_LAYERS = (Linear, Conv1D)


def is_dense(layer: nn.Module) -> bool:
    return isinstance(layer, DENSE_LAYERS)


def dense_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's ``W`` as ``[out_features, in_features]`` (a view: Conv1D's weight is ``[in, out]``)."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


@dataclass
class ChainLink:
    """One layer of the executed chain, with the site feedback at its input and at its output."""

    name: str
    layer: nn.Module
    f_in: Site | None    # site at the layer's input (None for the first layer: its input is the data)
    f_out: Site | None   # site at the layer's output (None for the last layer)


def chain(dfa: DFA) -> list[ChainLink]:
    """The modules in execution order with their sites; needs the feedback built."""
    if not dfa.built:
        raise RuntimeError("the feedback is not built yet: run one forward of the wrapper first, or pass "
                           "example_input= to fastdfa.DFA")
    order = dfa.execution_order
    sites = dfa.sites
    return [ChainLink(dfa.name_of(m), m, sites[i - 1] if i > 0 else None, sites[i] if i < len(sites) else None)
            for i, m in enumerate(order)]


def _dense_matches(site: Site | None, features: int) -> bool:
    return site is not None and not site.channelwise and site.rows == features


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 0.0


@torch.no_grad()
def error_space_feedback(dfa: DFA, site: Site) -> torch.Tensor:
    """The site's feedback in the error's own coordinates, float64 on the CPU: ``F`` ``(rows, n_e)``, or
    ``G = F P`` under ``error_rank=k`` (``F`` ``(rows, k)`` acts on ``P e``). WA and FWM compare these with
    the forward weights."""
    f = site.feedback.detach().double().cpu()
    p = dfa.feedback.error_projection
    return f if p is None else f @ p.detach().double().cpu()


@torch.no_grad()
def weight_alignment(dfa: DFA) -> dict[str, float]:
    """WA per dense fastdfa layer where it is defined (see the module docstring); under ``error_rank`` with
    each site's feedback in the error's coordinates, ``G = F P`` (``error_space_feedback``)."""
    out = {}
    links = chain(dfa)
    for i, link in enumerate(links):
        lay = link.layer
        if i == 0 or not is_dense(lay) or not _dense_matches(link.f_in, lay.in_features):
            continue
        if link.f_out is None:  # the output layer
            out[link.name] = _cos(dense_matrix(lay), error_space_feedback(dfa, link.f_in).t())
        elif _dense_matches(link.f_out, lay.out_features):
            out[link.name] = _cos(dense_matrix(lay), error_space_feedback(dfa, link.f_out)
                                  @ error_space_feedback(dfa, link.f_in).t())
    return out


@contextlib.contextmanager
def _capture_preactivations():
    captured: list[tuple[nn.Module, torch.Tensor]] = []
    token = CAPTURE.set(captured)
    try:
        yield captured
    finally:
        CAPTURE.reset(token)


def _deltas(dfa: DFA, mode: str, x, target, loss_fn) -> dict[int, torch.Tensor]:
    """dLoss/da_l for every fastdfa layer under ``mode``, by autograd.grad (no .grad is touched)."""
    dfa.mode = mode
    with _capture_preactivations() as captured:
        output = dfa(*x) if isinstance(x, tuple) else dfa(x)
    loss = loss_fn(error_tensor(output), target)  # a ModelOutput: its logits
    tensors = [a for _, a in captured]
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return {id(m): g for (m, _), g in zip(captured, grads)}


def gradient_alignment(dfa: DFA, x, target, loss_fn: Callable = F.cross_entropy) -> dict[str, float]:
    """GA per fastdfa layer: the batch mean of per-sample cosines between the error signal the
    current rule (``dfa.mode``: "dfa", "grape" or "fa") gives the layer's pre-activation and BP's.

    Computed on ``x`` / ``target`` in eval mode (BatchNorm statistics, dropout and the RNG are left
    alone) with ``torch.autograd.grad``: parameters, their ``.grad``, the mode and the training
    flags are as they were afterwards. The kernel backends' fused route is bypassed (the torch
    route computes the same deltas and exposes the pre-activations).
    """
    if not isinstance(dfa, DFA):
        raise TypeError(f"gradient_alignment needs a fastdfa.DFA, got {type(dfa).__name__}")
    mode = dfa.mode
    if mode == "bp":
        raise ValueError("dfa.mode is 'bp': its gradient alignment with BP is 1 by definition; set the mode "
                         "whose alignment you want ('dfa' or 'fa')")
    try:
        with evaluating(dfa), dfa.using_backend("torch"):  # the torch route for this measurement
            # GrAPE's update rule is DFA's (its feedback step happens apart from the deltas).
            rule = _deltas(dfa, rule_mode(mode), x, target, loss_fn)
            exact = _deltas(dfa, "bp", x, target, loss_fn)
    finally:
        dfa.mode = mode
    out = {}
    for m in dfa.model.modules():
        if not isinstance(m, FASTDFA_LAYERS) or id(m) not in rule or id(m) not in exact:
            continue
        r, b = rule[id(m)], exact[id(m)]
        if r is None or b is None:
            continue
        n = r.shape[0]
        per_sample = F.cosine_similarity(r.reshape(n, -1).double(), b.reshape(n, -1).double(), dim=1, eps=1e-30)
        out[dfa.name_of(m)] = float(per_sample.mean())
    return out


def alignment_summary(values: dict[str, float]) -> float:
    """The mean over layers, for one-number logs (NaN for an empty dict)."""
    return sum(values.values()) / len(values) if values else math.nan


class AlignmentLog:
    """A callback for your own training loop: each call records WA and GA on a fixed batch.

        log = fastdfa.metrics.AlignmentLog(dfa, x_fixed, y_fixed)
        for epoch in range(epochs):
            ...train...
            log(epoch)                 # {"step": epoch, "weight": {...}, "gradient": {...}}
        log.plot("alignment.png")      # WA and GA per layer over the calls

    Each call leaves the model, its gradients and its mode as they were (see
    ``gradient_alignment``).
    """

    def __init__(self, dfa: DFA, x, target, loss_fn: Callable = F.cross_entropy):
        if not isinstance(dfa, DFA):
            raise TypeError(f"AlignmentLog needs a fastdfa.DFA, got {type(dfa).__name__}")
        self.dfa, self.x, self.target, self.loss_fn = dfa, x, target, loss_fn
        self.records: list[dict] = []

    def __call__(self, step=None) -> dict:
        record = {"step": len(self.records) if step is None else step,
                  "weight": weight_alignment(self.dfa) if self.dfa.built else {},
                  "gradient": gradient_alignment(self.dfa, self.x, self.target, self.loss_fn)}
        self.records.append(record)
        return record

    def plot(self, path, label: str | None = None):
        return plot_alignment_records({label or self.dfa.mode: [(r["step"], r) for r in self.records]}, path,
                                      xlabel="step")


# ----------------------------------------------------------------------------- the chain check

def describe(module: nn.Module) -> str:
    """``module``'s type and weight shape, for messages: "fastdfa.Linear 12 -> 9 (weight (9, 12))"."""
    kind = type(module)
    name = f"fastdfa.{kind.__name__}" if kind.__module__.startswith("fastdfa") else kind.__name__
    weight = getattr(module, "weight", None)
    shape = f"weight {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else ""
    if is_dense(module):
        return f"{name} {module.in_features} -> {module.out_features} ({shape})"
    return f"{name} ({shape})" if shape else name


# autograd ops whose Jacobian with respect to their data input is diagonal (each output element depends on the
# same element of each data input) and that keep the elements in order: what the plain chain may have between
# two layers. Names as type(grad_fn).__name__ without "Backward<k>". A per-feature affine (BatchNorm, a bias, a
# scale) is diagonal too. Anything else on a data path breaks a link; reading an unknown op as "not elementwise"
# refuses too much rather than too little.
ELEMENTWISE_OPS = frozenset({
    "Relu", "Threshold", "Tanh", "Sigmoid", "Gelu", "Silu", "Elu", "Celu", "LeakyRelu", "RreluWithNoise",
    "Softplus", "Hardtanh", "Hardswish", "Hardsigmoid", "Mish", "LogSigmoid", "PreluKernel", "Prelu",
    "Softshrink", "Hardshrink", "Erf", "Erfc", "Exp", "Exp2", "Expm1", "Log", "Log2", "Log10", "Log1p", "Sqrt",
    "Rsqrt", "Reciprocal", "Neg", "Abs", "Sgn", "Sign", "Pow", "Sin", "Cos", "Tan", "Atan", "Sinh", "Cosh",
    "Clamp", "ClampMin", "ClampMax", "Maximum", "Minimum", "Fmax", "Fmin", "Where", "MaskedFill",
    "Add", "Sub", "Rsub", "Mul", "Div", "Lerp", "Addcmul", "Addcdiv",
    "NativeDropout", "FusedDropout", "ToCopy", "Clone", "Alias", "View", "UnsafeView", "ReshapeAlias",
    "Squeeze", "Unsqueeze", "NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm",
})
# Lookups whose index the graph does not show: from a parameter table they are data (an embedding of the input).
_LOOKUP_OPS = frozenset({"Embedding", "EmbeddingBag", "EmbeddingDense", "Index", "IndexSelect", "Gather", "Take",
                         "TakeAlongDim"})
_OP_KINDS = (  # (test on the op name, what it is), for messages; the first that fits
    (lambda n: n in {"NativeLayerNorm", "NativeGroupNorm", "CudnnLayerNorm", "FusedRmsNorm"},
     "a LayerNorm / GroupNorm (it mixes a sample's features)"),
    (lambda n: "Attention" in n or n in {"Mm", "Bmm", "Addmm", "Baddbmm", "Addbmm", "Matmul", "Dot", "Mv",
                                          "Addmv", "Linear"},
     "a matrix product (attention, or a linear map that is not a fastdfa layer)"),
    (lambda n: n in {"Softmax", "LogSoftmax"}, "a softmax"),
    (lambda n: n in {"Mean", "Sum", "Amax", "Amin", "Max", "Min", "Var", "Std", "VarMean", "StdMean", "Norm",
                     "LinalgVectorNorm", "Logsumexp", "Prod", "Cumsum"},
     "a reduction over features (e.g. an RMSNorm's mean)"),
    (lambda n: n in _LOOKUP_OPS, "a lookup (an embedding or an index)"),
    (lambda n: n in {"Permute", "Transpose", "T", "Slice", "Select", "Split", "SplitWithSizes", "Unbind", "Cat",
                     "Stack", "Expand", "Repeat", "Roll", "Flip", "CopySlices", "AsStrided", "Narrow",
                     "Diagonal", "Tril", "Triu"},
     "reindexing (a slice, split, concatenation, permutation or broadcast)"),
    (lambda n: "Pool" in n, "pooling"),
    (lambda n: "Convolution" in n, "a convolution that is not a fastdfa layer"),
    (lambda n: True, "an op not known to be elementwise"),
)
DATA = "the model input"
LOOKUP = "an embedding lookup (of the model input, as far as the graph shows: its index is not in it)"


def _op_base(node) -> str:
    name = type(node).__name__
    cut = name.find("Backward")
    return name[:cut] if cut > 0 else name


def _describe_ops(ops) -> str:
    """The non-elementwise ops, grouped by what they are, the most telling kind first."""
    kinds: dict[int, list[str]] = {}
    for op in sorted(ops):
        base = op[:op.find("Backward")] if op.find("Backward") > 0 else op
        kinds.setdefault(next(i for i, (test, _) in enumerate(_OP_KINDS) if test(base)), []).append(op)
    return "; ".join(f"{_OP_KINDS[i][1]} ({', '.join(kinds[i][:3])})" for i in sorted(kinds))


@dataclass(frozen=True)
class Reads:
    """What one tensor is computed from, as one forward's autograd graph shows it (``trace_flow``).

    ``outputs``: the wrapper's modules whose output it reads; ``data``: other data sources ("the model
    input", an embedding lookup, a fastdfa weight read outside its layer); ``ops``: the autograd ops on the
    paths from those sources that are not elementwise (``ELEMENTWISE_OPS``); ``same_input_as``: the first
    wrapper module whose input is this very tensor (a branch), if another module's is.
    """

    outputs: frozenset
    data: frozenset
    ops: frozenset
    same_input_as: nn.Module | None = None


@dataclass
class Flow:
    """The data flow of one forward between the wrapper's modules (``execution_order``): what each module's
    input is computed from (``inputs[id(module)]``), and the tensor the error is taken at (``output``: the
    model's output, its ``logits``, or the output / input of the ``error_at=`` / ``head=`` module; None
    when there is no such tensor)."""

    inputs: dict[int, Reads]
    output: Reads | None


def _error_point(dfa: DFA) -> tuple[str, nn.Module | None]:
    """Where the wrapper takes the output error: ("return", None) for the model's return value, ("output", M)
    or ("input", M) for a module's output or input (``error_at=`` / ``head=``, in a fastdfa that has them)."""
    point = getattr(dfa, "_point", None)
    kind, module = getattr(point, "kind", "return"), getattr(point, "module", None)
    return (kind, module) if kind in ("output", "input") and isinstance(module, nn.Module) else ("return", None)


def _returned_tensor(output):
    """The tensor of the model's return value the error is taken at: itself, its ``logits``, else its first
    tensor; None if it holds none."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def trace_flow(dfa: DFA, example_input) -> Flow:
    """Run ``dfa.model`` once on ``example_input`` (a tensor or a tuple of positional arguments, as for
    ``fastdfa.DFA(example_input=)``) and read the data flow between the wrapper's modules off the autograd
    graph (see the module docstring). The forward runs in eval mode with gradients on but no backward; the
    training flags and the RNG states are put back and nothing of the graph is kept, so the model, its
    ``.grad`` and its buffers are as they were. A small batch (one sample) is enough."""
    if not dfa.built:
        raise RuntimeError("the feedback is not built yet: run one forward of the wrapper first, or pass "
                           "example_input= to fastdfa.DFA")
    order = list(dfa.execution_order)
    model = dfa.model
    role: dict[int, object] = {}   # id(leaf tensor or parameter) -> the source it stands for
    keep: list[torch.Tensor] = []  # the leaves, alive while their ids are keys

    def leaf(t: torch.Tensor, source) -> torch.Tensor:
        """A fresh autograd leaf standing for ``source``, handed on as a clone (an elementwise op): the model
        may work on it in place (``nn.ReLU(inplace=True)``), which a leaf that requires grad refuses."""
        fresh = t.detach().requires_grad_(True)
        role[id(fresh)] = source
        keep.append(fresh)
        return fresh.clone()

    for m in order:  # a fastdfa weight read outside its layer (weight sharing) is a data path of its own
        if isinstance(m, FASTDFA_LAYERS):
            for p in m.parameters(recurse=False):
                role.setdefault(id(p), f"the parameters of {dfa.name_of(m)!r}, read outside that layer")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    inputs: dict[int, torch.Tensor] = {}

    def hook(module, hook_args, output):
        if hook_args and isinstance(hook_args[0], torch.Tensor):
            inputs[id(module)] = hook_args[0]
        # The module's output becomes a fresh leaf: the graph above it starts there, so the walk from a later
        # input stops at it and names the module, and each walk stays between two layers.
        if isinstance(output, torch.Tensor):
            return leaf(output, module)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (leaf(output[0], module),) + output[1:]
        return None

    handles = [m.register_forward_hook(hook) for m in order]
    kind, point = _error_point(dfa)
    at_point: list = []  # the error tensor of an error_at= / head= module, the first time it runs

    def output_hook(_module, _args, output):
        at_point.append(_returned_tensor(output))

    def input_hook(_module, hook_args):
        at_point.append(hook_args[0] if hook_args else None)

    if kind == "output":  # registered after the cut: it sees the output as the next module does
        handles.append(point.register_forward_hook(output_hook))
    elif kind == "input":
        handles.append(point.register_forward_pre_hook(input_hook))
    training = [(m, m.training) for m in model.modules()]
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    cpu_rng = torch.get_rng_state()
    cuda_rng = {d: torch.cuda.get_rng_state(d) for d in devices}
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():  # the callers run under no_grad
            # Float inputs become leaves so that a read of the input itself shows; integer ids enter through
            # lookups. Made here: a clone made under no_grad would carry no graph back to its leaf.
            args = tuple(leaf(a, DATA) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            out = _returned_tensor(model(*args))
            if kind != "return":
                out = at_point[0] if at_point and isinstance(at_point[0], torch.Tensor) else None
    finally:
        for h in handles:
            h.remove()
        for m, t in training:
            m.training = t
        torch.set_rng_state(cpu_rng)
        for d, state in cuda_rng.items():
            torch.cuda.set_rng_state(state, d)

    memo: dict = {}  # autograd node -> (sources, non-elementwise ops) of its output; holds the nodes alive
    empty = frozenset()

    def visit(root):
        stack = [(root, False)]
        while stack:  # iterative post-order: a deep graph (the residual stream) must not hit the recursion limit
            node, ready = stack.pop()
            if node in memo:
                continue
            if not ready:
                stack.append((node, True))
                stack.extend((n, False) for n, _ in node.next_functions if n is not None and n not in memo)
                continue
            base = _op_base(node)
            if base == "AccumulateGrad":
                source = role.get(id(node.variable))
                memo[node] = (empty if source is None else frozenset([source]), empty)
                continue
            sources = frozenset().union(*(memo[n][0] for n, _ in node.next_functions if n is not None))
            ops = frozenset().union(*(memo[n][1] for n, _ in node.next_functions if n is not None))
            if base in _LOOKUP_OPS and not sources:
                sources = frozenset([LOOKUP])  # a table looked up: its index (not in the graph) may be the data
            if sources and base not in ELEMENTWISE_OPS:
                ops = ops | {type(node).__name__}
            memo[node] = (sources, ops)
        return memo[root]

    def reads(t: torch.Tensor, same=None) -> Reads:
        if t.grad_fn is None:
            source = role.get(id(t)) if t.requires_grad else None
            sources, ops = (empty if source is None else frozenset([source])), empty
        else:
            sources, ops = visit(t.grad_fn)
        mods = frozenset(s for s in sources if isinstance(s, nn.Module))
        return Reads(mods, frozenset(s for s in sources if not isinstance(s, nn.Module)), ops, same)

    first_reader: dict[int, nn.Module] = {}
    flow = {}
    for m in order:
        x = inputs.get(id(m))
        if x is None:
            continue
        flow[id(m)] = reads(x, first_reader.get(id(x)))
        first_reader.setdefault(id(x), m)
    return Flow(flow, None if out is None else reads(out))


OUTPUT = "the model output"


def output_label(dfa: DFA) -> str:
    """The tensor the error is taken at, in words, for messages."""
    kind, point = _error_point(dfa)
    return OUTPUT if kind == "return" else f"the {kind} of {dfa.name_of(point)!r} (where the error is taken)"


def link_problem(dfa: DFA, a: nn.Module, b: nn.Module | str, reads: Reads) -> str | None:
    """Why ``a -> b`` is not a chain link (``b``: a module, or ``OUTPUT``), from ``reads`` (what ``b``'s input,
    or the model output, is computed from); None when it is one."""
    name = dfa.name_of
    target = f"the input of {name(b)!r}" if isinstance(b, nn.Module) else output_label(dfa)
    others = sorted(f"{name(m)!r}'s output" for m in reads.outputs if m is not a) + sorted(reads.data)
    if a not in reads.outputs:
        if reads.same_input_as is not None:
            return (f"{target} is not computed from {name(a)!r}'s output: it is also the input of "
                    f"{name(reads.same_input_as)!r} (parallel branches, such as attention's q/k/v or an MLP's "
                    "gate/up projections)")
        what = ", ".join(others) if others else "nothing that depends on the data"
        return f"{target} is not computed from {name(a)!r}'s output: it reads {what}"
    if others:
        return (f"{target} is not computed from {name(a)!r}'s output alone: it also reads {', '.join(others)} "
                "(a residual add, a skip connection, attention, or a branch)")
    if reads.ops:
        return (f"{target} is computed from {name(a)!r}'s output alone, but through {_describe_ops(reads.ops)}, "
                "not through elementwise ops only (the chain's rules drop only diagonal Jacobians such as g')")
    return None


# Modules whose forward is elementwise (a diagonal Jacobian, the elements in order), by exact type: a subclass
# may compute something else. BatchNorm: per feature (see the module docstring).
_ELEMENTWISE_MODULES = tuple(getattr(nn, n) for n in (
    "ReLU", "ReLU6", "Tanh", "Sigmoid", "GELU", "SiLU", "ELU", "CELU", "SELU", "LeakyReLU", "PReLU", "Softplus",
    "Hardtanh", "Hardswish", "Hardsigmoid", "Mish", "LogSigmoid", "Softsign", "Tanhshrink", "Hardshrink",
    "Softshrink", "Threshold", "Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
    "FeatureAlphaDropout", "Flatten", "Unflatten", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d") if hasattr(nn, n))
# Modules known to mix elements: a definite break, no forward needed to tell.
_MIXING_MODULES = tuple(getattr(nn, n) for n in (
    "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "Softmax", "LogSoftmax", "Softmin", "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
    "ConvTranspose2d", "ConvTranspose3d", "MultiheadAttention", "Embedding") if hasattr(nn, n))


def _hooked(module: nn.Module, allowed: set) -> bool:
    """Whether ``module`` has a forward (pre-)hook other than the wrapper's own (``allowed``: their ids)."""
    return any(k not in allowed for hooks in (module._forward_hooks, module._forward_pre_hooks) for k in hooks)


def _sequential_problems(dfa: DFA, links: list[tuple[nn.Module, nn.Module | str]]) -> list[tuple[str, str | None]]:
    """For each link, from the modules alone: ("ok", None), ("break", why) or ("unproven", why). Only an
    ``nn.Sequential`` (nested ones flattened) proves its data flow: each child gets the previous child's
    output and nothing else."""
    model = dfa.model
    # The wrapper's own hooks: its pre-hooks on the sites= modules, and the one at an error_at= / head= module.
    allowed = {h.id for h in getattr(getattr(dfa, "_recorder", None), "hooks", ())}
    allowed.update(h.id for h in getattr(getattr(dfa, "_point", None), "handles", ()))
    kind, point = _error_point(dfa)
    if type(model) is not nn.Sequential:
        why = f"the model is a {type(model).__name__}, not an nn.Sequential, so its forward is not known"
        return [("unproven", why)] * len(links)
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return [("unproven", "global module hooks are registered, and may change what flows")] * len(links)
    items: list[nn.Module] = []

    def flatten(seq: nn.Sequential) -> bool:
        if _hooked(seq, allowed):
            return False
        for child in seq._modules.values():  # as Sequential.forward runs them (repeats included)
            if type(child) is nn.Sequential:
                if not flatten(child):
                    return False
            elif child is not None:
                items.append(child)
        return True

    if not flatten(model):
        return [("unproven", "a hook on an nn.Sequential may change what flows")] * len(links)
    executed = {id(m) for m in dfa.execution_order}
    position = {id(m): i for i, m in enumerate(items) if id(m) in executed}
    out = []
    where = {id(m): i for i, m in enumerate(items)}
    for a, b in links:
        start = position.get(id(a))
        if not isinstance(b, str):
            stop = position.get(id(b))
        elif kind == "return":
            stop = len(items)
        else:  # the error is taken at the output of (or the input of) a module: the link ends there
            stop = where.get(id(point))
            stop = None if stop is None else stop + (kind == "output")  # the module itself is between, for "output"
        target = output_label(dfa) if isinstance(b, str) else repr(dfa.name_of(b))
        if start is None or stop is None or stop <= start:
            missing = repr(dfa.name_of(a)) if start is None else target if not isinstance(b, str) else \
                f"the {kind} of {dfa.name_of(point)!r}, where the error is taken,"
            out.append(("unproven", f"{missing} is not a child of the nn.Sequential after {dfa.name_of(a)!r}"))
            continue
        verdict = ("ok", None)
        for m in [items[start]] + items[start + 1:stop] + ([] if isinstance(b, str) else [items[stop]]):
            if _hooked(m, allowed):
                verdict = ("unproven", f"{dfa.name_of(m)!r} has a forward hook, which may change what flows")
                break
        else:
            for m in items[start + 1:stop]:
                if type(m) in _ELEMENTWISE_MODULES:
                    continue
                if isinstance(m, _MIXING_MODULES) or (isinstance(m, FASTDFA_LAYERS) and id(m) not in executed):
                    verdict = ("break", f"{dfa.name_of(m)!r} ({describe(m)}) runs between {dfa.name_of(a)!r} and "
                                        f"{target}, and it is not elementwise")
                elif any(id(s) in executed for s in m.modules()):
                    verdict = ("unproven", f"{dfa.name_of(m)!r} ({type(m).__name__}) runs between them and "
                                           "holds wrapper modules; its forward is not known")
                else:
                    verdict = ("unproven", f"{dfa.name_of(m)!r} ({type(m).__name__}) runs between "
                                           f"{dfa.name_of(a)!r} and {target}; it is not known to be elementwise")
                break
        out.append(verdict)
    return out


def check_chain(dfa: DFA, first: int = 0, example_input=None, *, who: str = "this") -> None:
    """Raise ``ValueError`` unless the modules of ``dfa.execution_order`` from position ``first`` on form a
    chain: for each pair of consecutive modules ``A -> B``, ``B``'s input is computed from ``A``'s output
    alone through elementwise ops, and so is the model output from the last module's (see the module
    docstring). The message names the first link that breaks it and why (``who``: the caller, for the
    message). With ``example_input`` the data flow of one forward decides (``trace_flow``); without it, an
    ``nn.Sequential``'s children; for any other model it raises asking for ``example_input=``.
    Changes nothing."""
    order = list(dfa.execution_order)
    if first >= len(order):
        return
    links = list(zip(order[first:], order[first + 1:])) + [(order[-1], OUTPUT)]
    name = dfa.name_of

    def label(b):
        return output_label(dfa) if isinstance(b, str) else repr(name(b))

    def refuse(a, b, why):
        raise ValueError(f"{who}: {name(a)!r} -> {label(b)} breaks the chain it assumes ({why}). It needs the "
                         f"layers from {name(order[first])!r} to the output to form a chain, each layer's input "
                         "computed from the previous layer's output alone through elementwise ops (docs/math.md); "
                         f"{name(a)!r} is a {describe(a)}"
                         + (f", {name(b)!r} a {describe(b)}" if isinstance(b, nn.Module) else "")
                         + ". Nothing was changed.")

    if example_input is None:
        for (a, b), (verdict, why) in zip(links, _sequential_problems(dfa, links)):
            if verdict == "break":
                refuse(a, b, why)
            if verdict == "unproven":
                raise ValueError(
                    f"{who}: cannot tell from the modules alone whether {name(a)!r} -> {label(b)} is a chain link "
                    f"({why}). Pass example_input= (a small batch the model takes, as for "
                    "fastdfa.DFA(example_input=)) so that one forward shows the data flow. Nothing was changed.")
        return
    flow = trace_flow(dfa, example_input)
    for a, b in links:
        reads = flow.output if isinstance(b, str) else flow.inputs.get(id(b))
        if reads is None:
            if isinstance(b, str):  # the model returned no tensor: where the error is taken is the wrapper's call
                continue
            refuse(a, b, f"{name(b)!r} did not run on the example input")
        why = link_problem(dfa, a, b, reads)
        if why is not None:
            refuse(a, b, why)
