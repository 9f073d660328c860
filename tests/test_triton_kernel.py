"""The Triton kernel (`abkd.kernels.triton_kernels`, under the interpreter on a CPU): what is special to it. Its values
and gradients against the mpmath reference, through the front, are in test_core.py."""
import pytest
import torch


def test_triton_backward_runs_once():
    from abkd.kernels.triton_kernels import ab_divergence_triton
    s, t = torch.randn(2, 50, requires_grad=True), torch.randn(2, 50)
    loss = ab_divergence_triton(s, t, 0.2, 0.7).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()
