"""Triton epilogue of the chunked LM-head ops: one program per row of a logits chunk.

Pass 1 streams the row once: online log-sum-exp (running max starts at -inf), the target's
logit, and sum p*z for the entropy. In policy-loss mode the row's dL/dlogp is then a
pointwise function of (logp, old, ref, A, w) evaluated right here (`_surrogate`), and
pass 2 writes dL/dlogits for the row, so the caller's two gradient GEMMs read it next.
The PyTorch statement of the same contract is `row_stats` / `write_logit_grad_` in
mempo/ops/epilogue.py and `surrogate_terms` in mempo/ops/policy_loss.py. Imports nothing
from mempo: the loss options arrive as plain scalars.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MODE_STATS = 0  # lse / logp / entropy only
MODE_POLICY_LOSS = 1  # stats, dL/dlogp in-kernel, then dL/dlogits
MODE_GRAD = 2  # dL/dlogits from saved lse (and mean z) and given dL/dlogp, dL/dentropy


@triton.jit
def _surrogate(logp, old, adv, ref, clip_low, clip_high, dual_clip, kl_coef,
               HAS_DUAL_CLIP: tl.constexpr, KL_KIND: tl.constexpr, CLAMP: tl.constexpr):
    """d loss_token / d logp; twin of mempo.ops.policy_loss.surrogate_terms."""
    log_ratio = logp - old
    ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -CLAMP), CLAMP))
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = (pg2 > pg1) | (tl.abs(log_ratio) > CLAMP)
    grad = tl.where(clipped, 0.0, pg1)
    if HAS_DUAL_CLIP:
        dual = (adv < 0) & (tl.maximum(pg1, pg2) > -adv * dual_clip)
        grad = tl.where(dual, 0.0, grad)
    if KL_KIND == 1:
        grad += kl_coef
    elif KL_KIND == 2:
        grad += kl_coef * (logp - ref)
    elif KL_KIND == 3:
        d = ref - logp
        dk = 1.0 - tl.exp(tl.minimum(tl.maximum(d, -CLAMP), CLAMP))
        grad += kl_coef * tl.where(tl.abs(d) > CLAMP, 0.0, dk)
    return grad


@triton.jit
def _chunk_epilogue_kernel(
    logits_ptr, stride_logits, grad_ptr, stride_grad, targets_ptr, V,
    inv_temp,
    lse_ptr, logp_ptr, mean_z_ptr,  # [C] written in stats modes, read in MODE_GRAD
    old_ptr, adv_ptr, ref_ptr, weight_ptr,  # [C] policy-loss inputs
    grad_logp_ptr, grad_ent_ptr,  # [C] MODE_GRAD inputs
    clip_low, clip_high, dual_clip, kl_coef,
    MODE: tl.constexpr, WITH_ENTROPY: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    KL_KIND: tl.constexpr, CLAMP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * stride_logits
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_V)

    if MODE == 2:
        lse = tl.load(lse_ptr + row)
        g_logp = tl.load(grad_logp_ptr + row)
        if WITH_ENTROPY:
            mean_z = tl.load(mean_z_ptr + row)
            g_ent = tl.load(grad_ent_ptr + row)
    else:
        m = float("-inf")
        s = 0.0
        t = 0.0  # sum exp(z - m) * (z - m): shifted, so |z| ~ 1e3 keeps entropy precise
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            valid = idx < V
            z = tl.load(row_logits + idx, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp(m - m_new)  # m starts at -inf: alpha = 0, and m_new is finite
            e = tl.where(valid, tl.exp(z - m_new), 0.0)
            if WITH_ENTROPY:
                # re-centre the old sum on m_new: sum e_old (z - m_new) = t + s (m - m_new)
                shift = tl.where(m == float("-inf"), 0.0, m - m_new)
                t = (t + s * shift) * alpha + tl.sum(e * tl.where(valid, z - m_new, 0.0), axis=0)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
        lse = m + tl.log(s)
        z_target = tl.load(row_logits + target).to(tl.float32) * inv_temp
        logp = z_target - lse
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, logp)
        if WITH_ENTROPY:
            mean_z = m + t / s
            tl.store(mean_z_ptr + row, mean_z)
        if MODE == 1:
            old = tl.load(old_ptr + row)
            adv = tl.load(adv_ptr + row)
            ref = 0.0
            if KL_KIND != 0:
                ref = tl.load(ref_ptr + row)
            w = tl.load(weight_ptr + row)
            g_logp = w * _surrogate(logp, old, adv, ref, clip_low, clip_high, dual_clip, kl_coef,
                                    HAS_DUAL_CLIP, KL_KIND, CLAMP)

    if MODE != 0:
        row_grad = grad_ptr + row * stride_grad
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            valid = idx < V
            z = tl.load(row_logits + idx, mask=valid, other=0.0).to(tl.float32) * inv_temp
            p = tl.exp(z - lse)
            if MODE == 2 and WITH_ENTROPY:
                coef = g_logp + g_ent * (z - mean_z)
            else:
                coef = g_logp
            g = tl.where(idx == target, g_logp, 0.0) - p * coef
            tl.store(row_grad + idx, (g * inv_temp).to(grad_ptr.dtype.element_ty), mask=valid)


# (largest BLOCK_V, num_warps) per device type. CUDA: 4096-wide vocabulary tiles, so a
# 152k-vocab row is 38 coalesced sweeps by 8 warps. CPU tensors run only under the
# interpreter (TRITON_INTERPRET=1), where small blocks keep numpy temporaries small; this
# follows the tensor, not torch.cuda.is_available(): CPU tests on a GPU machine stay small.
LAUNCH_CONFIGS = {"cuda": (4096, 8), "cpu": (128, 1)}


def launch_config(device: torch.device, V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a chunk of vocabulary size V on `device`."""
    if device.type not in LAUNCH_CONFIGS:
        raise ValueError(f"chunk_epilogue runs on CUDA tensors (or CPU tensors under the interpreter), "
                         f"got a tensor on {device}")
    max_block, num_warps = LAUNCH_CONFIGS[device.type]
    return min(triton.next_power_of_2(V), max_block), num_warps


