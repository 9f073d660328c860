"""The chunked PyTorch path (`abkd.kernels.torch_chunked`): chunking, what it saves for backward, its evaluation plan.
Its values and gradients against the mpmath reference, through the front, are in test_core.py."""
import torch

from abkd.core import ab_divergence
from abkd.gradients import saved_tensor_bytes
from abkd.kernels.torch_chunked import ab_divergence_chunked, ab_plan
from cases import randn


def test_chunk_boundaries_do_not_change_the_result():
    s, t = randn(7, 300, seed=27).requires_grad_(), randn(7, 300, seed=28)
    base = ab_divergence_chunked(s, t, 0.2, 0.7, 1.0, 7 * 300)
    (g_base,) = torch.autograd.grad(base.sum(), s)
    for chunk in (1, 300, 900, 1000):
        v = ab_divergence_chunked(s, t, 0.2, 0.7, 1.0, chunk)
        (g,) = torch.autograd.grad(v.sum(), s)
        torch.testing.assert_close(v, base, rtol=1e-14, atol=0)
        torch.testing.assert_close(g, g_base, rtol=1e-14, atol=1e-18)


def test_chunked_saves_only_inputs_and_2n_numbers():
    s, t = randn(16, 500, seed=33).requires_grad_(), randn(16, 500, seed=34)
    extra = saved_tensor_bytes(lambda s, t: ab_divergence(s, t, 0.2, 0.7, impl="chunked", reduction="sum"), s, t)
    assert extra <= 2 * 16 * 8 + 64


def test_plan_series_length_and_psi_branch():
    p = ab_plan(0.2, 0.7, torch.float32)
    assert 1.0 <= p.tau <= 1.25 and not p.psi_needs_series      # τ = 0.25·0.9/0.2
    assert ab_plan(1e-7, 0.7, torch.float32).psi_needs_series   # a near-zero gap: ψ keeps its series
    assert len(ab_plan(0.2, 0.7, torch.float64).f_series) > len(p.f_series)
