"""Tests of the token-level loss zoo `abkd.losses` against the independent float64 references in
tests/loss_reference.py (each written from its defining formula), plus identities, masks, precision,
gradients, the registry and the vocabulary policy."""
import math

import numpy as np
import pytest
import torch

import loss_reference as ref
from abkd import ab_divergence
from abkd import losses as L

NINF = float("-inf")

# (registry name, hyperparameters, reference function) -- several points per loss
CASES = [
    ("fkl", {}, ref.fkl), ("rkl", {}, ref.rkl),
    ("ab", dict(alpha=0.2, beta=0.7), ref.ab), ("ab", dict(alpha=1.5, beta=-0.4), ref.ab),
    ("ab", dict(alpha=0.0, beta=0.0), ref.ab), ("ab", dict(alpha=0.5, beta=-0.5), ref.ab),
    ("alpha", dict(alpha=0.5), ref.alpha_div), ("alpha", dict(alpha=-0.3), ref.alpha_div),
    ("alpha", dict(alpha=1.7), ref.alpha_div),
    ("js", {}, ref.js), ("js", dict(beta=0.1), ref.js), ("js", dict(beta=0.9), ref.js),
    ("tvd", {}, ref.tvd),
    ("sfkl", {}, ref.sfkl), ("sfkl", dict(lam=0.5), ref.sfkl),
    ("srkl", {}, ref.srkl), ("srkl", dict(lam=0.3), ref.srkl),
    ("wsd", {}, ref.wsd), ("wsd", dict(lam=0.9), ref.wsd),
    ("akl", {}, ref.akl), ("akl", dict(mu=0.2), ref.akl), ("akl", dict(mu=0.9), ref.akl),
    ("bdkd", {}, ref.bdkd), ("bdkd", dict(weight=2.0), ref.bdkd),
]
DEFAULTS = {"ab": dict(alpha=0.2, beta=0.7), "alpha": dict(alpha=0.5)}   # for losses without defaults
NAMES = list(L.LOSSES)


def _ids(cases):
    return [f"{n}-{','.join(f'{k}={v}' for k, v in p.items())}" for n, p, _ in cases]


