"""Independent correctness tests for `abkd.ab_divergence` / `abkd.ABDivergence` (values, not gradients).

The ground truth is the mpmath reference in tests/reference.py (50 digits, straight from the
definition of the alpha-beta divergence and its limit formulas)."""
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import abkd
from cases import GRID, _ids, ab, randn
from reference import closed_form_gradient, ref_ab_divergence, ref_ab_gradient, to_float64

# ----------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------
# (alpha, beta, temperature) cases with T != 1
TEMPERATURE_CASES = [(1, 0, 2.0), (0.5, -0.5, 0.7), (-0.3, 1.2, 3.0), (0, 0, 1.5), (0.2, 0.9, 4.0)]
# small but not tiny |alpha|, |beta|, |sigma|: where a stable implementation switches between
# series and direct evaluation (the nodes sigma*log p, alpha*log p + beta*log q, sigma*log q are ~1e-3..1e-1 apart)
SWITCH_CASES = [(1e-3, 1e-3, 1.0), (3e-3, -1e-3, 1.0), (-2e-3, 5e-3, 1.0), (0.02, 0.03, 1.0), (0.05, -0.04, 1.0),
                (0.3, -0.295, 1.0), (1e-3, 0.0, 1.0), (0.0, -4e-3, 1.0), (0.01, 0.01, 5.0)]
ALL_CASES = [(a, b, 1.0) for a, b in GRID] + TEMPERATURE_CASES + SWITCH_CASES


def rel_err(x, ref):
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return np.max(np.abs(x - ref) / np.abs(ref))


# ----------------------------------------------------------------------------------
# the reference itself (so a wrong reference cannot silently pass/fail the implementation)
# ----------------------------------------------------------------------------------
def test_reference_self_test():
    import reference
    reference._self_test()


def test_reference_named_points():
    s, t = randn(3, 11, seed=5), randn(3, 11, seed=6)
    P, Q = torch.softmax(t, -1), torch.softmax(s, -1)
    closed = {
        (1, 0): (P * (P.log() - Q.log())).sum(-1),
        (0, 1): (Q * (Q.log() - P.log())).sum(-1),
        (0.5, 0.5): 2 * ((P.sqrt() - Q.sqrt()) ** 2).sum(-1),
        (1, 1): 0.5 * ((P - Q) ** 2).sum(-1),
        (0, 0): 0.5 * ((P.log() - Q.log()) ** 2).sum(-1),
    }
    for (a, b), v in closed.items():
        np.testing.assert_allclose(to_float64(ref_ab_divergence(s, t, a, b)), v.numpy(), rtol=1e-12)


def test_reference_one_sided_limits():
    "the one-sided -inf closed forms equal the limit of the finite divergence as the logit -> -inf"
    s, t = randn(2, 7, seed=7), randn(2, 7, seed=8)
    for (a, b) in [(1, 0), (0.5, 0.5), (2, -0.5), (1e-7, 0.7)]:  # teacher-side finite region
        t_inf, t_far = t.clone(), t.clone()
        t_inf[:, 2] = -math.inf
        t_far[:, 2] = -1e15  # p^alpha -> 0 needs alpha * logit -> -inf
        x = to_float64(ref_ab_divergence(s, t_inf, a, b))
        y = to_float64(ref_ab_divergence(s, t_far, a, b))
        np.testing.assert_allclose(x, y, rtol=1e-12)
    for (a, b) in [(0, 1), (0.5, 0.5), (-0.3, 1.2), (0.7, 1e-7)]:  # student-side finite region
        s_inf, s_far = s.clone(), s.clone()
        s_inf[:, 4] = -math.inf
        s_far[:, 4] = -1e15  # p^alpha -> 0 needs alpha * logit -> -inf
        x = to_float64(ref_ab_divergence(s_inf, t, a, b))
        y = to_float64(ref_ab_divergence(s_far, t, a, b))
        np.testing.assert_allclose(x, y, rtol=1e-12)


# ----------------------------------------------------------------------------------
# values vs the reference
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b,T", ALL_CASES, ids=_ids(ALL_CASES))
def test_matches_reference_fp64(a, b, T):
    s, t = randn(4, 17, seed=1), randn(4, 17, seed=2)
    out = ab(s, t, a, b, temperature=T, reduction="none")
    assert out.dtype == torch.float64
    assert out.shape == (4,)
    ref = to_float64(ref_ab_divergence(s, t, a, b, T))
    assert rel_err(out.detach().numpy(), ref) <= 1e-8


