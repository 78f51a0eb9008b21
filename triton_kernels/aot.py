"""Ahead-of-time compilation of the launches the launchers make, for a GPU target, without a GPU.

Each launcher is split into ``plan_<op>`` (checks, outputs, tables, and the
``_common.Launch`` it would make) and ``<op>`` (runs the launches). This module
takes those launches as they are, binds their arguments the way
``JITFunction.run`` does (``native_specialize_impl``: a pointer or an integer
divisible by 16 gets ``tt.divisibility = 16``, an integer equal to 1 becomes a
constexpr) and compiles them with ``triton.compile`` for ``sm_80`` / ``sm_90``:
PTX, then a cubin through Triton's own ``ptxas``. No GPU is needed, so a CPU
machine can check registers, spills and shared memory of every variant.

The variants are the engine's launches at the shapes DFA nets have
(``NETS``): every op, fp32 / fp16 / bf16, every activation, ieee and tf32, the
batch a multiple of 16 or not, with and without bias, 0 / 1 tangents (the
engine) and more (the API). Launches that bind to the same compiled kernel
(same signature, constexprs, divisibility and options: warps, stages, the
register budget ``maxnreg``) are compiled once.

Reported per compiled kernel and target: registers, spill stores / loads and
stack frame (ptxas' ``-v`` log of the compile), and shared memory (the kernel's
metadata). A check fails on a compile error, shared memory above the target's
opt-in limit, or a spill in a kernel the engine launches.

    python -m fastdfa.triton_kernels.aot [--full] [--arch 80,90] [--report FILE]

must run WITHOUT ``TRITON_INTERPRET`` (under the interpreter a ``@triton.jit``
function is not a ``JITFunction``); ``tests/test_triton_compile.py`` runs it
in subprocesses.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import combinations

import torch
import triton

from ._common import Launch

# Dynamic shared memory one block may opt into (cudaFuncAttributeMaxDynamicSharedMemorySize).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = tuple(SHARED_LIMIT)

# DFA nets: (name, input features, hidden widths, output units). The widths decide the strides
# (n_out 10 / 100 / 1000 are not multiples of 16; 784, 256, 1024, 3072 are; 100 is not).
NETS = (
    ("784-1000x2-10", 784, (1000, 1000), 10),
    ("784-100x2-10", 784, (100, 100), 10),
    ("3072-1024x2-100", 3072, (1024, 1024), 100),
    ("256-256x2-1000", 256, (256, 256), 1000),
)
# Convolutional DFA nets reach dfa_project / align_step with big dense sites (C*H*W rows) and
# small channel-wise ones (C rows).
CONV_SITES = (("conv-16x28x28,32x14x14-10", (16 * 28 * 28, 32 * 14 * 14), 10),
              ("conv-channelwise-16,32,64-10", (16, 32, 64), 10))
BATCHES = (256, 100)              # a full batch, and one that is not a multiple of 16
# Past 2^31 elements (a token batch of a wide transformer-sized MLP): the launchers switch the
# kernels to 64-bit offsets. Built on the meta device (no memory); its addresses are the views'
# offsets from 0, so its alignment is the layout's own.
LARGE_NETS = (("4096-4096x2-1000", 4096, (4096, 4096), 1000),)
LARGE_BATCHES = (1 << 20,)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = (None, "relu", "tanh", "sigmoid", "gelu")
PRECISIONS = ("ieee", "tf32")     # torch.backends.cuda.matmul.allow_tf32 False / True
ENGINE_TANGENTS = (0, 1)          # jvp_linear: the fused forward (0) and GrAPE's dual pass (1)
API_TANGENTS = (2, 3, 8, 9)       # T_PAD 2, 4, 8, and a second chunk (STORE_PRIMAL False)

_DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Variant:
    """One launch of one op at one shape, with what it was made from (``desc``)."""

    desc: dict                     # op, net, dtype, precision, batch, ...: the axes of the sweep
    launch: Launch
    engine: bool                   # whether the engine makes this launch (else only the API does)
    key: str = field(default="")   # the compiled kernel it binds to (``specialize``)

    def __post_init__(self):
        # Only what the binding reads (dtype, address) is kept of a tensor: the sweep's tensors can go.
        args = tuple(_Pointer(a.dtype, a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in self.launch.args)
        self.launch = Launch(self.launch.kernel, self.launch.grid, args, dict(self.launch.constexprs),
                             self.launch.num_warps, self.launch.num_stages, self.launch.maxnreg)


class _Pointer:
    """A tensor argument as the JIT's binding sees it: its dtype and its address."""

    def __init__(self, dtype: torch.dtype, address: int):
        self.dtype, self._address = dtype, address

    def data_ptr(self) -> int:
        return self._address