def chunk_epilogue(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inv_temperature: float,
    *,
    with_entropy: bool = False,
    grad_out: torch.Tensor | None = None,
    loss: tuple | None = None,
    saved: tuple | None = None,
    clip_low: float = 0.0,
    clip_high: float = 0.0,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_kind: int = 0,
    log_ratio_clamp: float = 20.0,
):
    """Launch the epilogue on a chunk `logits` [C, V] (float32, row-contiguous).

    - stats only (grad_out None): returns (lse, logp, mean_z or None).
    - policy loss: loss = (old, adv, ref or None, weight), each [C], with the loss's scalars
      (clip_low, clip_high, dual_clip or None, kl_coef, kl_kind 0/1/2/3 = none/k1/k2/k3,
      log_ratio_clamp; `mempo.ops.PolicyLossOptions` validates them); writes dL/dlogits into
      grad_out [C, V] (may be `logits` itself); returns (lse, logp, mean_z).
    - gradient: saved = (lse, mean_z or None, grad_logp, grad_entropy or None); writes
      dL/dlogits into grad_out.
    """
    C, V = logits.shape
    if logits.stride(1) != 1 or (grad_out is not None and grad_out.stride(1) != 1):
        raise ValueError("logits and grad_out must have unit stride along the vocabulary")
    f32 = dict(dtype=torch.float32, device=logits.device)
    dummy = torch.empty(1, **f32)
    has_dual = dual_clip is not None
    if loss is None:  # the loss scalars only matter in policy-loss mode
        clip_low = clip_high = kl_coef = 0.0
        has_dual, kl_kind = False, 0
    old = adv = ref = weight = grad_logp = grad_ent = dummy
    if saved is not None:
        mode = MODE_GRAD
        lse, mean_z, grad_logp, grad_ent = saved
        with_entropy = mean_z is not None
        mean_z = dummy if mean_z is None else mean_z
        grad_ent = dummy if grad_ent is None else grad_ent
        logp = dummy
    else:
        mode = MODE_STATS if loss is None else MODE_POLICY_LOSS
        lse, logp = torch.empty(C, **f32), torch.empty(C, **f32)
        mean_z = torch.empty(C, **f32) if with_entropy else dummy
        if loss is not None:
            old, adv, ref, weight = loss
            ref = dummy if ref is None else ref
    grad = dummy if grad_out is None else grad_out
    block_v, num_warps = launch_config(logits.device, V)
    if C > 0:
        _chunk_epilogue_kernel[(C,)](
            logits, logits.stride(0), grad, grad.stride(0) if grad_out is not None else 0, targets, V,
            float(inv_temperature),
            lse, logp, mean_z,
            old, adv, ref, weight,
            grad_logp, grad_ent,
            float(clip_low), float(clip_high), float(dual_clip or 0.0), float(kl_coef),
            MODE=mode, WITH_ENTROPY=with_entropy, HAS_DUAL_CLIP=has_dual, KL_KIND=kl_kind,
            CLAMP=float(log_ratio_clamp), BLOCK_V=block_v, num_warps=num_warps,
        )
    if mode == MODE_GRAD:
        return None
    return lse, logp, (mean_z if with_entropy else None)
