"""Feedback matrices: seeded, scaled as documented, buffers that move and save."""

import math

import pytest
import torch
from torch import nn

import fastdfa
from fastdfa.feedback import feedback_matrix, seeded_generator
from fastdfa.models import make_cnn, make_mlp


def _built(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = make_mlp(10, (12, 8), 5).to(dtype)
    return fastdfa.DFA(model, seed=seed, example_input=torch.randn(2, 10, dtype=dtype), **kw)


def test_same_seed_same_feedback_whatever_the_global_rng():
    torch.manual_seed(1)
    a = _built(seed=7)
    torch.manual_seed(999)
    torch.rand(1000)
    b = _built(seed=7)
    for sa, sb in zip(a.sites, b.sites):
        torch.testing.assert_close(sa.feedback, sb.feedback, rtol=0, atol=0)
    fa_a = [m.feedback_weight for m in a.model if isinstance(m, fastdfa.Linear)]
    fa_b = [m.feedback_weight for m in b.model if isinstance(m, fastdfa.Linear)]
    for x, y in zip(fa_a, fa_b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    c = _built(seed=8)
    assert not torch.equal(a.sites[0].feedback, c.sites[0].feedback)


def test_feedback_is_dtype_independent_up_to_the_cast():
    f32 = _built(seed=3, dtype=torch.float32)
    f64 = _built(seed=3, dtype=torch.float64)
    assert f64.sites[0].feedback.dtype == torch.float64
    torch.testing.assert_close(f64.sites[0].feedback.float(), f32.sites[0].feedback, rtol=0, atol=0)


def test_example_input_builds_eagerly_without_touching_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(fastdfa.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), fastdfa.Linear(6, 2))
    stats = model[1].running_mean.clone()
    dfa = fastdfa.DFA(model, example_input=torch.randn(3, 4))
    assert dfa.built and len(dfa.sites) == 1
    torch.testing.assert_close(model[1].running_mean, stats, rtol=0, atol=0)
    assert model.training  # the training flags are restored


def test_lazy_build_on_first_forward():
    dfa = fastdfa.DFA(make_mlp(10, (12,), 5))
    assert not dfa.built and dfa.sites == []
    dfa(torch.randn(2, 10))
    assert dfa.built and [s.name for s in dfa.sites] == ["2"]
    assert dfa.sites[0].feedback.shape == (12, 5)


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_documented_scale(kind):
    """Entries have mean 0 and variance scale^2 / n (n = site elements per sample)."""
    n, rows, cols, scale = 50, 400, 100, 1.5
    values = feedback_matrix((rows, cols), n, kind, seeded_generator(0, "t"), scale, dtype=torch.float64)
    count = rows * cols
    var = scale ** 2 / n
    # Standard errors from the sample size: mean ~ sqrt(var/count); variance ~ var*sqrt(k/count)
    # with k = 2 (gaussian) or 0.8 (uniform, excess kurtosis -1.2); 5 sigma.
    assert abs(values.mean().item()) < 5 * math.sqrt(var / count)
    k = 2.0 if kind == "gaussian" else 0.8
    assert abs(values.var().item() - var) < 5 * var * math.sqrt(k / count)
    if kind == "uniform":
        assert values.abs().max().item() <= scale * math.sqrt(3 / n)


def test_conv_sites_dense_and_channelwise():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    dense = fastdfa.DFA(make_cnn((1, 8, 8), 5, channels=(3, 4), hidden=6), example_input=x)
    chan = fastdfa.DFA(make_cnn((1, 8, 8), 5, channels=(3, 4), hidden=6), conv_feedback="channel", example_input=x)
    assert dense.sites[0].feedback.shape == (3 * 4 * 4, 5)
    assert chan.sites[0].feedback.shape == (3, 5) and chan.sites[0].channelwise
    # Channel-wise feedback is scaled for the C*H*W elements it lands on, like the dense one.
    assert chan.sites[0].features == dense.sites[0].features == 48


def test_feedback_buffers_in_state_dict_and_moved_by_to():
    dfa = _built(seed=1)
    keys = [k for k in dfa.state_dict() if "feedback" in k]
    assert keys == ["feedback.0", "feedback.1", "feedback.fa.0", "feedback.fa.1", "feedback.fa.2",
                    "feedback.site_names", "feedback.grape.seed"]
    # tensors only (safetensors, Trainer's save_model): the site names and GrAPE's stream as tensors too
    assert all(isinstance(v, torch.Tensor) for v in dfa.state_dict().values())
    torch.testing.assert_close(dfa.state_dict()["feedback.1"], dfa.sites[1].feedback, rtol=0, atol=0)
    before = dfa.sites[0].feedback.clone()
    dfa.to(torch.float64)
    assert dfa.sites[0].feedback.dtype == torch.float64
    assert dfa.feedback.flat.dtype == torch.float64
    torch.testing.assert_close(dfa.sites[0].feedback, before.double(), rtol=0, atol=0)
    assert all(m.feedback_weight.dtype == torch.float64 for m in dfa.model if isinstance(m, fastdfa.Linear))


def test_writing_site_feedback_changes_the_projection():
    dfa = _built()
    with torch.no_grad():
        dfa.sites[1].feedback.zero_()
    y = dfa(torch.randn(3, 10))
    y.sum().backward()
    layer_before_site1 = dfa.sites[0].module  # trained by site 1, whose feedback is now zero
    assert torch.count_nonzero(layer_before_site1.weight.grad) == 0
    assert torch.count_nonzero(dfa.model[1].weight.grad) > 0


@pytest.mark.gpu
def test_same_feedback_on_gpu_and_cpu():
    cpu = _built(seed=5)
    torch.manual_seed(0)
    gpu = fastdfa.DFA(make_mlp(10, (12, 8), 5).cuda(), seed=5, example_input=torch.randn(2, 10, device="cuda"))
    for a, b in zip(cpu.sites, gpu.sites):
        torch.testing.assert_close(a.feedback, b.feedback.cpu(), rtol=0, atol=0)
