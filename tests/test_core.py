"""The front (`abkd.core`): every implementation of its table through `ab_divergence(..., impl=...)` against the
independent float64 mpmath reference and against each other (the same tolerances as the core's tests), the table
itself, and the dispatch with its errors."""
import dataclasses
import math

import numpy as np
import warnings

import pytest
import torch

import abkd
from abkd import core
from abkd.core import (IMPLEMENTATIONS, ABDivergence, Implementation, ab_divergence, ab_divergence_from_hidden,
                       core_rows, implementation, resolve_impl)
from abkd.gradients import ABDivergenceFunction
from abkd.kernels.torch_chunked import ab_divergence_chunked
from cases import GRID, _ids, randn
from reference import ref_ab_divergence, ref_ab_gradient, to_float64

KERNELS = ["chunked", "compiled", "triton"]
CASES = [(a, b, T) for a, b in GRID for T in (1.0, 2.5)]


def rel_err(x, ref):
    return float(np.max(np.abs(np.asarray(x, dtype=np.float64) - ref) / np.abs(ref)))


def values_and_grads(s, t, a, b, impl, T=1.0, **kw):
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = ab_divergence(s, t, a, b, temperature=T, reduction="none", impl=impl, teacher_grad=True, **kw)
    gs, gt = torch.autograd.grad(out.sum(), (s, t))
    return out.detach(), gs, gt


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("a,b,T", CASES, ids=_ids(CASES))
def test_values_and_gradients_match_reference_fp64(impl, a, b, T):
    s, t = randn(2, 9, seed=21), randn(2, 9, seed=22)
    v, gs, gt = values_and_grads(s, t, a, b, impl, T)
    assert rel_err(v.numpy(), to_float64(ref_ab_divergence(s, t, a, b, T))) <= 1e-12
    for g, wrt in ((gs, "student"), (gt, "teacher")):
        ref = to_float64(ref_ab_gradient(s, t, a, b, T, wrt=wrt))
        assert np.all(np.abs(g.numpy() - ref) <= 1e-7 * np.abs(ref) + 1e-12 * np.abs(ref).max()), (impl, wrt)


@pytest.mark.parametrize("impl", KERNELS)
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


@pytest.mark.parametrize("impl", KERNELS)
def test_impls_agree_on_large_rows_and_multi_tile_rows(impl):
    # rows longer than a Triton tile and than a chunk: the running max, the ragged tile, the chunk loop
    s, t = randn(5, 2500, seed=25, scale=4.0), randn(5, 2500, seed=26, scale=4.0)
    for a, b in [(0.2, 0.7), (1, 0), (0.5, -0.5), (1e-7, 0.7)]:
        v, gs, gt = values_and_grads(s, t, a, b, impl, 0.7)
        rv, rgs, rgt = values_and_grads(s, t, a, b, "reference", 0.7)
        torch.testing.assert_close(v, rv, rtol=1e-12, atol=0)
        torch.testing.assert_close(gs, rgs, rtol=0, atol=1e-12 * rgs.abs().max().item())
        torch.testing.assert_close(gt, rgt, rtol=0, atol=1e-12 * rgt.abs().max().item())


