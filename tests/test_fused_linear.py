"""The fused-linear loss (`abkd.kernels.fused_linear`, through the front `abkd.core.ab_divergence_from_hidden`) against
materialized logits, and its input checks."""
import math

import pytest
import torch

from abkd.core import ab_divergence, ab_divergence_from_hidden


@pytest.mark.parametrize("impl", ["chunked", "triton", "reference"])
def test_fused_linear_matches_materialized(impl):
    torch.manual_seed(0)
    hs = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    ws = (torch.randn(120, 8, dtype=torch.float64) / 3).requires_grad_()
    ht, wt = torch.randn(2, 11, 6, dtype=torch.float64), torch.randn(120, 6, dtype=torch.float64) / 3
    mask = torch.rand(2, 11) > 0.3
    out = ab_divergence_from_hidden(hs, ws, (ht, wt), 0.2, 0.7, temperature=2.0, mask=mask, chunk_tokens=4, impl=impl)
    gh, gw = torch.autograd.grad(out, (hs, ws))
    ref = ab_divergence(hs @ ws.T, ht @ wt.T, 0.2, 0.7, temperature=2.0, mask=mask, impl="reference")
    rh, rw = torch.autograd.grad(ref, (hs, ws))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(gh, rh, rtol=0, atol=1e-12 * rh.abs().max().item())
    torch.testing.assert_close(gw, rw, rtol=0, atol=1e-12 * rw.abs().max().item())


def test_fused_linear_all_masked_and_no_grad():
    h, w, t = torch.randn(3, 4), torch.randn(20, 4, requires_grad=True), torch.randn(3, 20)
    out = ab_divergence_from_hidden(h, w, t, 1, 0, mask=torch.zeros(3, dtype=torch.bool), reduction="sum")
    out.backward()
    assert out.item() == 0 and w.grad.abs().sum() == 0
    with torch.no_grad():
        v = ab_divergence_from_hidden(h, w, t, 1, 0)
    torch.testing.assert_close(v, ab_divergence(h @ w.detach().T, t, 1, 0), rtol=1e-5, atol=0)


def test_fused_linear_bad_inputs():
    h, w = torch.randn(4, 8), torch.randn(50, 8)
    with pytest.raises(ValueError, match=r"\[V, 8\]"):
        ab_divergence_from_hidden(h, torch.randn(50, 7), torch.randn(4, 50), 1, 0)
    with pytest.raises(ValueError, match="V=60"):
        ab_divergence_from_hidden(h, w, (torch.randn(4, 6), torch.randn(60, 6)), 1, 0)
    with pytest.raises(ValueError, match="positions"):
        ab_divergence_from_hidden(h, w, (torch.randn(5, 6), torch.randn(50, 6)), 1, 0)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ab_divergence_from_hidden(h, w, torch.randn(4, 50), 1, 0, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="teacher must be"):
        ab_divergence_from_hidden(h, w, [torch.randn(4, 6)], 1, 0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        ab_divergence_from_hidden(h, w, torch.randn(4, 50), float("nan"), 0)
    t = torch.randn(4, 50); t[0] = -math.inf
    with pytest.raises(ValueError, match="all -inf"):
        ab_divergence_from_hidden(h, w, t, 1, 0)
