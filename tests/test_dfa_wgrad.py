"""``dfa_wgrad`` (Triton grouped GEMM) against its PyTorch reference."""

import pytest
import torch
from tolerance import assert_matches_reference

pytest.importorskip("triton")
from fastdfa.triton_kernels import dfa_wgrad as op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _check(n, shapes, bias, dtype, seed=0, slice_deltas=False):
    gen = torch.Generator().manual_seed(seed)
    if slice_deltas:  # the deltas as dfa_project leaves them: column blocks of one [N, R] buffer
        total = torch.randn(n, sum(m for m, _ in shapes) + 3, generator=gen, dtype=torch.float64)
        offsets = [sum(m for m, _ in shapes[:i]) for i in range(len(shapes))]
        deltas64 = [total[:, o:o + m] for o, (m, _) in zip(offsets, shapes)]
    else:
        deltas64 = [torch.randn(n, m, generator=gen, dtype=torch.float64) for m, _ in shapes]
    inputs64 = [torch.randn(n, k, generator=gen, dtype=torch.float64) for _, k in shapes]
    if slice_deltas:
        total_d = total.to(dtype).to(DEVICE)
        deltas = [total_d[:, o:o + m] for o, (m, _) in zip(offsets, shapes)]
    else:
        deltas = [d.to(dtype).to(DEVICE) for d in deltas64]
    inputs = [x.to(dtype).to(DEVICE) for x in inputs64]
    out = op.dfa_wgrad(deltas, inputs, bias)
    ref64 = op.dfa_wgrad_reference([d.to(dtype).double() for d in deltas64],
                                   [x.to(dtype).double() for x in inputs64], bias)
    compute = torch.float32 if (dtype == torch.float16 and DEVICE == "cpu") else dtype
    at_dtype = op.dfa_wgrad_reference([d.to(dtype).to(compute) for d in deltas64],
                                      [x.to(dtype).to(compute) for x in inputs64], bias)
    for i, ((dw, db), (rw, rb), (tw, tb)) in enumerate(zip(out, ref64, at_dtype)):
        assert_matches_reference(dw.cpu(), rw, tw.to(dtype), f"dW[{i}] {dtype}")
        if bias[i]:
            assert_matches_reference(db.cpu(), rb, tb.to(dtype), f"db[{i}] {dtype}")
        else:
            assert db is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_layers_odd_shapes(dtype):
    _check(45, [(33, 17), (129, 33), (10, 129), (1, 5)], [True, False, True, True], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_layer_batch_one(dtype):
    _check(1, [(19, 23)], [True], dtype)


def test_deltas_as_column_slices_of_the_projection():
    _check(30, [(20, 12), (7, 20)], [True, True], torch.float32, slice_deltas=True)


def test_batch_larger_than_one_block_row():
    _check(300, [(24, 40)], [True], torch.float32)


def test_tile_table_kept_across_steps_and_inputs_checked():
    deltas = [torch.randn(8, 6, device=DEVICE), torch.randn(8, 4, device=DEVICE)]
    inputs = [torch.randn(8, 5, device=DEVICE), torch.randn(8, 6, device=DEVICE)]
    op.dfa_wgrad(deltas, inputs, [True, True])
    builds = op._TABLES.builds
    op.dfa_wgrad([d.clone() for d in deltas], [x.clone() for x in inputs], [True, True])
    # New addresses (new outputs too) rebuild the group table; the tile table, from shapes alone, is kept.
    assert op._TABLES.builds == builds + 1
    with pytest.raises(ValueError, match="same N"):
        op.dfa_wgrad([deltas[0]], [inputs[0][:4]], [True])
    with pytest.raises(TypeError, match="dtype"):
        op.dfa_wgrad([deltas[0]], [inputs[0].double()], [True])