# --------------------------------------------------------------------------- binding
@functools.lru_cache(maxsize=None)
def _nvidia_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    return make_backend(GPUTarget("cuda", 90, 32))


def _specialize_arg(backend, value, is_const: bool, specialize: bool, align: bool):
    """(type, divisibility attribute or constexpr value) as ``JITFunction.run`` derives them."""
    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:  # older triton: the same rules, written out
        native_specialize_impl = None
    if native_specialize_impl is not None:
        return native_specialize_impl(backend, value, is_const, specialize, align)
    if hasattr(value, "data_ptr"):
        ty = "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                    torch.int32: "i32", torch.uint8: "u8"}[value.dtype]
        return ty, "D" if align and value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        ty = "i32" if -2**31 <= value < 2**31 else "i64"
        return ty, "D" if specialize and align and value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"cannot specialize {type(value)}")


def specialize(launch: Launch) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``triton.compiler.ASTSource``, bound from the launch's
    own arguments the way the JIT binds them at launch time."""
    kernel = launch.kernel
    bound = dict(zip(kernel.arg_names, launch.args))
    overlap = set(bound) & set(launch.constexprs)
    if overlap or len(launch.args) > len(kernel.arg_names):
        raise TypeError(f"{kernel.__name__}: arguments bound twice or too many: {sorted(overlap)}")
    bound.update(launch.constexprs)
    missing = [n for n in kernel.arg_names if n not in bound]
    if missing:
        raise TypeError(f"{kernel.__name__}: unbound parameters {missing}")
    backend = _nvidia_backend()
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, attr = _specialize_arg(backend, value, p.is_const, not p.do_not_specialize,
                                   not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
        elif isinstance(attr, str):
            parsed = backend.parse_attr(attr)
            if parsed:
                attrs[(i,)] = parsed
    return signature, constexprs, attrs


def compile_key(launch: Launch) -> str:
    """Identifies the compiled kernel a launch binds to (kernel, signature, constexprs, divisibility,
    options); launches with the same key are compiled once."""
    signature, constexprs, attrs = specialize(launch)
    text = repr((launch.kernel.__name__, sorted(signature.items()), sorted((k, repr(v)) for k, v in constexprs.items()),
                 sorted((k, repr(v)) for k, v in attrs.items()), sorted(launch.options.items())))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- compiling
_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _parse_ptxas(log: str) -> dict | None:
    found = {k: rx.search(log) for k, rx in _PTXAS.items()}
    if not all(found.values()):
        return None
    return {k: int(m.group(1)) for k, m in found.items()}


def compile_launch(launch: Launch, arch: int, results_dir: str | None = None) -> dict:
    """Compiles the launch for ``sm_<arch>``: ``{regs, spill_stores, spill_loads, stack, shared,
    num_warps, num_stages, maxnreg, hash}``, or ``{error: ...}`` when it does not compile.

    Registers and spills come from ptxas' own ``-v`` log of the compile (TRITON_DUMP_PTXAS_LOG);
    a kernel Triton already had in its cache is looked up in ``results_dir`` (written here on every
    compile), or compiled again when it is not there.
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    signature, constexprs, attrs = specialize(launch)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    options = {k: v for k, v in launch.options.items() if v is not None}
    target = GPUTarget("cuda", arch, 32)
    saved = os.path.join(results_dir, "{}.json") if results_dir else None
    usage = None
    for attempt in range(2):  # the second compiles again: a kernel from Triton's cache whose log is gone
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), knobs.nvidia.scope(), knobs.compilation.scope():
                knobs.nvidia.dump_ptxas_log = True
                knobs.compilation.always_compile = attempt > 0
                compiled = triton.compile(src, target=target, options=options)
        except Exception as e:  # noqa: BLE001 -- a compile error is a result, reported
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
            where = f"{lines[0]} ... " if len(lines) > 2 else ""  # Triton's: location, source, cause
            return {"error": f"{type(e).__name__}: {where}{' | '.join(lines[-2:])}"[:500]}
        usage = _parse_ptxas(log.getvalue())
        if usage is None and saved and os.path.exists(saved.format(compiled.hash)):
            with open(saved.format(compiled.hash)) as f:
                usage = json.load(f)
        if usage is not None:
            break
    if usage is None:
        return {"error": "no ptxas log for the compiled kernel"}
    if saved:
        os.makedirs(results_dir, exist_ok=True)
        with open(saved.format(compiled.hash), "w") as f:
            json.dump(usage, f)
    meta = compiled.metadata
    return dict(usage, shared=int(meta.shared), num_warps=int(meta.num_warps), num_stages=int(meta.num_stages),
                maxnreg=meta.maxnreg, hash=compiled.hash)


