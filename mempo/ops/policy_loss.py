"""The clipped policy loss of GRPO / MemPO: options, per-token surrogate, advantages,
aggregation, and `policy_loss` for trainers that already have log-probs.

    per token i (loss_mask = 1):  r_i = exp(logp_i - old_i)     (log-ratio clamped to +-20)
        l_i = max(-A_i r_i, -A_i clip(r_i, 1 - clip_low, 1 + clip_high))
              [dual clip: min(l_i, -A_i c) where A_i < 0]  + kl_coef * KL(logp_i, ref_i)
        A_i = traj_adv[seq(i)] + mem_coef * mem_adv[memory(i)]  (memory tokens; MemPO)
    loss = sum_i w_i l_i, with w from `loss_agg` (token-mean, seq-mean-token-mean, ...)

The fused LM-head version (`mempo.ops.lm_head.linear_policy_loss`) shares every piece here:
the same options, the same surrogate (its derivative is evaluated inside the chunk
epilogue), the same input preparation and aggregation weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

# ---- options ---------------------------------------------------------------------------------
# Options of the clipped policy loss, validated once and shared by every backend.

LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",  # GRPO / MemPO default
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",  # Dr. GRPO
)
KL_ESTIMATORS = ("k1", "k2", "k3")
# exp() of a log-ratio beyond this is clamped, as verl does: a finite ratio keeps the
# gradient finite when a token's probability collapsed between rollout and update.
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class PolicyLossOptions:
    """clip_low / clip_high: asymmetric PPO clip range [1 - clip_low, 1 + clip_high].
    dual_clip: lower bound c > 1 on the loss of negative-advantage tokens (None = off).
    kl_coef / kl_estimator: KL(pi || pi_ref) penalty added per token (k1, k2 or k3).
    loss_agg: how token losses become one number (see LOSS_AGGREGATIONS).
    num_global_tokens / num_global_seqs: data-parallel normalisers (the counts over all
      ranks); None uses this batch's own counts.
    seq_norm_len: Dr. GRPO's constant length; None uses the longest sequence of the batch."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "seq-mean-token-mean"
    num_global_tokens: int | None = None
    num_global_seqs: int | None = None
    seq_norm_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high", "dual_clip", "kl_coef"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        for name in ("num_global_tokens", "num_global_seqs", "seq_norm_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int (or None), got {value!r}")

    @property
    def kl_kind(self) -> int:
        """0 = no KL term, else 1/2/3 for k1/k2/k3 (the Triton kernel's constexpr)."""
        return 0 if self.kl_coef == 0.0 else KL_ESTIMATORS.index(self.kl_estimator) + 1


# ---- input checks (shared with mempo.ops.lm_head) ----------------------------------------------
# Validation of the LM-head inputs shared by linear_logprobs and linear_policy_loss.

def raise_failed(checks: list[tuple[str, Tensor]]) -> None:
    """Read all device-side checks with one sync; raise ValueError for the first failure."""
    if not checks:
        return
    ok = torch.stack([c for _, c in checks]).tolist()
    for (message, _), good in zip(checks, ok):
        if not good:
            raise ValueError(message)


# ---- inputs: advantages and aggregation weights ----------------------------------------------
# Validation of the policy-loss inputs and the two O(N) pre-passes every backend shares:
# per-token advantages (from the per-token or the compact MemPO form) and the aggregation
# weights that turn per-token losses into the scalar loss (loss = sum_i w_i * l_i).

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
            checks.append((f"seq_index must lie in [0, {num_seqs})",
                           ((c.seq_index >= 0) & (c.seq_index < num_seqs)).all()))
            checks.append((f"segment_index must lie in [-1, {num_segments})",
                           ((c.segment_index >= -1) & (c.segment_index < num_segments)).all()))
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


