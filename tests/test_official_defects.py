"""Defects of the official ABKD code (found by a differential run against it) that this package does not share.

Every expected value here is written from the mathematics: the mpmath reference of `reference.py` (the definition
and its four limit formulas at 50 digits) or the float64 probability-space formulas of `loss_reference.py`. Nothing
is taken from the official code. The defects, one group of tests each:

1. wrong constants on the branches alpha = 0, beta = 0, alpha + beta = 0 (the official returns alpha or beta times
   the true value there, negative for alpha < 0);
2. NaN gradients where both sides are -inf, and float32 underflow for a logit gap over ~104;
3. one-sided -inf entries silently dropped (a total variation of half its true value);
4. NaN padding rows that poison the loss although they are masked out;
5. 0/0 in the adaptive KL when the student equals the teacher;
6. float32 cancellation next to the axes (the official: 1.5e-4 relative error at alpha = 1e-3);
7. ZeroDivisionError at the boundary points in the vision AB losses.

The vision losses take no row mask, so group 4 covers the token-level entry points only.
"""
import math

import mpmath
import numpy as np
import pytest
import torch

import abkd
import loss_reference as LR
from abkd.vision_losses import get_vision_loss
from reference import ref_ab_divergence, ref_ab_gradient, to_float64

NINF, NAN = float("-inf"), float("nan")
IMPLS = ["reference", "chunked", "triton"]
ALPHA0 = [(0.0, 0.3), (0.0, 1.0), (0.0, -0.5)]                     # alpha = 0 branch
BETA0 = [(0.5, 0.0), (1.0, 0.0), (2.0, 0.0), (-0.5, 0.0)]          # beta = 0 branch
SIGMA0 = [(0.5, -0.5), (-0.5, 0.5), (2.0, -2.0)]                   # alpha + beta = 0 branch
BRANCH_POINTS = ALPHA0 + BETA0 + SIGMA0 + [(0.0, 0.0)]
VISION_AB = {"abkd": LR.abkd, "abdkd": LR.abdkd, "ablsd": LR.ablsd, "abttm": LR.abttm}