# --------------------------------------------------------------------------- the sweep
def _precision(name: str):
    return _Precision(name == "tf32")


class _Precision(contextlib.ContextDecorator):
    """torch's allow_tf32 for the duration (dot_precision() reads it while planning)."""

    def __init__(self, tf32: bool):
        self.tf32 = tf32

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _state(n, rows, activation, dtype, device):
    from ._common import STATE_OF
    kind = STATE_OF[activation]
    if kind == "mask":
        return torch.empty(n, rows, dtype=torch.uint8, device=device)
    if kind in ("pre", "output"):
        return torch.empty(n, rows, dtype=dtype, device=device)
    return None


def _site_layout(rows):
    offsets, at = [], 0
    for r in rows:
        offsets.append(at)
        at += r
    return offsets, at


def _project_and_align(net, rows, n_out, dtype, prec, batch, activation, device):
    from . import align_step, dfa_project
    out = []
    offsets, total = _site_layout(rows)
    feedback = torch.empty(total, n_out, dtype=dtype, device=device)
    error = torch.empty(batch, n_out, dtype=dtype, device=device)
    sites = [dfa_project.ProjectSite(o, r, activation, _state(batch, r, activation, dtype, device))
             for o, r in zip(offsets, rows)]
    base = dict(net=net, dtype=_DTYPE_NAME[dtype], precision=prec, batch=batch)
    projected, launches = dfa_project.plan_dfa_project(error, feedback, sites, gpu=True)
    for launch in launches:
        out.append(Variant(dict(op="dfa_project", **base), launch, True))
    asites = [align_step.AlignSite(o, r, torch.empty(batch, r, dtype=dtype, device=device),
                                   torch.empty(batch, n_out, dtype=dtype, device=device))
              for o, r in zip(offsets, rows)]
    for deterministic in (False, True):  # fp32 atomics, or per-tile partials summed in tile order
        _, launches = align_step.plan_align_step(feedback, asites, 0.1, gpu=True, deterministic=deterministic)
        for launch in launches:
            out.append(Variant(dict(op="align_step", **base, **{"pass": launch.constexprs["PASS"]},
                                    deterministic=deterministic), launch, True))
    return out, projected, offsets


