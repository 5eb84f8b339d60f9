"""The chunk epilogue of the LM-head ops: one sweep over a chunk of logits [C, V].

Per row of z = logits / T: the online log-sum-exp, the target's log-prob, optionally the
entropy, and (for the fused loss) dL/dlogits written over the chunk so that the caller's two
gradient GEMMs run on the same buffer. Three backends implement this one contract:

- "triton": `mempo.kernels.chunk_epilogue` (CUDA; CPU tensors under TRITON_INTERPRET=1, tests);
- "native": the C++/OpenMP sweeps of the `mempo._C` extension (csrc/cpu/chunk_epilogue.cpp);
- "torch": `row_stats` / `write_logit_grad_` below (the plain statement; any device, float64).

`resolve_backend` picks one from the device ("auto") or honours a forced choice (argument
`backend=` or env MEMPO_BACKEND) with a clear error when it cannot run.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .policy_loss import LOG_RATIO_CLAMP, PolicyLossOptions, surrogate_terms

# ---- the PyTorch backend ---------------------------------------------------------------------
# Two sweeps over a chunk: `row_stats` (lse, target logit, mean logit under p) and
# `write_logit_grad_` (dL/dlogits over the chunk). The native extension and the Triton kernel
# implement the same contract; these functions are its plain-PyTorch statement.

def row_stats(
    logits: Tensor, targets: Tensor, inv_temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Statistics of z = logits * inv_temperature, row by row.

    logits: [C, V] float32 (not modified); targets: [C] int64 in [0, V).
    Returns lse [C], z_target [C] and, if with_entropy, mean_z [C] = sum_j p_j z_j, all float32.
    entropy = lse - mean_z; log p(target) = z_target - lse.
    """
    z = logits if inv_temperature == 1.0 else logits * inv_temperature
    z_target = z.gather(1, targets[:, None]).squeeze(1)
    if not with_entropy:
        return torch.logsumexp(z, dim=-1), z_target, None
    # Shift by the row max before weighting: mean_z = m + sum(e * (z - m)) / sum(e) keeps the
    # rounding of |z| ~ 1e3 logits out of the entropy (sum p*z directly loses ~1e-1 there).
    m = z.amax(dim=-1, keepdim=True)
    zc = z - m
    e = torch.exp(zc)
    s = e.sum(-1)
    mean_z = m.squeeze(1) + torch.where(e > 0, e * zc, 0.0).sum(-1) / s  # -inf logits: 0, not 0 * -inf
    return m.squeeze(1) + torch.log(s), z_target, mean_z


def write_logit_grad_(
    logits: Tensor,
    targets: Tensor,
    inv_temperature: float,
    lse: Tensor,
    grad_logp: Tensor,
    grad_entropy: Tensor | None = None,
    mean_z: Tensor | None = None,
) -> Tensor:
    """Overwrite `logits` [C, V] float32 with dL/dlogits; returns it.

    With p = softmax(z), z = logits / T:
      dlogp_t/dz = onehot(t) - p;  dH/dz = -p * (z - mean_z)
      dL/dlogits = (grad_logp * (onehot - p) - grad_entropy * p * (z - mean_z)) / T
    grad_logp, grad_entropy: [C] float32 (grad_entropy and mean_z together or not at all).
    """
    if (grad_entropy is None) != (mean_z is None):
        raise ValueError("grad_entropy and mean_z must be given together")
    z = logits
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    if grad_entropy is not None:
        # p * (g_lp_scale + g_ent * (z - mean_z)) with the sign folded in below.
        coef = z.sub(mean_z[:, None]).mul_(grad_entropy[:, None]).add_(grad_logp[:, None])
        z.sub_(lse[:, None]).exp_().mul_(coef).neg_()
        del coef
    else:
        z.sub_(lse[:, None]).exp_().mul_(grad_logp[:, None].neg())
    rows = torch.arange(z.shape[0], device=z.device)
    z[rows, targets] += grad_logp
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z


# ---- backend choice and dispatch -------------------------------------------------------------

BACKENDS = ("auto", "triton", "native", "torch")


