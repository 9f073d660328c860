"""The Triton kernel (`abkd.kernels.triton_kernels`, under the interpreter on a CPU): what is special to it. Its values
and gradients against the mpmath reference, through the front, are in test_core.py. Here: accuracy at large logit
offsets against float64 autograd, the real compiler for sm_90 / sm_80 on every launch variant, and the self-check."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import abkd.kernels.triton_kernels as tk
from abkd.core import IMPLEMENTATIONS
from abkd.divergence import ab_divergence_rows
from abkd.kernels.triton_kernels import (GRAD_REQUESTS, INPUT_DTYPES, ab_divergence_triton, aot_work, compile_table,
                                         compile_variant, launch_variant, launch_variants, plan_classes,
                                         triton_self_check)

OFFSETS = (-80.0, 300.0, 2000.0)
POINTS = ((0.2, 0.7), (1.0, 0.0), (0.0, 1.0), (0.8, 0.3))


def test_triton_backward_runs_once():
    s, t = torch.randn(2, 50, requires_grad=True), torch.randn(2, 50)
    loss = ab_divergence_triton(s, t, 0.2, 0.7).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


# ---------------------------------------------------------------------------------------------- logit offsets
def _values_and_grads(rows, s, t, alpha, beta, temperature):
    s, t = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    values = rows(s, t, alpha, beta, temperature)
    return (values.detach(), *torch.autograd.grad(values.sum(), (s, t)))


def _float64(s, t, alpha, beta, temperature):
    "The float64 yardstick on the same rounded inputs: the divergence formula differentiated by autograd."
    return _values_and_grads(ab_divergence_rows, s.double(), t.double(), alpha, beta, temperature)


def _errors(ours, ref) -> tuple[float, float]:
    "(value error, gradient error), each max |Δ| / max |ref| (the worse side for the gradients)."
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()
    return rel(ours[0], ref[0]), max(rel(ours[1], ref[1]), rel(ours[2], ref[2]))


def _logits(offset, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = (torch.randn(2, 1100, generator=g, dtype=torch.float64) * 4 + offset for _ in range(2))
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("offset", OFFSETS)
def test_float32_accuracy_does_not_depend_on_the_offset(offset, temperature):
    "fp32 values and gradients within 2× the error of impl='reference' (+3e-6 of the largest entry) at any offset."
    s, t = _logits(offset, torch.float32)
    reference = IMPLEMENTATIONS["reference"].rows
    for alpha, beta in POINTS:
        exact = _float64(s, t, alpha, beta, temperature)
        ours = _errors(_values_and_grads(ab_divergence_triton, s, t, alpha, beta, temperature), exact)
        theirs = _errors(_values_and_grads(reference, s, t, alpha, beta, temperature), exact)
        for what, e_ours, e_ref in zip(("value", "gradient"), ours, theirs):
            assert e_ours <= 2 * e_ref + 3e-6, (offset, alpha, beta, what, e_ours, e_ref)


def _bf16_step(x):
    "The spacing of bfloat16 numbers at |x| (one step of the last of its 8 significant bits)."
    exponent = torch.floor(torch.log2(x.abs().clamp_min(1e-38)))
    return torch.finfo(torch.bfloat16).eps * torch.exp2(exponent)


@pytest.mark.parametrize("offset", OFFSETS)
def test_bfloat16_gradients_within_one_step_at_any_offset(offset):
    s, t = _logits(offset, torch.bfloat16, seed=1)
    reference = IMPLEMENTATIONS["reference"].rows
    for alpha, beta in POINTS:
        exact = _float64(s, t, alpha, beta, 1.0)
        ours = _values_and_grads(ab_divergence_triton, s, t, alpha, beta, 1.0)
        e_value = _errors(ours, exact)[0]
        e_ref = _errors(_values_and_grads(reference, s, t, alpha, beta, 1.0), exact)[0]
        assert e_value <= 2 * e_ref + 3e-6, (offset, alpha, beta, e_value, e_ref)
        for g, g64 in zip(ours[1:], exact[1:]):
            assert g.dtype == torch.bfloat16
            excess = (g.double() - g64).abs() - _bf16_step(g64) - 3e-6 * g64.abs().max()
            assert excess.max().item() <= 0, (offset, alpha, beta, excess.max().item())


# ------------------------------------------------------------------------------------------- launch variants
def test_launch_variants_cover_every_dtype_pair_plan_class_and_gradient_request():
    variants = launch_variants()
    pairs = {(v.student_dtype, v.teacher_dtype) for v in variants}
    assert len(pairs) == len(INPUT_DTYPES) ** 2
    for student, teacher in pairs:
        mine = [dict(v.constexprs) for v in variants if (v.student_dtype, v.teacher_dtype) == (student, teacher)]
        grads = {(c["COMPUTE_GS"], c["COMPUTE_GT"]) for c in mine}
        assert grads == set(GRAD_REQUESTS)
        compute = torch.float64 if "fp64" in (student, teacher) else torch.float32
        assert {(c["N_F"], c["N_PSI"], c["PSI_SERIES"]) for c in mine} == set(plan_classes(compute))
        assert {c["DTYPE"] for c in mine} == {"fp64" if compute == torch.float64 else "fp32"}


reals = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e-7]), st.floats(-3, 3, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(alpha=reals, beta=reals, student=st.sampled_from(INPUT_DTYPES), teacher=st.sampled_from(INPUT_DTYPES),
       grads=st.sampled_from(GRAD_REQUESTS))
def test_any_call_launches_a_listed_variant(alpha, beta, student, teacher, grads):
    "What triton_rows launches for any (α, β) is among the variants the compile test compiles."
    s, t = torch.zeros(2, 1500, dtype=student), torch.zeros(2, 1500, dtype=teacher)
    assert launch_variant(s, t, alpha, beta, 1.5, *grads) in set(launch_variants(1500, [(student, teacher)]))


def test_compiling_needs_a_process_without_the_interpreter():
    with pytest.raises(RuntimeError, match=r"interpreted in this process \(TRITON_INTERPRET=1\): use compile_table"):
        compile_variant(launch_variants(1500, [(torch.float32, torch.float32)])[0], 90)


def test_every_variant_compiles_for_sm90_and_sm80_without_spills():
    """The real compiler (ptxas included) on every variant for sm_90 and the equal-dtype ones for sm_80; a variant the
    compiler must reject (BLOCK not a power of two) shows that a rejection is reported as a failed row."""
    import dataclasses
    work = aot_work()
    assert len({v for v, c in work if c == 90}) >= len(launch_variants()) and {c for _, c in work} == {80, 90}
    bad = dataclasses.replace(work[0][0], constexprs=tuple((k, 1000 if k == "BLOCK" else x)
                                                           for k, x in work[0][0].constexprs))
    rows = compile_table(work + [(bad, 90)], jobs=2)
    *rows, rejected = rows
    failed = [(r["capability"], r["variant"], r["error"]) for r in rows if not r["ok"]]
    assert not failed, failed
    assert not rejected["ok"] and "power of 2" in rejected["error"], rejected
    for r in rows:
        assert 0 < r["reg"] <= 255 and r["stack"] == 0 and r["local"] == 0 and r["spill_bytes"] in (0, None), r


# ------------------------------------------------------------------------------------------------ self-check
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_self_check_passes(dtype):
    assert triton_self_check("cpu", dtype) is None


def _patched_rows(monkeypatch, change):
    real = tk.triton_rows
    monkeypatch.setattr(tk, "triton_rows", lambda *a, **k: change(*real(*a, **k)))


def test_self_check_reports_a_wrong_value(monkeypatch):
    _patched_rows(monkeypatch, lambda v, gs, gt: (v * (1 + 1e-3), gs, gt))
    reason = triton_self_check("cpu")
    assert reason.startswith("the Triton kernel disagrees with the float64 reference on cpu (fp32 logits): value error")
    assert "gradient" not in reason and "1.0e-03" in reason


def test_self_check_reports_a_wrong_gradient(monkeypatch):
    _patched_rows(monkeypatch, lambda v, gs, gt: (v, gs, torch.where(torch.isfinite(gt), gt * 0.99, gt)))
    assert "teacher gradient error 1.0e-02" in triton_self_check("cpu")
    _patched_rows(monkeypatch, lambda v, gs, gt: (v, gs.fill_(math.nan), gt))
    assert "student gradient error nan" in triton_self_check("cpu")


def test_self_check_reports_compile_and_launch_failures(monkeypatch):
    from triton.runtime.errors import PTXASError

    def fails(error):
        def rows(*args, **kwargs): raise error
        return rows
    monkeypatch.setattr(tk, "triton_rows", fails(PTXASError("ptxas fatal: unknown register")))
    assert triton_self_check("cpu") == ("the Triton kernel failed to compile on cpu (fp32 logits): "
                                        "PTXASError: PTXAS error: ptxas fatal: unknown register")
    monkeypatch.setattr(tk, "triton_rows", fails(RuntimeError("CUDA error: an illegal memory access\nmore")))
    assert triton_self_check("cpu", torch.bfloat16) == ("the Triton kernel failed to launch on cpu (bf16 logits): "
                                                        "RuntimeError: CUDA error: an illegal memory access … more")


def test_self_check_runs_inside_no_grad_and_inference_mode():
    with torch.no_grad():
        assert triton_self_check("cpu") is None
    with torch.inference_mode():
        assert triton_self_check("cpu") is None
