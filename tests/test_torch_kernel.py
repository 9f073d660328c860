"""The chunked PyTorch path (`abkd.kernels.torch_chunked`): chunking, what it saves for backward, its evaluation plan.
Its values and gradients against the mpmath reference, through the front, are in test_core.py."""
import math

import pytest
import torch

from abkd.core import ab_divergence
from abkd.gradients import saved_tensor_bytes
from abkd.kernels.torch_chunked import ab_divergence_chunked, ab_plan
from cases import randn


def test_chunk_boundaries_do_not_change_the_result():
    s, t = randn(7, 300, seed=27).requires_grad_(), randn(7, 300, seed=28)
    base = ab_divergence_chunked(s, t, 0.2, 0.7, 1.0, 7 * 300)
    (g_base,) = torch.autograd.grad(base.sum(), s)
    for chunk in (1, 300, 900, 1000):
        v = ab_divergence_chunked(s, t, 0.2, 0.7, 1.0, chunk)
        (g,) = torch.autograd.grad(v.sum(), s)
        torch.testing.assert_close(v, base, rtol=1e-14, atol=0)
        torch.testing.assert_close(g, g_base, rtol=1e-14, atol=1e-18)


def test_chunked_saves_only_inputs_and_4n_numbers():
    s, t = randn(16, 500, seed=33).requires_grad_(), randn(16, 500, seed=34)
    extra = saved_tensor_bytes(lambda s, t: ab_divergence(s, t, 0.2, 0.7, impl="chunked", reduction="sum"), s, t)
    assert extra <= 4 * 16 * 8 + 64                              # row maxima and log-sums, both sides


def test_plan_series_length_and_psi_branch():
    p = ab_plan(0.2, 0.7, torch.float32)
    assert 1.0 <= p.tau <= 1.25 and not p.psi_needs_series      # τ = 0.25·0.9/0.2
    assert ab_plan(1e-7, 0.7, torch.float32).psi_needs_series   # a near-zero gap: ψ keeps its series
    assert len(ab_plan(0.2, 0.7, torch.float64).f_series) > len(p.f_series)


# ------------------------------------------------------------------ float32 accuracy at any logit offset
# The logits of real models sit far from 0 (GPT-2's around −100). The chunked path keeps the row maximum and the
# log-sum apart, so its error does not grow with the offset. Errors are measured against float64 autograd of the
# core formula on the same (rounded) inputs, beside those of impl="reference" (the closed-form core in float32).
from abkd.divergence import ab_divergence_rows
from abkd.gradients import ABDivergenceFunction

OFFSETS = (-80.0, 300.0, 2000.0)
OFFSET_GRID = ((0.2, 0.7), (1.0, 0.0), (0.0, 1.0), (0.8, 0.3))
BF16_STEP = 2.0 ** -8                    # one bf16 step, relative to the largest gradient entry


def offset_logits(offset: float, dtype: torch.dtype, n: int = 8, v: int = 1500, seed: int = 0, masked: bool = False):
    "Student, teacher logits ~ offset + N(0, 4²) in `dtype`, per-row weights; −inf entries if `masked`."
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, v, generator=g) * 4 + offset, torch.randn(n, v, generator=g) * 4 + offset
    if masked:                                               # rows 0-1: masked on both sides; row 2: teacher only
        s[:2, :40] = t[:2, :40] = -math.inf
        t[2, 100:130] = -math.inf
    return s.to(dtype), t.to(dtype), torch.rand(n, generator=g, dtype=torch.float64) + 0.5


def float64_truth(s, t, alpha, beta, temperature, w):
    "Values and both gradients of Σ w·D by float64 autograd of the core formula, on the inputs upcast."
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    values = ab_divergence_rows(s64, t64, alpha, beta, temperature)
    return (values.detach(), *torch.autograd.grad((values * w).sum(), (s64, t64)))


def relative_errors(fn, s, t, alpha, beta, temperature, w, truth):
    "max |x − truth| / max |truth| of the values, the student gradient and the teacher gradient."
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    values = fn(s, t, alpha, beta, temperature)
    got = (values.detach(), *torch.autograd.grad((values * w.to(values.dtype)).sum(), (s, t)))
    return [((x.double() - y).abs().max() / y.abs().max()).item() for x, y in zip(got, truth)]


