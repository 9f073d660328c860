"""Shared test inputs: the (alpha, beta) grid of the core's tests, seeded random logits, and the call under test."""
import torch

import abkd

GRID = [(1, 0), (0, 1), (0, 0), (0.5, 0.5), (1, 1), (0.5, -0.5), (2, -0.5), (-0.3, 1.2),
        (1e-7, 0.7), (0.7, 1e-7), (0.3, -0.3 + 1e-7)]


def _ids(cases):
    return [",".join(repr(v) for v in c) for c in cases]


def randn(*shape, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def ab(s, t, a, b, **kw):
    return abkd.ab_divergence(s, t, a, b, **kw)