def logits(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def rel(x, ref):
    "max relative error of x against a float64 / mpf reference"
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(to_float64(ref) if np.asarray(ref).dtype == object else ref,
                                                         dtype=np.float64)
    return float(np.max(np.abs(x - ref) / np.abs(ref)))


def value_and_grad(fn, s, t):
    "fn(s, t) and d fn / d s (float64 numpy)"
    x = s.detach().clone().requires_grad_(True)
    v = fn(x, t)
    v.backward()
    return v.detach(), x.grad.detach()


def limit_formula(p, q, a, b):
    """The limit of one entry's D_AB term at a branch point, written out in mpmath (p teacher, q student):
    alpha = 0: (q^b log(q^b/p^b) - q^b + p^b) / b^2;  beta = 0: (p^a log(p^a/q^a) - p^a + q^a) / a^2;
    alpha + beta = 0: (log(q^a/p^a) + p^a/q^a - 1) / a^2;  alpha = beta = 0: (log p - log q)^2 / 2."""
    if a == 0 and b == 0: return (mpmath.log(p) - mpmath.log(q)) ** 2 / 2
    if a == 0: return (q ** b * mpmath.log(q ** b / p ** b) - q ** b + p ** b) / b ** 2
    if b == 0: return (p ** a * mpmath.log(p ** a / q ** a) - p ** a + q ** a) / a ** 2
    return (mpmath.log(q ** a / p ** a) + p ** a / q ** a - 1) / a ** 2


def general_formula(p, q, a, b):
    "The general-position term -(p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)) / (a b), in mpmath."
    s = a + b
    return -(p ** a * q ** b - a / s * p ** s - b / s * q ** s) / (a * b)


def mp_probs(z):
    e = [mpmath.exp(mpmath.mpf(v)) for v in z]
    S = mpmath.fsum(e)
    return [x / S for x in e]


# ---------------------------------------------------------------------------------------------------------------
# 1. the branch constants
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("a,b", BRANCH_POINTS)
def test_branch_values_match_the_limit_formulas(a, b, impl):
    """Defect: the official's alpha = 0 / beta = 0 / alpha + beta = 0 branches return alpha or beta times the true
    value (negative for alpha < 0). Ours equals the limit formula evaluated with mpmath, per row, to 1e-13."""
    s, t = logits(3, 8, seed=1), logits(3, 8, seed=2)
    ours = abkd.ab_divergence(s, t, a, b, reduction="none", impl=impl)
    with mpmath.workdps(50):
        exact = [mpmath.fsum(limit_formula(pk, qk, mpmath.mpf(a), mpmath.mpf(b))
                             for pk, qk in zip(mp_probs(tr), mp_probs(sr))) for sr, tr in zip(s.tolist(), t.tolist())]
    assert rel(ours, np.array([float(v) for v in exact])) < 1e-13
    assert rel(ours, ref_ab_divergence(s, t, a, b)) < 1e-13


@pytest.mark.parametrize("a,b", BRANCH_POINTS)
def test_branch_gradients_match_the_reference(a, b):
    """Defect: a wrong branch constant scales the gradient as well. Ours (student and teacher side) equals the
    numerical gradient of the mpmath reference."""
    s, t = logits(2, 6, seed=3), logits(2, 6, seed=4)
    xs, xt = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    abkd.ab_divergence(xs, xt, a, b, reduction="sum", teacher_grad=True).backward()
    for got, wrt in ((xs.grad, "student"), (xt.grad, "teacher")):
        ref = ref_ab_gradient(s, t, a, b, wrt=wrt)
        assert np.max(np.abs(got.numpy() - ref)) <= 1e-12 * np.max(np.abs(ref))


def branch_sequence(a, b, eps):
    "a point at distance ~eps off the branch of (a, b), along the direction that leaves that branch"
    if a == 0 and b == 0: return eps, eps / 2
    if a == 0: return eps, b
    if b == 0: return a, eps
    return a, b + eps                                              # alpha + beta = eps


@pytest.mark.parametrize("a,b", BRANCH_POINTS)
def test_branch_is_the_limit_of_the_general_formula(a, b):
    """Defect: with a wrong constant the branch value is not the limit of the general formula. Approaching each
    branch along eps = +-1e-2 ... 1e-8 (general formula in mpmath at 60 digits, no branch involved), the
    reference converges to the limit formula at rate O(eps); ours follows the reference at every step and its
    branch value is the limit."""
    s, t = logits(2, 6, seed=5), logits(2, 6, seed=6)
    at_branch = abkd.ab_divergence(s, t, a, b, reduction="none").numpy()
    with mpmath.workdps(60):
        rows = [(mp_probs(tr), mp_probs(sr)) for sr, tr in zip(s.tolist(), t.tolist())]
        limit = np.array([float(mpmath.fsum(limit_formula(pk, qk, mpmath.mpf(a), mpmath.mpf(b))
                                            for pk, qk in zip(p, q))) for p, q in rows])
        for sign in (1.0, -1.0):
            gaps = []
            for k in (2, 4, 6, 8):
                ae, be = branch_sequence(a, b, sign * 10.0 ** -k)
                general = np.array([float(mpmath.fsum(general_formula(pk, qk, mpmath.mpf(ae), mpmath.mpf(be))
                                                      for pk, qk in zip(p, q))) for p, q in rows])
                ours = abkd.ab_divergence(s, t, ae, be, reduction="none").numpy()
                assert rel(ours, general) < 1e-12, (ae, be)
                gaps.append(float(np.max(np.abs(general - limit) / limit)))
                assert gaps[-1] <= 100 * 10.0 ** -k, (ae, be, gaps)       # O(eps) convergence to the limit
    assert rel(at_branch, limit) < 1e-13


@pytest.mark.parametrize("a,b", BRANCH_POINTS + [(-0.5, -0.5), (-1.0, 3.0), (0.5, 0.5), (3.0, -1.0)])
def test_divergence_is_nonnegative_and_zero_only_at_p_equal_q(a, b):
    """Defect: the official's beta = 0 branch is negative for alpha < 0. Ours is > 0 for p != q and 0 (to
    rounding) for p = q, given as shifted logits (the softmax is shift-invariant)."""
    t = logits(16, 10, seed=7)
    s = logits(16, 10, seed=8)
    for impl in IMPLS:
        apart = abkd.ab_divergence(s, t, a, b, reduction="none", impl=impl)
        same = abkd.ab_divergence(t + 2.5, t, a, b, reduction="none", impl=impl)
        assert bool((apart > 0).all()), (impl, apart.min())
        assert bool((same >= 0).all()) and float(same.max()) < 1e-25, (impl, same.max())


# ---------------------------------------------------------------------------------------------------------------
# 2. -inf on both sides, float32 underflow
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a,b", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, -0.5), (-0.5, 1.0), (0.2, 0.7)])
def test_minus_inf_on_both_sides_gives_finite_exact_gradients(a, b, dtype):
    """Defect: the official gives NaN gradients where student and teacher are both -inf (0 * log 0 in the
    backward). Ours: finite value and gradient equal to the reference, gradient 0 at the excluded entries."""
    s, t = logits(3, 7, seed=9), logits(3, 7, seed=10)
    both = torch.zeros(3, 7, dtype=torch.bool)
    both[0, 2] = both[1, 0] = both[1, 5] = both[2, 6] = True
    s, t = s.masked_fill(both, NINF).to(dtype), t.masked_fill(both, NINF).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for impl in IMPLS:
        v, g = value_and_grad(lambda x, y: abkd.ab_divergence(x, y, a, b, reduction="sum", impl=impl), s, t)
        ref = ref_ab_gradient(s, t, a, b)
        assert torch.isfinite(g).all() and bool((g[both] == 0).all()), impl
        assert rel(v, mpmath.fsum(ref_ab_divergence(s, t, a, b))) < tol, impl
        assert np.max(np.abs(g.double().numpy() - ref)) <= tol * np.max(np.abs(ref)), impl


@pytest.mark.parametrize("gap", [110.0, 150.0, 400.0])
@pytest.mark.parametrize("a,b", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.2, 0.7), (0.0, 0.0), (1.5, -0.5)])
def test_float32_logit_gap_beyond_underflow_is_exact(a, b, gap):
    """Defect: in float32 exp(-gap) underflows to 0 for a logit gap over ~104, and the official then takes log 0
    (inf / NaN loss and gradients). Ours keeps log-probabilities: value and gradient finite and equal to the
    reference computed from the same float32 inputs."""
    s = torch.tensor([[0.0, -gap, 1.0, -3.0], [2.0, 0.5, -gap / 2, 0.0]], dtype=torch.float32)
    t = torch.tensor([[0.5, -gap + 4.0, -1.0, -3.0], [1.0, 0.0, -gap / 2 - 7.0, 0.3]], dtype=torch.float32)
    assert float(torch.softmax(s, -1)[0, 1]) == 0.0                   # the underflow really happens in float32
    exact = mpmath.fsum(ref_ab_divergence(s, t, a, b))
    ref = ref_ab_gradient(s, t, a, b)
    for impl in IMPLS:
        v, g = value_and_grad(lambda x, y: abkd.ab_divergence(x, y, a, b, reduction="sum", impl=impl), s, t)
        assert torch.isfinite(v) and torch.isfinite(g).all(), impl
        assert rel(v, exact) < 1e-5, impl
        assert np.max(np.abs(g.double().numpy() - ref)) <= 1e-5 * np.max(np.abs(ref)), impl