@pytest.mark.parametrize("a,b,T", ALL_CASES, ids=_ids(ALL_CASES))
def test_matches_reference_fp32(a, b, T):
    s, t = randn(3, 33, seed=3, dtype=torch.float32), randn(3, 33, seed=4, dtype=torch.float32)
    out = ab(s, t, a, b, temperature=T, reduction="none")
    assert out.dtype == torch.float32
    assert out.shape == (3,)
    ref = to_float64(ref_ab_divergence(s, t, a, b, T))  # same fp32 values, upcast exactly
    assert rel_err(out.detach().numpy(), ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_3d_and_1d(dtype):
    s, t = randn(2, 3, 13, seed=9, dtype=dtype), randn(2, 3, 13, seed=10, dtype=dtype)
    tol = 1e-8 if dtype == torch.float64 else 1e-5
    out = ab(s, t, -0.3, 1.2, reduction="none")
    assert out.shape == (2, 3)
    assert rel_err(out.numpy(), to_float64(ref_ab_divergence(s, t, -0.3, 1.2))) <= tol
    out1 = ab(s[1, 2], t[1, 2], -0.3, 1.2, reduction="none")
    assert out1.shape == ()
    assert rel_err(out1.numpy(), to_float64(ref_ab_divergence(s[1, 2], t[1, 2], -0.3, 1.2))) <= tol


# ----------------------------------------------------------------------------------
# continuity at the limit formulas
# ----------------------------------------------------------------------------------
CONTINUITY = [
    ((0.8, 0.0), [(0.8, 1e-7), (0.8, -1e-7)]),                       # beta -> 0
    ((-0.6, 0.0), [(-0.6, 1e-7), (-0.6, -1e-7)]),
    ((0.0, 0.8), [(1e-7, 0.8), (-1e-7, 0.8)]),                       # alpha -> 0
    ((0.0, -0.6), [(1e-7, -0.6), (-1e-7, -0.6)]),
    ((0.6, -0.6), [(0.6, -0.6 + 1e-7), (0.6, -0.6 - 1e-7)]),         # alpha -> -beta
    ((-1.1, 1.1), [(-1.1, 1.1 + 1e-7), (-1.1 + 1e-7, 1.1)]),
    ((0.0, 0.0), [(1e-7, 1e-7), (-1e-7, 2e-7), (1e-7, 0.0), (0.0, 1e-7), (1e-7, -2e-7),
                  (-1e-7, -1e-7)]),                                  # both -> 0
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("limit,near", CONTINUITY, ids=[repr(c[0]) for c in CONTINUITY])
def test_continuity_at_limits(limit, near, dtype):
    s, t = randn(4, 17, seed=11, dtype=dtype), randn(4, 17, seed=12, dtype=dtype)
    at = ab(s, t, *limit, reduction="none").double()
    assert torch.isfinite(at).all()
    for a, b in near:
        v = ab(s, t, a, b, reduction="none").double()
        r = ((v - at).abs() / at.abs()).max().item()
        assert r <= 1e-5, ((a, b), r)


# ----------------------------------------------------------------------------------
# named points vs closed forms
# ----------------------------------------------------------------------------------
def test_named_points_closed_forms():
    s, t = randn(5, 23, seed=13), randn(5, 23, seed=14)
    P, Q = torch.softmax(t, -1), torch.softmax(s, -1)
    closed = {
        (1, 0): (P * (P.log() - Q.log())).sum(-1),          # KL(p || q)
        (0, 1): (Q * (Q.log() - P.log())).sum(-1),          # KL(q || p)
        (0.5, 0.5): 2 * ((P.sqrt() - Q.sqrt()) ** 2).sum(-1),
        (1, 1): 0.5 * ((P - Q) ** 2).sum(-1),
        (0, 0): 0.5 * ((P.log() - Q.log()) ** 2).sum(-1),
    }
    for (a, b), v in closed.items():
        out = ab(s, t, a, b, reduction="none")
        torch.testing.assert_close(out, v, rtol=1e-10, atol=0, msg=f"{(a, b)}")
        # int vs float hyper-parameters must not matter
        torch.testing.assert_close(ab(s, t, float(a), float(b), reduction="none"), v, rtol=1e-10, atol=0)


def test_kl_matches_torch_kl_div_with_temperature():
    s, t = randn(4, 19, seed=15), randn(4, 19, seed=16)
    T = 2.5
    expected = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                          log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ab(s, t, 1.0, 0.0, temperature=T, reduction="none"), expected,
                               rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------------
# reductions and masks
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("a,b", [(0.5, 0.5), (0, 0), (2, -0.5)])
def test_reductions_3d(a, b, dtype):
    s, t = randn(2, 3, 9, seed=17, dtype=dtype), randn(2, 3, 9, seed=18, dtype=dtype)
    ref = torch.from_numpy(to_float64(ref_ab_divergence(s, t, a, b)))  # [2, 3]
    tol = dict(rtol=1e-8, atol=0) if dtype == torch.float64 else dict(rtol=1e-5, atol=0)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    for m in (None, mask):
        keep = torch.ones(2, 3, dtype=torch.bool) if m is None else m
        none = ab(s, t, a, b, mask=m, reduction="none")
        assert none.shape == (2, 3)
        assert none.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        expected_none = torch.where(keep, ref, torch.zeros(()))
        torch.testing.assert_close(none.double(), expected_none, **tol)
        assert (none[~keep] == 0).all()
        total = expected_none.sum()
        for red, exp in [("sum", total), ("mean", total / keep.sum()), ("batchmean", total / 2)]:
            out = ab(s, t, a, b, mask=m, reduction=red)
            assert out.shape == (), red
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            torch.testing.assert_close(out.double(), exp, **tol, msg=f"{red} mask={m is not None}")
    # default reduction is "mean"
    torch.testing.assert_close(ab(s, t, a, b, mask=mask), ab(s, t, a, b, mask=mask, reduction="mean"))
    torch.testing.assert_close(ab(s, t, a, b), ab(s, t, a, b, reduction="mean"))


def test_reductions_1d():
    s, t = randn(11, seed=19), randn(11, seed=20)
    ref = float(to_float64(ref_ab_divergence(s, t, 0.5, 0.5)))
    for red in ("none", "sum", "mean", "batchmean"):
        out = ab(s, t, 0.5, 0.5, reduction=red)
        assert out.shape == (), red
        assert abs(out.item() - ref) <= 1e-8 * ref, red
        out_m = ab(s, t, 0.5, 0.5, reduction=red, mask=torch.tensor(True))
        assert abs(out_m.item() - ref) <= 1e-8 * ref, red
        out_0 = ab(s, t, 0.5, 0.5, reduction=red, mask=torch.tensor(False))
        assert out_0.item() == 0.0, red


def test_reductions_2d_batchmean_and_mean():
    s, t = randn(5, 8, seed=21), randn(5, 8, seed=22)
    ref = torch.from_numpy(to_float64(ref_ab_divergence(s, t, 1, 0)))
    mask = torch.tensor([True, True, False, True, False])
    torch.testing.assert_close(ab(s, t, 1, 0, reduction="batchmean"), ref.sum() / 5, rtol=1e-10, atol=0)
    torch.testing.assert_close(ab(s, t, 1, 0, reduction="batchmean", mask=mask), ref[mask].sum() / 5,
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(ab(s, t, 1, 0, reduction="mean", mask=mask), ref[mask].sum() / 3,
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("red", ["none", "sum", "mean", "batchmean"])
def test_all_masked_is_zero_not_nan(red):
    s, t = randn(2, 3, 7, seed=23), randn(2, 3, 7, seed=24)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = ab(s, t, 0.5, 0.5, mask=mask, reduction=red)
    assert torch.isfinite(out).all()
    assert (out == 0).all()


def test_masked_rows_may_hold_garbage():
    "masked-out rows may contain NaN, +inf, -inf (one-sided or whole-row) and are ignored"
    s, t = randn(4, 6, seed=25), randn(4, 6, seed=26)
    mask = torch.tensor([True, False, True, False])
    ref = ab(s, t, 0.5, -0.5, mask=mask, reduction="none")
    s2, t2 = s.clone(), t.clone()
    s2[1, 0] = math.nan
    t2[1, 3] = math.inf
    s2[3, :] = -math.inf
    t2[3, 2] = -math.inf
    for red in ("none", "sum", "mean", "batchmean"):
        out = ab(s2, t2, 0.5, -0.5, mask=mask, reduction=red)
        exp = ab(s, t, 0.5, -0.5, mask=mask, reduction=red)
        assert torch.isfinite(out).all(), red
        torch.testing.assert_close(out, exp, rtol=1e-14, atol=0)
    assert (ab(s2, t2, 0.5, -0.5, mask=mask, reduction="none")[~mask] == 0).all()
    torch.testing.assert_close(ab(s2, t2, 0.5, -0.5, mask=mask, reduction="none"), ref)


def test_mask_from_labels():
    labels = torch.tensor([[3, -100, 7], [-100, -100, 0]])
    m = abkd.mask_from_labels(labels)
    assert m.dtype == torch.bool
    assert torch.equal(m, torch.tensor([[True, False, True], [False, False, True]]))
    m2 = abkd.mask_from_labels(labels, ignore_index=0)
    assert torch.equal(m2, labels != 0)
    m3 = abkd.mask_from_labels(labels, ignore_index=7)
    assert torch.equal(m3, torch.tensor([[True, True, False], [True, True, True]]))
    # usable directly as the mask of the loss
    s, t = randn(2, 3, 5, seed=27), randn(2, 3, 5, seed=28)
    out = ab(s, t, 1, 0, mask=m, reduction="none")
    assert (out[~m] == 0).all() and (out[m] > 0).all()


# ----------------------------------------------------------------------------------
# module form
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("red", ["none", "sum", "mean", "batchmean"])
def test_module_equals_function(red):
    s, t = randn(2, 3, 10, seed=29), randn(2, 3, 10, seed=30)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    mod = abkd.ABDivergence(0.3, 0.9, temperature=1.7, reduction=red)
    assert isinstance(mod, torch.nn.Module)
    for m in (None, mask):
        assert torch.equal(mod(s, t, mask=m), ab(s, t, 0.3, 0.9, temperature=1.7, mask=m, reduction=red))
    assert torch.equal(mod(s, t, m), ab(s, t, 0.3, 0.9, temperature=1.7, mask=m, reduction=red))
    # defaults: temperature 1, reduction "mean"
    assert torch.equal(abkd.ABDivergence(0.3, 0.9)(s, t), ab(s, t, 0.3, 0.9))
    mod_pos = abkd.ABDivergence(0.3, 0.9, 1.7, red)
    assert torch.equal(mod_pos(s, t), mod(s, t))


# ----------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sd,td,od", [
    (torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.float16, torch.float32), (torch.float64, torch.float64, torch.float64),
    (torch.float32, torch.float64, torch.float64), (torch.float64, torch.bfloat16, torch.float64),
    (torch.bfloat16, torch.float32, torch.float32)])
def test_output_dtype(sd, td, od):
    s, t = randn(3, 8, seed=31, dtype=sd), randn(3, 8, seed=32, dtype=td)
    for red in ("none", "mean"):
        assert ab(s, t, 0.5, 0.5, reduction=red).dtype == od


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("a,b", [(0.5, 0.5), (-0.3, 1.2)])
def test_half_precision_matches_reference(dtype, a, b):
    s, t = randn(3, 40, seed=33, dtype=dtype), randn(3, 40, seed=34, dtype=dtype)
    out = ab(s, t, a, b, reduction="none")
    assert out.dtype == torch.float32
    # fp32 math on the exact half values: compare with the reference on the same values
    assert rel_err(out.numpy(), to_float64(ref_ab_divergence(s, t, a, b))) <= 1e-5


def _torch64_general(s, t, a, b, T=1.0):
    "plain fp64 general-formula divergence (independent of abkd), for large vocabularies"
    p = torch.softmax(t.double() / T, -1)
    q = torch.softmax(s.double() / T, -1)
    sig = a + b
    if b == 0:
        return (p * (p.log() - q.log())).sum(-1) if a == 1 else None
    return -(p ** a * q ** b - a / sig * p ** sig - b / sig * q ** sig).sum(-1) / (a * b)


def _torch64_grad_student(s, t, a, b, T=1.0):
    p = torch.softmax(t.double() / T, -1)
    q = torch.softmax(s.double() / T, -1)
    g = q ** b * (q ** a - p ** a) / a
    return (g - q * g.sum(-1, keepdim=True)) / T


@pytest.mark.parametrize("dtype,a,b", [(torch.bfloat16, 1, 0), (torch.bfloat16, 0.2, 0.9), (torch.bfloat16, 2, -0.5),
                                       (torch.float16, 0.5, 0.5), (torch.float16, 0.2, 0.9)])
def test_large_vocab_half_precision(dtype, a, b):
    V = 151936
    s = randn(2, V, seed=35, dtype=dtype).requires_grad_()
    t = randn(2, V, seed=36, dtype=dtype)
    out = ab(s, t, a, b, reduction="none")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    exp = _torch64_general(s.detach(), t, a, b)
    # fp32 math over 151936 entries: ~1e-6 relative is typical; 1e-4 leaves room for summation error
    r = ((out.double() - exp).abs() / exp.abs()).max().item()
    assert r <= 1e-4, r
    out.sum().backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()
    if a != 0:
        gexp = _torch64_grad_student(s.detach(), t, a, b)
        # gradient is returned in half precision: elementwise rounding 2^-8 (bf16) / 2^-11 (fp16)
        err = ((s.grad.double() - gexp).abs().amax(-1) / gexp.abs().amax(-1)).max().item()
        assert err <= 1e-2, err


# ----------------------------------------------------------------------------------
# -inf in the vocabulary
# ----------------------------------------------------------------------------------
BOTH_NINF_COLS = [0, 3, 4, 11]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("a,b", GRID, ids=_ids(GRID))
def test_both_neg_inf_equals_deleting_entries(a, b, dtype):
    s, t = randn(3, 15, seed=37, dtype=dtype), randn(3, 15, seed=38, dtype=dtype)
    s[:, BOTH_NINF_COLS] = -math.inf
    t[:, BOTH_NINF_COLS] = -math.inf
    # additionally one row-specific column
    s[1, 7] = t[1, 7] = -math.inf
    out = ab(s, t, a, b, reduction="none")
    assert torch.isfinite(out).all()
    keep = [k for k in range(15) if k not in BOTH_NINF_COLS]
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    for r in range(3):
        kr = [k for k in keep if not (r == 1 and k == 7)]
        ref_row = ab(s[r, kr], t[r, kr], a, b, reduction="none")
        torch.testing.assert_close(out[r], ref_row, rtol=rtol, atol=0)
    if dtype == torch.float64:
        ref = to_float64(ref_ab_divergence(s, t, a, b))
        assert rel_err(out.numpy(), ref) <= 1e-8


TEACHER_NINF_FINITE = [(1, 0), (0.5, 0.5), (1, 1), (2, -0.5), (1e-7, 0.7), (0.7, 1e-7), (0.3, 0.1),
                       (1.5, -1.2)]
TEACHER_NINF_ERROR = [(0, 1), (0, 0), (-0.3, 1.2), (0.5, -0.5), (1, -2), (-1e-7, 0.7), (0.3, -0.3 - 1e-7),
                      (-0.5, 0)]
STUDENT_NINF_FINITE = [(0, 1), (0.5, 0.5), (1, 1), (-0.3, 1.2), (0.7, 1e-7), (1e-7, 0.7), (0.1, 0.3),
                       (-1.2, 1.5)]
STUDENT_NINF_ERROR = [(1, 0), (0, 0), (2, -0.5), (0.5, -0.5), (-2, 1), (0.7, -1e-7), (-0.3 - 1e-7, 0.3),
                      (0, -0.5)]


def _one_sided(side, dtype=torch.float64):
    s, t = randn(3, 12, seed=39, dtype=dtype), randn(3, 12, seed=40, dtype=dtype)
    x = t if side == "teacher" else s
    x[0, 2] = -math.inf
    x[2, [5, 9]] = -math.inf
    return s, t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("side,a,b", [("teacher",) + c for c in TEACHER_NINF_FINITE]
                         + [("student",) + c for c in STUDENT_NINF_FINITE])
def test_one_sided_neg_inf_finite(side, a, b, dtype):
    s, t = _one_sided(side, dtype)
    out = ab(s, t, a, b, reduction="none")
    assert torch.isfinite(out).all()
    ref = to_float64(ref_ab_divergence(s, t, a, b))
    assert np.isfinite(ref).all()
    assert rel_err(out.numpy(), ref) <= (1e-8 if dtype == torch.float64 else 1e-5)


def _both_in_msg(*words):
    return "(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words)


@pytest.mark.parametrize("side,a,b", [("teacher",) + c for c in TEACHER_NINF_ERROR]
                         + [("student",) + c for c in STUDENT_NINF_ERROR])
def test_one_sided_neg_inf_error(side, a, b):
    s, t = _one_sided(side)
    ref = to_float64(ref_ab_divergence(s, t, a, b))
    assert np.isinf(ref[[0, 2]]).all()  # the reference agrees the divergence is infinite
    with pytest.raises(ValueError, match=_both_in_msg(f"{side}_logits", "-inf")):
        ab(s, t, a, b)
    # ... but not when the offending positions are masked out
    mask = torch.tensor([False, True, False])
    out = ab(s, t, a, b, mask=mask, reduction="none")
    assert torch.isfinite(out).all() and out[0] == 0 and out[2] == 0


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_all_neg_inf_row_unmasked_raises(side):
    s, t = randn(3, 6, seed=41), randn(3, 6, seed=42)
    x = s if side == "student" else t
    x[1, :] = -math.inf
    with pytest.raises(ValueError):
        ab(s, t, 0.5, 0.5)
    with pytest.raises(ValueError):
        ab(s, t, 0.5, 0.5, mask=torch.tensor([True, True, False]))
    out = ab(s, t, 0.5, 0.5, mask=torch.tensor([True, False, True]))
    assert torch.isfinite(out)
    # both sides entirely -inf in an unmasked row is also an error
    s2, t2 = s.clone(), t.clone()
    s2[1, :] = -math.inf
    t2[1, :] = -math.inf
    with pytest.raises(ValueError):
        ab(s2, t2, 0.5, 0.5)


# ----------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------
S0 = randn(2, 5, seed=43)
T0 = randn(2, 5, seed=44)


def _shape_in(msg, shape):
    forms = [str(tuple(shape)), str(list(shape)), str(torch.Size(shape)), "x".join(map(str, shape)),
             ", ".join(map(str, shape))]
    return any(f in msg for f in forms)


def test_shape_mismatch_message():
    for s, t in [(randn(2, 5), randn(2, 6)), (randn(2, 5), randn(3, 5)), (randn(2, 3, 5), randn(6, 5)),
                 (randn(5), randn(2, 5))]:
        with pytest.raises(ValueError, match=_both_in_msg("student_logits", "teacher_logits")) as ei:
            ab(s, t, 1, 0)
        msg = str(ei.value)
        assert _shape_in(msg, s.shape) and _shape_in(msg, t.shape), msg


@pytest.mark.parametrize("exc,kw,match", [
    (TypeError, dict(student_logits=[[0.0, 1.0]]), "student_logits"),
    (TypeError, dict(teacher_logits=np.zeros((2, 5))), "teacher_logits"),
    (TypeError, dict(student_logits=torch.zeros(2, 5, dtype=torch.int64)), "student_logits"),
    (TypeError, dict(teacher_logits=torch.zeros(2, 5, dtype=torch.int32)), "teacher_logits"),
    (TypeError, dict(teacher_logits=torch.zeros(2, 5, dtype=torch.bool)), "teacher_logits"),
    (TypeError, dict(student_logits=torch.zeros(2, 5, dtype=torch.complex64)), "student_logits"),
    (ValueError, dict(alpha=math.nan), "alpha"),
    (ValueError, dict(alpha=math.inf), "alpha"),
    (ValueError, dict(alpha=-math.inf), "alpha"),
    (ValueError, dict(beta=math.nan), "beta"),
    (ValueError, dict(beta=math.inf), "beta"),
    (ValueError, dict(temperature=0.0), "temperature"),
    (ValueError, dict(temperature=-1.0), "temperature"),
    (ValueError, dict(temperature=math.nan), "temperature"),
    (ValueError, dict(temperature=math.inf), "temperature"),
    (ValueError, dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    (ValueError, dict(mask=torch.ones(3, dtype=torch.bool)), "mask"),
    (ValueError, dict(mask=torch.ones(2, 5, dtype=torch.bool)), "mask"),
    (ValueError, dict(mask=torch.ones(2, dtype=torch.int64)), "mask"),
    (ValueError, dict(mask=torch.ones(2, dtype=torch.float32)), "mask"),
    (ValueError, dict(reduction="avg"), "reduction"),
    (ValueError, dict(reduction="MEAN"), "reduction"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_bad_input_raises(exc, kw, match):
    args = dict(student_logits=S0, teacher_logits=T0, alpha=0.5, beta=0.5)
    args.update(kw)
    s, t, a, b = (args.pop(k) for k in ("student_logits", "teacher_logits", "alpha", "beta"))
    with pytest.raises(exc, match=match):
        abkd.ab_divergence(s, t, a, b, **args)


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_nan_or_posinf_logits_raise(side, bad, dtype):
    s, t = S0.clone().to(dtype), T0.clone().to(dtype)
    (s if side == "student" else t)[1, 3] = bad
    with pytest.raises(ValueError, match=f"{side}_logits"):
        ab(s, t, 0.5, 0.5)
    # masked out -> fine
    out = ab(s, t, 0.5, 0.5, mask=torch.tensor([True, False]))
    assert torch.isfinite(out)


def test_module_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        abkd.ABDivergence(0.5, 0.5, reduction="bogus")(S0, T0)


def test_module_bad_hyperparameters():
    for kw, name in [(dict(alpha=math.nan, beta=0.5), "alpha"), (dict(alpha=0.5, beta=math.inf), "beta"),
                     (dict(alpha=0.5, beta=0.5, temperature=0.0), "temperature")]:
        with pytest.raises(ValueError, match=name):
            abkd.ABDivergence(**kw)(S0, T0)


# ----------------------------------------------------------------------------------
# hypothesis properties (fp64)
# ----------------------------------------------------------------------------------
HYP = settings(max_examples=40, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])
coef = st.floats(-2, 2, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def logit_pairs(draw):
    n = draw(st.integers(1, 3))
    V = draw(st.integers(2, 9))
    el = st.floats(-6, 6, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    s = draw(hnp.arrays(np.float64, (n, V), elements=el))
    t = draw(hnp.arrays(np.float64, (n, V), elements=el))
    return torch.from_numpy(s), torch.from_numpy(t)


def _scale(s, t, a, b):
    "magnitude of the pieces of the general formula (without the 1/(alpha beta) factor)"
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    return 1.0 + (p ** a * q ** b + p ** (a + b) + q ** (a + b)).sum(-1)


@HYP
@given(logit_pairs(), coef, coef)
def test_prop_nonnegative(st_pair, a, b):
    s, t = st_pair
    d = ab(s, t, a, b, reduction="none")
    assert torch.isfinite(d).all(), (a, b, d)
    assert (d >= -1e-9 * _scale(s, t, a, b)).all(), (a, b, d)


@HYP
@given(logit_pairs(), coef, coef)
def test_prop_zero_on_diagonal(st_pair, a, b):
    s, _ = st_pair
    d = ab(s, s.clone(), a, b, reduction="none")
    assert torch.isfinite(d).all(), (a, b, d)
    assert (d.abs() <= 1e-9 * _scale(s, s, a, b)).all(), (a, b, d)


@HYP
@given(logit_pairs(), coef, coef, st.randoms(use_true_random=False))
def test_prop_vocab_permutation_invariance(st_pair, a, b, rnd):
    s, t = st_pair
    perm = list(range(s.shape[-1]))
    rnd.shuffle(perm)
    d = ab(s, t, a, b, reduction="none")
    dp = ab(s[:, perm], t[:, perm], a, b, reduction="none")
    torch.testing.assert_close(dp, d, rtol=1e-9, atol=1e-11 * _scale(s, t, a, b).max().item())


@HYP
@given(logit_pairs(), coef, coef, st.floats(-4, 4), st.floats(-4, 4))
def test_prop_shift_invariance(st_pair, a, b, cs, ct):
    s, t = st_pair
    d = ab(s, t, a, b, reduction="none")
    d2 = ab(s + cs, t + ct, a, b, reduction="none")
    torch.testing.assert_close(d2, d, rtol=1e-8, atol=1e-10 * _scale(s, t, a, b).max().item())


def test_align_next_token_shifts_logits_and_labels_together():
    from abkd import align_next_token
    logits, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5)); labels[0, :3] = -100
    s, t, lab, mask = align_next_token(logits, teacher, labels=labels)
    assert torch.equal(s, logits[:, :-1]) and torch.equal(t, teacher[:, :-1]) and torch.equal(lab, labels[:, 1:])
    assert torch.equal(mask, labels[:, 1:] != -100) and int(mask.sum()) == 8 - 2


@pytest.mark.parametrize("labels, logits, match", [
    (torch.zeros(2, 5), torch.randn(2, 5, 7), "integer token ids"),
    (torch.zeros(2, 5, dtype=torch.long), torch.randn(2, 4, 7), r"\[\*labels.shape, V\]"),
    (torch.zeros(2, 1, dtype=torch.long), torch.randn(2, 1, 7), "L >= 2"),
])
def test_align_next_token_bad_inputs(labels, logits, match):
    from abkd import align_next_token
    with pytest.raises((TypeError, ValueError), match=match): align_next_token(logits, labels=labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.complex64])
def test_mask_from_labels_refuses_non_integer_labels(dtype):
    with pytest.raises(TypeError, match="labels must hold integer token ids"):
        abkd.mask_from_labels(torch.zeros(3, dtype=dtype))


# ----------------------------------------------------------------------------------
# the teacher-gradient rule, V = 1, meta tensors (the shared plumbing of every divergence)
# ----------------------------------------------------------------------------------
def test_teacher_requiring_grad_is_refused_by_default():
    from abkd.divergence import ab_divergence_reference
    s, t = randn(3, 9, seed=61), randn(3, 9, seed=62).requires_grad_()
    with pytest.raises(ValueError, match=r"teacher_logits requires a gradient.*torch\.no_grad\(\).*"
                                         r"teacher_logits\.detach\(\).*teacher_grad=True"):
        ab_divergence_reference(s, t, 0.2, 0.7)
    with torch.no_grad():                                   # nothing is differentiated: accepted
        assert ab_divergence_reference(s, t, 0.2, 0.7) == ab_divergence_reference(s, t.detach(), 0.2, 0.7)
    with pytest.raises(TypeError, match="teacher_grad must be True or False"):
        ab_divergence_reference(s, t, 0.2, 0.7, teacher_grad=1)


@pytest.mark.parametrize("a,b,T", [(0.2, 0.7, 1.0), (1, 0, 2.0), (-0.3, 1.2, 1.5)])
def test_teacher_grad_true_gives_the_reference_teacher_gradient(a, b, T):
    "teacher_grad=True: the teacher's gradient is the mpmath reference's (central differences, 50 digits)."
    from abkd.divergence import ab_divergence_reference
    s, t = randn(2, 6, seed=63), randn(2, 6, seed=64).requires_grad_()
    ab_divergence_reference(s, t, a, b, temperature=T, reduction="sum", teacher_grad=True).backward()
    ref = ref_ab_gradient(s.numpy(), t.detach().numpy(), a, b, T, wrt="teacher")
    np.testing.assert_allclose(t.grad.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_vocabulary_of_one_and_meta_tensors_are_refused():
    from abkd.divergence import ab_divergence_reference
    with pytest.raises(ValueError, match=r"student_logits has a vocabulary dimension of size 1.*V >= 2"):
        ab_divergence_reference(randn(4, 1), randn(4, 1), 0.2, 0.7)
    with pytest.raises(ValueError, match=r"teacher_logits is on the meta device"):
        ab_divergence_reference(randn(4, 3), torch.empty(4, 3, device="meta", dtype=torch.float64), 0.2, 0.7)
    with pytest.raises(ValueError, match=r"mask is on meta.*mask\.to"):
        ab_divergence_reference(randn(4, 3), randn(4, 3), 0.2, 0.7, mask=torch.ones(4, dtype=torch.bool, device="meta"))


def test_integer_and_flag_checks():
    from abkd.divergence import as_int, check_flag
    assert as_int(3, "epochs", 1) == 3 and as_int(np.int64(0), "seed") == 0
    for bad, exc, match in ((True, TypeError, "epochs must be an int, got bool"), (2.0, TypeError, "must be an int"),
                            (0, ValueError, r"epochs must be an int >= 1, got 0")):
        with pytest.raises(exc, match=match):
            as_int(bad, "epochs", 1)
    assert check_flag(False, "amp") is False
    with pytest.raises(TypeError, match="amp must be True or False, got 'yes'"):
        check_flag("yes", "amp")
