"""`linear_policy_loss`: hidden states + LM head -> clipped policy loss in one pass.

For token-level ratios dL/dlogp is pointwise in (logp, old, ref, A, weight), so the epilogue
that computes each row's log-softmax also writes the logit gradient, and the forward
produces dX and dW directly (three GEMMs in all instead of the four of a recompute-based
backward); backward only scales by grad_output. Only rows with loss_mask = 1 go through
the LM head: agent trajectories are mostly observation tokens that carry no loss.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .epilogue_backends import epilogue_policy_loss, resolve_backend
from .input_checks import check_lm_head_inputs, check_temperature
from .lm_head_chunks import lm_head_pass
from .loss_inputs import MemPOAdvantages, prepare_loss_inputs
from .loss_options import PolicyLossOptions
from .policy_loss import loss_metrics
from .precomputed_grad import with_precomputed_grad
from .surrogate import surrogate_terms


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor | MemPOAdvantages,
    loss_mask: Tensor,
    ref_logprobs: Tensor | None = None,
    *,
    seq_index: Tensor | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    weight_grad_fp32: bool = True,
    chunk_rows: int | None = None,
    backend: str = "auto",
    **options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy loss of the tokens `targets` under logits = hidden @ weight.T / T.

    hidden: [N, H]; weight: [V, H] (same dtype); targets, old_logprobs, loss_mask,
      ref_logprobs: [N]; advantages: [N] or `MemPOAdvantages`; seq_index: [N].
    options: `PolicyLossOptions` fields (clip_low=0.2, clip_high=0.2, dual_clip=None,
      kl_coef=0, kl_estimator="k3", loss_agg="seq-mean-token-mean", num_global_tokens,
      num_global_seqs, seq_norm_len).
    compute_entropy: also report the mean entropy of the loss tokens (metric only).
    weight_grad_fp32: accumulate dW over chunks in float32 (default; a [V, H] float32
      buffer). False accumulates in the weight's dtype, which saves that buffer.
    Returns (loss 0-dim float32, metrics of detached 0-dim tensors), like `policy_loss`.
    """
    opts = PolicyLossOptions(**options)
    inv_t = check_temperature(temperature)
    checks = check_lm_head_inputs(hidden, weight, targets)
    n, device = hidden.shape[0], hidden.device
    if not isinstance(old_logprobs, Tensor) or old_logprobs.shape != (n,):
        raise ValueError(f"old_logprobs must have shape [{n}], got {list(getattr(old_logprobs, 'shape', []))}")
    if old_logprobs.device != device:
        raise ValueError(f"old_logprobs is on {old_logprobs.device}, hidden on {device}")
    name = resolve_backend(backend, device, hidden.dtype)
    stat = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    inputs = prepare_loss_inputs(n, device, stat, advantages, loss_mask, seq_index, ref_logprobs, opts, checks)

    rows = inputs.mask.nonzero().squeeze(1)  # the one size-dependent sync of the op
    all_rows = rows.numel() == n
    pick = (lambda t: t) if all_rows else (lambda t: t.index_select(0, rows))  # noqa: E731
    x = pick(hidden)
    # every per-row operand contiguous: the kernels read them with stride 1 (a strided float32
    # advantage tensor with an all-ones mask used to reach them as is)
    tgt, adv, w = (pick(t).contiguous() for t in (targets.long(), inputs.advantages, inputs.weights))
    old = pick(old_logprobs.detach()).to(stat).contiguous()
    ref = None if ref_logprobs is None else pick(ref_logprobs.detach()).to(stat).contiguous()
    m = rows.numel()
    logp = torch.empty(m, dtype=stat, device=device)
    mean_z = torch.empty(m, dtype=stat, device=device) if compute_entropy else None
    lse = torch.empty(m, dtype=stat, device=device)

    need_x = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad

    def epilogue(sl, logits, grad_out):
        lse[sl], logp[sl], mz = epilogue_policy_loss(
            name, logits, tgt[sl], inv_t, compute_entropy, old[sl], adv[sl],
            None if ref is None else ref[sl], w[sl], opts, grad_out)
        if compute_entropy:
            mean_z[sl] = mz

    grad_x_rows, grad_w = lm_head_pass(x.detach(), weight.detach(), chunk_rows, epilogue,
                                       need_x, need_w, weight_grad_fp32)
    grad_x = grad_x_rows
    if grad_x_rows is not None and not all_rows:
        grad_x = torch.zeros_like(hidden).index_copy_(0, rows, grad_x_rows)

    terms = surrogate_terms(logp, old, adv, ref, opts)
    value = (terms.loss * w).sum()
    loss = with_precomputed_grad(value, [hidden, weight], [grad_x, grad_w])
    entropy = None if mean_z is None else lse - mean_z
    ones = torch.ones(m, dtype=torch.bool, device=device)
    metrics = loss_metrics(value, terms, ones, inputs.num_loss_tokens, logp, old, entropy)
    return loss, metrics
