"""Random inputs for the loss tests (ragged packed batches with masks) and the float64 truth of
the chunk epilogue."""
from __future__ import annotations

import torch


def random_batch(n: int, num_seqs: int, dtype=torch.float64, mask_frac: float = 0.6,
                 empty_seq: bool = True, generator=None):
    """Tokens of `num_seqs` sequences packed in order; one sequence without loss tokens."""
    seq_index = torch.sort(torch.randint(0, num_seqs, (n,), generator=generator)).values
    mask = torch.rand(n, generator=generator) < mask_frac
    if empty_seq and n:
        mask[seq_index == seq_index[0]] = False
    logp = -torch.rand(n, generator=generator, dtype=dtype) * 3
    old = logp + 0.4 * torch.randn(n, generator=generator, dtype=dtype)
    ref = logp + 0.2 * torch.randn(n, generator=generator, dtype=dtype)
    adv = torch.randn(n, generator=generator, dtype=dtype)
    return dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, seq_index=seq_index)


LOSS_OPTION_CASES = [
    dict(),
    dict(clip_low=0.2, clip_high=0.28),
    dict(clip_low=0.1, clip_high=0.3, dual_clip=2.0),
    dict(kl_coef=0.05, kl_estimator="k1"),
    dict(kl_coef=0.05, kl_estimator="k2"),
    dict(kl_coef=0.05, kl_estimator="k3", dual_clip=3.0),
    dict(loss_agg="token-mean"),
    dict(loss_agg="token-mean", num_global_tokens=1000),
    dict(loss_agg="seq-mean-token-sum"),
    dict(loss_agg="seq-mean-token-sum-norm"),
    dict(loss_agg="seq-mean-token-sum-norm", seq_norm_len=64, num_global_seqs=9),
    dict(loss_agg="seq-mean-token-mean", num_global_seqs=7, kl_coef=0.1),
]


def epilogue_float64_truth(logits, targets, inv_t, g_lp, g_ent):
    z = logits.double() * inv_t
    logp_all = z.log_softmax(-1)
    p = logp_all.exp()
    lse = torch.logsumexp(z, -1)
    mean_z = (p * z).sum(-1)
    onehot = torch.nn.functional.one_hot(targets, z.shape[1]).double()
    grad = (g_lp[:, None] * (onehot - p) - g_ent[:, None] * p * (z - mean_z[:, None])) * inv_t
    return lse, z.gather(1, targets[:, None]).squeeze(1), mean_z, grad


def assert_within_low_precision_error(out, ref, pt, *, factor: float = 2.0, atol: float = 1e-5, name: str = "") -> None:
    """flash-attention's bound for low-precision outputs: max|out - ref| <= factor * max|pt - ref|
    + atol, where ref is the float64 truth and pt is plain PyTorch's answer from the same
    low-precision inputs (what a user would compute). A fixed atol would either hide a real bug
    at small magnitudes or fail on rounding PyTorch makes too."""
    err = (out.double() - ref).abs().max().item()
    pt_err = (pt.double() - ref).abs().max().item()
    assert err <= factor * pt_err + atol, (f"{name}: max error {err:.3g} exceeds {factor} x PyTorch's own "
                                           f"low-precision error {pt_err:.3g} + {atol}")