def _net_variants(net, n_in, hidden, n_out, batches, device) -> list[Variant]:
    from . import dfa_wgrad, jvp_linear
    variants: list[Variant] = []
    widths = (n_in,) + tuple(hidden) + (n_out,)
    empty = functools.partial(torch.empty, device=device)
    for dtype in DTYPES:
        for prec in PRECISIONS:
            with _precision(prec):
                for batch in batches:
                    found, projected, offsets = _project_and_align(net, hidden, n_out, dtype, prec, batch, "relu",
                                                                   device)
                    variants += found
                    deltas = [projected[:, o:o + r] for o, r in zip(offsets, hidden)]
                    deltas.append(empty(batch, n_out, dtype=dtype))  # the output layer's delta: e
                    inputs = [empty(batch, w, dtype=dtype) for w in widths[:-1]]
                    _, launches = dfa_wgrad.plan_dfa_wgrad(deltas, inputs, [True] * len(deltas), gpu=True)
                    base = dict(net=net, dtype=_DTYPE_NAME[dtype], precision=prec, batch=batch)
                    variants += [Variant(dict(op="dfa_wgrad", **base), launch, True) for launch in launches]
                    for layer, (k, m) in enumerate(zip(widths[:-1], widths[1:])):
                        last = layer == len(widths) - 2
                        for act in ((None,) if last else ACTIVATIONS):
                            for bias in (True, False):
                                for n_t in ENGINE_TANGENTS + API_TANGENTS:
                                    x = empty(batch, k, dtype=dtype)
                                    w = empty(m, k, dtype=dtype)
                                    b = empty(m, dtype=dtype) if bias else None
                                    t = empty(n_t, batch, k, dtype=dtype) if n_t else None
                                    _, launches = jvp_linear.plan_jvp_linear(x, w, b, act, t, gpu=True)
                                    for chunk, launch in enumerate(launches):
                                        desc = dict(op="jvp_linear", **base, layer=f"{k}->{m}",
                                                    act=act or "none", bias=bias, tangents=n_t, chunk=chunk)
                                        variants.append(Variant(desc, launch, n_t in ENGINE_TANGENTS))
    return variants


def enumerate_variants() -> list[Variant]:
    """Every launch the engine (and the API) makes at the shapes of ``NETS``, ``CONV_SITES`` and
    ``LARGE_NETS``, for every dtype, precision, batch, activation, bias and tangent count
    (deterministic order)."""
    variants: list[Variant] = []
    for net, n_in, hidden, n_out in NETS:
        variants += _net_variants(net, n_in, hidden, n_out, BATCHES, "cpu")
    for net, rows, n_out in CONV_SITES:
        for dtype in DTYPES:
            for prec in PRECISIONS:
                with _precision(prec):
                    for batch in BATCHES:
                        variants += _project_and_align(net, rows, n_out, dtype, prec, batch, "relu", "cpu")[0]
    for net, n_in, hidden, n_out in LARGE_NETS:  # no memory behind them: shapes and addresses only
        variants += _net_variants(net, n_in, hidden, n_out, LARGE_BATCHES, "meta")
    unique: dict[str, Variant] = {}
    for v in variants:  # a net with two layers of one shape makes the same launches twice
        unique.setdefault(variant_id(v), v)
    variants = list(unique.values())
    for v in variants:
        v.key = compile_key(v.launch)
    return variants


def sample(variants: list[Variant]) -> list[Variant]:
    """A deterministic covering sample: per op, greedily the compiled kernels that cover the most
    not yet covered PAIRS of axis values (``_axes``: dtype x precision, activation x tangent tile,
    alignment x index width, ...), so every pair the full sweep has is compiled at least once; then
    one kernel per block configuration (tiles, warps, stages, per dtype) not covered yet. Returns
    every variant that binds to a chosen kernel."""
    chosen: list[Variant] = []
    by_op: dict[str, list[Variant]] = {}
    for v in variants:
        by_op.setdefault(v.desc["op"], []).append(v)
    for group in by_op.values():
        # A compiled kernel covers the pairs of every variant that binds to it.
        cover: dict[str, set] = {}
        candidates: list[Variant] = []
        for v in group:
            if v.key not in cover:
                cover[v.key] = set()
                candidates.append(v)
            cover[v.key] |= set(combinations(sorted(_axes(v).items()), 2))
        todo = set().union(*cover.values())
        while todo:
            best = max(candidates, key=lambda v: len(cover[v.key] & todo))  # first of the best: deterministic
            chosen.append(best)
            todo -= cover[best.key]
        configs = {_config(v) for v in chosen}
        for v in candidates:
            if _config(v) not in configs:
                configs.add(_config(v))
                chosen.append(v)
    keys = {v.key for v in chosen}
    return [v for v in variants if v.key in keys]


def _axes(v: Variant) -> dict:
    """What the sample covers pairwise: the variant's dtype, precision, batch (a multiple of 16 or
    not), activation, bias, tangent tile, align_step's deterministic path, and the alignments the
    launcher derived (ALIGN_*)."""
    d, c = v.desc, v.launch.constexprs
    axes = {"dtype": d["dtype"], "precision": d["precision"], "batch16": d["batch"] % 16 == 0}
    axes.update({k: x for k, x in c.items()
                 if k.startswith("ALIGN") or k in ("PASS", "DETERMINISTIC", "T_PAD", "STORE_PRIMAL", "INDEX")})
    if d["op"] == "jvp_linear":
        axes.update(act=d["act"], bias=d["bias"])
    return {k: str(x) for k, x in axes.items()}


