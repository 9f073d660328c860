"""Independent correctness tests for the gradients of `abkd.ab_divergence`.

Reference gradients come from numerical differentiation of the mpmath reference divergence
(tests/reference.py), not from the closed form."""
import math

import numpy as np
import pytest
import torch

import abkd
from cases import GRID, _ids, ab, randn
from reference import closed_form_gradient, ref_ab_gradient

TEMPERATURE_CASES = [(1, 0, 2.0), (0.5, -0.5, 0.7), (-0.3, 1.2, 3.0), (0, 0, 1.5), (0.2, 0.9, 4.0)]
# small but not tiny |alpha|, |beta|, |sigma|: where a stable implementation switches between
# series and direct evaluation (the nodes sigma*log p, alpha*log p + beta*log q, sigma*log q are ~1e-3..1e-1 apart)
SWITCH_CASES = [(1e-3, 1e-3, 1.0), (3e-3, -1e-3, 1.0), (-2e-3, 5e-3, 1.0), (0.02, 0.03, 1.0), (0.05, -0.04, 1.0),
                (0.3, -0.295, 1.0), (1e-3, 0.0, 1.0), (0.0, -4e-3, 1.0), (0.01, 0.01, 5.0)]
ALL_CASES = [(a, b, 1.0) for a, b in GRID] + TEMPERATURE_CASES + SWITCH_CASES
GRADCHECK_CASES = GRID + [(-1.0, -0.5), (-0.7, 0.0), (0.0, -0.6), (-1e-7, 1e-7), (1e-7, 1e-7),
                          (1.3, -1.3), (1.3, -1.3 + 1e-7), (-2.0, 1.5), (1.5, 2.0)]


def grads(s, t, a, b, reduction="sum", grad_output=None, **kw):
    "(loss, d loss/d student, d loss/d teacher) with both inputs requiring grad"
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = ab(s, t, a, b, reduction=reduction, teacher_grad=True, **kw)
    if grad_output is None:
        grad_output = torch.ones_like(out)
    gs, gt = torch.autograd.grad(out, (s, t), grad_output)
    return out.detach(), gs, gt


def assert_grad_close(g, ref, rtol, floor=1e-12):
    "elementwise |g - ref| <= rtol |ref| + floor * max_row |ref|"
    g = g.detach().double().numpy()
    ref = np.asarray(ref, dtype=np.float64)
    rowmax = np.abs(ref).max(-1, keepdims=True)
    bad = np.abs(g - ref) > rtol * np.abs(ref) + floor * rowmax
    assert not bad.any(), f"max err {np.max(np.abs(g - ref) / (np.abs(ref) + floor * rowmax)):.3e}\n{g[bad]}\n{ref[bad]}"


# ----------------------------------------------------------------------------------
# the reference gradient itself: numeric differentiation == closed form
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b,T", [(1, 0, 1.0), (0, 0, 1.0), (0.5, -0.5, 0.7), (-0.3, 1.2, 3.0),
                                   (1e-7, 0.7, 1.0), (0.3, -0.3 + 1e-7, 1.0)])
def test_reference_gradient_matches_closed_form(a, b, T):
    s, t = randn(2, 7, seed=1), randn(2, 7, seed=2)
    for wrt in ("student", "teacher"):
        n = ref_ab_gradient(s, t, a, b, T, wrt=wrt)
        c = closed_form_gradient(s, t, a, b, T, wrt=wrt)
        np.testing.assert_allclose(n, c, rtol=1e-13, atol=1e-15 * np.abs(c).max())


