"""LM-head ops on hidden states: per-token log-probs and the fused policy loss.

    linear_logprobs(hidden [N, H], weight [V, H], targets [N]) -> logp [N] (+ entropy [N])
    linear_policy_loss(hidden, weight, targets, old_logp, advantages, loss_mask, ...) -> loss

Rows are processed in chunks (`chunk_rows`, from a byte budget, never growing with N): per
chunk one GEMM gives float32 logits [C, V], the chunk epilogue (`mempo.ops.epilogue`) streams
each row once, and two GEMMs give dX and accumulate dW. [N, V] logits never exist.
`linear_policy_loss` evaluates dL/dlogp inside the epilogue (pointwise for token-level
ratios), so dX and dW are produced in the forward and backward only scales them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .epilogue import epilogue_grad_, epilogue_policy_loss, epilogue_stats, resolve_backend
from .policy_loss import (
    MemPOAdvantages,
    PolicyLossOptions,
    loss_metrics,
    prepare_loss_inputs,
    raise_failed,
    surrogate_terms,
    with_precomputed_grad,
)

# ---- chunking and the GEMMs ------------------------------------------------------------------
# The chunk loop shared by the LM-head ops: GEMM -> epilogue -> gradient GEMMs.
#
# Rows are processed `chunk_rows` at a time, so logits exist only as one [chunk_rows, V]
# buffer (float32 statistics whatever the input dtype) that is reused for every chunk; its
# size depends on V and a byte budget, never on N. For bf16/fp16 weights the epilogue
# writes dL/dlogits into a second buffer of the weight's dtype, which the two gradient
# GEMMs (dX = G @ W, dW += G^T @ X) read with float32 accumulation.

# Logit-chunk budgets: big enough that each chunk is a few-hundred-row GEMM on an H100 at
# V = 152k; small enough to stay in cache-friendly territory on CPUs.
CUDA_CHUNK_BYTES = 256 << 20
CPU_CHUNK_BYTES = 16 << 20

_out_dtype_mm_ok: dict[torch.device, bool] = {}


def default_chunk_rows(num_rows: int, vocab: int, device: torch.device, grad_bytes: int) -> int:
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    rows = budget // max(1, vocab * (4 + grad_bytes))
    rows = max(16, rows // 16 * 16)  # tensor-core friendly
    return max(1, min(num_rows, rows))


def _supports_out_dtype_mm(device: torch.device) -> bool:
    """bf16/fp16 x bf16/fp16 -> fp32 GEMMs (torch.mm/addmm out_dtype), CUDA only."""
    if device not in _out_dtype_mm_ok:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
                c = torch.zeros(16, 16, dtype=torch.float32, device=device)
                torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
                torch.mm(a, a, out_dtype=torch.float32, out=c)
                ok = bool(c[0, 0].item() == 16.0)
            except (RuntimeError, TypeError):
                ok = False
        _out_dtype_mm_ok[device] = ok
    return _out_dtype_mm_ok[device]


def logits_chunk(x: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """out[:C] = x @ weight.T in out's dtype (float32, or float64 for float64 inputs)."""
    if x.dtype == out.dtype:
        return torch.mm(x, weight.T, out=out)
    if _supports_out_dtype_mm(x.device):
        return torch.mm(x, weight.T, out_dtype=out.dtype, out=out)  # fp32 accumulators, unrounded
    out.copy_(torch.mm(x, weight.T))  # CPU bf16: logits rounded to bf16 once
    return out


