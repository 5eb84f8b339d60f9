"""`policy_loss`: the clipped policy loss for trainers that already have log-probs."""
from __future__ import annotations

import torch
from torch import Tensor

from .loss_inputs import MemPOAdvantages, prepare_loss_inputs
from .loss_options import PolicyLossOptions
from .precomputed_grad import with_precomputed_grad
from .surrogate import SurrogateTerms, surrogate_terms


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor | MemPOAdvantages,
    loss_mask: Tensor,
    ref_logprobs: Tensor | None = None,
    *,
    seq_index: Tensor | None = None,
    entropy: Tensor | None = None,
    **options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (PPO/GRPO, optional dual clip and KL to a reference), aggregated.

    logprobs, old_logprobs, ref_logprobs, advantages, loss_mask: [N] packed tokens, or
      [B, T] (then each row is a sequence and seq_index may be omitted).
    advantages: per-token [N], or `MemPOAdvantages` (compact trajectory + memory form).
    seq_index: [N] sequence of each token (needed by the seq-mean aggregations).
    entropy: optional [N] per-token entropies, only averaged into the metrics.
    options: `PolicyLossOptions` fields (clip_low, clip_high, dual_clip, kl_coef,
      kl_estimator, loss_agg, num_global_tokens, num_global_seqs, seq_norm_len).
    Returns (loss 0-dim, metrics): metrics are detached 0-dim tensors (no host sync here;
    call float() when logging).
    """
    opts = PolicyLossOptions(**options)
    if not isinstance(logprobs, Tensor) or not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a floating tensor, got {getattr(logprobs, 'dtype', type(logprobs))}")
    if logprobs.dim() == 2:
        rows, cols = logprobs.shape
        if seq_index is None and not isinstance(advantages, MemPOAdvantages):
            seq_index = torch.arange(rows, device=logprobs.device).repeat_interleave(cols)
        shape = logprobs.shape
        flat = lambda t: None if t is None else t.reshape(-1) if t.shape == shape else t  # noqa: E731
        logprobs, old_logprobs, ref_logprobs, loss_mask, entropy = map(
            flat, (logprobs, old_logprobs, ref_logprobs, loss_mask, entropy)
        )
        if isinstance(advantages, Tensor):
            advantages = flat(advantages)
    elif logprobs.dim() != 1:
        raise ValueError(f"logprobs must be [N] or [B, T], got {list(logprobs.shape)}")
    n, device = logprobs.shape[0], logprobs.device
    if not isinstance(old_logprobs, Tensor) or old_logprobs.shape != logprobs.shape:
        raise ValueError(f"old_logprobs must have shape {list(logprobs.shape)}, got {getattr(old_logprobs, 'shape', None)}")
    if old_logprobs.device != device:
        raise ValueError(f"old_logprobs is on {old_logprobs.device}, expected {device}")
    compute_dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    inputs = prepare_loss_inputs(n, device, compute_dtype, advantages, loss_mask, seq_index, ref_logprobs, opts)

    # Masked tokens take no part: zero their inputs, so a NaN/inf there (padding, a skipped
    # row) cannot reach the sum through 0 * NaN (linear_policy_loss never reads them either).
    keep = inputs.mask
    zero = lambda t: torch.where(keep, t.detach().to(compute_dtype), 0.0)  # noqa: E731
    logp = zero(logprobs)
    ref = None if ref_logprobs is None else zero(ref_logprobs)
    terms = surrogate_terms(logp, zero(old_logprobs), zero(inputs.advantages), ref, opts)
    value = (terms.loss * inputs.weights).sum()
    grad = (terms.grad * inputs.weights).to(logprobs.dtype)
    loss = with_precomputed_grad(value, [logprobs], [grad])
    return loss, loss_metrics(value, terms, inputs.mask, inputs.num_loss_tokens, logp, zero(old_logprobs),
                              None if entropy is None else zero(entropy))


def loss_metrics(
    value: Tensor,
    terms: SurrogateTerms,
    mask: Tensor,
    num_loss_tokens: Tensor,
    logp: Tensor,
    old_logprobs: Tensor,
    entropy: Tensor | None,
) -> dict[str, Tensor]:
    """Token means over loss tokens of this batch, as detached 0-dim float32 tensors."""
    m = mask.to(terms.loss.dtype)
    count = num_loss_tokens.clamp(min=1).to(m.dtype)
    mean = lambda x: ((x.to(m.dtype) * m).sum() / count).detach().float()  # noqa: E731
    log_ratio = (logp - old_logprobs.to(logp.dtype)).clamp(-20, 20)
    metrics = {
        "loss": value.detach().float(),
        "clip_frac": mean(terms.clipped),
        "dual_clip_frac": mean(terms.dual_clipped),
        "ratio_mean": mean(terms.ratio),
        # k3 estimate of KL(old || new) on the sampled tokens: r - 1 - log r >= 0.
        "approx_kl": mean(torch.exp(log_ratio) - 1 - log_ratio),
        "num_loss_tokens": num_loss_tokens.detach().float(),
    }
    if terms.kl is not None:
        metrics["kl_ref"] = mean(terms.kl)
    if entropy is not None:
        metrics["entropy"] = mean(entropy.detach())
    return metrics
