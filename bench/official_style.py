"""Baseline α-β divergence implementations for the CPU benchmark (timing and memory only).

Two baselines live here, both differentiated by plain autograd and both returning one value per row of
[N, V] logits (teacher → p, student → q, softmax over the last dimension):

* `ab_divergence_log_general` — the general closed form written in log space,
  D = −1/(αβ) Σ_k ( exp(α·lp_k + β·lq_k) − α/σ·exp(σ·lp_k) − β/σ·exp(σ·lq_k) ),  σ = α + β,
  with lp, lq = log_softmax. Valid only for α ≠ 0, β ≠ 0, σ ≠ 0 (no limits, no branches).

* `ab_divergence_official_style` — a probability-space implementation with the *structure* of the official
  ABKD code: see its docstring.

Neither is part of `abkd`; nothing here should be used to train a model.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ab_divergence_log_general", "ab_divergence_official_style", "PROB_FLOOR"]

PROB_FLOOR = 1e-10   # the clamp(min=...) guard applied to probabilities before pow / log


def ab_divergence_log_general(student_logits: Tensor, teacher_logits: Tensor, alpha: float, beta: float) -> Tensor:
    "Per-row D_AB(p‖q) from the general formula in log space (α, β, α+β ≠ 0 only), plain autograd."
    sigma = alpha + beta
    if alpha == 0 or beta == 0 or sigma == 0:
        raise ValueError(f"the general formula needs alpha, beta and alpha + beta nonzero, got alpha={alpha}, beta={beta}")
    lp = torch.log_softmax(teacher_logits, dim=-1)    # log p (teacher)
    lq = torch.log_softmax(student_logits, dim=-1)    # log q (student)
    terms = (torch.exp(alpha * lp + beta * lq) - alpha / sigma * torch.exp(sigma * lp)
             - beta / sigma * torch.exp(sigma * lq))
    return -terms.sum(-1) / (alpha * beta)


def ab_divergence_official_style(student_logits: Tensor, teacher_logits: Tensor, alpha: float, beta: float) -> Tensor:
    """Per-row α-β divergence written the way the official ABKD code is structured — a baseline for timing only.

    It reproduces the official formulation's *structure*, including its defects, so that the benchmark times what
    such code costs; it is not a correct reference:

    * probabilities p = softmax(teacher), q = softmax(student), guarded with ``clamp(min=1e-10)``
      (which silently changes the value and zeroes the gradient wherever a probability is below the floor);
    * ``torch.pow`` of probabilities, evaluated in the input dtype (float32 cancellation near the boundaries);
    * one ``if/elif`` branch per special case — α = β = 0, α = 0, β = 0, α = −β — whose boundary branches are
      scaled by 1/α or 1/β instead of the 1/α² or 1/β² of the true limits (the known defect: the value jumps by a
      factor |β| or |α| at the boundary);
    * the general branch −1/(αβ) Σ (p^α q^β − α/σ p^σ − β/σ q^σ), σ = α + β.

    Differentiated by plain autograd. Written from that description for this benchmark, not copied.
    """
    p = torch.softmax(teacher_logits, dim=-1).clamp(min=PROB_FLOOR)
    q = torch.softmax(student_logits, dim=-1).clamp(min=PROB_FLOOR)
    if alpha == 0 and beta == 0:                       # log-Euclidean: ½ Σ (log p − log q)²
        div = 0.5 * (torch.log(p) - torch.log(q)).pow(2)
    elif alpha == 0:                                   # limit α → 0, scaled by 1/β (true limit: 1/β²)
        q_b, p_b = torch.pow(q, beta), torch.pow(p, beta)
        div = (q_b * torch.log(q_b / p_b) - q_b + p_b) / beta
    elif beta == 0:                                    # limit β → 0, scaled by 1/α (true limit: 1/α²)
        p_a, q_a = torch.pow(p, alpha), torch.pow(q, alpha)
        div = (p_a * torch.log(p_a / q_a) - p_a + q_a) / alpha
    elif alpha == -beta:                               # σ = 0, scaled by 1/α (true limit: 1/α²)
        ratio = torch.pow(p, alpha) / torch.pow(q, alpha)
        div = (torch.log(1 / ratio) + ratio - 1) / alpha
    else:                                              # general case
        sigma = alpha + beta
        div = -(torch.pow(p, alpha) * torch.pow(q, beta) - alpha / sigma * torch.pow(p, sigma)
                - beta / sigma * torch.pow(q, sigma)) / (alpha * beta)
    return div.sum(-1)