def accumulate_weight_grad_(acc: Tensor, grad_logits: Tensor, x: Tensor) -> None:
    """acc [V, H] += grad_logits^T @ x, accumulating in acc's dtype."""
    if acc.dtype == grad_logits.dtype:
        acc.addmm_(grad_logits.T, x)
    elif _supports_out_dtype_mm(acc.device):
        torch.addmm(acc, grad_logits.T, x, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(torch.mm(grad_logits.T, x))


def lm_head_pass(
    x: Tensor,
    weight: Tensor,
    chunk_rows: int | None,
    epilogue: Callable[[slice, Tensor, Tensor | None], None],
    want_grad_x: bool,
    want_grad_weight: bool,
    weight_grad_fp32: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Run `epilogue(rows, logits, grad_buf)` over x [M, H] in chunks of rows.

    The epilogue reads logits [C, V] (float32/64) and, when grad_buf is not None, writes
    dL/dlogits [C, V] into it. Returns (dX [M, H] in x's dtype, dW [V, H] in the weight's
    dtype), each None when not wanted.
    """
    M, _ = x.shape
    V = weight.shape[0]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    want_grad = want_grad_x or want_grad_weight
    separate_grad_buf = want_grad and weight.dtype != stat_dtype
    grad_bytes = weight.element_size() if separate_grad_buf else 0
    rows = chunk_rows or default_chunk_rows(M, V, x.device, grad_bytes)
    if rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    rows = min(rows, max(M, 1))
    logits_buf = torch.empty(rows, V, dtype=stat_dtype, device=x.device)
    grad_buf = torch.empty(rows, V, dtype=weight.dtype, device=x.device) if separate_grad_buf else None
    grad_x = torch.empty_like(x) if want_grad_x else None
    grad_w = None
    if want_grad_weight:
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else (
            torch.float32 if weight_grad_fp32 else weight.dtype)
        grad_w = torch.zeros(V, weight.shape[1], dtype=acc_dtype, device=weight.device)
    for start in range(0, M, rows):
        sl = slice(start, min(start + rows, M))
        c = sl.stop - sl.start
        x_c = x[sl]
        logits = logits_chunk(x_c, weight, logits_buf[:c])
        g = None
        if want_grad:
            g = grad_buf[:c] if separate_grad_buf else logits
        epilogue(sl, logits, g)
        if grad_x is not None:
            torch.mm(g, weight, out=grad_x[sl])  # g has the weight's dtype (validated == x's)
        if grad_w is not None:
            accumulate_weight_grad_(grad_w, g, x_c)
    if grad_w is not None and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    return grad_x, grad_w


# ---- input checks ----------------------------------------------------------------------------

def check_lm_head_inputs(hidden: Tensor, weight: Tensor, targets: Tensor) -> list[tuple[str, Tensor]]:
    """Shape/dtype/device checks (raise now) and the value checks that need the device
    (returned as (message, bool tensor) pairs, to be read in one host sync)."""
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating tensor [N, H], got {getattr(hidden, 'dtype', type(hidden))}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {list(hidden.shape)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, {hidden.shape[1]}] (H of hidden), "
                         f"got {list(getattr(weight, 'shape', []))}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row (V >= 1)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device}, hidden on {hidden.device}")
    if not isinstance(targets, Tensor) or targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must have shape [{hidden.shape[0]}], got {list(getattr(targets, 'shape', []))}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device}, hidden on {hidden.device}")
    if targets.numel() == 0:
        return []
    V = weight.shape[0]
    return [(f"targets must lie in [0, {V})", ((targets >= 0) & (targets < V)).all())]


def check_temperature(temperature: float) -> float:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return 1.0 / float(temperature)


# ---- linear_logprobs -------------------------------------------------------------------------
# `linear_logprobs`: per-token log-probs (and entropy) straight from hidden states and the
# LM head, differentiable, without materialising the [N, V] logits.

class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t, with_entropy, backend, chunk_rows):
        n = hidden.shape[0]
        stat_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        lse = torch.empty(n, dtype=stat_dtype, device=hidden.device)
        logp = torch.empty_like(lse)
        mean_z = torch.empty_like(lse) if with_entropy else None

        def stats(rows, logits, _):
            lse[rows], logp[rows], mz = epilogue_stats(backend, logits, targets[rows], inv_t, with_entropy)
            if with_entropy:
                mean_z[rows] = mz

        lm_head_pass(hidden, weight, chunk_rows, stats, want_grad_x=False, want_grad_weight=False)
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
        ctx.inv_t, ctx.backend, ctx.chunk_rows = inv_t, backend, chunk_rows
        entropy = lse - mean_z if with_entropy else None
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, mean_z = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logp = grad_logp.to(lse.dtype).contiguous()
        if mean_z is None:
            grad_entropy = None
        elif grad_entropy is None:
            grad_entropy = torch.zeros_like(lse)
        else:
            grad_entropy = grad_entropy.to(lse.dtype).contiguous()
        mz = mean_z

        def grad(rows, logits, out):
            epilogue_grad_(ctx.backend, logits, targets[rows], ctx.inv_t, lse[rows], grad_logp[rows],
                           None if grad_entropy is None else grad_entropy[rows],
                           None if mz is None else mz[rows], out)

        grad_x, grad_w = lm_head_pass(
            hidden, weight, ctx.chunk_rows, grad,
            want_grad_x=ctx.needs_input_grad[0], want_grad_weight=ctx.needs_input_grad[1],
        )
        return grad_x, grad_w, None, None, None, None, None


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(hidden @ weight.T / temperature)[targets], chunk by chunk.

    hidden: [N, H] float (bf16/fp16/fp32/fp64); weight: [V, H] same dtype; targets: [N] int.
    Returns logp [N] float32 (float64 for float64 inputs) and, with return_entropy, the
    entropy [N] of each row's distribution. Differentiable w.r.t. hidden and weight; the
    backward recomputes logits chunk by chunk (nothing of size N x V is ever stored).
    chunk_rows: rows per logits chunk (default from a memory budget); backend: "auto",
    "triton", "native" or "torch" (see mempo.ops.epilogue).
    """
    inv_t = check_temperature(temperature)
    raise_failed(check_lm_head_inputs(hidden, weight, targets))
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    logp, entropy = _LinearLogprobs.apply(
        hidden, weight, targets.long().contiguous(), inv_t, bool(return_entropy), name, chunk_rows
    )
    return (logp, entropy) if return_entropy else logp


# ---- linear_policy_loss ----------------------------------------------------------------------
# `linear_policy_loss`: hidden states + LM head -> clipped policy loss in one pass.
#
# For token-level ratios dL/dlogp is pointwise in (logp, old, ref, A, weight), so the epilogue
# that computes each row's log-softmax also writes the logit gradient, and the forward
# produces dX and dW directly (three GEMMs in all instead of the four of a recompute-based
# backward); backward only scales by grad_output. Only rows with loss_mask = 1 go through
# the LM head: agent trajectories are mostly observation tokens that carry no loss.

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