# ----------------------------------------------------------------------------------
# gradcheck
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b", GRADCHECK_CASES, ids=_ids(GRADCHECK_CASES))
def test_gradcheck(a, b):
    s = randn(2, 5, seed=3).requires_grad_()
    t = randn(2, 5, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: ab(x, y, a, b, reduction="none", teacher_grad=True), (s, t),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("red,a,b", [("none", 0.4, 0.8), ("sum", 0, 0), ("mean", 0.5, -0.5),
                                       ("batchmean", 2, -0.5)])
def test_gradcheck_reductions_masks_temperature(red, a, b):
    s = randn(2, 3, 4, seed=5).requires_grad_()
    t = randn(2, 3, 4, seed=6).requires_grad_()
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(
        lambda x, y: ab(x, y, a, b, temperature=1.7, mask=mask, reduction=red, teacher_grad=True), (s, t),
        eps=1e-6, atol=1e-6, rtol=1e-5)
    s1 = randn(6, seed=7).requires_grad_()
    t1 = randn(6, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: ab(x, y, 1.0, 0.0, reduction=red, teacher_grad=True), (s1, t1),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_with_neg_inf_entries():
    "gradcheck on the finite entries; the -inf entries are held fixed"
    s0, t0 = randn(2, 6, seed=9), randn(2, 6, seed=10)
    s0[:, 1] = t0[:, 1] = -math.inf  # both sides
    t0[0, 4] = -math.inf              # teacher only: finite for a > 0, a + b > 0
    s0[1, 2] = -math.inf              # student only: finite for b > 0, a + b > 0
    fin_s = torch.isfinite(s0)
    fin_t = torch.isfinite(t0)
    xs = s0[fin_s].clone().requires_grad_()
    xt = t0[fin_t].clone().requires_grad_()

    def f(xs, xt):
        s = s0.masked_scatter(fin_s, xs)
        t = t0.masked_scatter(fin_t, xt)
        return ab(s, t, 0.6, 0.5, reduction="none", teacher_grad=True)

    assert torch.autograd.gradcheck(f, (xs, xt), eps=1e-6, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------
# vs the mpmath numerical-differentiation reference
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b,T", ALL_CASES, ids=_ids(ALL_CASES))
def test_gradient_matches_reference_fp64(a, b, T):
    s, t = randn(3, 11, seed=11), randn(3, 11, seed=12)
    _, gs, gt = grads(s, t, a, b, temperature=T)
    assert gs.dtype == torch.float64 and gt.dtype == torch.float64
    assert_grad_close(gs, ref_ab_gradient(s, t, a, b, T, wrt="student"), rtol=1e-7)
    assert_grad_close(gt, ref_ab_gradient(s, t, a, b, T, wrt="teacher"), rtol=1e-7)


@pytest.mark.parametrize("a,b,T", ALL_CASES, ids=_ids(ALL_CASES))
def test_gradient_matches_reference_fp32(a, b, T):
    s, t = randn(2, 13, seed=13, dtype=torch.float32), randn(2, 13, seed=14, dtype=torch.float32)
    _, gs, gt = grads(s, t, a, b, temperature=T)
    assert gs.dtype == torch.float32 and gt.dtype == torch.float32
    # fp32 math: elementwise 1e-5 relative, with a 1e-6 (of the row's largest entry) floor for
    # the entries that suffer cancellation in g_k - q_k * sum(g)
    assert_grad_close(gs, ref_ab_gradient(s, t, a, b, T, wrt="student"), rtol=1e-5, floor=1e-6)
    assert_grad_close(gt, ref_ab_gradient(s, t, a, b, T, wrt="teacher"), rtol=1e-5, floor=1e-6)


def test_gradient_matches_reference_3d_and_1d():
    s, t = randn(2, 2, 7, seed=15), randn(2, 2, 7, seed=16)
    _, gs, gt = grads(s, t, 0.5, 0.5)
    assert_grad_close(gs, ref_ab_gradient(s, t, 0.5, 0.5, wrt="student"), rtol=1e-7)
    assert_grad_close(gt, ref_ab_gradient(s, t, 0.5, 0.5, wrt="teacher"), rtol=1e-7)
    _, gs1, gt1 = grads(s[1, 0], t[1, 0], 0.5, 0.5)
    assert gs1.shape == (7,)
    assert_grad_close(gs1, ref_ab_gradient(s[1, 0], t[1, 0], 0.5, 0.5, wrt="student"), rtol=1e-7)
    assert_grad_close(gt1, ref_ab_gradient(s[1, 0], t[1, 0], 0.5, 0.5, wrt="teacher"), rtol=1e-7)


def test_gradient_only_one_side_requires_grad():
    s, t = randn(3, 9, seed=17), randn(3, 9, seed=18)
    _, gs_ref, gt_ref = grads(s, t, 0.3, 0.6)
    sg = s.clone().requires_grad_()
    ab(sg, t, 0.3, 0.6, reduction="sum").backward()
    torch.testing.assert_close(sg.grad, gs_ref, rtol=1e-14, atol=0)
    tg = t.clone().requires_grad_()
    ab(s, tg, 0.3, 0.6, reduction="sum", teacher_grad=True).backward()
    torch.testing.assert_close(tg.grad, gt_ref, rtol=1e-14, atol=0)
    # no grad required at all: plain forward works
    assert ab(s, t, 0.3, 0.6).requires_grad is False


# ----------------------------------------------------------------------------------
# structural properties
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("a,b", GRID + [(-1.0, -0.5)], ids=_ids(GRID + [(-1.0, -0.5)]))
def test_gradient_sums_to_zero_over_vocab(a, b, dtype):
    s, t = randn(4, 17, seed=19, dtype=dtype), randn(4, 17, seed=20, dtype=dtype)
    _, gs, gt = grads(s, t, a, b, temperature=1.3)
    eps = torch.finfo(dtype).eps
    for g in (gs, gt):
        g = g.double()
        assert (g.sum(-1).abs() <= 64 * eps * g.abs().sum(-1)).all(), g.sum(-1)


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (1, 0), (0, 0), (2, -0.5)])
def test_reduction_scaling_of_gradients(a, b):
    s, t = randn(2, 3, 8, seed=21), randn(2, 3, 8, seed=22)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    _, gs_sum, gt_sum = grads(s, t, a, b, reduction="sum", mask=mask)
    _, gs_mean, gt_mean = grads(s, t, a, b, reduction="mean", mask=mask)
    _, gs_bm, gt_bm = grads(s, t, a, b, reduction="batchmean", mask=mask)
    _, gs_none, gt_none = grads(s, t, a, b, reduction="none", mask=mask)
    n = mask.sum()
    tol = dict(rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(gs_mean, gs_sum / n, **tol)
    torch.testing.assert_close(gt_mean, gt_sum / n, **tol)
    torch.testing.assert_close(gs_bm, gs_sum / 2, **tol)
    torch.testing.assert_close(gt_bm, gt_sum / 2, **tol)
    torch.testing.assert_close(gs_none, gs_sum, **tol)
    torch.testing.assert_close(gt_none, gt_sum, **tol)
    # weighted grad_output for "none" weights each position's gradient
    w = torch.tensor([[0.5, 3.0, -2.0], [1.5, 0.0, 7.0]], dtype=torch.float64)
    _, gs_w, gt_w = grads(s, t, a, b, reduction="none", mask=mask, grad_output=w)
    _, gs_1, gt_1 = grads(s, t, a, b, reduction="none")
    torch.testing.assert_close(gs_w, gs_1 * (w * mask)[..., None], **tol)
    torch.testing.assert_close(gt_w, gt_1 * (w * mask)[..., None], **tol)
    # the unmasked mean over all positions
    _, gs_s, _ = grads(s, t, a, b, reduction="sum")
    _, gs_m, _ = grads(s, t, a, b, reduction="mean")
    torch.testing.assert_close(gs_m, gs_s / 6, **tol)


@pytest.mark.parametrize("sd,td", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                   (torch.float16, torch.float16), (torch.float64, torch.float64),
                                   (torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_gradient_dtype_is_input_dtype(sd, td):
    s = randn(3, 8, seed=23, dtype=sd).requires_grad_()
    t = randn(3, 8, seed=24, dtype=td).requires_grad_()
    ab(s, t, 0.5, 0.5, teacher_grad=True).backward()
    assert s.grad.dtype == sd and t.grad.dtype == td
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


# ----------------------------------------------------------------------------------
# masks and -inf
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("red", ["none", "sum", "mean", "batchmean"])
def test_masked_positions_get_zero_gradient(red):
    s, t = randn(2, 3, 6, seed=25), randn(2, 3, 6, seed=26)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    s2, t2 = s.clone(), t.clone()
    s2[0, 1, 2] = math.nan  # garbage in masked rows
    t2[1, 0, :] = -math.inf
    s2[1, 0, 3] = math.inf
    _, gs, gt = grads(s2, t2, 0.5, -0.5, reduction=red, mask=mask)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (gs[~mask] == 0).all() and (gt[~mask] == 0).all()
    _, gs_c, gt_c = grads(s, t, 0.5, -0.5, reduction=red, mask=mask)
    torch.testing.assert_close(gs, gs_c, rtol=1e-14, atol=0)
    torch.testing.assert_close(gt, gt_c, rtol=1e-14, atol=0)


@pytest.mark.parametrize("red", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_all_masked_zero_gradients(red, dtype):
    s, t = randn(2, 3, 5, seed=27, dtype=dtype), randn(2, 3, 5, seed=28, dtype=dtype)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out, gs, gt = grads(s, t, 1.0, 0.0, reduction=red, mask=mask)
    assert (out == 0).all() and not torch.isnan(out).any()
    assert (gs == 0).all() and (gt == 0).all()
    assert gs.dtype == dtype


BOTH_NINF_COLS = [0, 3, 4, 11]


@pytest.mark.parametrize("a,b", GRID, ids=_ids(GRID))
def test_both_neg_inf_entries_zero_gradient(a, b):
    s, t = randn(3, 15, seed=29), randn(3, 15, seed=30)
    s[:, BOTH_NINF_COLS] = -math.inf
    t[:, BOTH_NINF_COLS] = -math.inf
    s[1, 7] = t[1, 7] = -math.inf
    _, gs, gt = grads(s, t, a, b, temperature=1.4)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    ninf = torch.isinf(s)
    assert (gs[ninf] == 0).all() and (gt[ninf] == 0).all()
    keep = [k for k in range(15) if k not in BOTH_NINF_COLS]
    for r in range(3):
        kr = [k for k in keep if not (r == 1 and k == 7)]
        _, gs_r, gt_r = grads(s[r, kr], t[r, kr], a, b, temperature=1.4)
        torch.testing.assert_close(gs[r, kr], gs_r, rtol=1e-10, atol=1e-16)
        torch.testing.assert_close(gt[r, kr], gt_r, rtol=1e-10, atol=1e-16)
    assert_grad_close(gs, ref_ab_gradient(s, t, a, b, 1.4, wrt="student"), rtol=1e-7)
    assert_grad_close(gt, ref_ab_gradient(s, t, a, b, 1.4, wrt="teacher"), rtol=1e-7)


ONE_SIDED_FINITE = [("teacher", 1, 0), ("teacher", 0.5, 0.5), ("teacher", 2, -0.5), ("teacher", 0.7, 1e-7),
                    ("teacher", 1.5, -1.2),
                    ("student", 0, 1), ("student", 0.5, 0.5), ("student", -0.3, 1.2), ("student", 1e-7, 0.7),
                    ("student", -1.2, 1.5)]


@pytest.mark.parametrize("side,a,b", ONE_SIDED_FINITE, ids=_ids(ONE_SIDED_FINITE))
def test_one_sided_neg_inf_gradient(side, a, b):
    s, t = randn(3, 10, seed=31), randn(3, 10, seed=32)
    x = t if side == "teacher" else s
    x[0, 2] = -math.inf
    x[2, [5, 9]] = -math.inf
    _, gs, gt = grads(s, t, a, b)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert_grad_close(gs, ref_ab_gradient(s, t, a, b, wrt="student"), rtol=1e-7)
    assert_grad_close(gt, ref_ab_gradient(s, t, a, b, wrt="teacher"), rtol=1e-7)
    # the -inf logit itself cannot move the loss: zero gradient there
    g_side = gt if side == "teacher" else gs
    assert (g_side[torch.isinf(x)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradient_vs_reference(dtype):
    s, t = randn(2, 24, seed=33, dtype=dtype), randn(2, 24, seed=34, dtype=dtype)
    _, gs, gt = grads(s, t, 0.5, 0.5)
    assert gs.dtype == dtype and gt.dtype == dtype
    # fp32 math, result rounded to half precision: 2^-8 (bf16) / 2^-11 (fp16) relative per element
    rtol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    assert_grad_close(gs, ref_ab_gradient(s, t, 0.5, 0.5, wrt="student"), rtol=rtol, floor=1e-4)
    assert_grad_close(gt, ref_ab_gradient(s, t, 0.5, 0.5, wrt="teacher"), rtol=rtol, floor=1e-4)
