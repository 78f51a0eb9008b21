"""``align_step`` (Triton) against its PyTorch reference, and the reference against autograd."""

import pytest
import torch
from tolerance import assert_matches_reference

pytest.importorskip("triton")
from fastdfa.triton_kernels import align_step as op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _problem(batch, widths, n_out, shared, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feedback = torch.randn(sum(widths), n_out, generator=gen, dtype=torch.float64)
    shared_t = torch.randn(batch, n_out, generator=gen, dtype=torch.float64)
    sites, offset = [], 0
    for w in widths:
        p = torch.randn(batch, w, generator=gen, dtype=torch.float64)
        t = shared_t if shared else torch.randn(batch, n_out, generator=gen, dtype=torch.float64)
        sites.append(op.AlignSite(offset, w, p, t))
        offset += w
    return feedback, sites


def _at(sites, dtype, device):
    return [op.AlignSite(s.offset, s.rows, s.perturbation.to(dtype).to(device), s.tangent.to(dtype).to(device))
            for s in sites]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_step_matches_reference(dtype, shared, deterministic):
    """Both paths; the deterministic one on sites of several row tiles (rows > the interpreter's 128-row
    tile), whose per-tile partials are summed in tile order."""
    widths = [300, 5, 140] if deterministic else [37, 5, 70]
    feedback64, sites64 = _problem(29, widths, 11, shared)
    fb = feedback64.to(dtype).to(DEVICE)
    cos = op.align_step(fb, _at(sites64, dtype, DEVICE), lr=0.5, deterministic=deterministic)
    stored64 = _at(sites64, dtype, "cpu")
    ref64, cos64 = op.align_step_reference(feedback64.to(dtype).double(),
                                           [op.AlignSite(s.offset, s.rows, s.perturbation.double(),
                                                         s.tangent.double()) for s in stored64], lr=0.5)
    # PyTorch at fp16 on CPU: fp32 math rounded once (as in the other kernel tests).
    compute = torch.float32 if (dtype == torch.float16 and DEVICE == "cpu") else dtype
    refd, _ = op.align_step_reference(feedback64.to(dtype).to(compute),
                                      [op.AlignSite(s.offset, s.rows, s.perturbation.to(compute),
                                                    s.tangent.to(compute)) for s in stored64], lr=0.5)
    assert_matches_reference(fb.cpu(), ref64, refd.to(dtype), f"align_step {dtype} shared={shared}")
    torch.testing.assert_close(cos.cpu().double(), cos64, rtol=0, atol=5e-3 if dtype != torch.float32 else 1e-5)
    for s in sites64:  # the step turns each column and keeps its norm (feedback_scale survives)
        col_norms = fb.cpu().double()[s.offset:s.offset + s.rows].norm(dim=0)
        before = feedback64.to(dtype).double()[s.offset:s.offset + s.rows].norm(dim=0)
        torch.testing.assert_close(col_norms, before, rtol=1e-5 if dtype == torch.float32 else 5e-3, atol=0)


def test_batch_one_one_site():
    feedback64, sites64 = _problem(1, [13], 3, shared=False, seed=2)
    fb = feedback64.float().to(DEVICE)
    op.align_step(fb, _at(sites64, torch.float32, DEVICE), lr=0.1)
    ref64, _ = op.align_step_reference(feedback64.float().double(), _at(sites64, torch.float32, "cpu"), 0.1)
    ref32, _ = op.align_step_reference(feedback64.float(), _at(sites64, torch.float32, "cpu"), 0.1)
    assert_matches_reference(fb.cpu(), ref64, ref32, "batch 1")


def test_reference_gradient_is_autograd_of_one_minus_mean_cosine():
    """The closed-form dL/dB of the reference equals autograd's, in float64."""
    feedback, sites = _problem(17, [9], 4, shared=False, seed=7)
    b = feedback.clone().requires_grad_(True)
    j = sites[0].perturbation.t() @ sites[0].tangent / 17
    loss = 1 - torch.nn.functional.cosine_similarity(b, j, dim=0, eps=0).mean()
    (grad,) = torch.autograd.grad(loss, b)
    lr = 0.3
    # the step on the unit direction: at |B_j| = 1 the gradient of 1 - mean cos is the one autograd gives
    # for the normalised columns, and the result is scaled back to each column's norm
    norms = feedback.norm(dim=0)
    u = (feedback / norms).requires_grad_(True)
    (grad,) = torch.autograd.grad(1 - torch.nn.functional.cosine_similarity(u, j, dim=0, eps=0).mean(), u)
    want = u.detach() - lr * grad
    want = want / want.norm(dim=0) * norms
    got, cos = op.align_step_reference(feedback, sites, lr)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cos[0], 1 - loss.detach(), rtol=1e-12, atol=1e-12)


