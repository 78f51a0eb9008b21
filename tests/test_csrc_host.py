"""csrc/'s CUDA kernels RUN on the CPU: each .cu is compiled by g++ against the host emulation in
tests/cuda_host/ (blocks of std::threads, __syncthreads as a barrier, warp shuffles exchanged between
warp barriers) and its host launcher is called through ctypes on torch CPU tensors; the results are
checked against the PyTorch references in float64 with tests/tolerance.py's rule. The nvcc checks
(tests/test_csrc.py) prove the kernels compile for the GPU; these prove what they compute.
What the emulation cannot show: races between blocks, memory coalescing, speed."""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tolerance import assert_matches_reference

from fastdfa.activations import ACTIVATION_CODES, STATE_OF, apply_activation, derivative_from_state
from fastdfa.ops.align_step import column_step

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HOST = Path(__file__).resolve().parent / "cuda_host"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# `name<T><<<grid, block, smem, stream>>>(` -> `fastdfa_emu::launch(name<T>, grid, block, smem, stream)(`
LAUNCH = re.compile(r"(\w+(?:<[\w\s:]*>)?)\s*<<<(.*?)>>>", re.S)


def emulated_source(cu: Path) -> str:
    text = cu.read_text()
    out, n = LAUNCH.subn(r"fastdfa_emu::launch(\1, \2)", text)
    assert n == text.count("<<<"), f"{cu.name}: a launch the rewrite does not understand"
    return out


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    build = tmp_path_factory.mktemp("csrc_host")
    for header in list(CSRC.glob("*.h")) + list(CSRC.glob("*.cuh")):
        shutil.copy(header, build / header.name)
    sources = []
    for cu in sorted(CSRC.glob("*.cu")):
        target = build / (cu.stem + ".cpp")
        target.write_text(emulated_source(cu))
        sources.append(str(target))
    so = build / "libcsrc_host.so"
    cmd = [gxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-I", str(HOST), "-I", str(build),
           *sources, str(HOST / "capi.cpp"), "-o", str(so)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "_Float16" in proc.stderr:
        pytest.skip("this g++ has no _Float16 (GCC >= 12 on x86-64 needed for the __half emulation)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(so))


def _p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


I64 = ctypes.c_int64

# --------------------------------------------------------------------------- dual_activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu", None])
@pytest.mark.parametrize("numel, tangents", [(1, 1), (777, 2), (300, 0)])
def test_dual_activation(lib, dtype, activation, numel, tangents):
    torch.manual_seed(numel + tangents)
    a = (torch.randn(numel) * 2).to(dtype)
    u = torch.randn(tangents, numel).to(dtype)
    h, dh = torch.empty_like(a), torch.empty_like(u)
    kind = STATE_OF[activation]
    state = torch.full((numel,), 7, dtype=torch.uint8) if kind == "mask" else \
        torch.empty_like(a) if kind == "pre" else None
    rc = lib.emu_dual_activation(DTYPE_CODES[dtype], ACTIVATION_CODES[activation], _p(a), _p(u if tangents else None),
                                 I64(numel), tangents, _p(h), _p(dh if tangents else None), _p(state))
    assert rc == 0
    a64 = a.double()
    ref_h = apply_activation(a64, activation)
    d64 = derivative_from_state(ref_h if kind == "output" else a64, activation, torch.float64)
    assert_matches_reference(h, ref_h, apply_activation(a, activation), f"h {activation}")
    if tangents:
        d_at = derivative_from_state(apply_activation(a, activation) if kind == "output" else a, activation, dtype)
        assert_matches_reference(dh, d64 * u.double(), d_at * u, f"dh {activation}")
    if kind == "mask":
        assert torch.equal(state, (a > 0).to(torch.uint8))
    if kind == "pre":
        assert torch.equal(state, a)

# --------------------------------------------------------------------------- dfa_project epilogue


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dfa_project_epilogue_every_site_in_one_launch(lib, dtype):
    """out[:, site] *= g'(state) for five sites of different widths and activations (one unclaimed, one
    with no activation), in a block with a leading dimension wider than the sites, in place."""
    torch.manual_seed(1)
    n = 9  # 300-wide sites still take several 256-element chunks of the grid's x
    specs = [("relu", 300), ("tanh", 5), (None, 17), ("gelu", 260), ("sigmoid", 33), ("relu", 0)]
    total = sum(r for _, r in specs) + 3  # 3 trailing columns no site owns
    out = torch.randn(n, total).to(dtype)
    before = out.clone()
    rows, states, offset = [], [], 0
    for act, r in specs:
        kind = STATE_OF[act]
        a = torch.randn(n, r + 4)[:, 2:2 + r]  # a strided view: the state's row stride is not its width
        if kind == "mask":
            state = (a > 0).to(torch.uint8)
        elif kind == "output":
            state = apply_activation(a, act).to(dtype)
        elif kind == "pre":
            state = a.to(dtype)
        else:
            state = None
        if state is not None and kind != "mask":
            state = torch.randn(n, r + 4).to(dtype)[:, 2:2 + r].copy_(state)
        states.append(state)
        code = ACTIVATION_CODES[act] if state is not None else 0
        rows.append([offset, r, code, state.data_ptr() if state is not None else 0,
                     state.stride(0) if state is not None else 0])
        offset += r
    table = torch.tensor(rows, dtype=torch.int64)
    max_rows = max(r for _, r in specs)
    assert lib.emu_dfa_project_epilogue(DTYPE_CODES[dtype], _p(out), I64(total), I64(n), _p(table),
                                        len(specs), I64(max_rows)) == 0
    offset = 0
    for (act, r), state in zip(specs, states):
        block, orig = out[:, offset:offset + r], before[:, offset:offset + r]
        if state is None:
            assert torch.equal(block, orig), f"site at {offset} changed without an epilogue"
        else:
            ref64 = orig.double() * derivative_from_state(state.double() if state.dtype != torch.uint8 else state,
                                                          act, torch.float64)
            at_dtype = orig * derivative_from_state(state, act, dtype)
            assert_matches_reference(block, ref64, at_dtype, f"epilogue {act}")
        offset += r
    assert torch.equal(out[:, offset:], before[:, offset:]), "columns past the sites changed"

# --------------------------------------------------------------------------- align_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_align_step_all_sites(lib, dtype):
    """Sites of 1, 300 (more rows than threads) and 40 rows, one with a zero column of J (no step, only
    the normalisation), feedback with a row stride wider than k: the kernel equals align.column_step."""
    torch.manual_seed(2)
    k, lr = 6, 0.7
    sizes = [1, 300, 40]
    total = sum(sizes)
    full = torch.randn(total, k + 2).to(dtype)
    padding = full[:, k:].clone()
    fb = full[:, :k]  # ldf = k + 2
    j = torch.randn(total, k)
    j[1:301, 3] = 0.0
    offsets = torch.tensor([0, 1, 301], dtype=torch.int64)
    rows = torch.tensor(sizes, dtype=torch.int64)
    cos = torch.full((len(sizes), k), float("nan"))
    fb_before = fb.clone()
    assert lib.emu_align_step(DTYPE_CODES[dtype], _p(fb), I64(fb.stride(0)), _p(j), I64(k), _p(offsets),
                              _p(rows), len(sizes), ctypes.c_float(lr), _p(cos)) == 0
    for s, (o, r) in enumerate(zip(offsets.tolist(), sizes)):
        new64, cos64 = column_step(fb_before[o:o + r].double(), j[o:o + r].double(), lr)
        new_at, cos_at = column_step(fb_before[o:o + r].float(), j[o:o + r], lr)  # torch in the kernel's fp32
        assert_matches_reference(cos[s], cos64, cos_at, f"cosines site {s}")
        assert_matches_reference(fb[o:o + r], new64, new_at.to(dtype), f"feedback site {s}")
    assert torch.equal(full[:, k:], padding), "the columns between k and the row stride changed"


def test_launches_with_nothing_to_do_touch_nothing(lib):
    out = torch.randn(4, 3)
    before = out.clone()
    table = torch.zeros(0, 5, dtype=torch.int64)
    assert lib.emu_dfa_project_epilogue(0, _p(out), I64(3), I64(4), _p(table), 0, I64(0)) == 0
    assert lib.emu_dual_activation(0, 1, _p(out), _p(None), I64(0), 0, _p(out), _p(None), _p(None)) == 0
    assert torch.equal(out, before)
    assert lib.emu_dual_activation(7, 1, _p(out), _p(None), I64(12), 0, _p(out), _p(None), _p(None)) != 0  # bad dtype
