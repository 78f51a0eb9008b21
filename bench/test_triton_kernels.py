"""GPU benchmarks of the Triton kernels (each against its PyTorch reference and, where ``fastdfa._C``
is built, against the cuda backend's op: cuBLAS GEMMs plus the csrc/ epilogue kernels) and of whole
DFA steps.

    python -m pytest bench/test_triton_kernels.py --fastdfa-record bench/results/triton-<gpu>.json

Skipped without a CUDA GPU: the interpreter's timings mean nothing.
``FASTDFA_BENCH_SMOKE=1`` runs the same code on tiny shapes under
``TRITON_INTERPRET=1`` to check the plumbing; it refuses to record.

Every timed function ends with ``torch.cuda.synchronize()`` (eager timing:
the launch and the kernel both count). Each group's methods are also timed
interleaved, round after round (``fastdfa.lab.steptime``), and the recorded ratios
are the interleaved ones: a shared GPU drifts too.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastdfa
from fastdfa.lab.steptime import interleaved_step_ms
from fastdfa.models import make_mlp

SMOKE = os.environ.get("FASTDFA_BENCH_SMOKE") == "1"
if not torch.cuda.is_available() and not SMOKE:
    pytest.skip("GPU benchmarks: no CUDA GPU here (FASTDFA_BENCH_SMOKE=1 runs the plumbing on CPU)",
                allow_module_level=True)
if SMOKE and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("smoke mode on CPU needs TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from fastdfa.triton_kernels import align_step, dfa_project, dfa_wgrad, jvp_linear  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (batch, input, hidden widths, outputs) for the step benchmarks; issue "Core"'s MLP first.
STEP_SHAPES = [(256, 784, (1024,) * 4, 10), (1024, 1024, (4096,) * 4, 10)] if not SMOKE else [(8, 12, (16,) * 3, 4)]
# (batch, width, layers, n_out) for the kernel benchmarks.
KERNEL_SHAPES = [(256, 1024, 4, 10), (1024, 4096, 4, 100)] if not SMOKE else [(8, 16, 3, 4)]
DTYPES = [torch.float32, torch.bfloat16] if not SMOKE else [torch.float32]
ROUNDS = 50 if not SMOKE else 2


def _cuda_ops():
    """The cuda backend's ops (``fastdfa.backends.cuda_ops``) when ``fastdfa._C`` is built and a GPU is here, else None.

    They answer issue 4's "cuBLAS with a separate epilogue, or a hand kernel: measure which wins": each
    kernel group below times the fused Triton kernel against cuBLAS + one csrc/ epilogue launch."""
    from fastdfa.backends import backend_status, get_backend
    from fastdfa.backends.cuda_ops import CudaBackend, EmulatedC

    if SMOKE and DEVICE.type != "cuda":
        return CudaBackend(EmulatedC)  # plumbing only: the same calls into the kernels' torch emulation
    return get_backend("cuda") if DEVICE.type == "cuda" and backend_status("cuda").available else None


CUDA_OPS = _cuda_ops()


def _with_cuda(fns, name, fn):
    """fns plus the cuda op under ``name`` when the extension is built (else fns unchanged)."""
    return {**fns, name: fn} if CUDA_OPS is not None else fns


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn):
    def run(_round=None):
        fn()
        _sync()
    return run


def _bench(benchmark, record_step, record_interleaved, group, fns):
    """pytest-benchmark times the first method (the kernel); all methods are timed interleaved."""
    first = next(iter(fns))
    benchmark.group = group
    benchmark.pedantic(_timed(fns[first]), rounds=ROUNDS, iterations=1, warmup_rounds=3)
    record_step(group, first, benchmark)
    record_interleaved(group, interleaved_step_ms({k: _timed(v) for k, v in fns.items()}, rounds=ROUNDS,
                                                  warmup=3, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_dfa_project(benchmark, record_step, record_interleaved, shape, dtype):
    n, width, layers, n_out = shape
    e = torch.randn(n, n_out, device=DEVICE, dtype=dtype)
    f = torch.randn(width * layers, n_out, device=DEVICE, dtype=dtype)
    masks = [(torch.randn(n, width, device=DEVICE) > 0).to(torch.uint8) for _ in range(layers)]
    sites = [dfa_project.ProjectSite(i * width, width, "relu", masks[i]) for i in range(layers)]
    _bench(benchmark, record_step, record_interleaved, f"dfa_project-{n}x{width}x{layers}-o{n_out}-{dtype}",
           _with_cuda({"triton": lambda: dfa_project.dfa_project(e, f, sites),
                       "torch": lambda: dfa_project.dfa_project_reference(e, f, sites)},
                      "cuda", lambda: CUDA_OPS.dfa_project(e, f, sites)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_dfa_wgrad(benchmark, record_step, record_interleaved, shape, dtype):
    """The grouped launch against per-layer cuBLAS GEMMs (one stream; issue 4 adds streams)."""
    n, width, layers, _ = shape
    deltas = [torch.randn(n, width, device=DEVICE, dtype=dtype) for _ in range(layers)]
    inputs = [torch.randn(n, width, device=DEVICE, dtype=dtype) for _ in range(layers)]
    bias = [True] * layers
    _bench(benchmark, record_step, record_interleaved, f"dfa_wgrad-{n}x{width}x{layers}-{dtype}",
           _with_cuda({"triton": lambda: dfa_wgrad.dfa_wgrad(deltas, inputs, bias),
                       "torch": lambda: dfa_wgrad.dfa_wgrad_reference(deltas, inputs, bias)},
                      "cuda-4-streams", lambda: CUDA_OPS.dfa_wgrad(deltas, inputs, bias, streams=4)))


@pytest.mark.parametrize("tangents", [0, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_jvp_linear(benchmark, record_step, record_interleaved, shape, dtype, tangents):
    n, width, _, _ = shape
    x = torch.randn(n, width, device=DEVICE, dtype=dtype)
    w = torch.randn(width, width, device=DEVICE, dtype=dtype) / math.sqrt(width)
    b = torch.randn(width, device=DEVICE, dtype=dtype)
    dx = torch.randn(tangents, n, width, device=DEVICE, dtype=dtype) if tangents else None
    _bench(benchmark, record_step, record_interleaved, f"jvp_linear-{n}x{width}-t{tangents}-{dtype}",
           _with_cuda({"triton": lambda: jvp_linear.jvp_linear(x, w, b, "relu", dx),
                       "torch": lambda: jvp_linear.jvp_linear_reference(x, w, b, "relu", dx)},
                      "cuda", lambda: CUDA_OPS.jvp_linear(x, w, b, "relu", dx)))


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_align_step(benchmark, record_step, record_interleaved, shape):
    n, width, layers, n_out = shape
    fb = torch.randn(width * layers, n_out, device=DEVICE)
    sites = [align_step.AlignSite(i * width, width, torch.randn(n, width, device=DEVICE),
                                  torch.randn(n, n_out, device=DEVICE)) for i in range(layers)]
    fb_ref, fb_cuda, fb_det = fb.clone(), fb.clone(), fb.clone()
    # "triton-deterministic": per-tile partials summed in tile order instead of fp32 atomics; its
    # ratio to "triton" decides whether it becomes the only path (docs/kernels.md, under 5%)
    _bench(benchmark, record_step, record_interleaved, f"align_step-{n}x{width}x{layers}-o{n_out}",
           _with_cuda({"triton": lambda: align_step.align_step(fb, sites, 0.1),
                       "triton-deterministic": lambda: align_step.align_step(fb_det, sites, 0.1, deterministic=True),
                       "torch": lambda: align_step.align_step_reference(fb_ref, sites, 0.1)},
                      "cuda", lambda: CUDA_OPS.align_step(fb_cuda, sites, 0.1)))


def _step(method, backend, shape, dtype, wgrad="grouped"):
    n, n_in, widths, n_out = shape
    torch.manual_seed(0)
    model = make_mlp(n_in, widths, n_out).to(DEVICE, dtype)
    dfa = fastdfa.DFA(model, mode=method, seed=0, backend=backend, wgrad=wgrad)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(n, n_in, device=DEVICE, dtype=dtype)
    t = torch.randint(0, n_out, (n,), device=DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(dfa(x), t).backward()
        opt.step()
    return step


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=str)
def test_dfa_step_triton_against_bp(benchmark, record_step, record_interleaved, shape, dtype):
    """Whole training steps: DFA with the triton backend (grouped and per-layer weight gradients),
    DFA with the torch backend, and BP, on the same MLP and batch."""
    n, n_in, widths, n_out = shape
    fns = {"dfa-triton": _step("dfa", "triton", shape, dtype),
           "dfa-triton-per-layer": _step("dfa", "triton", shape, dtype, wgrad="per-layer"),
           "dfa-torch": _step("dfa", "torch", shape, dtype),
           "bp": _step("bp", "torch", shape, dtype)}
    _bench(benchmark, record_step, record_interleaved,
           f"step-mlp-{n_in}x{widths[0]}x{len(widths)}-o{n_out}-b{n}-{dtype}", fns)
