"""Tests of `abkd.clip.metrics`: accuracy and the base/new harmonic mean."""
import pytest
import torch
from abkd.clip.metrics import accuracy, harmonic_mean


@pytest.mark.parametrize("b, n, hm", [(90, 50, 2 * 90 * 50 / 140), (0, 80, 0.0), (100, 100, 100.0), (0, 0, 0.0)])
def test_harmonic_mean(b, n, hm):
    assert harmonic_mean(b, n) == pytest.approx(hm, rel=1e-15)
    assert harmonic_mean(b, n) <= (b + n) / 2 + 1e-12


@pytest.mark.parametrize("bad", [-1, 100.5, float("inf"), float("nan"), "90", True])
def test_harmonic_mean_rejects_bad_accuracies(bad):
    with pytest.raises(ValueError, match="base"):
        harmonic_mean(bad, 50)


def test_accuracy():
    logits = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([1, 0, 0, 0])) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="no examples"):
        accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))

