"""Tolerances derived from the reference itself (flash-attention's rule, docs/design.md section 4).

A kernel output ``out`` at dtype d passes when

    max|out - ref_fp64| <= 2 * max|torch_at_d - ref_fp64| + ulp_d(max|ref_fp64|)

``torch_at_d`` is the same math done by PyTorch at dtype d: the kernel may be
at most twice as far from the float64 truth as PyTorch itself. The one-ulp
floor covers inputs where PyTorch happens to be exact (error 0), where any
other summation order would otherwise fail.
"""

import torch


def assert_matches_reference(out: torch.Tensor, ref64: torch.Tensor, torch_at_dtype: torch.Tensor, what: str):
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == torch_at_dtype.dtype, f"{what}: dtype {out.dtype} != {torch_at_dtype.dtype}"
    if ref64.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    base = (torch_at_dtype.double() - ref64).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    assert err <= 2 * base + ulp, (f"{what}: max error {err:.3e} vs float64 exceeds 2 x torch's "
                                   f"{base:.3e} + ulp {ulp:.3e}")
