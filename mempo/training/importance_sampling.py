"""Truncated importance sampling (TIS) for rollout / trainer log-prob mismatch.

The policy-gradient surrogate assumes the tokens were sampled from pi_old, the trainer's
policy before the update. When another engine samples them (engine=vllm) they come from
pi_rollout instead: vLLM re-encodes the kept context after a memory drop at contiguous
positions (and uses its own kernels), so pi_rollout != pi_old token by token. Reweighting
each token by pi_old / pi_rollout makes the gradient unbiased for pi_old; truncating the
ratio at `cap` bounds its variance (a small bias where the rollout under-samples a token).

Use it whenever rollout and trainer log-probs can differ: engine=vllm, or the native engine in
bf16 (algorithm.old_logprobs=recompute); with the native engine in float32 the ratio is 1 up
to float error and the weights are skipped.

The ratio can be taken per token, per agent turn (the product over the turn's tokens, one
weight for all of them: a turn is what the environment answers, so it is the unit whose
probability decides what came next) or per sequence (the product over the trajectory), and
either truncated (min(w, cap): bounded variance, a small bias where the rollout under-samples)
or used as a mask (tokens, turns or sequences with w outside [low, cap] get weight 0: no bias
from truncation, but less data). Defaults: token level, truncate, cap 2 (the usual TIS setting;
turn and sequence products grow with length, so their weights leave [low, cap] more often).

The weight multiplies the per-token advantage. That is exact for the PPO/GRPO clipped
surrogate: min(r A, clip(r, 1-e, 1+e) A) is positively homogeneous in A, so for w >= 0
w * min(r A, clip(r) A) = min(r (wA), clip(r) (wA)); scaling A by w is scaling the token's
loss by w. The weights are detached: they correct the sampling distribution, they are not
part of what is optimised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LEVELS = ("token", "turn", "sequence")
MODES = ("truncate", "mask")


@dataclass(frozen=True)
class RolloutCorrection:
    """level: token | turn | sequence; mode: truncate | mask; cap: the upper bound of a weight
    (truncate: min(w, cap); mask: w > cap -> 0); None = no reweighting (weights 1); low: the
    lower bound of mask mode (w < low -> 0)."""

    level: str = "token"
    mode: str = "truncate"
    cap: float | None = 2.0
    low: float = 0.0

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.cap is not None and not self.cap > 0:
            raise ValueError(f"cap must be > 0 (or None), got {self.cap}")
        if not 0 <= self.low < (self.cap if self.cap is not None else math.inf):
            raise ValueError(f"low must be in [0, cap), got {self.low} (cap {self.cap})")


def correction_weights(log_ratio: Tensor, units: Tensor, correction: RolloutCorrection) -> tuple[Tensor, Tensor]:
    """Weights of one trajectory's loss tokens.

    log_ratio: [n] log pi_old - log pi_rollout of each loss token; units: [n] int64, the unit
    (token, turn or sequence index, from 0) each token belongs to. The unit's log-ratio is the
    sum over its tokens. Returns (weights [n] float32 detached, masked [n] bool)."""
    lr = log_ratio.detach().double()
    if correction.cap is None:
        return torch.ones_like(lr, dtype=torch.float32), torch.zeros_like(lr, dtype=torch.bool)
    size = int(units.max()) + 1 if units.numel() else 0
    unit_lr = torch.zeros(size, dtype=torch.float64, device=lr.device).index_add_(0, units, lr)[units]
    log_cap = math.log(correction.cap)
    if correction.mode == "truncate":
        # clamp the log first: exp of a large gap would overflow to inf before the cap applies
        return torch.exp(unit_lr.clamp(max=log_cap)).float(), torch.zeros_like(lr, dtype=torch.bool)
    log_low = math.log(correction.low) if correction.low > 0 else -math.inf
    masked = (unit_lr > log_cap) | (unit_lr < log_low)
    return torch.where(masked, 0.0, torch.exp(unit_lr.clamp(max=log_cap))).float(), masked


def tis_weights(trainer_old_logprobs: Tensor, rollout_logprobs: Tensor, cap: float = 2.0) -> Tensor:
    """Per-token truncated weights min(exp(old - rollout), cap), detached, float32 in (0, cap]
    (token-level truncate `correction_weights`)."""
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    if trainer_old_logprobs.shape != rollout_logprobs.shape:
        raise ValueError(f"trainer_old_logprobs {tuple(trainer_old_logprobs.shape)} and rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)} must have the same shape")
    rollout = rollout_logprobs.detach().float().to(trainer_old_logprobs.device)
    log_ratio = trainer_old_logprobs.detach().float() - rollout
    units = torch.arange(log_ratio.numel(), device=log_ratio.device)
    return correction_weights(log_ratio.flatten(), units, RolloutCorrection(cap=cap))[0].view_as(log_ratio)


def trajectory_rows(batch, trajectory_lengths: list[int]) -> list[tuple[int, int]]:
    """Packed rows [start, end) that predict tokens 1.. of each trajectory of `batch` (row j
    of a sequence predicts its token j + 1; probes, if any, follow the trajectory)."""
    cu = batch.cu_seqlens.tolist()
    return [(cu[k], cu[k] + n - 1) for k, n in enumerate(trajectory_lengths)]


def _units(traj, level: str, loss: Tensor) -> Tensor:
    """[n] unit of each loss token (tokens 1.. of the trajectory where loss is set)."""
    count = int(loss.sum())
    if level == "token":
        return torch.arange(count)
    if level == "sequence":
        return torch.zeros(count, dtype=torch.int64)
    step = torch.zeros(len(traj), dtype=torch.int64)
    for seg in traj.segments:
        step[seg.start:seg.end] = seg.step
    return step[1:][loss]


def use_trainer_old_logprobs(batch, trajectories: list, trainer_logprobs: list[Tensor],
                             correction: RolloutCorrection) -> tuple[Tensor, Tensor]:
    """Make the trainer's recomputed log-probs the old policy of `batch` (in place) and return
    (weights [L] float32: 1 off the loss tokens, masked [L] bool) for `correction`.

    trajectories[k]: the batch's k-th trajectory; trainer_logprobs[k]: [len - 1] trainer
    log-probs of its tokens 1..; `batch.old_logprobs` holds the rollout's on entry."""
    weights = torch.ones(batch.num_tokens, dtype=torch.float32)
    masked = torch.zeros(batch.num_tokens, dtype=torch.bool)
    rows = trajectory_rows(batch, [len(t) for t in trajectories])
    for (start, end), traj, trainer in zip(rows, trajectories, trainer_logprobs, strict=True):
        rollout = batch.old_logprobs[start:end].clone()
        batch.old_logprobs[start:end] = trainer.detach().float().cpu()
        loss = batch.loss_mask[start:end]
        if loss.any():
            w, m = correction_weights((batch.old_logprobs[start:end] - rollout)[loss],
                                      _units(traj, correction.level, loss), correction)
            weights[start:end][loss] = w
            masked[start:end][loss] = m
    return weights, masked