@pytest.mark.parametrize("impl", KERNELS)
def test_neg_inf_entries_and_row_mask(impl):
    s, t = randn(4, 40, seed=29), randn(4, 40, seed=30)
    t[0, :6] = -math.inf            # teacher-only: allowed at (0.2, 0.7)
    s[1, :3] = -math.inf; t[1, :3] = -math.inf      # both sides
    t[2, 5] = -math.inf; s[2, 9] = -math.inf; t[2, 9] = -math.inf
    mask = torch.tensor([True, True, False, True])
    for red in ("none", "sum", "mean"):
        si, ti = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = ab_divergence(si, ti, 0.2, 0.7, mask=mask, reduction=red, impl=impl, teacher_grad=True)
        (out.sum() if red == "none" else out).backward()
        sr, tr = s.clone().requires_grad_(), t.clone().requires_grad_()
        ref = ab_divergence(sr, tr, 0.2, 0.7, mask=mask, reduction=red, impl="reference", teacher_grad=True)
        (ref.sum() if red == "none" else ref).backward()
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(si.grad, sr.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(ti.grad, tr.grad, rtol=0, atol=1e-12)
        assert si.grad[2].abs().sum() == 0


@pytest.mark.parametrize("impl", KERNELS)
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


# ---------------------------------------------------------------------------------------------- the table
def test_table_lists_every_implementation_and_what_it_supports():
    assert list(IMPLEMENTATIONS) == ["reference", "chunked", "compiled", "triton"]
    assert core.IMPLS == ("auto", "reference", "chunked", "compiled", "triton")
    ref, chunked, compiled, triton = IMPLEMENTATIONS.values()
    assert ref.rows == ABDivergenceFunction.apply and chunked.rows is ab_divergence_chunked
    assert compiled.devices == ("cpu",) and compiled.repeat_backward and not compiled.row_mask
    assert "needs CPU logits" in compiled.unavailable(torch.device("cuda"))
    assert triton.row_mask and triton.inplace_grad and not triton.repeat_backward and triton.devices == ("cuda",)
    for impl in (ref, chunked):
        assert not impl.row_mask and not impl.inplace_grad and impl.repeat_backward and impl.devices == ("any",)
    assert all(torch.bfloat16 in i.dtypes and torch.float64 in i.dtypes for i in IMPLEMENTATIONS.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.row_mask = True


def test_auto_resolves_by_device(monkeypatch):
    import abkd.core as core
    monkeypatch.setattr(core, "TRITON_VERDICTS", {})
    monkeypatch.setattr(core, "triton_self_check", lambda device, dtype=torch.float32: None)   # a passing check
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"
    expected = "triton" if IMPLEMENTATIONS["triton"].rows is not None else "chunked"
    assert resolve_impl("auto", torch.device("cuda")) == expected          # a device object, no CUDA needed
    assert implementation("auto", torch.device("cpu")) is IMPLEMENTATIONS["chunked"]
    for name in ("reference", "chunked"):
        assert resolve_impl(name, torch.device("cpu")) == name


@pytest.mark.skipif(IMPLEMENTATIONS["triton"].rows is None, reason="the fallback concerns the Triton kernel")
def test_auto_falls_back_to_chunked_once_when_the_self_check_fails(monkeypatch):
    import abkd.core as core
    calls = []
    def failing(device, dtype=torch.float32):
        calls.append(device); return "the Triton kernel failed to launch: no CUDA driver"
    monkeypatch.setattr(core, "TRITON_VERDICTS", {})
    monkeypatch.setattr(core, "triton_self_check", failing)
    with pytest.warns(RuntimeWarning, match="impl='auto' uses the chunked path on cuda:1: the Triton kernel failed"):
        assert resolve_impl("auto", torch.device("cuda", 1)) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                      # no second warning
        assert resolve_impl("auto", torch.device("cuda", 1)) == "chunked"
    assert calls == [torch.device("cuda", 1)]
    assert resolve_impl("triton", torch.device("cuda", 1)) == "triton"      # asked for explicitly: no check


def test_auto_self_check_on_a_real_device_without_cuda_falls_back():
    "On a machine without CUDA, the real self-check fails to launch and auto resolves to chunked, with the reason."
    import abkd.core as core
    if torch.cuda.is_available() or IMPLEMENTATIONS["triton"].rows is None:
        pytest.skip("needs triton and no CUDA device")
    saved = dict(core.TRITON_VERDICTS)
    core.TRITON_VERDICTS.clear()
    try:
        with pytest.warns(RuntimeWarning, match="impl='auto' uses the chunked path on cuda"):
            assert resolve_impl("auto", torch.device("cuda", 0)) == "chunked"
    finally:
        core.TRITON_VERDICTS.clear(); core.TRITON_VERDICTS.update(saved)


def test_core_rows_is_the_auto_implementation():
    s, t = randn(3, 17, seed=40), randn(3, 17, seed=41)
    assert torch.equal(core_rows(s, t, 0.2, 0.7, 1.5), ab_divergence_chunked(s, t, 0.2, 0.7, 1.5))
    assert torch.equal(core_rows(s, t, 0.2, 0.7), ab_divergence(s, t, 0.2, 0.7, reduction="none"))


def test_unknown_impl_is_rejected_everywhere():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    for call in (lambda: resolve_impl("fast", torch.device("cpu")), lambda: ab_divergence(s, t, 1, 0, impl="Triton"),
                 lambda: ABDivergence(1, 0, impl="auto "),
                 lambda: ab_divergence_from_hidden(torch.randn(2, 4), torch.randn(5, 4), torch.randn(2, 5), 1, 0,
                                                   impl="cuda")):
        with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'reference', 'chunked', 'compiled', 'triton'\)"):
            call()


def test_triton_without_cuda_or_interpreter(monkeypatch):
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for call in (lambda: ab_divergence(s, t, 1, 0, impl="triton"), lambda: ABDivergence(1, 0, impl="triton")(s, t),
                 lambda: ab_divergence_from_hidden(torch.randn(2, 4), torch.randn(5, 4), t, 1, 0, impl="triton")):
        with pytest.raises(ValueError, match="impl='triton' needs CUDA logits, got logits on cpu.*TRITON_INTERPRET=1"):
            call()
    assert IMPLEMENTATIONS["triton"].unavailable(torch.device("cpu")) is not None
    assert IMPLEMENTATIONS["chunked"].unavailable(torch.device("cpu")) is None


def test_triton_package_missing(monkeypatch):
    missing = dataclasses.replace(IMPLEMENTATIONS["triton"], rows=None)
    monkeypatch.setitem(IMPLEMENTATIONS, "triton", missing)
    with pytest.raises(ValueError, match=r"impl='triton' needs the triton package \(pip install triton\); "
                                         "impl='chunked' runs without it"):
        ab_divergence(torch.randn(2, 5), torch.randn(2, 5), 1, 0, impl="triton")
    assert resolve_impl("auto", torch.device("cuda")) == "chunked"


def test_front_follows_the_table_for_the_row_mask(monkeypatch):
    "an implementation whose entry says row_mask=True gets all rows and the flat mask; the others the kept rows"
    seen = {}
    def spy(name):
        def rows(s, t, a, b, T, row_mask=None):
            seen[name] = (s.shape[0], None if row_mask is None else row_mask.tolist())
            out = ab_divergence_chunked(s, t, a, b, T)
            return out if row_mask is None else out * row_mask
        return rows
    monkeypatch.setitem(IMPLEMENTATIONS, "reference", Implementation("reference", spy("gathered"), "test", row_mask=False,
                                                                     inplace_grad=False, repeat_backward=True))
    monkeypatch.setitem(IMPLEMENTATIONS, "chunked", Implementation("chunked", spy("native"), "test", row_mask=True,
                                                                   inplace_grad=False, repeat_backward=True))
    s, t = randn(4, 9, seed=42), randn(4, 9, seed=43)
    mask = torch.tensor([True, False, True, True])
    a = ab_divergence(s, t, 0.2, 0.7, mask=mask, reduction="none", impl="reference")
    b = ab_divergence(s, t, 0.2, 0.7, mask=mask, reduction="none", impl="chunked")
    assert seen == {"gathered": (3, None), "native": (4, [True, False, True, True])}
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_module_and_top_level_api():
    s, t = randn(2, 3, 11, seed=44), randn(2, 3, 11, seed=45)
    m = torch.tensor([[True, False, True], [False, False, True]])
    mod = ABDivergence(0.5, 0.5, temperature=2.0, reduction="none", impl="reference")
    assert torch.equal(mod(s, t, m), ab_divergence(s, t, 0.5, 0.5, temperature=2.0, mask=m, reduction="none",
                                                   impl="reference"))
    assert "impl='reference'" in repr(mod)
    assert abkd.ab_divergence is ab_divergence and abkd.ABDivergence is ABDivergence
    assert abkd.ab_divergence_from_hidden is ab_divergence_from_hidden


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_every_implementation_agrees_with_the_reference_entry(impl):
    "the front with each implementation = the plain-autograd reference of the divergence notebook"
    from abkd.divergence import ab_divergence_reference
    s, t = randn(3, 1100, seed=46), randn(3, 1100, seed=47)
    s[0, :5] = t[0, :5] = -math.inf
    mask = torch.tensor([True, False, True])
    si, sr = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = ab_divergence(si, t, 0.2, 0.7, temperature=1.3, mask=mask, reduction="sum", impl=impl)
    ref = ab_divergence_reference(sr, t, 0.2, 0.7, temperature=1.3, mask=mask, reduction="sum")
    out.backward(); ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(si.grad, sr.grad, rtol=0, atol=1e-12 * sr.grad.abs().max().item())
