"""Mass-concentration analysis: the log mass ratio, the factors, the paper's claims and the training monitor."""
import math

import pytest
import torch

from abkd.mass_concentration import (check_ab_concentration, check_fkl_error_alone, check_rkl_confidence_order,
                                     concentration_stats, confidence_factor_share, exact_log_mass_ratio,
                                     first_order_error, first_order_log_mass_ratio, hardness_factor_share,
                                     mass_reallocation, matching_factor, one_step_changes, step_for_mass,
                                     structured_example, weighting_factor)
from abkd.theory import ControlledTask
from abkd.gradients import ab_divergence_grad

f64 = dict(dtype=torch.float64)


def test_exact_log_mass_ratio_matches_a_real_step():
    s, t = torch.randn(3, 40, **f64) * 2, torch.randn(3, 40, **f64) * 2
    v = ab_divergence_grad(s, t, 0.3, 0.6)
    for lr in (1e-3, 0.5, 3.0):
        direct = torch.log_softmax(s - lr * v, -1) - torch.log_softmax(s, -1)
        assert torch.allclose(exact_log_mass_ratio(s, v, lr), direct, atol=1e-13)


def test_first_order_error_is_second_order_in_the_step():
    res = first_order_error(vocab_sizes=(10, 1000), lrs=[1e-2, 1e-3, 1e-4])
    for r in res.values():
        assert abs(r["slope"] - 2) < 0.05
        assert abs(r["ratio_to_prediction"][-1] - 1) < 1e-2          # the η²Var/2 constant, not just the slope


def test_factors_reproduce_the_closed_form_gradient():
    s, t = torch.randn(2, 30, **f64), torch.randn(2, 30, **f64)
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    for a, b in [(1, 0), (0, 1), (0.2, 0.7), (-0.5, 1.5)]:
        g = weighting_factor(lq, b) * matching_factor(lp, lq, a)
        q = lq.exp()
        grad = g - q * g.sum(-1, keepdim=True)
        assert torch.allclose(grad, ab_divergence_grad(s, t, a, b), atol=1e-13)


def test_claim_a_fkl_equal_error_equal_change():
    r = check_fkl_error_alone(n_draws=60, vocab=30)
    assert r["fkl_worst_gap"] < 1e-3 < r["rkl_median_gap"]           # would fail if FKL depended on q as RKL does


def test_claim_b_rkl_favours_confident_classes():
    r = check_rkl_confidence_order(n_draws=60, vocab=30)
    assert r["under_holds"] == r["under_estimated_pairs"] > 0
    assert r["over_holds"] == r["over_estimated_pairs"] > 0
    assert r["worst_margin"] > 0


def test_claim_b_fails_for_fkl():
    # the same measurement applied to FKL finds no preference: margins are ~0, so the strict claim is FKL-specific
    from abkd.mass_concentration import equal_error_pairs
    margins = []
    for s, t, i, j, _ in equal_error_pairs(40, 30, seed=1):
        d = one_step_changes(s, t, 1.0, 0.0, 1e-4)
        margins.append(((d[i] - d[j]) / (abs(d[i]) + abs(d[j]))).item())
    assert max(abs(m) for m in margins) < 1e-3


def test_claim_c_and_its_regimes():
    r = check_ab_concentration(n_draws=40)
    assert r["tail"]["confidence_increases_with_beta"] == 40
    assert r["tail"]["hardness_decreases_with_alpha"] >= 38
    assert r["tail"]["both_move_together_on_sigma_1"] >= 38
    assert r["target_missed"]["confidence_increases_with_beta"] == 40
    assert r["target_missed"]["hardness_decreases_with_alpha"] < 40


def test_confidence_share_is_monotone_in_beta_for_any_distribution():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        lq = torch.log_softmax(3 * torch.randn(64, generator=gen, **f64), -1)
        c = [confidence_factor_share(lq, b, 5).item() for b in (-1.0, 0.0, 0.5, 1.0, 2.0)]
        assert all(x < y for x, y in zip(c, c[1:]))


def test_hardness_factor_share_limits():
    s, t = structured_example()
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    r = (lq - lp).abs()
    share0 = r.topk(10).values.sum() / r.sum()                        # α = 0: the matching factor is |log q/p|
    assert math.isclose(hardness_factor_share(lp, lq, 0.0).item(), share0.item(), rel_tol=1e-12)


def test_step_for_mass_moves_the_requested_mass():
    s, t = structured_example()
    for a, b in [(1, 0), (0, 1), (0.2, 0.7)]:
        v = ab_divergence_grad(s, t, a, b)
        lr = step_for_mass(s, v, 0.02)
        q = torch.softmax(s, -1)
        moved = 0.5 * (q * torch.expm1(exact_log_mass_ratio(s, v, lr))).abs().sum().item()
        assert abs(moved - 0.02) < 1e-6
    changes = mass_reallocation(s, t)
    assert all(abs(d.sum().item()) < 1e-12 for d in changes.values())    # mass is conserved


def test_concentration_stats_masks_and_labels():
    task = ControlledTask(vocab=40, contexts=16)
    s = torch.randn(16, 40)
    full = concentration_stats(s, task.teacher_logits, labels=task.targets, alpha=0.2, beta=0.7)
    assert set(full) == {"student_target_mass", "teacher_target_mass", "entropy_gap", "tv_error",
                         "hardness_weighted_error", "confidence_weighted_error", "update_topk_share"}
    assert all(math.isfinite(v) for v in full.values())
    mask = torch.zeros(16, dtype=torch.bool); mask[:8] = True
    half = concentration_stats(s, task.teacher_logits, mask=mask, labels=task.targets)
    first = concentration_stats(s[:8], task.teacher_logits[:8], labels=task.targets[:8])
    assert half == pytest.approx(first)
    labels = task.targets.clone(); labels[8:] = -100                 # ignore index behaves like the mask
    assert concentration_stats(s, task.teacher_logits, labels=labels) == pytest.approx(first)
    assert concentration_stats(s, task.teacher_logits, mask=torch.zeros(16, dtype=torch.bool)) == {}


def test_concentration_stats_with_masked_vocabulary():
    s, t = torch.randn(4, 20), torch.randn(4, 20)
    s[:, :3] = t[:, :3] = float("-inf")
    stats = concentration_stats(s, t, alpha=0.2, beta=0.7)
    assert all(math.isfinite(v) for v in stats.values())