def _config(v: Variant) -> tuple:
    """The block configuration: tile sizes, warps, stages (and the dtype they are chosen for)."""
    c = v.launch.constexprs
    return (v.desc["op"], v.desc["dtype"], tuple(sorted((k, x) for k, x in c.items() if k.startswith("BLOCK_"))),
            v.launch.num_warps, v.launch.num_stages)


# --------------------------------------------------------------------------- running and reporting
def compile_variants(variants: list[Variant], archs=ARCHS, shard: tuple[int, int] = (0, 1),
                     results_dir: str | None = None) -> dict[str, dict]:
    """``{f"{key}@{arch}": result}`` for this shard's share of the distinct compiled kernels."""
    units = sorted({(v.key, arch): v for v in variants for arch in archs}.items())
    index, count = shard
    out = {}
    for i, ((key, arch), v) in enumerate(units):
        if i % count != index:
            continue
        t0 = time.perf_counter()
        res = compile_launch(v.launch, arch, results_dir)
        res["seconds"] = round(time.perf_counter() - t0, 3)
        out[f"{key}@{arch}"] = res
    return out


def failures(variants: list[Variant], results: dict[str, dict], archs=ARCHS) -> list[str]:
    """What makes the check fail: a compile error, shared memory over the target's limit, or a
    spill in a kernel the engine launches (one line each)."""
    bad = []
    for first, group in _groups(variants):
        engine = any(v.engine for v in group)
        for arch in archs:
            r = results.get(f"{first.key}@{arch}")
            where = f"sm_{arch} {variant_id(first)}"
            if r is None:
                bad.append(f"{where}: not compiled")
            elif "error" in r:
                bad.append(f"{where}: {r['error']}")
            else:
                if r["shared"] > SHARED_LIMIT[arch]:
                    bad.append(f"{where}: {r['shared']} B shared memory > {SHARED_LIMIT[arch]} B")
                if engine and (r["spill_stores"] or r["spill_loads"]):
                    bad.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
                               f"({r['regs']} registers)")
    return bad


def _blocks_text(launch: Launch) -> str:
    c = launch.constexprs
    blocks = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R") if k in c)
    return f"{blocks} w{launch.num_warps} s{launch.num_stages} r{launch.maxnreg}"


def variant_id(v: Variant) -> str:
    """A short stable name of the variant: op, net, dtype, precision, batch, and the op's own axes."""
    d = dict(v.desc)
    parts = [d.pop("op"), d.pop("net"), d.pop("dtype"), d.pop("precision"), f"N{d.pop('batch')}"]
    if "layer" in d:
        parts += [d.pop("layer"), d.pop("act"), "bias" if d.pop("bias") else "nobias", f"T{d.pop('tangents')}"]
        chunk = d.pop("chunk")
        if chunk:
            parts.append(f"chunk{chunk}")
    parts += [f"{k}{x}" for k, x in d.items()]
    return " ".join(parts)


def _groups(variants: list[Variant]) -> list[tuple[Variant, list[Variant]]]:
    """(first variant, all variants) per compiled kernel, in the variants' order."""
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.key, []).append(v)
    return [(vs[0], vs) for vs in groups.values()]


