"""Group-relative advantages (GRPO) for trajectories and for memory blocks.

Trajectory: A_i = (R_i - mean_g R) / (std_g R + eps) over the G rollouts of one task
(std_g: unbiased, as verl; `scale_by_std=False` is Dr. GRPO's unscaled variant).
Memory: the same normalisation over the memories of one group that share a step index
(default) or over all memories of the group; a normaliser with fewer than two members, or
whose rewards all tie, gives advantage 0 (there is nothing to prefer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mempo.rollout.trajectory import Trajectory


def _group_normalise(values: Tensor, group: Tensor, scale_by_std: bool, eps: float) -> Tensor:
    """(v - mean_g) / (std_g + eps) per group id; 0 where a group has < 2 members or ties."""
    if values.dim() != 1 or group.shape != values.shape:
        raise ValueError(f"values and group ids must be matching 1-D tensors, got {list(values.shape)} "
                         f"and {list(group.shape)}")
    if values.numel() == 0:
        return values.clone()
    v = values.double()
    _, gid = torch.unique(group, return_inverse=True)
    k = int(gid.max()) + 1
    count = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(0, gid, torch.ones_like(v))
    mean = torch.zeros_like(count).index_add_(0, gid, v) / count
    centred = v - mean[gid]
    sq = torch.zeros_like(count).index_add_(0, gid, centred * centred)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    # "ties" judged on the spread, with a tolerance far below any reward difference of interest
    degenerate = (count < 2) | (std <= 1e-12)
    out = centred / (std[gid] + eps) if scale_by_std else centred
    return torch.where(degenerate[gid], torch.zeros_like(out), out).to(values.dtype)


def trajectory_advantages(
    rewards: Tensor, group_index: Tensor, *, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """rewards [T] of T trajectories, group_index [T] (the task each was rolled out for).
    Returns advantages [T]."""
    return _group_normalise(rewards, group_index, scale_by_std, eps)


def memory_advantages(
    mem_rewards: Tensor,
    group_index: Tensor,
    step_index: Tensor,
    *,
    by_step: bool = True,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """mem_rewards [M] of M memory blocks; group_index [M] the group of each memory's
    trajectory; step_index [M] the turn that wrote it. Returns advantages [M]."""
    if step_index.shape != group_index.shape:
        raise ValueError(f"step_index must have shape {list(group_index.shape)}, got {list(step_index.shape)}")
    key = group_index.long()
    if by_step:
        key = key * (int(step_index.max()) + 1 if step_index.numel() else 1) + step_index.long()
    return _group_normalise(mem_rewards, key, scale_by_std, eps)


@dataclass
class BatchAdvantages:
    traj_adv: Tensor  # [T] float32, trajectories in batch order
    mem_adv: Tensor  # [M] float32, memories in batch order (trajectory by trajectory)
    mem_rewards: Tensor  # [M] float64


def batch_advantages(trajectories: list[Trajectory], mem_rewards: Tensor, *, by_step: bool = True,
                     scale_by_std: bool = True) -> BatchAdvantages:
    """Group-normalised trajectory advantages and per-step (or per-group) normalised
    memory advantages; mem_rewards [M] in batch order."""
    rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float64)
    groups = torch.tensor([t.group_index for t in trajectories])
    traj_adv = trajectory_advantages(rewards, groups, scale_by_std=scale_by_std)
    mem_group, mem_step = [], []
    for t in trajectories:
        for seg in t.memory_segments():
            mem_group.append(t.group_index)
            mem_step.append(seg.step)
    if len(mem_group) != mem_rewards.shape[0]:
        raise ValueError(f"mem_rewards has {mem_rewards.shape[0]} entries for {len(mem_group)} memories")
    mem_adv = memory_advantages(mem_rewards, torch.tensor(mem_group, dtype=torch.long),
                                torch.tensor(mem_step, dtype=torch.long), by_step=by_step,
                                scale_by_std=scale_by_std)
    return BatchAdvantages(traj_adv.float(), mem_adv.float(), mem_rewards)
