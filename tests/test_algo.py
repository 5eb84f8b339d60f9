"""MemPO advantages and memory rewards against hand-computed cases and loops."""
import math

import pytest
import torch

from mempo.algo import answer_probability, memory_advantages, memory_rewards, trajectory_advantages


def test_trajectory_advantages_hand_case():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.2])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    a = trajectory_advantages(r, g, eps=0.0)
    std0 = math.sqrt(((0.5**2) * 4) / 3)  # unbiased
    torch.testing.assert_close(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std0)
    assert torch.all(a[4:] == 0)  # tie, and a group of one
    unscaled = trajectory_advantages(r, g, scale_by_std=False)
    torch.testing.assert_close(unscaled[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_trajectory_advantages_match_loop(seed):
    r = torch.randn(40)
    g = torch.randint(0, 6, (40,))
    a = trajectory_advantages(r, g)
    for k in g.unique():
        sel = g == k
        if sel.sum() < 2:
            assert torch.all(a[sel] == 0)
            continue
        expect = (r[sel] - r[sel].mean()) / (r[sel].std() + 1e-6)
        torch.testing.assert_close(a[sel], expect, rtol=1e-5, atol=1e-6)


def test_memory_advantages_by_step_and_by_group():
    rew = torch.tensor([0.9, 0.1, 0.5, 0.4, 0.6, 0.3])
    grp = torch.tensor([0, 0, 0, 0, 0, 1])
    step = torch.tensor([1, 1, 2, 2, 3, 1])
    a = memory_advantages(rew, grp, step, eps=0.0)
    s1 = torch.tensor([0.9, 0.1]).std()
    s2 = torch.tensor([0.5, 0.4]).std()
    torch.testing.assert_close(a[:4], torch.tensor([0.4 / s1, -0.4 / s1, 0.05 / s2, -0.05 / s2]))
    assert a[4] == 0 and a[5] == 0  # alone at its step; alone in its group
    b = memory_advantages(rew, grp, step, by_step=False, eps=0.0)
    five = rew[:5]
    torch.testing.assert_close(b[:5], (five - five.mean()) / five.std())


def test_answer_probability_is_geometric_mean():
    lp = torch.log(torch.tensor([0.5, 0.125, 0.9]))
    p = answer_probability(lp, torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(p, torch.tensor([0.25, 0.9], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one answer token"):
        answer_probability(lp, torch.tensor([0, 0, 0]), 2)
    torch.testing.assert_close(memory_rewards(p, torch.tensor([0.5, 0.5], dtype=torch.float64)),
                               torch.tensor([-0.25, 0.4], dtype=torch.float64))


def test_empty_inputs():
    assert trajectory_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0
    no_ids = torch.zeros(0, dtype=torch.long)
    assert memory_advantages(torch.zeros(0), no_ids, no_ids).numel() == 0
