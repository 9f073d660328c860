"""Independent float64 references for the loss zoo (token-level and vision).

Every function here is written from the defining formula of its loss, in probability space, with numpy
float64: softmax, sums of p*log(p/q), powers, sorting, entropies. Nothing is imported from abkd, and
nothing uses log-space tricks, divided differences or the core's autograd function. Inputs are logits
(any array-like, converted to float64); -inf logits give probability 0 and the usual conventions
0*log(0/x) = 0 apply.
"""
from __future__ import annotations

import numpy as np

__all__ = ["softmax", "kl", "ab_div", "entropy", "fkl", "rkl", "ab", "alpha_div", "js", "tvd", "sfkl", "srkl",
           "wsd", "akl", "akl_head_weight", "bdkd", "TOKEN_REFERENCES", "kd", "abkd", "dkd", "abdkd", "zscore", "lsd",
           "ablsd", "ttm", "abttm", "wttm"]


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def softmax(logits, T: float = 1.0) -> np.ndarray:
    "Probabilities exp(z/T)/sum exp(z/T) along the last axis (-inf -> 0)."
    z = _f64(logits) / T
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    "KL(a||b) = sum_k a_k log(a_k/b_k), terms with a_k = 0 are 0 (inf where a_k > 0 = b_k)."
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * np.log(a / b), 0.0)
    return terms.sum(-1)


def ab_div(p: np.ndarray, q: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    "D_AB(p||q) of Cichocki, Cruces & Amari (2011) and its four limits; entries with p = q = 0 are dropped."
    a, b = float(alpha), float(beta)
    s = a + b
    keep = (p > 0) | (q > 0)
    p, q = np.where(keep, p, 1.0), np.where(keep, q, 1.0)
    def xlog(x, y):                      # x log(x/y) with 0 log(0/y) = 0
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0) / y), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        if a == 0 and b == 0:
            t = 0.5 * (np.log(p) - np.log(q)) ** 2
        elif b == 0:
            t = (xlog(p**a, q**a) - p**a + q**a) / a**2
        elif a == 0:
            t = (xlog(q**b, p**b) - q**b + p**b) / b**2
        elif s == 0:
            t = (np.log(q**a / p**a) + (q**a / p**a) ** -1 - 1) / a**2
        else:
            t = -(p**a * q**b - a / s * p**s - b / s * q**s) / (a * b)
    return np.where(keep, t, 0.0).sum(-1)


def entropy(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(a > 0, a * np.log(a), 0.0).sum(-1)


# ---------------------------------------------------------------------------------------------
# token-level divergences: functions of (p, q) = (teacher, student) probabilities
# ---------------------------------------------------------------------------------------------
def fkl(p, q): return kl(p, q)
def rkl(p, q): return kl(q, p)
def ab(p, q, alpha, beta): return ab_div(p, q, alpha, beta)


def alpha_div(p, q, alpha):
    "Amari: (1 - sum p^a q^(1-a)) / (a (1-a)); the KL limits at a = 1 and a = 0."
    if alpha == 1: return kl(p, q)
    if alpha == 0: return kl(q, p)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1 - (p**alpha * q ** (1 - alpha)).sum(-1)) / (alpha * (1 - alpha))


def js(p, q, beta=0.5):
    "beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q."
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def tvd(p, q): return 0.5 * np.abs(p - q).sum(-1)
def sfkl(p, q, lam=0.1): return kl(p, lam * p + (1 - lam) * q)
def srkl(p, q, lam=0.1): return kl(q, lam * q + (1 - lam) * p)


def wsd(p, q, lam=0.5):
    out = 0.0
    if lam < 1: out = out + (1 - lam) * kl(p, q)
    if lam > 0: out = out + lam * kl(q, p)
    return out