# ---------------------------------------------------------------------------------------------------------------
# 3. one-sided -inf entries
# ---------------------------------------------------------------------------------------------------------------
def one_sided_pair():
    "(finite logits, the same shape with one -inf entry per row)"
    s = logits(2, 5, seed=11)
    t = logits(2, 5, seed=12)
    t[0, 1] = NINF
    t[1, 4] = NINF
    return s, t


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_tvd_counts_mass_where_one_side_is_zero(side):
    """Defect: the official drops the entries where one side is -inf, so its total variation is about half the
    true one (0.366 for 0.731 in the differential run). Ours is 1/2 sum |p - q| over every entry."""
    finite, with_inf = one_sided_pair()
    s, t = (finite, with_inf) if side == "teacher" else (with_inf, finite)
    v, g = value_and_grad(lambda x, y: abkd.get_loss("tvd", reduction="none")(x, y).sum(), s, t)
    exact = LR.tvd(LR.softmax(t), LR.softmax(s))
    assert rel(v, exact.sum()) < 1e-14
    kept = np.abs(exact - 0.5 * np.where(np.isinf(with_inf.numpy()), 0.0,
                                         np.abs(LR.softmax(t) - LR.softmax(s))).sum(-1))
    assert kept.min() > 1e-2                                          # dropping the entry would be visible
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.2, 0.7), (2.0, -0.5), (-0.5, 1.0), (0.0, 0.0)])
@pytest.mark.parametrize("side", ["teacher", "student"])
def test_ab_one_sided_minus_inf_is_exact_or_refused(a, b, side):
    """Defect: the official drops one-sided -inf terms silently. Ours: the term q^(a+b)/(a(a+b)) (teacher -inf)
    or p^(a+b)/(b(a+b)) (student -inf) is counted where it is finite; where D_AB is +inf the documented ValueError
    says so (ab_divergence and the zoo's 'ab')."""
    finite, with_inf = one_sided_pair()
    s, t = (finite, with_inf) if side == "teacher" else (with_inf, finite)
    exact = ref_ab_divergence(s, t, a, b)
    fns = [lambda x, y: abkd.ab_divergence(x, y, a, b, reduction="none", impl=impl) for impl in IMPLS]
    fns.append(lambda x, y: abkd.get_loss("ab", alpha=a, beta=b, reduction="none")(x, y))
    finite_region = (a > 0 if side == "teacher" else b > 0) and a + b > 0
    assert finite_region == all(mpmath.isfinite(v) for v in exact)
    for fn in fns:
        if finite_region:
            assert rel(fn(s, t).numpy(), exact) < 1e-13
            _, g = value_and_grad(lambda x, y: fn(x, y).sum(), s, t)
            ref = ref_ab_gradient(s, t, a, b)
            assert np.max(np.abs(g.numpy() - ref)) <= 1e-12 * np.max(np.abs(ref))
        else:
            with pytest.raises(ValueError, match=r"D_AB is \+inf there"):
                fn(s, t)