# ---- the per-token surrogate and its derivative ----------------------------------------------
# Per-token clipped surrogate and its analytic derivative, in PyTorch.
#
# For token-level ratios the loss of a token depends on its own log-prob only, so
# dL/dlogp is a pointwise function of (logp, old, ref, A, weight): the fused ops evaluate it
# in the same sweep as the log-softmax. The Triton twin is `_surrogate` in
# kernels/chunk_epilogue.py; tests check both against autograd on the reference.

class SurrogateTerms(NamedTuple):
    loss: Tensor  # [M] per-token loss (policy + kl_coef * kl)
    grad: Tensor  # [M] d loss / d logp
    ratio: Tensor  # [M]
    clipped: Tensor  # [M] bool: the PPO clip took the gradient away
    dual_clipped: Tensor  # [M] bool
    kl: Tensor | None  # [M] KL estimate to the reference, if any


def surrogate_terms(
    logp: Tensor, old: Tensor, adv: Tensor, ref: Tensor | None, opts: PolicyLossOptions
) -> SurrogateTerms:
    """All inputs [M] float32/float64 (same dtype); returns SurrogateTerms."""
    log_ratio = logp - old
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    # Beyond the clamp the ratio is constant in logp: no gradient, as in autograd.
    in_range = log_ratio.abs() <= LOG_RATIO_CLAMP
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - opts.clip_low, 1.0 + opts.clip_high)
    clipped = pg2 > pg1
    loss = torch.maximum(pg1, pg2)
    grad = torch.where(clipped | ~in_range, torch.zeros_like(pg1), pg1)  # d(-A r)/dlogp = -A r
    if opts.dual_clip is not None:
        pg3 = -adv * opts.dual_clip
        dual_clipped = (adv < 0) & (loss > pg3)
        loss = torch.where(dual_clipped, pg3, loss)
        grad = torch.where(dual_clipped, torch.zeros_like(grad), grad)
    else:
        dual_clipped = torch.zeros_like(clipped)
    kl = None
    if opts.kl_kind:
        diff = logp - ref
        if opts.kl_kind == 1:
            kl, dkl = diff, torch.ones_like(diff)
        elif opts.kl_kind == 2:
            kl, dkl = 0.5 * diff * diff, diff
        else:  # k3 with d = ref - logp: exp(d) - d - 1, derivative 1 - exp(d)
            d = -diff
            d_clamped = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            e = torch.exp(d_clamped)
            kl = e - d_clamped - 1.0
            dkl = torch.where(d.abs() <= LOG_RATIO_CLAMP, 1.0 - e, torch.zeros_like(e))
        loss = loss + opts.kl_coef * kl
        grad = grad + opts.kl_coef * dkl
    return SurrogateTerms(loss, grad, ratio, clipped, dual_clipped, kl)


# ---- autograd glue: gradients computed in the forward ----------------------------------------
# Autograd glue for ops that compute their gradients during the forward pass.
#
# The one-pass losses know dL/dinput when the forward ends; backward then only scales by
# grad_output, in place (no second [V, H] buffer for dW). Like torch's own freed buffers,
# a second backward through the same graph is an error rather than a wrong result.

class _PrecomputedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, grads: list[Tensor | None], *inputs: Tensor) -> Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.grads is None:
            raise RuntimeError(
                "mempo's fused loss was already backpropagated: its precomputed gradients "
                "are consumed by the first backward (recompute the loss instead of retain_graph=True)"
            )
        grads, ctx.grads = ctx.grads, None
        return (None, None, *[None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads])


def with_precomputed_grad(value: Tensor, inputs: list[Tensor], grads: list[Tensor | None]) -> Tensor:
    """Return `value` (0-dim) wired into autograd so that d value / d inputs[i] = grads[i]."""
    return _PrecomputedGrad.apply(value, grads, *inputs)


# ---- policy_loss -----------------------------------------------------------------------------
# `policy_loss`: the clipped policy loss for trainers that already have log-probs.

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
        raise ValueError(f"old_logprobs must have shape {list(logprobs.shape)}, "
                         f"got {getattr(old_logprobs, 'shape', None)}")
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