def chunked_and_reference_errors(s, t, alpha, beta, w, temperature=1.0, chunk_elements=None):
    truth = float64_truth(s, t, alpha, beta, temperature, w)
    chunked = relative_errors(lambda *a: ab_divergence_chunked(*a, chunk_elements), s, t, alpha, beta, temperature,
                              w, truth)
    return chunked, relative_errors(ABDivergenceFunction.apply, s, t, alpha, beta, temperature, w, truth)


@pytest.mark.parametrize("alpha,beta", OFFSET_GRID)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_offset_accuracy_against_reference(dtype, offset, alpha, beta):
    s, t, w = offset_logits(offset, dtype)
    chunked, reference = chunked_and_reference_errors(s, t, alpha, beta, w)
    # values are float32 for either input dtype; bf16 gradients are rounded once to bf16
    slack = [3e-6, *(2 * [3e-6 if dtype == torch.float32 else BF16_STEP])]
    for what, c, r, eps in zip(("values", "student gradient", "teacher gradient"), chunked, reference, slack):
        assert c <= 2 * r + eps, f"{what}: chunked {c:.2e} vs reference {r:.2e} at offset {offset}"


def test_offset_error_is_flat_in_float32():
    "The chunked path's own error stays at the float32 level at every offset (it was 3.7e-4 at +2000)."
    worst = max(max(chunked_and_reference_errors(*offset_logits(offset, torch.float32)[:2], a, b,
                                                 offset_logits(offset, torch.float32)[2])[0])
                for offset in (0.0, *OFFSETS) for a, b in OFFSET_GRID)
    assert worst < 4e-6, worst


@pytest.mark.parametrize("offset", [-80.0, 2000.0])
def test_offset_accuracy_with_temperature(offset):
    s, t, w = offset_logits(offset, torch.float32, seed=3)
    chunked, reference = chunked_and_reference_errors(s, t, 0.2, 0.7, w, temperature=2.5)
    assert all(c <= 2 * r + 3e-6 for c, r in zip(chunked, reference)), (chunked, reference)


@pytest.mark.parametrize("alpha,beta", [(0.2, 0.7), (1.0, 0.0), (0.8, 0.3)])
@pytest.mark.parametrize("offset", [-80.0, 2000.0])
def test_offset_accuracy_of_masked_chunks(offset, alpha, beta):
    "Chunks with −inf logits (the core's closed forms) are as accurate; a chunk of finite rows sits beside them."
    s, t, w = offset_logits(offset, torch.float32, masked=True)
    if alpha == 1.0 and beta == 0.0: t[2, 100:130] = s[2, 100:130] = -math.inf     # p = 0 < q is refused there
    chunked, reference = chunked_and_reference_errors(s, t, alpha, beta, w, chunk_elements=2 * 1500)
    assert all(c <= 2 * r + 3e-6 for c, r in zip(chunked, reference)), (chunked, reference)


# ------------------------------------------------------------------ the compiled CPU variant (torch.compile)
# `ab_divergence_compiled` runs the same math through torch.compile (inductor, C++). The first call per kernel
# compiles: 10-25 s on 2 cores with a cold inductor cache (a few seconds warm), so the kernels are compiled once per
# session by the module-scoped fixture below and every later test reuses them.
from torch._dynamo.utils import counters as dynamo_counters
import abkd.kernels.torch_chunked as torch_chunked
from abkd.divergence import ab_divergence_reference
from abkd.kernels.torch_chunked import ab_divergence_compiled

COMPILED_GRID = ((1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, -0.5), (0.2, 0.7), (0.8, 0.3), (2.0, -0.5))


@pytest.fixture(scope="module")
def compiled():
    "Compile the forward and every backward (student, teacher, both) once for the tests of this module."
    s, t = randn(4, 300, seed=40, dtype=torch.float32), randn(4, 300, seed=41, dtype=torch.float32)
    for need_s, need_t in ((True, False), (False, True), (True, True)):
        s_, t_ = s.clone().requires_grad_(need_s), t.clone().requires_grad_(need_t)
        ab_divergence_compiled(s_, t_, 0.2, 0.7).sum().backward()
    return ab_divergence_compiled


def reference_truth(s, t, alpha, beta, temperature, w):
    "Values and both gradients of Σ w·D by float64 autograd of `ab_divergence_reference` (teacher_grad=True)."
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    values = ab_divergence_reference(s64, t64, alpha, beta, temperature=temperature, reduction="none",
                                     teacher_grad=True)
    return (values.detach(), *torch.autograd.grad((values * w).sum(), (s64, t64)))


