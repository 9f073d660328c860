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
