"""Validation of the policy-loss inputs and the two O(N) pre-passes every backend shares:
per-token advantages (from the per-token or the compact MemPO form) and the aggregation
weights that turn per-token losses into the scalar loss (loss = sum_i w_i * l_i)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .input_checks import raise_failed
from .loss_options import PolicyLossOptions


@dataclass
class MemPOAdvantages:
    """Compact MemPO advantages: token advantage = traj_adv[seq] (+ mem_coef * mem_adv[segment]
    on memory tokens).

    traj_adv: [num_seqs] trajectory advantage of each sequence.
    seq_index: [N] int, sequence of each token, in [0, num_seqs).
    mem_adv: [num_segments] memory advantage of each memory block.
    segment_index: [N] int, memory block of each token, -1 for non-memory tokens.
    """

    traj_adv: Tensor
    seq_index: Tensor
    mem_adv: Tensor
    segment_index: Tensor
    mem_coef: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.mem_coef, (int, float)) or not math.isfinite(self.mem_coef):
            raise ValueError(f"mem_coef must be a finite number, got {self.mem_coef!r}")


@dataclass
class LossInputs:
    """Everything [N] on one device, validated: advantages and weights in float32 (float64
    if the log-probs are float64), mask bool."""

    advantages: Tensor
    weights: Tensor
    mask: Tensor
    num_loss_tokens: Tensor  # 0-dim, this batch's count of tokens with loss


def _check_vector(name: str, t: Tensor, n: int, device: torch.device, floating: bool | None) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the log-probs)")
    if floating is True and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if floating is False and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def prepare_loss_inputs(
    n: int,
    device: torch.device,
    compute_dtype: torch.dtype,
    advantages: Tensor | MemPOAdvantages,
    loss_mask: Tensor,
    seq_index: Tensor | None,
    ref_logprobs: Tensor | None,
    opts: PolicyLossOptions,
    extra_checks: list[tuple[str, Tensor]] = (),
) -> LossInputs:
    """Validate and build per-token advantages and aggregation weights; one host sync for
    all range checks together (the caller's `extra_checks` included)."""
    _check_vector("loss_mask", loss_mask, n, device, floating=None)
    if ref_logprobs is not None:
        _check_vector("ref_logprobs", ref_logprobs, n, device, floating=True)
    elif opts.kl_coef != 0.0:
        raise ValueError("kl_coef > 0 needs ref_logprobs")

    checks = list(extra_checks)  # (message, bool tensor that must be True)
    if loss_mask.dtype == torch.bool:
        mask = loss_mask
    else:
        checks.append(("loss_mask must hold only 0 and 1", ((loss_mask == 0) | (loss_mask == 1)).all()))
        mask = loss_mask != 0

    if isinstance(advantages, MemPOAdvantages):
        c = advantages
        for name, t in (("traj_adv", c.traj_adv), ("mem_adv", c.mem_adv)):
            if not isinstance(t, Tensor) or t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D tensor, got {getattr(t, 'shape', t)}")
        num_seqs, num_segments = c.traj_adv.shape[0], c.mem_adv.shape[0]
        _check_vector("traj_adv", c.traj_adv, num_seqs, device, floating=True)
        _check_vector("mem_adv", c.mem_adv, num_segments, device, floating=True)
        _check_vector("seq_index", c.seq_index, n, device, floating=False)
        _check_vector("segment_index", c.segment_index, n, device, floating=False)
        if seq_index is not None and seq_index is not c.seq_index:
            raise ValueError("give seq_index once: either as an argument or inside MemPOAdvantages")
        seq_index = c.seq_index
        if n:
            checks.append((f"seq_index must lie in [0, {num_seqs})", ((c.seq_index >= 0) & (c.seq_index < num_seqs)).all()))
            checks.append((f"segment_index must lie in [-1, {num_segments})", ((c.segment_index >= -1) & (c.segment_index < num_segments)).all()))
    else:
        _check_vector("advantages", advantages, n, device, floating=True)
        if seq_index is not None:
            _check_vector("seq_index", seq_index, n, device, floating=False)
            if n:
                checks.append(("seq_index must be >= 0", (seq_index >= 0).all()))

    if opts.loss_agg != "token-mean" and seq_index is None:
        raise ValueError(f"loss_agg={opts.loss_agg!r} needs seq_index (the sequence of each token)")
    raise_failed(checks)
    adv = token_advantages(advantages, compute_dtype)

    weights, num_loss_tokens = aggregation_weights(mask, seq_index, opts, compute_dtype)
    return LossInputs(adv, weights, mask, num_loss_tokens)


def token_advantages(advantages: Tensor | MemPOAdvantages, dtype: torch.dtype) -> Tensor:
    """Per-token advantages [N] from either form (inputs already validated)."""
    if isinstance(advantages, Tensor):
        return advantages.to(dtype)
    c = advantages
    adv = c.traj_adv.to(dtype)[c.seq_index]
    if c.mem_adv.numel():
        mem = c.mem_adv.to(dtype)[c.segment_index.clamp(min=0)]
        adv = adv + torch.where(c.segment_index >= 0, c.mem_coef * mem, torch.zeros_like(mem))
    return adv


def aggregation_weights(
    mask: Tensor, seq_index: Tensor | None, opts: PolicyLossOptions, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """w [N] such that loss = sum_i w_i * loss_i for the chosen aggregation; no host sync."""
    m = mask.to(dtype)
    num_tokens = m.sum()
    if opts.loss_agg == "token-mean":
        denom = num_tokens.clamp(min=1) if opts.num_global_tokens is None else opts.num_global_tokens
        return m / denom, num_tokens
    loss_tokens_per_seq = torch.bincount(seq_index, weights=m).to(dtype)
    if opts.num_global_seqs is not None:
        num_seqs = opts.num_global_seqs
    else:  # sequences without a loss token have no mean and do not count
        num_seqs = (loss_tokens_per_seq > 0).sum().clamp(min=1).to(dtype)
    if opts.loss_agg == "seq-mean-token-mean":
        return m / (loss_tokens_per_seq.clamp(min=1)[seq_index] * num_seqs), num_tokens
    w = m / num_seqs
    if opts.loss_agg == "seq-mean-token-sum-norm":
        if opts.seq_norm_len is not None:
            w = w / opts.seq_norm_len
        elif seq_index.numel():
            w = w / torch.bincount(seq_index).max().to(dtype)
    return w, num_tokens
