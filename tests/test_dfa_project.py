"""``dfa_project`` (Triton) against its PyTorch reference: fp32 and fp16 (bf16 on GPU only)."""

import pytest
import torch
from tolerance import assert_matches_reference

pytest.importorskip("triton")
from fastdfa.triton_kernels import dfa_project as op  # noqa: E402
from fastdfa.triton_kernels._common import STATE_OF, activation_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _problem(n, n_out, widths, activations, dtype, seed=0):
    """Error, feedback and per-site states from real pre-activations, plus the float64 versions."""
    gen = torch.Generator().manual_seed(seed)
    rows_total = sum(widths)
    error = torch.randn(n, n_out, generator=gen, dtype=torch.float64)
    feedback = torch.randn(rows_total, n_out, generator=gen, dtype=torch.float64) / n_out ** 0.5
    sites, sites64, offset = [], [], 0
    for width, act in zip(widths, activations):
        a = torch.randn(n, width, generator=gen, dtype=torch.float64)
        kind = STATE_OF[act]
        if kind == "mask":
            state, state64 = (a > 0).to(torch.uint8), (a > 0).to(torch.uint8)
        elif kind == "output":
            state64 = activation_reference(a, act).to(dtype).double()  # the state as stored at dtype
            state = state64.to(dtype)
        elif kind == "pre":
            state64 = a.to(dtype).double()
            state = state64.to(dtype)
        else:
            state = state64 = None
        sites.append(op.ProjectSite(offset, width, act, None if state is None else state.to(DEVICE)))
        sites64.append(op.ProjectSite(offset, width, act, state64))
        offset += width
    e, f = error.to(dtype), feedback.to(dtype)
    return (e.to(DEVICE), f.to(DEVICE), sites), (e.double(), f.double(), sites64), (e, f)


def _check(n, n_out, widths, activations, dtype):
    (e, f, sites), (e64, f64, sites64), (e_cpu, f_cpu) = _problem(n, n_out, widths, activations, dtype)
    out = op.dfa_project(e, f, sites)
    ref64 = op.dfa_project_reference(e64, f64, sites64)
    at_dtype = op.dfa_project_reference(e.cpu() if dtype != torch.float16 else e_cpu.float(),
                                        f.cpu() if dtype != torch.float16 else f_cpu.float(),
                                        [op.ProjectSite(s.offset, s.rows, s.activation,
                                                        None if s.state is None else
                                                        (s.state.cpu() if s.state.dtype == torch.uint8
                                                         else s.state.cpu().float()))
                                         for s in sites])
    # PyTorch on CPU has no fp16 GEMM worth the name; its fp16 baseline is the fp32
    # computation rounded to fp16 once, which is the best an fp16-output kernel can do.
    at_dtype = at_dtype.to(dtype)
    assert_matches_reference(out.cpu(), ref64, at_dtype, f"dfa_project {dtype} {widths} {activations}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_sites_every_activation_odd_shapes(dtype):
    _check(37, 10, [33, 70, 5, 129, 18], ["relu", "tanh", "sigmoid", "gelu", None], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_site_batch_one(dtype):
    _check(1, 3, [21], ["relu"], dtype)


def test_wide_output_error_takes_several_k_steps():
    _check(19, 150, [40, 17], ["gelu", "tanh"], torch.float32)


def test_matches_the_engine_reference_without_epilogue():
    """No activation: the kernel equals fastdfa's own one-GEMM projection (fastdfa/ops/dfa_project.py)."""
    from fastdfa.ops.dfa_project import project_to_sites as engine_reference
    gen = torch.Generator().manual_seed(3)
    e, f = torch.randn(9, 4, generator=gen), torch.randn(30, 4, generator=gen)
    layout = [(0, 12, (12,), False), (12, 18, (18,), False)]
    want = torch.cat([p for p in engine_reference(e, f, layout, (9,))], dim=1)
    got = op.dfa_project(e.to(DEVICE), f.to(DEVICE), [op.ProjectSite(0, 12), op.ProjectSite(12, 18)]).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_tables_are_cached_between_calls():
    (e, f, sites), _, _ = _problem(8, 5, [20, 12], ["relu", "tanh"], torch.float32)
    op.dfa_project(e, f, sites)
    builds = op._TABLES.builds
    op.dfa_project(e, f, sites)
    assert op._TABLES.builds == builds, "same shapes and addresses: no new table"
    moved = [op.ProjectSite(s.offset, s.rows, s.activation, s.state.clone()) for s in sites]
    op.dfa_project(e, f, moved)
    assert op._TABLES.builds == builds + 1, "new state addresses: the site table is rebuilt"


def test_bad_state_is_rejected():
    (e, f, sites), _, _ = _problem(8, 5, [20], ["gelu"], torch.float32)
    with pytest.raises(ValueError, match="no saved state"):
        op.dfa_project(e, f, [op.ProjectSite(0, 20, "gelu", None)])
    with pytest.raises(ValueError, match="expected a"):
        op.dfa_project(e, f, [op.ProjectSite(0, 20, "gelu", sites[0].state[:, :5].contiguous())])