def report(variants: list[Variant], results: dict[str, dict], archs=ARCHS, baseline: dict | None = None,
           elapsed: float | None = None) -> str:
    """A table, one row per compiled kernel and target: the first variant that binds to it (and how
    many more do), tiles / warps / stages, registers, spill stores / loads (bytes), stack frame,
    shared memory; and that variant's registers and spills in ``baseline`` (``baseline_entries`` of
    an earlier run: the kernels before the alignment / tiling changes)."""
    head = (f"{'variant (first of those binding to the kernel)':<76} {'+n':>4} {'arch':<5} {'tiles warps stages':<20} "
            f"{'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6} | {'before: regs spill st/ld':>24}  used by")
    lines = [head, "-" * len(head)]
    rows = spilling = spilling_engine = spilling_before = 0
    for first, group in _groups(variants):
        engine = any(v.engine for v in group)
        for arch in archs:
            r = results.get(f"{first.key}@{arch}")
            if r is None:
                continue
            rows += 1
            name = variant_id(first)
            if "error" in r:
                lines.append(f"{name:<76} {len(group) - 1:>4} sm_{arch:<2} ERROR {r['error']}")
                continue
            before = (baseline or {}).get(f"{name}@sm{arch}")
            btext = f"{before[0]:>4} {before[1]:>5}/{before[2]:<5}" if before else "-"
            if r["spill_stores"] or r["spill_loads"]:
                spilling += 1
                spilling_engine += engine
            if before and (before[1] or before[2]):
                spilling_before += 1
            lines.append(f"{name:<76} {len(group) - 1:>4} sm_{arch:<2} {_blocks_text(first.launch):<20} "
                         f"{r['regs']:>4} {r['spill_stores']:>5}/{r['spill_loads']:<5} {r['stack']:>5} "
                         f"{r['shared']:>6} | {btext:>24}  {'engine' if engine else 'api'}")
    tail = (f"{rows} kernel x target rows ({len(variants)} variants); {spilling} spill "
            f"({spilling_engine} of them used by the engine)")
    if baseline:
        tail += f"; {spilling_before} of these variants spilled before"
    if elapsed is not None:
        tail += f"; {elapsed:.1f} s"
    lines += ["-" * len(head), tail]
    return "\n".join(lines)


def baseline_entries(variants: list[Variant], results: dict[str, dict], archs=ARCHS) -> dict:
    """``{f"{variant_id}@sm{arch}": [regs, spill stores, spill loads, shared]}``, for ``report``'s
    baseline)."""
    out = {}
    for v in variants:
        for arch in archs:
            r = results.get(f"{v.key}@{arch}")
            if r and "error" not in r:
                out[f"{variant_id(v)}@sm{arch}"] = [r["regs"], r["spill_stores"], r["spill_loads"], r["shared"]]
    return out


def default_cache() -> str:
    """Where compiled kernels are kept between runs: Triton's cache and the ptxas numbers."""
    return os.path.join(tempfile.gettempdir(), f"fastdfa-aot-triton-{triton.__version__}")


def _select(full: bool) -> list[Variant]:
    variants = enumerate_variants()
    return variants if full else sample(variants)


def _compile_shard(full: bool, archs: tuple[int, ...], shard: tuple[int, int], cache: str) -> dict:
    """A worker process' share (enumerates the same variants deterministically)."""
    return compile_variants(_select(full), archs, shard, os.path.join(cache, "ptxas"))


def run(full: bool = False, archs: tuple[int, ...] = ARCHS, jobs: int = 1, cache: str | None = None,
        baseline: dict | None = None) -> tuple[list[Variant], dict, list[str], str]:
    """Compiles the sample (or every variant) with ``jobs`` processes: ``(variants, results,
    failures, report)``."""
    t0 = time.perf_counter()
    cache = cache or default_cache()
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")  # read by Triton and the workers
    variants = _select(full)
    if jobs <= 1:
        results = _compile_shard(full, archs, (0, 1), cache)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = [pool.submit(_compile_shard, full, archs, (i, jobs), cache) for i in range(jobs)]
            results = {}
            for part in parts:
                results.update(part.result())
    bad = failures(variants, results, archs)
    text = report(variants, results, archs, baseline, time.perf_counter() - t0)
    text += "".join(f"\nFAIL {b}" for b in bad)
    return variants, results, bad, text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every variant (default: the covering sample)")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    parser.add_argument("--cache", help=f"compiled kernels kept here between runs (default {default_cache()})")
    parser.add_argument("--baseline", help="JSON of earlier numbers to show next to these (baseline_entries)")
    parser.add_argument("--report", help="write the table here (default: stdout)")
    parser.add_argument("--json", help="write {results, failures, baseline entries} here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: under the interpreter there is nothing to compile")
    archs = tuple(int(a) for a in args.arch.split(","))
    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)
    variants, results, bad, text = run(args.full, archs, args.jobs, args.cache, baseline)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "failures": bad, "entries": baseline_entries(variants, results, archs)},
                      f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
