"""Independent high-precision reference for the alpha-beta divergence.

Everything here is computed with mpmath (50 significant digits by default) directly
from the probability-space definition of Cichocki, Cruces & Amari (2011) and its four
limit formulas.  The branch is chosen by whether alpha, beta and sigma = alpha + beta
are *exactly* zero; there are no divided differences, no series, no log-space tricks.

Gradients are obtained by numerical differentiation of the reference divergence
(second-order central differences with a tiny step at raised precision), so they are
independent of any closed form.  The closed forms are only used as a cross-check
(`closed_form_gradient`), in the self-tests.

Inputs are torch tensors of any floating dtype; they are converted exactly
(dtype -> float64 -> mpf).  Outputs are numpy object arrays of mpf (divergences) or
numpy float64 arrays (gradients, via `to_float64` for divergences).
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import torch
from mpmath import mp, mpf

DPS = 50          # working precision of the reference divergence
GRAD_DPS = 70     # working precision of the numerical gradient
GRAD_STEP_EXP = 22  # step h = 10**-GRAD_STEP_EXP for the central difference

__all__ = ["DPS", "ref_ab_divergence", "ref_ab_gradient", "closed_form_gradient",
           "ref_terms_row", "to_float64", "softmax_row", "term"]


# ----------------------------------------------------------------------------------
# conversion helpers
# ----------------------------------------------------------------------------------
def _rows(x):
    "torch tensor [..., V] -> (list of rows of python floats, leading shape)"
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float64)
    x = x.detach().to("cpu", torch.float64)
    if x.dim() == 0:
        raise ValueError("reference needs at least one (vocab) dimension")
    V = x.shape[-1]
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, V).tolist(), lead


def _is_ninf(v) -> bool:
    return mpmath.isinf(v) and v < 0


def to_float64(a) -> np.ndarray:
    "numpy object array (or list) of mpf -> float64 array of the same shape"
    a = np.asarray(a, dtype=object)
    return np.vectorize(lambda v: float(v), otypes=[np.float64])(a) if a.size else a.astype(np.float64)


# ----------------------------------------------------------------------------------
# the definition
# ----------------------------------------------------------------------------------
def softmax_row(z, temperature):
    """softmax(z / T) of one row of mpf logits at the current precision.
    -inf entries get probability exactly 0.  Returns None when every entry is -inf."""
    T = mpf(temperature)
    finite = [mpf(v) / T for v in z if not _is_ninf(v)]
    if not finite:
        return None
    for v in finite:
        if mpmath.isnan(v) or mpmath.isinf(v):
            raise ValueError("reference: NaN/+inf logits are not allowed")
    m = max(finite)
    e = [mpf(0) if _is_ninf(v) else mpmath.exp(mpf(v) / T - m) for v in z]
    S = mpmath.fsum(e)
    return [x / S for x in e]


def term(p, q, a, b):
    """The contribution of one vocab entry, p = teacher prob, q = student prob, a = alpha, b = beta
    (all mpf).  Returns +inf where the divergence is infinite."""
    s = a + b  # exact for the doubles used here (mp precision >> 53 bits)
    if p == 0 and q == 0:
        return mpf(0)
    if p == 0:  # teacher -inf only: p^a q^b -> 0 iff a > 0, p^s -> 0 iff s > 0
        if a > 0 and s > 0:
            return q ** s / (a * s)
        return mpmath.inf
    if q == 0:  # student -inf only
        if b > 0 and s > 0:
            return p ** s / (b * s)
        return mpmath.inf
    if a != 0 and b != 0 and s != 0:  # general
        return -(p ** a * q ** b - (a / s) * p ** s - (b / s) * q ** s) / (a * b)
    if a != 0 and b == 0:  # beta = 0: generalized KL in p^a, q^a
        pa, qa = p ** a, q ** a
        return (pa * mpmath.log(pa / qa) - pa + qa) / (a * a)
    if a == 0 and b != 0:  # alpha = 0
        pb, qb = p ** b, q ** b
        return (qb * mpmath.log(qb / pb) - qb + pb) / (b * b)
    if a != 0 and s == 0:  # alpha = -beta: Itakura-Saito-like
        r = q ** a / p ** a
        return (mpmath.log(r) + 1 / r - 1) / (a * a)
    # alpha = beta = 0: log-Euclidean
    d = mpmath.log(p) - mpmath.log(q)
    return d * d / 2


def ref_terms_row(s_row, t_row, alpha, beta, temperature=1.0):
    "per-vocab-entry contributions of one position (current mp precision); None if a row is all -inf"
    q = softmax_row([mpf(v) for v in s_row], temperature)
    p = softmax_row([mpf(v) for v in t_row], temperature)
    if p is None or q is None:
        return None
    a, b = mpf(alpha), mpf(beta)
    return [term(pk, qk, a, b) for pk, qk in zip(p, q)]


def _div_row(s_row, t_row, alpha, beta, temperature):
    terms = ref_terms_row(s_row, t_row, alpha, beta, temperature)
    if terms is None:
        return mpmath.nan
    if any(mpmath.isinf(t) for t in terms):
        return mpmath.inf
    return mpmath.fsum(terms)


def ref_ab_divergence(student_logits, teacher_logits, alpha, beta, temperature=1.0, dps=DPS):
    """Per-position divergence D(p || q), p = softmax(teacher/T), q = softmax(student/T).

    Returns a numpy object array of mpf with shape = leading dims (0-d for 1-D input).
    +inf marks an infinite divergence (one-sided -inf outside the finite region);
    nan marks a row that is entirely -inf on either side."""
    s_rows, lead = _rows(student_logits)
    t_rows, lead_t = _rows(teacher_logits)
    if lead != lead_t or len(s_rows[0]) != len(t_rows[0]):
        raise ValueError("reference: shapes differ")
    with mp.workdps(dps):
        vals = [_div_row(sr, tr, alpha, beta, temperature) for sr, tr in zip(s_rows, t_rows)]
    out = np.empty(len(vals), dtype=object)
    out[:] = vals
    return out.reshape(lead)


def ref_ab_gradient(student_logits, teacher_logits, alpha, beta, temperature=1.0, wrt="student",
                    dps=GRAD_DPS, step_exp=GRAD_STEP_EXP):
    """d D_position / d logits by central differences of the reference divergence.

    Each position's divergence depends only on its own row, so this is also the gradient of
    the *sum* of the per-position divergences.  `wrt` is "student" or "teacher".  Entries whose
    logit is -inf get gradient 0 (they cannot be perturbed; the spec's limit value is 0).
    Returns float64 numpy array with the shape of the input."""
    if wrt not in ("student", "teacher"):
        raise ValueError(wrt)
    s_rows, lead = _rows(student_logits)
    t_rows, _ = _rows(teacher_logits)
    V = len(s_rows[0])
    out = np.zeros((len(s_rows), V), dtype=np.float64)
    with mp.workdps(dps):
        h = mpf(10) ** (-step_exp)
        for r, (sr, tr) in enumerate(zip(s_rows, t_rows)):
            s = [mpf(v) for v in sr]
            t = [mpf(v) for v in tr]
            x = s if wrt == "student" else t
            for k in range(V):
                if _is_ninf(x[k]):
                    continue
                x0 = x[k]
                x[k] = x0 + h
                fp = _div_row(s, t, alpha, beta, temperature)
                x[k] = x0 - h
                fm = _div_row(s, t, alpha, beta, temperature)
                x[k] = x0
                out[r, k] = float((fp - fm) / (2 * h))
    return out.reshape(lead + (V,))


def closed_form_gradient(student_logits, teacher_logits, alpha, beta, temperature=1.0,
                         wrt="student", dps=DPS):
    """Closed-form gradient, used ONLY to cross-check the numerical reference gradient.
    student: (1/T)(g - q sum g), g = q^b (q^a - p^a)/a   (a = 0: q^b log(q/p))
    teacher: (1/T)(f - p sum f), f = p^a (p^b - q^b)/b   (b = 0: p^a log(p/q))"""
    s_rows, lead = _rows(student_logits)
    t_rows, _ = _rows(teacher_logits)
    V = len(s_rows[0])
    out = np.zeros((len(s_rows), V), dtype=np.float64)
    with mp.workdps(dps):
        a, b, T = mpf(alpha), mpf(beta), mpf(temperature)
        for r, (sr, tr) in enumerate(zip(s_rows, t_rows)):
            q = softmax_row([mpf(v) for v in sr], temperature)
            p = softmax_row([mpf(v) for v in tr], temperature)
            if wrt == "teacher":  # symmetry D_{a,b}(p||q) = D_{b,a}(q||p)
                p, q, a_, b_ = q, p, b, a
            else:
                a_, b_ = a, b
            g = []
            for pk, qk in zip(p, q):
                if qk == 0:
                    g.append(mpf(0))
                elif a_ == 0:
                    g.append(qk ** b_ * mpmath.log(qk / pk))
                else:
                    g.append(qk ** b_ * (qk ** a_ - pk ** a_) / a_)
            G = mpmath.fsum(g)
            for k in range(V):
                out[r, k] = float((g[k] - q[k] * G) / T)
    return out.reshape(lead + (V,))


# ----------------------------------------------------------------------------------
# self-test (also exercised from tests/test_divergence.py and tests/test_gradients.py)
# ----------------------------------------------------------------------------------
def _self_test():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 9, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 9, generator=g, dtype=torch.float64) * 2
    # limit formulas vs the general formula approached at 1e-20 (extra precision)
    for (a, b), (da, db) in [((1.0, 0.0), (0, 1)), ((0.0, 1.0), (1, 0)), ((0.0, 0.0), (1, 2)),
                             ((0.5, -0.5), (0, 1)), ((-0.7, 0.0), (0, 1)), ((0.0, -1.3), (1, 0))]:
        x = to_float64(ref_ab_divergence(s, t, a, b))
        with mp.workdps(120):
            eps = mpf(10) ** -20
            y = to_float64(ref_ab_divergence(s, t, mpf(a) + da * eps, mpf(b) + db * eps, dps=120))
        assert np.allclose(x, y, rtol=1e-15, atol=0), ((a, b), x, y)
    P = torch.softmax(t, -1)
    Q = torch.softmax(s, -1)
    kl = (P * (P.log() - Q.log())).sum(-1).numpy()
    assert np.allclose(to_float64(ref_ab_divergence(s, t, 1, 0)), kl, rtol=1e-12)
    print("reference self-test ok")


if __name__ == "__main__":
    _self_test()
