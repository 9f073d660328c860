"""The kernel implementations (chunked, Triton under the interpreter, fused-linear) against the independent
float64 mpmath reference and against each other: same tolerances as the core's tests."""
import math

import numpy as np
import pytest
import torch

import abkd
from abkd.divergence import ab_divergence, resolve_impl
from abkd.kernels.torch_chunked import ab_divergence_chunked, ab_plan
from abkd.kernels.fused_linear import ab_divergence_from_hidden
from abkd.gradients import saved_tensor_bytes
from cases import GRID, _ids, randn
from reference import ref_ab_divergence, ref_ab_gradient, to_float64

IMPLS = ["chunked", "triton"]
CASES = [(a, b, T) for a, b in GRID for T in (1.0, 2.5)]


def rel_err(x, ref):
    return float(np.max(np.abs(np.asarray(x, dtype=np.float64) - ref) / np.abs(ref)))


def values_and_grads(s, t, a, b, impl, T=1.0, **kw):
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = ab_divergence(s, t, a, b, temperature=T, reduction="none", impl=impl, **kw)
    gs, gt = torch.autograd.grad(out.sum(), (s, t))
    return out.detach(), gs, gt


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("a,b,T", CASES, ids=_ids(CASES))
def test_values_and_gradients_match_reference_fp64(impl, a, b, T):
    s, t = randn(2, 9, seed=21), randn(2, 9, seed=22)
    v, gs, gt = values_and_grads(s, t, a, b, impl, T)
    assert rel_err(v.numpy(), to_float64(ref_ab_divergence(s, t, a, b, T))) <= 1e-12
    for g, wrt in ((gs, "student"), (gt, "teacher")):
        ref = to_float64(ref_ab_gradient(s, t, a, b, T, wrt=wrt))
        assert np.all(np.abs(g.numpy() - ref) <= 1e-7 * np.abs(ref) + 1e-12 * np.abs(ref).max()), (impl, wrt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("a,b", GRID, ids=_ids(GRID))
def test_values_and_gradients_match_reference_fp32(impl, a, b):
    s, t = randn(2, 13, seed=23, dtype=torch.float32), randn(2, 13, seed=24, dtype=torch.float32)
    v, gs, gt = values_and_grads(s, t, a, b, impl, 1.5)
    assert v.dtype == torch.float32 and gs.dtype == torch.float32
    assert rel_err(v.numpy(), to_float64(ref_ab_divergence(s, t, a, b, 1.5))) <= 1e-5
    for g, wrt in ((gs, "student"), (gt, "teacher")):
        ref = to_float64(ref_ab_gradient(s, t, a, b, 1.5, wrt=wrt))
        floor = 1e-6 * np.abs(ref).max(axis=-1, keepdims=True)
        assert np.all(np.abs(g.numpy() - ref) <= 1e-5 * np.abs(ref) + floor), (impl, wrt)


@pytest.mark.parametrize("impl", IMPLS)
def test_impls_agree_on_large_rows_and_multi_tile_rows(impl):
    # rows longer than a Triton tile and than a chunk: the running max, the ragged tile, the chunk loop
    s, t = randn(5, 2500, seed=25, scale=4.0), randn(5, 2500, seed=26, scale=4.0)
    for a, b in [(0.2, 0.7), (1, 0), (0.5, -0.5), (1e-7, 0.7)]:
        v, gs, gt = values_and_grads(s, t, a, b, impl, 0.7)
        rv, rgs, rgt = values_and_grads(s, t, a, b, "reference", 0.7)
        torch.testing.assert_close(v, rv, rtol=1e-12, atol=0)
        torch.testing.assert_close(gs, rgs, rtol=0, atol=1e-12 * rgs.abs().max().item())
        torch.testing.assert_close(gt, rgt, rtol=0, atol=1e-12 * rgt.abs().max().item())


def test_chunk_boundaries_do_not_change_the_result():
    s, t = randn(7, 300, seed=27).requires_grad_(), randn(7, 300, seed=28)
    base = ab_divergence_chunked(s, t, 0.2, 0.7, 1.0, 7 * 300)
    (g_base,) = torch.autograd.grad(base.sum(), s)
    for chunk in (1, 300, 900, 1000):
        v = ab_divergence_chunked(s, t, 0.2, 0.7, 1.0, chunk)
        (g,) = torch.autograd.grad(v.sum(), s)
        torch.testing.assert_close(v, base, rtol=1e-14, atol=0)
        torch.testing.assert_close(g, g_base, rtol=1e-14, atol=1e-18)


@pytest.mark.parametrize("impl", IMPLS)
def test_neg_inf_entries_and_row_mask(impl):
    s, t = randn(4, 40, seed=29), randn(4, 40, seed=30)
    t[0, :6] = -math.inf            # teacher-only: allowed at (0.2, 0.7)
    s[1, :3] = -math.inf; t[1, :3] = -math.inf      # both sides
    t[2, 5] = -math.inf; s[2, 9] = -math.inf; t[2, 9] = -math.inf
    mask = torch.tensor([True, True, False, True])
    for red in ("none", "sum", "mean"):
        si, ti = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = ab_divergence(si, ti, 0.2, 0.7, mask=mask, reduction=red, impl=impl)
        (out.sum() if red == "none" else out).backward()
        sr, tr = s.clone().requires_grad_(), t.clone().requires_grad_()
        ref = ab_divergence(sr, tr, 0.2, 0.7, mask=mask, reduction=red, impl="reference")
        (ref.sum() if red == "none" else ref).backward()
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(si.grad, sr.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(ti.grad, tr.grad, rtol=0, atol=1e-12)
        assert si.grad[2].abs().sum() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_logits(impl):
    s, t = (randn(3, 1100, seed=31, dtype=torch.float32)).bfloat16(), randn(3, 1100, seed=32, dtype=torch.float32).bfloat16()
    si = s.clone().requires_grad_()
    out = ab_divergence(si, t, 0.2, 0.7, reduction="sum", impl=impl)
    out.backward()
    s64 = s.double().requires_grad_()
    ref = ab_divergence(s64, t.double(), 0.2, 0.7, reduction="sum", impl="reference")
    ref.backward()
    assert out.dtype == torch.float32 and si.grad.dtype == torch.bfloat16
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())
    # the gradient is rounded to bf16 once (8 bits): one bf16 step of the largest entry
    assert (si.grad.double() - s64.grad).abs().max() <= 2 ** -7 * s64.grad.abs().max()


def test_chunked_saves_only_inputs_and_2n_numbers():
    s, t = randn(16, 500, seed=33).requires_grad_(), randn(16, 500, seed=34)
    extra = saved_tensor_bytes(lambda s, t: ab_divergence(s, t, 0.2, 0.7, impl="chunked", reduction="sum"), s, t)
    assert extra <= 2 * 16 * 8 + 64


def test_plan_series_length_and_psi_branch():
    p = ab_plan(0.2, 0.7, torch.float32)
    assert 1.0 <= p.tau <= 1.25 and not p.psi_needs_series      # τ = 0.25·0.9/0.2
    assert ab_plan(1e-7, 0.7, torch.float32).psi_needs_series   # a near-zero gap: ψ keeps its series
    assert len(ab_plan(0.2, 0.7, torch.float64).f_series) > len(p.f_series)


def test_impl_errors(monkeypatch):
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="impl must be one of"):
        ab_divergence(s, t, 1, 0, impl="fast")
    with pytest.raises(ValueError, match="impl must be one of"):
        abkd.ABDivergence(1, 0, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA logits"):
        ab_divergence(s, t, 1, 0, impl="triton")
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"


def test_triton_backward_runs_once():
    from abkd.kernels.triton_kernels import ab_divergence_triton
    s, t = torch.randn(2, 50, requires_grad=True), torch.randn(2, 50)
    loss = ab_divergence_triton(s, t, 0.2, 0.7).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


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