def _sweeps(backend: str):
    """(row_stats, write_logit_grad_) of the native extension, or of the PyTorch statement above."""
    return (_native_ops().row_stats, _native_ops().write_logit_grad_) if backend == "native" else \
        (row_stats, write_logit_grad_)


def _native_ops():
    try:
        from mempo._native import native_ops
    except ImportError:
        return None
    return native_ops()


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on `device` in this process."""
    if device.type == "cuda":
        return ["triton", "torch"]
    names = ["torch"]
    if _native_ops() is not None:
        names.append("native")
    if os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Name of the epilogue backend to use for inputs on `device` of `dtype`."""
    if backend == "auto":
        backend = os.environ.get("MEMPO_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"
        if device.type == "cuda":
            return "triton"
        return "native" if device.type == "cpu" and _native_ops() is not None else "torch"
    if backend == "triton":
        if dtype == torch.float64:
            raise ValueError("backend='triton' supports float32/bfloat16/float16 inputs, got float64")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); on the CPU it runs only "
                "under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)"
            )
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' is the C++ CPU path; inputs are on {device}")
        if dtype == torch.float64:
            raise ValueError("backend='native' supports float32/bfloat16/float16 inputs, got float64")
        if _native_ops() is None:
            raise ValueError("backend='native' needs the mempo._C extension: pip install --no-build-isolation -e .")
    return backend


def epilogue_stats(backend: str, logits: Tensor, targets: Tensor, inv_t: float, with_entropy: bool):
    """-> (lse [C], logp [C], mean_z [C] or None) of a chunk."""
    if backend == "triton":
        from mempo.kernels.chunk_epilogue import chunk_epilogue

        return chunk_epilogue(logits, targets, inv_t, with_entropy=with_entropy)
    stats, _ = _sweeps(backend)
    lse, z_target, mean_z = stats(logits, targets, inv_t, with_entropy)
    return lse, z_target - lse, mean_z


def epilogue_grad_(
    backend: str, logits: Tensor, targets: Tensor, inv_t: float, lse: Tensor,
    grad_logp: Tensor, grad_entropy: Tensor | None, mean_z: Tensor | None, out: Tensor,
) -> None:
    """Write dL/dlogits of a chunk into `out` (which may be `logits` itself)."""
    if backend == "triton":
        from mempo.kernels.chunk_epilogue import chunk_epilogue

        chunk_epilogue(logits, targets, inv_t, grad_out=out,
                       saved=(lse, mean_z, grad_logp, grad_entropy))
        return
    _, write_grad_ = _sweeps(backend)
    write_grad_(logits, targets, inv_t, lse, grad_logp, grad_entropy, mean_z)
    if out is not logits:
        out.copy_(logits)


def epilogue_policy_loss(
    backend: str, logits: Tensor, targets: Tensor, inv_t: float, with_entropy: bool,
    old: Tensor, adv: Tensor, ref: Tensor | None, weight: Tensor, opts: PolicyLossOptions,
    out: Tensor | None,
):
    """Stats of the chunk and, if `out` is given, dL/dlogits of sum_i weight_i * loss_i
    written into it. -> (lse, logp, mean_z or None)."""
    if backend == "triton":
        from mempo.kernels.chunk_epilogue import chunk_epilogue

        if out is None:
            return chunk_epilogue(logits, targets, inv_t, with_entropy=with_entropy)
        return chunk_epilogue(logits, targets, inv_t, with_entropy=with_entropy, grad_out=out,
                              loss=(old, adv, ref, weight), clip_low=opts.clip_low, clip_high=opts.clip_high,
                              dual_clip=opts.dual_clip, kl_coef=opts.kl_coef, kl_kind=opts.kl_kind,
                              log_ratio_clamp=LOG_RATIO_CLAMP)
    lse, logp, mean_z = epilogue_stats(backend, logits, targets, inv_t, with_entropy)
    if out is not None:
        grad_logp = surrogate_terms(logp, old, adv, ref, opts).grad * weight
        epilogue_grad_(backend, logits, targets, inv_t, lse, grad_logp, None, None, out)
    return lse, logp, mean_z
