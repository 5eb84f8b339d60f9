"""Truncated importance-sampling weights."""
import math

import pytest
import torch

from mempo.training.importance_sampling import tis_weights


def test_hand_computed_case():
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.1])
    rollout = torch.tensor([-1.0, -1.5, -1.5, -0.2, -100.0])
    # ratios: 1, e^-0.5, e^1 = 2.718 -> cap 2, e^-2.8, e^99.9 -> cap 2
    expected = torch.tensor([1.0, math.exp(-0.5), 2.0, math.exp(-2.8), 2.0])
    w = tis_weights(old, rollout, cap=2.0)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=0)


def test_matches_float64_reference_and_is_detached(seed):
    n, cap = 1000, 1.5
    old = (torch.randn(n, dtype=torch.float64) - 2).requires_grad_()
    rollout = old.detach() + 0.5 * torch.randn(n, dtype=torch.float64)
    w = tis_weights(old, rollout, cap=cap)
    assert not w.requires_grad
    ref = torch.minimum((old.detach() - rollout).exp(), torch.tensor(cap, dtype=torch.float64))
    torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-7)
    assert (w <= cap).all() and (w > 0).all() and (w == cap).any() and (w < 1).any()


def test_scaling_advantages_equals_scaling_clipped_surrogate(seed):
    """Why the weight may go on A: min(r A, clip(r) A) is positively homogeneous in A."""
    n, eps = 500, 0.2
    ratio = torch.exp(0.3 * torch.randn(n, dtype=torch.float64))
    adv = torch.randn(n, dtype=torch.float64)
    w = tis_weights(torch.randn(n), torch.randn(n), cap=2.0).double()

    def surrogate(a):
        return torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)

    torch.testing.assert_close(surrogate(w * adv), w * surrogate(adv))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="cap"):
        tis_weights(torch.zeros(3), torch.zeros(3), cap=0.0)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        tis_weights(torch.zeros(3), torch.zeros(4))