@pytest.mark.parametrize("alpha,beta", COMPILED_GRID)
@pytest.mark.parametrize("offset", [-80.0, 2000.0])
def test_compiled_matches_float64_reference(compiled, offset, alpha, beta):
    s, t, w = offset_logits(offset, torch.float32, v=400)
    truth = reference_truth(s, t, alpha, beta, 1.0, w)
    got = relative_errors(compiled, s, t, alpha, beta, 1.0, w, truth)
    ref = relative_errors(ABDivergenceFunction.apply, s, t, alpha, beta, 1.0, w, truth)
    for what, c, r in zip(("values", "student gradient", "teacher gradient"), got, ref):
        assert c <= 2 * r + 3e-6, f"{what}: compiled {c:.2e} vs reference {r:.2e} at offset {offset}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_compiled_other_dtypes_and_temperature(compiled, dtype):
    s, t, w = offset_logits(-80.0, dtype, v=400, seed=4)
    truth = reference_truth(s, t, 0.2, 0.7, 2.5, w)
    got = relative_errors(lambda *a: compiled(*a), s, t, 0.2, 0.7, 2.5, w, truth)
    ref = relative_errors(ABDivergenceFunction.apply, s, t, 0.2, 0.7, 2.5, w, truth)
    slack = [3e-6, *(2 * [BF16_STEP if dtype == torch.bfloat16 else 3e-6])]
    assert all(c <= 2 * r + e for c, r, e in zip(got, ref, slack)), (got, ref)


def test_compiled_agrees_with_chunked_across_chunks(compiled):
    s, t = randn(7, 300, seed=27, dtype=torch.float32).requires_grad_(), randn(7, 300, seed=28, dtype=torch.float32)
    base = ab_divergence_chunked(s, t, 0.2, 0.7)
    (g_base,) = torch.autograd.grad(base.sum(), s)
    for chunk in (1, 300, 900, None):
        v = compiled(s, t, 0.2, 0.7, 1.0, chunk)
        (g,) = torch.autograd.grad(v.sum(), s)
        torch.testing.assert_close(v, base, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(g, g_base, rtol=1e-5, atol=2e-7 * g_base.abs().max().item())


def test_compiled_does_not_recompile_across_alpha_beta_temperature_and_rows(compiled):
    graphs = dynamo_counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(5)
    for (a, b), n, T, chunk in zip(COMPILED_GRID, (1, 2, 3, 17, 5, 9, 33), (1.0, 2.5, 0.7, 1.0, 1.0, 3.0, 1.0),
                                   (None, None, 300, 900, None, 600, 300)):
        s, t = torch.randn(n, 300, generator=g).requires_grad_(), torch.randn(n, 300, generator=g)
        compiled(s, t, a, b, T, chunk).sum().backward()
    assert dynamo_counters["stats"]["unique_graphs"] == graphs


def test_compiled_hands_minus_inf_rows_to_the_chunked_path(compiled):
    s, t, _ = offset_logits(-80.0, torch.float32, v=300, masked=True)
    s.requires_grad_()
    v, u = compiled(s, t, 0.2, 0.7), ab_divergence_chunked(s, t, 0.2, 0.7)
    (gv,), (gu,) = torch.autograd.grad(v.sum(), s), torch.autograd.grad(u.sum(), s)
    assert torch.isfinite(v).all() and torch.equal(v, u) and torch.equal(gv, gu)


def test_compiled_without_a_compiler_names_the_fix(monkeypatch):
    "No C++ compiler (or no torch.compile): a clear error naming impl='chunked', the cause chained."
    def broken(*args):
        raise torch._inductor.exc.InvalidCxxCompiler()
    monkeypatch.setattr(torch_chunked, "compiled_kernels", lambda: dict.fromkeys(torch_chunked.COMPILED_BODIES, broken))
    s, t = randn(3, 50, seed=1, dtype=torch.float32), randn(3, 50, seed=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"C\+\+ compiler.*impl='chunked'") as info:
        ab_divergence_compiled(s, t, 0.2, 0.7)
    assert isinstance(info.value.__cause__, torch._inductor.exc.InvalidCxxCompiler)
