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


def _traj_with_turns():
    """A trajectory: prompt (4), turn 1 memory (3) + action (2), information (3), turn 2 action (4)."""
    from mempo.ops import Segment
    from mempo.rollout import Trajectory

    traj = Trajectory(task_index=0, group_index=0, token_ids=list(range(16)))
    traj.segments = [Segment("prompt", 0, 0, 4), Segment("memory", 1, 4, 7),
                     Segment("action", 1, 7, 9), Segment("information", 1, 9, 12),
                     Segment("action", 2, 12, 16)]
    traj.loss_mask = [False] * 4 + [True] * 5 + [False] * 3 + [True] * 4
    return traj


@pytest.mark.parametrize("level", ["token", "turn", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_correction_levels_and_modes_against_float64(seed, level, mode):
    from mempo.training.importance_sampling import RolloutCorrection, _units, correction_weights

    traj = _traj_with_turns()
    loss = torch.tensor(traj.loss_mask[1:])
    units = _units(traj, level, loss)
    expected_units = {"token": list(range(9)), "turn": [1] * 5 + [2] * 4, "sequence": [0] * 9}[level]
    assert units.tolist() == expected_units
    log_ratio = 0.3 * torch.randn(9, dtype=torch.float64)
    corr = RolloutCorrection(level, mode, cap=1.5, low=0.7)
    w, masked = correction_weights(log_ratio.float(), units, corr)
    for u in set(expected_units):  # float64 reference, unit by unit
        idx = [i for i, x in enumerate(expected_units) if x == u]
        ratio = math.exp(float(log_ratio[idx].sum()))
        if mode == "truncate":
            want, drop = min(ratio, 1.5), False
        else:
            drop = not 0.7 <= ratio <= 1.5
            want = 0.0 if drop else ratio
        for i in idx:
            assert float(w[i]) == pytest.approx(want, rel=1e-5, abs=1e-7) and bool(masked[i]) == drop
    if level != "token":  # one weight for all tokens of a unit
        for u in set(expected_units):
            assert len({float(w[i]) for i, x in enumerate(expected_units) if x == u}) == 1


def test_use_trainer_old_logprobs_turn_level_in_a_packed_batch():
    from mempo.training.importance_sampling import RolloutCorrection, use_trainer_old_logprobs
    from mempo.training.packed_batch import pack_trajectories

    traj = _traj_with_turns()
    traj.sample_logprobs = [0.0] * 16
    batch = pack_trajectories([traj, traj])
    trainer = torch.zeros(15)
    trainer[3:5] = math.log(2.0) / 2  # turn 1 tokens 4, 5 (rows 3, 4): turn 1 ratio sqrt(2)^2 = 2
    w, masked = use_trainer_old_logprobs(batch, [traj, traj], [trainer, trainer], RolloutCorrection("turn", cap=3.0))
    first = w[:15]
    loss = batch.loss_mask[:15]
    assert torch.allclose(first[loss][:5], torch.full((5,), 2.0)) and torch.allclose(first[loss][5:], torch.ones(4))
    assert (first[~loss] == 1).all() and not masked.any()
    assert torch.equal(batch.old_logprobs[:15], trainer)  # the trainer's are the old policy now
    with pytest.raises(ValueError, match="level must be one of"):
        RolloutCorrection("step")
    with pytest.raises(ValueError, match="low must be in"):
        RolloutCorrection(mode="mask", cap=1.0, low=1.0)