def test_repeated_steps_turn_feedback_towards_the_estimate():
    feedback64, sites64 = _problem(64, [24, 40], 6, shared=False, seed=3)
    fb = feedback64.float().to(DEVICE)
    sites = _at(sites64, torch.float32, DEVICE)
    first = op.align_step(fb, sites, lr=2.0)
    for _ in range(30):
        last = op.align_step(fb, sites, lr=2.0)
    assert (first < 0.5).all() and (last > 0.99).all(), (first, last)


def test_dead_column_is_left_as_it_is():
    feedback64, sites64 = _problem(8, [10], 3, shared=False, seed=4)
    t = sites64[0].tangent.clone()
    t[:, 1] = 0  # output unit 1 never moves: J_1 = 0
    sites = [op.AlignSite(0, 10, sites64[0].perturbation.float().to(DEVICE), t.float().to(DEVICE))]
    fb = feedback64.float().to(DEVICE)
    op.align_step(fb, sites, lr=1.0)
    torch.testing.assert_close(fb[:, 1].cpu(), feedback64[:, 1].float())


def test_bad_input_leaves_feedback_untouched():
    feedback64, sites64 = _problem(8, [10], 3, shared=False)
    fb = feedback64.float().to(DEVICE)
    before = fb.clone()
    bad = op.AlignSite(0, 10, sites64[0].perturbation[:, :4].float().to(DEVICE), sites64[0].tangent.float().to(DEVICE))
    with pytest.raises(ValueError, match="perturbation"):
        op.align_step(fb, [bad], lr=1.0)
    with pytest.raises(ValueError, match="outside"):
        op.align_step(fb, [op.AlignSite(5, 10, bad.tangent.new_zeros(8, 10), bad.tangent)], lr=1.0)
    assert torch.equal(fb, before)


def test_the_step_is_scale_free():
    """Scaling the feedback (feedback_scale) scales the result and nothing else: same direction, same cosines."""
    feedback64, sites64 = _problem(16, [12, 7], 5, shared=False, seed=9)
    a, b = feedback64.clone(), feedback64 * 3.0
    new_a, cos_a = op.align_step_reference(a, sites64, 0.7)
    new_b, cos_b = op.align_step_reference(b, sites64, 0.7)
    torch.testing.assert_close(new_b, 3.0 * new_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cos_b, cos_a, rtol=1e-12, atol=1e-12)


def _run(launches, reverse_programs=False):
    for launch in launches:
        args = list(launch.args)
        if reverse_programs:  # program i runs tile (tiles - 1 - i): the atomics add in the other order
            args[4] = args[4].flip(0).contiguous()
        launch.kernel[launch.grid](*args, **launch.constexprs, **launch.options)


def test_deterministic_path_does_not_depend_on_the_order_programs_run():
    """The same step with the programs run in reverse order: bitwise the same feedback and column
    sums on the deterministic path. On the atomic path (interpreter: programs run one after another,
    so the order is exactly the tile table's) the reversed order changes the fp32 sums' last bits --
    what a GPU does from run to run."""
    feedback64, sites64 = _problem(33, [1000, 260], 64, shared=False, seed=6)
    results = {}
    for deterministic in (True, False):
        for reverse in (False, True):
            fb = feedback64.float().to(DEVICE)
            stats, launches = op.plan_align_step(fb, _at(sites64, torch.float32, DEVICE), 0.5,
                                                 deterministic=deterministic)
            assert all(launch.constexprs["DETERMINISTIC"] is deterministic for launch in launches)
            _run(launches, reverse_programs=reverse)
            results[deterministic, reverse] = (fb.cpu(), stats.cpu())
    for a, b in zip(results[True, False], results[True, True]):
        assert torch.equal(a, b)
    if DEVICE == "cpu":
        assert not torch.equal(results[False, False][1], results[False, True][1])
    # and both paths are the same step up to fp32 summation order
    torch.testing.assert_close(results[True, False][0], results[False, False][0], rtol=1e-5, atol=1e-6)


def test_deterministic_is_the_default_under_torch_deterministic_algorithms():
    feedback64, sites64 = _problem(8, [10], 3, shared=False)
    fb = feedback64.float().to(DEVICE)
    sites = _at(sites64, torch.float32, DEVICE)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        on = op.plan_align_step(fb, sites, 0.1)[1]
        torch.use_deterministic_algorithms(False)
        off = op.plan_align_step(fb, sites, 0.1)[1]
    finally:
        torch.use_deterministic_algorithms(was)
    assert [launch.constexprs["DETERMINISTIC"] for launch in on + off] == [True, True, False, False]
