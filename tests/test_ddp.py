"""DistributedDataParallel (gloo, 2 CPU processes) gives the gradients of one process on the combined batch."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_and_data(dtype=torch.float64):
    import fastdfa
    from fastdfa.models import make_cnn

    torch.manual_seed(0)
    model = make_cnn((1, 8, 8), 4, channels=(3, 4), hidden=6).to(dtype)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64).to(dtype)
    t = torch.randint(0, 4, (8,))
    return fastdfa, model, x, t


def _worker(rank, world, init_file, out_dir, mode, backend):
    sys.path.insert(0, os.path.join(ROOT, "python"))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fastdfa, model, x, t = _model_and_data(DTYPE[backend])
        ddp = torch.nn.parallel.DistributedDataParallel(fastdfa.DFA(model, mode=mode, seed=3, backend=backend))
        shard = slice(rank * 4, rank * 4 + 4)
        F.cross_entropy(ddp(x[shard]), t[shard]).backward()
        torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, f"grads{rank}.pt"))
        # Both ranks done before teardown, and the reducer gone before its process group: without
        # this a rank's gloo threads were occasionally torn down mid-exchange (SIGABRT, 1 run in 8).
        dist.barrier()
        del ddp
    finally:
        dist.destroy_process_group()


# The triton backend runs float32 (its kernels' dtypes); the torch one is checked in float64.
DTYPE = {"torch": torch.float64, "triton": torch.float32}
TOL = {"torch": dict(rtol=1e-10, atol=1e-12), "triton": dict(rtol=1e-4, atol=1e-6)}


@pytest.mark.parametrize("mode,backend", [("dfa", "torch"), ("fa", "torch"), ("dfa", "triton")])
def test_ddp_matches_single_process(tmp_path, mode, backend):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), mode, backend), nprocs=2, join=True)
    fastdfa, model, x, t = _model_and_data(DTYPE[backend])
    F.cross_entropy(fastdfa.DFA(model, mode=mode, seed=3, backend=backend)(x), t).backward()
    single = [p.grad for p in model.parameters()]
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        for g, s in zip(grads, single):
            torch.testing.assert_close(g, s, **TOL[backend])