# ---------------------------------------------------------------------------------------------------------------
# 4. NaN padding rows
# ---------------------------------------------------------------------------------------------------------------
ROW_MASK = torch.tensor([[True, False, True], [True, True, False]])


def nan_padded(x):
    "x with every masked-out position filled with NaN"
    return x.masked_fill(~ROW_MASK[..., None], NAN)


def zoo_losses():
    return [(n, {}) for n in abkd.available() if n not in ("ab", "alpha")] + [("ab", dict(alpha=0.2, beta=0.7)),
                                                                           ("alpha", dict(alpha=0.3))]


def zoo_reference(loss, p, q):
    "the float64 formula of a zoo loss at that loss's own hyperparameters"
    return LR.TOKEN_REFERENCES[loss.spec.name](p, q, **loss.hyper)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_padding_rows_do_not_poison_ab_divergence(impl, reduction):
    """Defect: the official computes every row and then masks, so a NaN padding row gives a NaN loss. Ours: the
    masked rows (NaN on both sides) change neither the loss nor the kept rows' gradients, and both equal the
    reference on the kept rows; the masked rows get gradient 0 (value 0 under reduction='none')."""
    s, t = logits(2, 3, 9, seed=13), logits(2, 3, 9, seed=14)
    fn = lambda x, y: abkd.ab_divergence(x, y, 0.2, 0.7, mask=ROW_MASK, reduction=reduction, impl=impl).sum()
    clean, padded = value_and_grad(fn, s, t), value_and_grad(fn, nan_padded(s), nan_padded(t))
    assert torch.equal(clean[0], padded[0]) and torch.equal(clean[1], padded[1])
    assert bool((padded[1][~ROW_MASK] == 0).all())
    per_row = LR.ab(LR.softmax(t[ROW_MASK]), LR.softmax(s[ROW_MASK]), 0.2, 0.7)
    expected = per_row.mean() if reduction == "mean" else per_row.sum()
    assert rel(padded[0], expected) < 1e-13


@pytest.mark.parametrize("name,hyper", zoo_losses(), ids=lambda x: x if isinstance(x, str) else "")
def test_nan_padding_rows_do_not_poison_the_zoo(name, hyper):
    """Defect: NaN padding rows poison the official's losses. Every zoo loss: a masked-out NaN row changes neither
    the loss nor the kept rows' gradients, and the loss equals the float64 formula on the kept rows."""
    s, t = logits(2, 3, 9, seed=15), logits(2, 3, 9, seed=16)
    loss = abkd.get_loss(name, **hyper)
    fn = lambda x, y: loss(x, y, mask=ROW_MASK)
    clean, padded = value_and_grad(fn, s, t), value_and_grad(fn, nan_padded(s), nan_padded(t))
    assert torch.equal(clean[0], padded[0]) and torch.equal(clean[1], padded[1])
    assert bool((padded[1][~ROW_MASK] == 0).all())
    expected = zoo_reference(loss, LR.softmax(t[ROW_MASK]), LR.softmax(s[ROW_MASK])).mean()
    assert rel(padded[0], expected) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_padding_rows_do_not_poison_ab_divergence_from_hidden(impl):
    """Defect: NaN padding poisons the official's loss. From hidden states: NaN hidden states and NaN teacher
    logits at masked positions change neither the loss nor the gradients of the kept hidden states and of the
    head, and the loss equals the reference of the materialized logits on the kept rows."""
    h, t = logits(2, 3, 5, seed=17), logits(2, 3, 11, seed=18)
    W = logits(11, 5, seed=19)

    def run(h, t):
        xh, xw = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        v = abkd.ab_divergence_from_hidden(xh, xw, t, 0.2, 0.7, mask=ROW_MASK, impl=impl)
        v.backward()
        return v.detach(), xh.grad, xw.grad

    clean, padded = run(h, t), run(nan_padded(h), nan_padded(t))
    assert torch.equal(clean[0], padded[0]) and torch.equal(clean[1], padded[1])
    assert torch.allclose(clean[2], padded[2], rtol=1e-14, atol=0) and torch.isfinite(padded[2]).all()
    assert bool((padded[1][~ROW_MASK] == 0).all())
    expected = LR.ab(LR.softmax(t[ROW_MASK]), LR.softmax(h[ROW_MASK] @ W.T), 0.2, 0.7).mean()
    assert rel(padded[0], expected) < 1e-13


