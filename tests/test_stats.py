"""Single-process tests of the formulas in syncbn._stats (the math without communication).

Summing the per-shard packed moments stands in for the all_reduce: the property is that any split
of a batch into shards, empty ones included, gives the statistics of the whole batch.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from syncbn import _stats

pytestmark = __import__("pytest").mark.timeout(120)


@st.composite
def batches(draw):
    """A random ``(N, C, *)`` float64 batch and a split of N into shards (some may be empty)."""
    channels = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    sizes = draw(st.lists(st.integers(0, 4), min_size=1, max_size=5).filter(lambda s: sum(s) >= 2))
    seed = draw(st.integers(0, 2**16))
    mean = draw(st.sampled_from([0.0, 3.0, -100.0, 1e4]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), channels, *spatial, generator=g, dtype=torch.float64) + mean
    return x, sizes


def _whole(x):
    flat = x.transpose(0, 1).flatten(1)
    return flat.mean(1), flat.var(1, correction=0)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_moments_of_any_split_merge_to_the_whole(batch):
    x, sizes = batch
    channels = x.shape[1]
    merged = sum(_stats.local_moments(s) for s in x.split(sizes))  # the all_reduce
    mean, var, count = _stats.global_mean_var(merged, channels)
    exp_mean, exp_var = _whole(x)
    assert int(count) == x.numel() // channels
    scale = max(1.0, float(exp_mean.abs().max()))
    torch.testing.assert_close(mean, exp_mean, rtol=1e-12, atol=1e-12 * scale)
    # float64 raw moments: relative error ~1e-16 * (mean/std)^2, i.e. 1e-8 at mean/std = 1e4
    torch.testing.assert_close(var, exp_var, rtol=1e-7, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(batches())
def test_grad_input_with_merged_sums_equals_autograd(batch):
    x, sizes = batch
    channels = x.shape[1]
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    weight = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    eps = 1e-5
    # reference: autograd through plain batch norm on the whole batch
    xr = x.clone().requires_grad_()
    torch.nn.functional.batch_norm(xr, None, None, weight, None, True, 0.0, eps).backward(dy)
    # syncbn's math: merged stats, per-shard reductions summed, per-shard grad_input
    mean, var, count = _stats.global_mean_var(sum(_stats.local_moments(s) for s in x.split(sizes)), channels)
    invstd = torch.rsqrt(var + eps)
    parts = [_stats.backward_reduce(d, s, mean, invstd) for d, s in zip(dy.split(sizes), x.split(sizes))]
    sum_dy = sum(p[0] for p in parts)
    sum_dy_xhat = sum(p[1] for p in parts)
    dx = torch.cat([
        _stats.grad_input(d, s, mean, invstd, weight, sum_dy, sum_dy_xhat, count)
        for d, s in zip(dy.split(sizes), x.split(sizes))
    ])
    # Documented bound: float64 raw moments lose ~1e-16 * (mean/std)^2 of the variance; dx is
    # compared on its natural scale |dy| * weight * invstd (dx itself may cancel to ~0).
    ratio = float((mean.abs() / var.sqrt()).max())
    tol = 1e-10 + 1e-15 * ratio**2
    scale = float((dy.abs().amax() * weight * invstd).max())
    torch.testing.assert_close(dx, xr.grad, rtol=tol, atol=tol * scale)


def test_local_moments_of_an_empty_shard_are_zeros():
    out = _stats.local_moments(torch.empty(0, 3, 2))
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.zeros(7, dtype=torch.float64))


def test_float32_moments_resist_cancellation():
    """mean/std = 1e4 in float32: the shifted sums keep the variance to ~1e-7 relative."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 2, 8, 8, generator=g, dtype=torch.float64) + 1e4).float()
    _, var, _ = _stats.global_mean_var(_stats.local_moments(x), 2)
    _, exp_var = _whole(x.double())
    rel = ((var - exp_var).abs() / exp_var).max().item()
    assert rel < 1e-5, rel


def test_update_running_stats_is_torchs_formula():
    rm, rv = torch.full((2,), 0.5), torch.full((2,), 2.0)
    mean = torch.tensor([1.0, -1.0], dtype=torch.float64)
    var = torch.tensor([4.0, 9.0], dtype=torch.float64)
    count = torch.tensor(10.0, dtype=torch.float64)
    _stats.update_running_stats(rm, rv, mean, var, count, 0.25)
    torch.testing.assert_close(rm, torch.tensor([0.75 * 0.5 + 0.25, 0.75 * 0.5 - 0.25]))
    torch.testing.assert_close(rv, torch.tensor([0.75 * 2 + 0.25 * 4 * 10 / 9, 0.75 * 2 + 0.25 * 9 * 10 / 9]))


def test_normalize_keeps_dtype_and_memory_format():
    x = torch.randn(2, 3, 4, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = _stats.normalize(x, torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3), 1e-5)
    assert y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