def randn(*shape, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def fn(name):
    "The registry function with default hyperparameters filled in."
    spec = L.LOSSES[name]
    return lambda s, t, **kw: spec.fn(s, t, **{**DEFAULTS.get(name, {}), **kw})


def rel_err(x, r):
    x, r = np.asarray(x, dtype=np.float64), np.asarray(r, dtype=np.float64)
    return float(np.max(np.abs(x - r) / np.maximum(np.abs(r), 1e-300)))


# ---------------------------------------------------------------------------------------------
# values against the references
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("name,params,reference", CASES, ids=_ids(CASES))
def test_against_reference(name, params, reference, temperature):
    s, t = randn(3, 5, 17, seed=1), randn(3, 5, 17, seed=2)
    ours = L.get_loss(name, temperature=temperature, reduction="none", **params)(s, t)
    expected = reference(ref.softmax(t, temperature), ref.softmax(s, temperature), **params)
    assert ours.shape == (3, 5) and ours.dtype == torch.float64
    assert rel_err(ours, expected) < 1e-12


@pytest.mark.parametrize("name,params,reference", CASES, ids=_ids(CASES))
def test_reference_extreme_logits(name, params, reference):
    "Peaked distributions (logit scale 8): tail probabilities down to ~1e-30, still to ~1e-9 relative."
    s, t = randn(4, 23, seed=3, scale=8.0), randn(4, 23, seed=4, scale=8.0)
    ours = L.LOSSES[name].fn(s, t, **params, reduction="none")
    assert rel_err(ours, reference(ref.softmax(t), ref.softmax(s), **params)) < 1e-9


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_reductions_and_mask(reduction):
    s, t = randn(2, 4, 9, seed=5), randn(2, 4, 9, seed=6)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    for name in NAMES:
        per = fn(name)(s, t, reduction="none")
        got = fn(name)(s, t, mask=mask, reduction=reduction)
        total = (per * mask).sum()
        expected = {"sum": total, "mean": total / mask.sum(), "batchmean": total / 2}[reduction]
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
        torch.testing.assert_close(fn(name)(s, t, mask=mask, reduction="none"), per * mask, rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------
def test_kl_points_are_the_core():
    s, t = randn(6, 30, seed=7), randn(6, 30, seed=8)
    assert torch.equal(L.ab(s, t, 1, 0), L.fkl(s, t))
    assert torch.equal(L.ab(s, t, 0, 1), L.rkl(s, t))
    assert torch.equal(L.fkl(s, t, temperature=3.), ab_divergence(s, t, 1., 0., temperature=3.))
    for a in (-0.5, 0.0, 0.3, 1.0, 2.0):
        assert torch.equal(L.alpha_divergence(s, t, a, reduction="none"), L.ab(s, t, a, 1 - a, reduction="none"))


def test_js_symmetry_and_bounds():
    s, t = randn(6, 30, seed=9), randn(6, 30, seed=10)
    torch.testing.assert_close(L.js(s, t, reduction="none"), L.js(t, s, reduction="none"), rtol=1e-14, atol=0)
    torch.testing.assert_close(L.js(s, t, 0.2, reduction="none"), L.js(t, s, 0.8, reduction="none"), rtol=1e-13, atol=0)
    far = L.js(s * 100, -s * 100, reduction="none")
    assert (far <= math.log(2) + 1e-12).all() and (far > math.log(2) - 1e-3).all()


def test_skew_and_wsd_endpoints():
    s, t = randn(6, 30, seed=11), randn(6, 30, seed=12)
    torch.testing.assert_close(L.sfkl(s, t, 0.0), L.fkl(s, t), rtol=1e-13, atol=0)
    torch.testing.assert_close(L.srkl(s, t, 0.0), L.rkl(s, t), rtol=1e-13, atol=0)
    assert torch.equal(L.wsd(s, t, 0.0), L.fkl(s, t)) and torch.equal(L.wsd(s, t, 1.0), L.rkl(s, t))
    assert (L.sfkl(s * 50, -t * 50, 0.1, reduction="none") <= math.log(10) + 1e-9).all()   # bounded by log(1/λ)


@pytest.mark.parametrize("name", NAMES)
def test_divergence_not_surrogate(name):
    "Each loss is >= 0 and zero at p = q (also for shifted logits: the same distribution)."
    s, t = randn(5, 40, seed=13), randn(5, 40, seed=14)
    assert (fn(name)(s, t, reduction="none") >= 0).all()
    assert fn(name)(s, s + 3.0, reduction="none").abs().max() < 1e-13


# ---------------------------------------------------------------------------------------------
# masked vocabulary
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_both_sided_neg_inf_removes_the_token(name):
    s, t = randn(3, 4, 20, seed=15), randn(3, 4, 20, seed=16)
    sm, tm = s.clone(), t.clone()
    sm[..., 3:7] = NINF
    tm[..., 3:7] = NINF
    kept = [k for k in range(20) if not 3 <= k < 7]
    expected = fn(name)(s[..., kept], t[..., kept], reduction="none")
    torch.testing.assert_close(fn(name)(sm, tm, reduction="none"), expected, rtol=1e-12, atol=1e-15)
    sm.requires_grad_()
    fn(name)(sm, tm).backward()
    assert torch.isfinite(sm.grad).all() and (sm.grad[..., 3:7] == 0).all()


# (teacher-only -inf finite?, student-only -inf finite?) per loss and hyperparameters
NEG_INF_RULES = [
    ("fkl", {}, True, False), ("rkl", {}, False, True),
    ("ab", dict(alpha=0.2, beta=0.7), True, True), ("ab", dict(alpha=0.0, beta=0.7), False, True),
    ("ab", dict(alpha=0.7, beta=-0.2), True, False),
    ("alpha", dict(alpha=0.5), True, True), ("alpha", dict(alpha=1.0), True, False),
    ("alpha", dict(alpha=0.0), False, True),
    ("js", {}, True, True), ("tvd", {}, True, True),
    ("sfkl", {}, True, True), ("sfkl", dict(lam=0.0), True, False),
    ("srkl", {}, True, True), ("srkl", dict(lam=0.0), False, True),
    ("wsd", {}, False, False), ("wsd", dict(lam=0.0), True, False), ("wsd", dict(lam=1.0), False, True),
    ("akl", {}, False, False), ("bdkd", {}, False, False),
]


@pytest.mark.parametrize("name,params,teacher_ok,student_ok", NEG_INF_RULES,
                         ids=[f"{n}-{p}" for n, p, _, _ in NEG_INF_RULES])
def test_one_sided_neg_inf_rules(name, params, teacher_ok, student_ok):
    s, t = randn(4, 12, seed=17), randn(4, 12, seed=18)
    loss = L.LOSSES[name].fn
    for side, ok in (("teacher", teacher_ok), ("student", student_ok)):
        s1, t1 = s.clone(), t.clone()
        (t1 if side == "teacher" else s1)[:, [2, 5]] = NINF
        if ok:
            s1.requires_grad_()
            value = loss(s1, t1, **params, reduction="none")
            expected = ref.TOKEN_REFERENCES[name](ref.softmax(t1), ref.softmax(s1), **params)
            assert rel_err(value.detach(), expected) < 1e-11
            value.sum().backward()
            assert torch.isfinite(s1.grad).all()
        else:
            with pytest.raises(ValueError, match=f"{side}_logits is -inf where"):
                loss(s1, t1, **params)


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_batch(name):
    s, t = randn(2, 3, 10, seed=19).requires_grad_(), randn(2, 3, 10, seed=20)
    none = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in ("mean", "sum", "batchmean"):
        value = fn(name)(s, t, mask=none, reduction=reduction)
        assert value.item() == 0.0
    fn(name)(s, t, mask=none).backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    # masked positions may hold anything, even all -inf or NaN rows
    s2 = s.detach().clone()
    s2[0, 1] = NINF
    s2[1, 2] = float("nan")
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[0, 1] = keep[1, 2] = False
    torch.testing.assert_close(fn(name)(s2, t, mask=keep, reduction="none"),
                               fn(name)(s.detach(), t, reduction="none") * keep, rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", ["js", "sfkl", "srkl", "tvd"])
def test_mixtures_do_not_underflow(name):
    "Tail entries far below the head on one side: the log-space mixture stays finite (log of a sum would be -inf)."
    t = torch.tensor([[0.0, -900.0, -950.0, 1.0]], dtype=torch.float64)
    s = torch.tensor([[-1000.0, 0.0, -2000.0, 2.0]], dtype=torch.float64, requires_grad=True)
    value = fn(name)(s, t)
    assert torch.isfinite(value)
    assert rel_err(value.detach(), ref.TOKEN_REFERENCES[name](ref.softmax(t), ref.softmax(s))) < 1e-9 or name == "tvd"
    value.backward()
    assert torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------------------------
# precision and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision(name, dtype):
    "bf16/fp16/fp32 logits: computed in float32, close to the float64 reference of the same (rounded) logits."
    s, t = randn(4, 50, seed=21, dtype=dtype).requires_grad_(), randn(4, 50, seed=22, dtype=dtype)
    value = fn(name)(s, t, reduction="none")
    assert value.dtype == torch.float32
    params = DEFAULTS.get(name, {})
    expected = ref.TOKEN_REFERENCES[name](ref.softmax(t.float()), ref.softmax(s.detach().float()), **params)
    assert rel_err(value.detach(), expected) < 2e-5
    value.sum().backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", [n for n in NAMES if n != "akl"])
def test_gradcheck(name):
    s, t = randn(2, 3, 6, seed=23).requires_grad_(), randn(2, 3, 6, seed=24).requires_grad_()
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(lambda a, b: fn(name)(a, b, mask=mask, temperature=1.3, teacher_grad=True), (s, t),
                                    eps=1e-6, atol=1e-8, fast_mode=True)


def test_gradcheck_masked_vocab():
    s, t = randn(3, 8, seed=25), randn(3, 8, seed=26)
    s[:, 0] = t[:, 0] = NINF
    t[:, 1] = NINF          # teacher-only: finite for js, sfkl, tvd
    s, t = s.requires_grad_(), t.requires_grad_()
    for name in ("js", "sfkl", "tvd"):
        assert torch.autograd.gradcheck(lambda a, b: fn(name)(a, b, reduction="sum", teacher_grad=True), (s, t),
                                        eps=1e-6, atol=1e-8, fast_mode=True)


def test_akl_gradient_treats_weights_as_constants():
    "AKL's weights are detached (as in the authors' code): its gradient is that of w_h FKL + w_t RKL at fixed w."
    s, t = randn(4, 9, seed=27).requires_grad_(), randn(4, 9, seed=28)
    grad, = torch.autograd.grad(L.akl(s, t, temperature=1.5, reduction="sum"), s)
    p = torch.softmax(t / 1.5, -1)
    w_head = torch.from_numpy(ref.akl_head_weight(ref.softmax(t, 1.5), ref.softmax(s, 1.5)))

    def fixed(a):
        q = torch.softmax(a / 1.5, -1)
        return (w_head * (p * (p / q).log()).sum(-1) + (1 - w_head) * (q * (q / p).log()).sum(-1)).sum()
    expected, = torch.autograd.grad(fixed(s), s)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-13)


def test_weights_of_akl_and_bdkd():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    q = torch.full((1, 4), 0.25, dtype=torch.float64)
    w_head, w_tail = L.akl_weights(p.log(), q.log(), 0.5)
    torch.testing.assert_close(w_head, torch.tensor([0.25 / 0.6], dtype=torch.float64))
    w_head, _ = L.akl_weights(p.log(), q.log(), 0.0)          # mu = 0: only the top-1 token is head
    torch.testing.assert_close(w_head, torch.tensor([0.25 / 0.6], dtype=torch.float64))
    w_head, _ = L.akl_weights(p.log(), q.log(), 0.85)         # head = top-2
    torch.testing.assert_close(w_head, torch.tensor([0.30 / 0.6], dtype=torch.float64))
    w_head, w_tail = L.akl_weights(p.log(), p.log(), 0.5)     # p = q: weights 1/2
    assert w_head.item() == w_tail.item() == 0.5
    # BDKD: the teacher (uniform) is more uncertain than a peaked student -> forward KL weighted
    t, s = torch.zeros(1, 5, dtype=torch.float64), torch.tensor([[4.0, 0, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(L.bdkd(s, t, 3.0), 3 * L.fkl(s, t) + L.rkl(s, t))
    torch.testing.assert_close(L.bdkd(t, s, 3.0), L.fkl(t, s) + 3 * L.rkl(t, s))


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
def test_available_lists_every_loss():
    names = L.available()
    assert list(names) == ["fkl", "rkl", "ab", "alpha", "js", "tvd", "sfkl", "srkl", "akl", "wsd", "bdkd"]
    assert all(isinstance(d, str) and d and "\n" not in d for d in names.values())


@pytest.mark.parametrize("name", NAMES)
def test_get_loss_module_matches_function(name):
    s, t = randn(3, 11, seed=29), randn(3, 11, seed=30)
    module = L.get_loss(name, **DEFAULTS.get(name, {}), temperature=2.0, reduction="sum")
    assert isinstance(module, torch.nn.Module)
    assert torch.equal(module(s, t), fn(name)(s, t, temperature=2.0, reduction="sum"))
    mask = torch.tensor([True, False, True])
    assert torch.equal(module(s, t, mask), fn(name)(s, t, temperature=2.0, reduction="sum", mask=mask))
    assert name in repr(module)


@pytest.mark.parametrize("call,message", [
    (lambda: L.get_loss("kl"), r"unknown loss 'kl'; available: fkl .*bdkd"),
    (lambda: L.get_loss("FKL"), "unknown loss 'FKL'"),
    (lambda: L.get_loss("js", lam=0.1), r"unknown parameter\(s\) 'lam' for loss 'js'; valid: beta .*temperature"),
    (lambda: L.get_loss("fkl", alpha=1.0), r"unknown parameter\(s\) 'alpha' for loss 'fkl'; valid: none"),
    (lambda: L.get_loss("ab", alpha=0.2), "loss 'ab' needs beta"),
    (lambda: L.get_loss("alpha"), "loss 'alpha' needs alpha"),
    (lambda: L.get_loss("js", beta=0.0), r"beta must be in \(0, 1\)"),
    (lambda: L.get_loss("sfkl", lam=1.0), r"lam must be in \[0, 1\)"),
    (lambda: L.get_loss("akl", mu=1.5), r"mu must be in \[0, 1\]"),
    (lambda: L.get_loss("bdkd", weight=0.0), "weight must be > 0"),
    (lambda: L.get_loss("wsd", lam=float("nan")), "lam must be finite"),
    (lambda: L.get_loss("fkl", temperature=0.0), "temperature must be > 0"),
    (lambda: L.get_loss("fkl", reduction="avg"), "reduction must be one of"),
    (lambda: L.get_loss("fkl", vocab_policy="crop"), "vocab_policy must be one of"),
    (lambda: L.js(torch.randn(2, 5), torch.randn(2, 5), 1.5), r"beta must be in \(0, 1\)"),
])
def test_registry_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name):
    f = fn(name)
    with pytest.raises(ValueError, match="contains NaN"):
        f(torch.full((2, 5), float("nan")), torch.randn(2, 5))
    with pytest.raises(ValueError, match="same shape"):
        f(torch.randn(2, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="mask must have the leading shape"):
        f(torch.randn(2, 5), torch.randn(2, 5), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="all -inf"):
        f(torch.full((2, 5), NINF), torch.full((2, 5), NINF))
    with pytest.raises(TypeError):
        f(torch.ones(2, 5, dtype=torch.long), torch.randn(2, 5))


# ---------------------------------------------------------------------------------------------
# vocabulary mismatch
# ---------------------------------------------------------------------------------------------
def test_vocab_error_names_both_sizes():
    s, t = torch.randn(2, 50304), torch.randn(2, 50257)
    with pytest.raises(ValueError, match="student_logits has V=50304, teacher_logits has V=50257"):
        L.get_loss("fkl")(s, t)
    with pytest.raises(ValueError, match="50304.*50257"):            # the plain functions: the core's message
        L.fkl(s, t)


@pytest.mark.parametrize("vs,vt", [(151936, 152064), (50257, 50304)])
def test_vocab_truncate_checks_teacher_mass(vs, vt):
    t = torch.randn(1, 2, vt)
    t[..., vs:] = -40.0                                               # padding ids: negligible teacher mass
    s = torch.randn(1, 2, vs)
    loss = L.get_loss("tvd", vocab_policy="truncate")
    torch.testing.assert_close(loss(s, t), L.tvd(s, t[..., :vs]))
    t[0, 1, vt - 1] = 20.0                                            # one position puts real mass on a dropped id
    sizes = f"student_logits has V={vs}, teacher_logits has V={vt}"
    with pytest.raises(ValueError, match=f"drop teacher ids {vs}..{vt - 1}.*{sizes}"):
        loss(s, t)
    keep = torch.tensor([[True, False]])
    assert torch.isfinite(loss(s, t, keep))                           # not checked where masked out
    assert torch.isfinite(L.get_loss("tvd", vocab_policy="truncate", vocab_tolerance=1.0)(s, t))


def test_vocab_truncate_then_loss():
    t = torch.randn(3, 4, 20, dtype=torch.float64)
    t[..., 16:] = -60.0
    s = torch.randn(3, 4, 16, dtype=torch.float64)
    torch.testing.assert_close(L.get_loss("rkl", vocab_policy="truncate")(s, t), L.rkl(s, t[..., :16]), rtol=0, atol=0)


def test_vocab_truncate_student_larger():
    s, t = torch.randn(4, 12), torch.randn(4, 10)
    torch.testing.assert_close(L.get_loss("js", vocab_policy="truncate")(s, t), L.js(s[:, :10], t))


def test_vocab_pad():
    s, t = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    # padded teacher: p = 0 on the two extra ids; forward KL then penalizes the student's mass there
    got = L.get_loss("fkl", vocab_policy="pad", reduction="none")(s, t)
    p = np.concatenate([ref.softmax(t), np.zeros((4, 2))], axis=1)
    assert rel_err(got, ref.kl(p, ref.softmax(s))) < 1e-12
    sizes = "student_logits has V=12, teacher_logits has V=10"
    with pytest.raises(ValueError, match=f"teacher_logits is -inf where.*{sizes}"):
        L.get_loss("rkl", vocab_policy="pad")(s, t)
    # padded student: fine for reverse KL and JS
    assert torch.isfinite(L.get_loss("rkl", vocab_policy="pad")(t, s))
    assert torch.isfinite(L.get_loss("js", vocab_policy="pad")(t, s))
    with pytest.raises(ValueError, match="student_logits is -inf where"):
        L.get_loss("fkl", vocab_policy="pad")(t, s)


def test_match_vocab_same_size_is_identity():
    s, t = torch.randn(2, 7), torch.randn(2, 7)
    for policy in L.VOCAB_POLICIES:
        a, b = L.match_vocab(s, t, policy)
        assert a is s and b is t


# ---------------------------------------------------------------------------------------------
# the mass-reallocation measure
# ---------------------------------------------------------------------------------------------
def test_one_step_reallocation_is_first_order():
    s, t = randn(2, 15, seed=31), randn(2, 15, seed=32)
    dq, dlogq = L.one_step_reallocation(L.get_loss("fkl"), s, t, step=1e-6)
    torch.testing.assert_close(dq.sum(-1), torch.zeros(2, dtype=torch.float64), atol=1e-8, rtol=0)
    q, p = s.softmax(-1), t.softmax(-1)
    g = q - p                                                  # FKL gradient (mean reduction over 2 rows: /2)
    ghat = g / g.norm(dim=-1, keepdim=True)
    expected = -q * (ghat - (q * ghat).sum(-1, keepdim=True))  # first-order Δq along the unit descent direction
    torch.testing.assert_close(dq, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(dlogq, expected / q, atol=1e-5, rtol=0)