# ---------------------------------------------------------------------------------------------------------------
# 5. AKL at student == teacher
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_akl_is_zero_with_zero_gradient_when_student_equals_teacher(shift, dtype):
    """Defect: the official's adaptive KL divides the head gap by the sum of both gaps, 0/0 = NaN when the
    student equals the teacher. Ours: AKL = 0 and its gradient (exactly 0 at p = q, both KL terms are stationary
    there) is finite, also with -inf entries on both sides."""
    t = logits(4, 12, seed=20)
    t[1, 3] = NINF
    t, s = t.to(dtype), (t + shift).to(dtype)
    v, g = value_and_grad(lambda x, y: abkd.get_loss("akl")(x, y), s, t)
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    assert torch.isfinite(v) and 0 <= float(v) <= tol
    assert torch.isfinite(g).all() and float(g.abs().max()) <= tol


# ---------------------------------------------------------------------------------------------------------------
# 6. float32 next to the axes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eps", [1e-3, 1e-5, 1e-7])
@pytest.mark.parametrize("where", ["alpha", "beta", "beta_small", "sigma"])
def test_float32_near_the_axes_has_no_cancellation(where, eps, impl):
    """Defect: the official evaluates the general formula in float32 next to the axes, where its terms cancel
    (1.5e-4 relative error at alpha = 1e-3, beta = 0.7). Ours, in float32, against the mpmath value of the same
    float32 inputs: relative error <= 2e-6 for the value and the gradient, at alpha = eps (beta = 0.7 and
    beta = 1e-4), beta = eps (alpha = 0.7) and alpha + beta = eps (alpha = 0.7)."""
    a, b = {"alpha": (eps, 0.7), "beta_small": (eps, 1e-4), "beta": (0.7, eps), "sigma": (0.7, -0.7 + eps)}[where]
    s, t = logits(4, 10, seed=21, dtype=torch.float32), logits(4, 10, seed=22, dtype=torch.float32)
    v, g = value_and_grad(lambda x, y: abkd.ab_divergence(x, y, a, b, reduction="none", impl=impl).sum(), s, t)
    assert v.dtype == torch.float32
    assert rel(abkd.ab_divergence(s, t, a, b, reduction="none", impl=impl), ref_ab_divergence(s, t, a, b)) <= 2e-6
    ref = ref_ab_gradient(s, t, a, b)
    assert np.max(np.abs(g.double().numpy() - ref)) <= 2e-6 * np.max(np.abs(ref))


# ---------------------------------------------------------------------------------------------------------------
# 7. the vision AB losses at the boundary points
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b", BRANCH_POINTS)
@pytest.mark.parametrize("name", list(VISION_AB))
def test_vision_ab_losses_at_boundary_points(name, a, b):
    """Defect: the official vision AB losses divide by alpha, beta and alpha + beta and raise ZeroDivisionError
    at alpha = 0, beta = 0, alpha + beta = 0. Ours: a finite value equal to the float64 limit formulas and a
    finite gradient; ABKD also equals T^2 times the mpmath reference."""
    s, t = logits(6, 10, seed=23), logits(6, 10, seed=24)
    y = torch.tensor([0, 3, 5, 9, 1, 1])
    loss = get_vision_loss(name, alpha=a, beta=b)
    v, g = value_and_grad(lambda x, z: loss(x, z, y), s, t)
    assert torch.isfinite(v) and torch.isfinite(g).all()
    assert rel(v, VISION_AB[name](s, t, y, alpha=a, beta=b)) < 1e-13
    if name == "abkd":
        T = loss.hyper["temperature"]
        assert rel(v, T ** 2 * mpmath.fsum(ref_ab_divergence(s, t, a, b, temperature=T)) / 6) < 1e-13
