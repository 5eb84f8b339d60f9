"""Truncated importance sampling (TIS) for rollout / trainer log-prob mismatch.

The policy-gradient surrogate assumes the tokens were sampled from pi_old, the trainer's
policy before the update. When another engine samples them (engine=vllm) they come from
pi_rollout instead: vLLM re-encodes the kept context after a memory drop at contiguous
positions (and uses its own kernels), so pi_rollout != pi_old token by token. Reweighting
each token by pi_old / pi_rollout makes the gradient unbiased for pi_old; truncating the
ratio at `cap` bounds its variance (a small bias where the rollout under-samples a token).

Use it whenever rollout and trainer log-probs can differ, i.e. engine=vllm; with the native
engine the ratio is 1 up to float error and the weights can be skipped.

The weight multiplies the per-token advantage. That is exact for the PPO/GRPO clipped
surrogate: min(r A, clip(r, 1-e, 1+e) A) is positively homogeneous in A, so for w >= 0
w * min(r A, clip(r) A) = min(r (wA), clip(r) (wA)); scaling A by w is scaling the token's
loss by w. The weights are detached: they correct the sampling distribution, they are not
part of what is optimised.
"""
from __future__ import annotations

import torch
from torch import Tensor


def tis_weights(trainer_old_logprobs: Tensor, rollout_logprobs: Tensor, cap: float = 2.0) -> Tensor:
    """Per-token weights min(exp(old - rollout), cap), detached.

    trainer_old_logprobs: [N] log pi_old(token) recomputed by the trainer before the update.
    rollout_logprobs: [N] log pi_rollout(token) recorded by the rollout engine.
    Returns [N] float32 weights in (0, cap]; multiply the per-token advantages by them
    (masked-out tokens may hold anything: their weight is finite and unused)."""
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    if trainer_old_logprobs.shape != rollout_logprobs.shape:
        raise ValueError(f"trainer_old_logprobs {tuple(trainer_old_logprobs.shape)} and rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)} must have the same shape")
    log_ratio = trainer_old_logprobs.detach().float() - rollout_logprobs.detach().float().to(trainer_old_logprobs.device)
    # clamp the log first: exp of a large gap would overflow to inf before the cap applies
    return torch.exp(log_ratio.clamp(max=float(torch.log(torch.tensor(cap, dtype=torch.float64)))))


def trajectory_rows(batch, trajectory_lengths: list[int]) -> list[tuple[int, int]]:
    """Packed rows [start, end) that predict tokens 1.. of each trajectory of `batch` (row j
    of a sequence predicts its token j + 1; probes, if any, follow the trajectory)."""
    cu = batch.cu_seqlens.tolist()
    return [(cu[k], cu[k] + n - 1) for k, n in enumerate(trajectory_lengths)]


def use_trainer_old_logprobs(batch, trainer_logprobs: list[Tensor], cap: float | None) -> Tensor:
    """Make the trainer's recomputed log-probs the old policy of `batch` (in place) and
    return the TIS weights [L] float32 (1 where cap is None, off-trajectory or on probes).

    trainer_logprobs[k]: [len(trajectory k) - 1] trainer log-probs of tokens 1.. of the
    batch's k-th trajectory; `batch.old_logprobs` holds the rollout's on entry."""
    weights = torch.ones(batch.num_tokens, dtype=torch.float32)
    rows = trajectory_rows(batch, [int(t.shape[0]) + 1 for t in trainer_logprobs])
    for (start, end), trainer in zip(rows, trainer_logprobs, strict=True):
        rollout = batch.old_logprobs[start:end].clone()
        batch.old_logprobs[start:end] = trainer.detach().float().cpu()
        if cap is not None:
            mask = batch.loss_mask[start:end]
            weights[start:end] = torch.where(mask, tis_weights(batch.old_logprobs[start:end], rollout, cap), 1.0)
    return weights