def akl_head_weight(p, q, mu=0.5):
    """Wu et al.: rank by p (descending, ties in index order); head = cumulative p <= mu, plus the top-1;
    returns g_head / (g_head + g_tail) per row (1/2 when both gaps are 0)."""
    p2, q2 = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    out = np.empty(p2.shape[0])
    for i, (pr, qr) in enumerate(zip(p2, q2)):
        order = sorted(range(len(pr)), key=lambda k: (-pr[k], k))
        cum, g_head, g_tail = 0.0, 0.0, 0.0
        for rank, k in enumerate(order):
            cum += pr[k]
            if rank == 0 or cum <= mu: g_head += abs(pr[k] - qr[k])
            else: g_tail += abs(pr[k] - qr[k])
        out[i] = g_head / (g_head + g_tail) if g_head + g_tail > 0 else 0.5
    return out.reshape(p.shape[:-1])


def akl(p, q, mu=0.5):
    w = akl_head_weight(p, q, mu)
    return w * kl(p, q) + (1 - w) * kl(q, p)


def bdkd(p, q, weight=3.0):
    hp, hq = entropy(p), entropy(q)
    return np.where(hp > hq, weight, 1.0) * kl(p, q) + np.where(hq > hp, weight, 1.0) * kl(q, p)


TOKEN_REFERENCES = {"fkl": fkl, "rkl": rkl, "ab": ab, "alpha": alpha_div, "js": js, "tvd": tvd, "sfkl": sfkl,
                    "srkl": srkl, "wsd": wsd, "akl": akl, "bdkd": bdkd}


# ---------------------------------------------------------------------------------------------
# vision losses: functions of logits [B, C] (and labels), batch mean
# ---------------------------------------------------------------------------------------------
def kd(s, t, y=None, T=4.0):
    return (T**2 * kl(softmax(t, T), softmax(s, T))).mean()


def abkd(s, t, y=None, alpha=0.8, beta=0.3, T=4.0):
    return (T**2 * ab_div(softmax(t, T), softmax(s, T), alpha, beta)).mean()


def _binary(pi, y):
    py = pi[np.arange(len(y)), y]
    return np.stack([py, 1 - py], axis=1)


def _non_target(pi, y):
    keep = np.ones_like(pi, dtype=bool)
    keep[np.arange(len(y)), y] = False
    rest = pi[keep].reshape(pi.shape[0], pi.shape[1] - 1)
    return rest / rest.sum(1, keepdims=True)


def dkd(s, t, y, a=1.0, b=8.0, T=4.0, epoch=None, warmup=20.0, alpha=1.0, beta=0.0, ab_tckd=True):
    "DKD (Zhao et al.) with D_AB in NCKD and, if ab_tckd, in TCKD: binary target distribution + renormalized rest."
    y = _f64(y).astype(int)
    p, q = softmax(t, T), softmax(s, T)
    ta, tb = (alpha, beta) if ab_tckd else (1.0, 0.0)
    tckd = T**2 * ab_div(_binary(p, y), _binary(q, y), ta, tb)
    nckd = T**2 * ab_div(_non_target(p, y), _non_target(q, y), alpha, beta)
    factor = 1.0 if epoch is None or warmup == 0 else min(epoch / warmup, 1.0)
    return factor * (a * tckd + b * nckd).mean()


def abdkd(s, t, y, alpha=0.8, beta=0.3, **kw): return dkd(s, t, y, alpha=alpha, beta=beta, **kw)


def zscore(z, eps=1e-7):
    z = _f64(z)
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + eps)


def lsd(s, t, y=None, T=2.0):
    return (T**2 * kl(softmax(zscore(t), T), softmax(zscore(s), T))).mean()


def ablsd(s, t, y=None, alpha=0.8, beta=0.3, T=2.0):
    return (T**2 * ab_div(softmax(zscore(t), T), softmax(zscore(s), T), alpha, beta)).mean()


def _power(t, gamma):
    pg = softmax(t) ** gamma
    return pg / pg.sum(-1, keepdims=True), pg.sum(-1)


def ttm(s, t, y=None, gamma=0.1):
    return kl(_power(t, gamma)[0], softmax(s)).mean()


def abttm(s, t, y=None, alpha=0.8, beta=0.3, gamma=0.1):
    return ab_div(_power(t, gamma)[0], softmax(s), alpha, beta).mean()


def wttm(s, t, y=None, gamma=0.2):
    tilde, weight = _power(t, gamma)
    return (weight * kl(tilde, softmax(s))).mean()
