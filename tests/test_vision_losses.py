"""Tests of `abkd.vision_losses` (KD, ABKD, DKD, ABDKD, LSD, ABLSD, TTM, ABTTM, WTTM) against the independent
float64 references of tests/loss_reference.py, the (1, 0) identities, every (alpha, beta) including 0, precision,
gradients and the registry."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import loss_reference as ref
import abkd.vision_losses as V

AB = dict(alpha=0.8, beta=0.3)
REFERENCES = {"kd": ref.kd, "abkd": ref.abkd, "dkd": ref.dkd, "abdkd": ref.abdkd, "lsd": ref.lsd, "ablsd": ref.ablsd,
              "ttm": ref.ttm, "abttm": ref.abttm, "wttm": ref.wttm}
NAMES = list(V.VISION_LOSSES)
KL_VERSION = {"abkd": "kd", "abdkd": "dkd", "ablsd": "lsd", "abttm": "ttm"}
# (name, our parameters, the reference's parameters)
CASES = [
    ("kd", {}, {}), ("kd", dict(temperature=2.0), dict(T=2.0)),
    ("abkd", AB, AB), ("abkd", dict(alpha=0.2, beta=0.7, temperature=1.0), dict(alpha=0.2, beta=0.7, T=1.0)),
    ("dkd", {}, {}), ("dkd", dict(tckd_weight=2.0, nckd_weight=6.0, temperature=3.0, epoch=5, warmup=10),
                      dict(a=2.0, b=6.0, T=3.0, epoch=5, warmup=10)),
    ("abdkd", AB, AB), ("abdkd", dict(AB, ab_tckd=False), dict(AB, ab_tckd=False)),
    ("abdkd", dict(alpha=1.2, beta=-0.1, epoch=30), dict(alpha=1.2, beta=-0.1, epoch=30)),
    ("lsd", {}, {}), ("lsd", dict(temperature=3.0), dict(T=3.0)),
    ("ablsd", AB, AB), ("ablsd", dict(alpha=0.5, beta=0.5, temperature=1.0), dict(alpha=0.5, beta=0.5, T=1.0)),
    ("ttm", {}, {}), ("ttm", dict(gamma=0.5), dict(gamma=0.5)),
    ("abttm", AB, AB), ("abttm", dict(alpha=0.6, beta=0.6, gamma=0.3), dict(alpha=0.6, beta=0.6, gamma=0.3)),
    ("wttm", {}, {}), ("wttm", dict(gamma=0.1), dict(gamma=0.1)),
]


def randn(*shape, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def data(B=6, C=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(0, C, (B,), generator=g)
    return randn(B, C, seed=seed, dtype=dtype), randn(B, C, seed=seed + 1, dtype=dtype), labels


def call(name, s, t, y, **params):
    params = {**(AB if name.startswith("ab") else {}), **params}
    epoch = params.pop("epoch", None)
    fn = V.VISION_LOSSES[name].fn
    return fn(s, t, y, **params, **(dict(epoch=epoch) if epoch is not None else {}))


def rel(x, r):
    return abs(float(x.detach() if isinstance(x, torch.Tensor) else x) / float(r) - 1)


# ---------------------------------------------------------------------------------------------
# values against the references
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params,ref_params", CASES, ids=[f"{n}-{p}" for n, p, _ in CASES])
def test_against_reference(name, params, ref_params):
    s, t, y = data(8, 100, seed=1)
    assert rel(call(name, s, t, y, **params), REFERENCES[name](s, t, y, **ref_params)) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_module_matches_function(name):
    s, t, y = data(5, 12, seed=2)
    params = AB if name.startswith("ab") else {}
    module = V.get_vision_loss(name, **params)
    assert isinstance(module, torch.nn.Module)
    assert torch.equal(module(s, t, y), call(name, s, t, y))
    assert torch.equal(module(s, t, y, epoch=3), call(name, s, t, y, **(dict(epoch=3) if "dkd" in name else {})))
    per = V.get_vision_loss(name, **params, reduction="none")(s, t, y)
    assert per.shape == (5,)
    torch.testing.assert_close(per.mean(), module(s, t, y), rtol=1e-13, atol=0)
    summed = V.get_vision_loss(name, **params, reduction="sum")(s, t, y)
    torch.testing.assert_close(summed, per.sum(), rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ab_name", list(KL_VERSION))
def test_ab_at_one_zero_is_the_kl_version(ab_name):
    s, t, y = data(7, 20, seed=3)
    kl_name = KL_VERSION[ab_name]
    assert torch.equal(call(ab_name, s, t, y, alpha=1.0, beta=0.0), call(kl_name, s, t, y))
    if ab_name == "abdkd":
        assert torch.equal(call(ab_name, s, t, y, alpha=1.0, beta=0.0, ab_tckd=False), call(kl_name, s, t, y))


def test_dkd_decomposes_kd():
    "KL(p||q) = TCKD + (1 - p_y) NCKD per sample (Zhao et al.), all at temperature T with T^2."
    s, t, y = data(9, 30, seed=4)
    tckd, nckd = V.dkd_parts(s, t, y, temperature=3.0, reduction="none")
    p_y = torch.softmax(t / 3, -1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(tckd + (1 - p_y) * nckd, V.kd_loss(s, t, temperature=3.0, reduction="none"),
                               rtol=1e-12, atol=0)


def test_dkd_warmup():
    s, t, y = data(4, 10, seed=5)
    full = V.dkd_loss(s, t, y)
    for epoch, factor in ((1, 1 / 20), (10, 0.5), (20, 1.0), (200, 1.0)):
        torch.testing.assert_close(V.dkd_loss(s, t, y, epoch=epoch), factor * full, rtol=1e-14, atol=0)
    assert torch.equal(V.dkd_loss(s, t, y, epoch=3, warmup=0), full)
    assert V.warmup_factor(None, 20) == 1.0 and V.warmup_factor(5, 20) == 0.25


def test_abdkd_ab_tckd_switch():
    s, t, y = data(6, 15, seed=6)
    tckd_ab, nckd_ab = V.dkd_parts(s, t, y, 0.8, 0.3)
    tckd_kl, _ = V.dkd_parts(s, t, y)
    torch.testing.assert_close(V.abdkd_loss(s, t, y, **AB), tckd_ab + 8 * nckd_ab, rtol=1e-14, atol=0)
    torch.testing.assert_close(V.abdkd_loss(s, t, y, **AB, ab_tckd=False), tckd_kl + 8 * nckd_ab, rtol=1e-14, atol=0)


def test_lsd_standardization():
    s, t, y = data(5, 20, seed=7)
    torch.testing.assert_close(V.lsd_loss(2 * s - 5, 0.5 * t + 1), V.lsd_loss(s, t), rtol=1e-6, atol=0)
    z = V.zscore(s)
    torch.testing.assert_close(z.mean(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.std(-1), torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)
    const = torch.full((2, 8), 3.0, dtype=torch.float64)             # std = 0: uniform, finite
    assert torch.isfinite(V.lsd_loss(const, randn(2, 8, seed=8)))


def test_ttm_power_transform():
    t = randn(4, 10, seed=9)
    tilde = torch.softmax(V.power_transform_logits(t, 0.3), -1)
    p = torch.softmax(t, -1) ** 0.3
    torch.testing.assert_close(tilde, p / p.sum(-1, keepdim=True), rtol=1e-13, atol=0)
    s = randn(4, 10, seed=10)
    # gamma = 1: plain KD at T = 1 (the transformed teacher logits differ by a constant per row: rounding only)
    torch.testing.assert_close(V.ttm_loss(s, t, gamma=1.0), V.kd_loss(s, t, temperature=1.0), rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------------
# every alpha, beta (the official LSD divides by alpha*beta; its ABTTM crashes)
# ---------------------------------------------------------------------------------------------
POINTS = [(0.0, 0.5), (0.5, 0.0), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (-0.5, 1.2), (0.5, -0.5), (1e-7, 0.5)]


@pytest.mark.parametrize("alpha,beta", POINTS)
@pytest.mark.parametrize("name", ["abkd", "abdkd", "ablsd", "abttm"])
def test_every_alpha_beta(name, alpha, beta):
    s, t, y = data(6, 25, seed=11)
    s.requires_grad_()
    value = call(name, s, t, y, alpha=alpha, beta=beta)
    ra, rb = (0.0, beta) if alpha == 1e-7 else (alpha, beta)          # 1e-7: continuity towards the limit
    expected = REFERENCES[name](s.detach(), t, y, alpha=ra, beta=rb)
    assert rel(value, expected) < (1e-6 if alpha == 1e-7 else 1e-11)
    value.backward()
    assert torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------------------------
# precision and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision(name, dtype):
    s, t, y = data(8, 100, seed=12, dtype=dtype)
    s.requires_grad_()
    value = call(name, s, t, y)
    assert value.dtype == torch.float32
    expected = REFERENCES[name](s.detach().float(), t.float(), y, **(AB if name.startswith("ab") else {}))
    assert rel(value, expected) < 5e-5
    value.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    s, t, y = data(3, 6, seed=13)
    s, t = s.requires_grad_(), t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: call(name, a, b, y, teacher_grad=True), (s, t), eps=1e-6, atol=1e-7,
                                    fast_mode=True)


# ---------------------------------------------------------------------------------------------
# registry, recipes, errors
# ---------------------------------------------------------------------------------------------
def test_available_and_recipes():
    assert list(V.available()) == ["kd", "abkd", "dkd", "abdkd", "lsd", "ablsd", "ttm", "abttm", "wttm"]
    kd, dkd, lsd, ttm = (V.get_vision_loss(n) for n in ("kd", "dkd", "lsd", "ttm"))
    assert kd.hyper == dict(temperature=4.0) and (kd.ce_weight, kd.kd_weight) == (0.1, 0.9)
    assert dkd.hyper == dict(tckd_weight=1.0, nckd_weight=8.0, temperature=4.0, warmup=20.0)
    assert lsd.hyper == dict(temperature=2.0) and (lsd.ce_weight, lsd.kd_weight) == (0.1, 9.0)
    assert ttm.hyper == dict(gamma=0.1)


def test_total():
    s, t, y = data(6, 10, seed=14)
    loss = V.get_vision_loss("abdkd", **AB, ce_weight=0.5, kd_weight=2.0)
    expected = 0.5 * F.cross_entropy(s, y) + 2.0 * V.abdkd_loss(s, t, y, **AB, epoch=4)
    torch.testing.assert_close(loss.total(s, t, y, epoch=4), expected, rtol=1e-14, atol=0)
    lsd = V.get_vision_loss("lsd", reduction="none")
    torch.testing.assert_close(lsd.total(s, t, y), 0.1 * F.cross_entropy(s, y, reduction="none") + 9 * lsd(s, t, y),
                               rtol=1e-14, atol=0)


@pytest.mark.parametrize("make,error,message", [
    (lambda: V.get_vision_loss("dkd2"), ValueError, r"unknown vision loss 'dkd2'; available: kd .*wttm"),
    (lambda: V.get_vision_loss("dkd", alpha=1.0), ValueError, r"unknown parameter\(s\) 'alpha'.*valid: tckd_weight"),
    (lambda: V.get_vision_loss("abkd"), ValueError, "vision loss 'abkd' needs alpha, beta"),
    (lambda: V.get_vision_loss("abdkd", alpha=0.5), ValueError, "needs beta"),
    (lambda: V.get_vision_loss("ttm", gamma=0.0), ValueError, "gamma must be > 0"),
    (lambda: V.get_vision_loss("kd", temperature=-1.0), ValueError, "temperature must be > 0"),
    (lambda: V.get_vision_loss("dkd", nckd_weight=-1.0), ValueError, "nckd_weight must be in"),
    (lambda: V.get_vision_loss("abdkd", **AB, ab_tckd=1), TypeError, "ab_tckd must be True or False"),
    (lambda: V.get_vision_loss("kd", reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: V.get_vision_loss("kd", kd_weight=-2), ValueError, "kd_weight must be in"),
])
def test_registry_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name):
    s, t, y = data(4, 10, seed=15)
    with pytest.raises(ValueError, match="same shape"):
        call(name, s, t[:, :9], y)
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        call(name, s[None], t[None], y)
    bad = s.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="student_logits must be finite"):
        call(name, bad, t, y)
    bad = t.clone()
    bad[1, 2] = float("-inf")
    with pytest.raises(ValueError, match="teacher_logits must be finite"):
        call(name, s, bad, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        call(name, s[:, :1], t[:, :1], torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", ["dkd", "abdkd"])
def test_bad_labels(name):
    s, t, y = data(4, 10, seed=16)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        call(name, s, t, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        call(name, s, t, y.double())
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        call(name, s, t, y[:3])
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        call(name, s, t, None)
