"""policy_loss against the autograd reference (float64), all options, both advantage forms."""
import math

import pytest
import torch
from loss_cases import LOSS_OPTION_CASES, random_batch

import mempo.ops as ops
from mempo.ops import MemPOAdvantages, policy_loss
from mempo.reference.logprobs import policy_loss_reference, token_advantages_reference


def _ref_kwargs(options):
    return {k: v for k, v in options.items()}


@pytest.mark.parametrize("options", LOSS_OPTION_CASES)
@pytest.mark.parametrize("n", [1, 13, 200])
def test_matches_reference(seed, options, n):
    b = random_batch(n, num_seqs=5)
    ref = b["ref"] if options.get("kl_coef") else None
    logp = b["logp"].clone().requires_grad_()
    loss, metrics = policy_loss(logp, b["old"], b["adv"], b["mask"], ref, seq_index=b["seq_index"], **options)
    logp_ref = b["logp"].clone().requires_grad_()
    expected = policy_loss_reference(logp_ref, b["old"], b["adv"], b["mask"], b["seq_index"], ref,
                                     **_ref_kwargs(options))
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    (g_ref,) = torch.autograd.grad(expected, logp_ref) if expected.requires_grad else (torch.zeros_like(logp_ref),)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert 0.0 <= float(metrics["clip_frac"]) <= 1.0
    torch.testing.assert_close(metrics["loss"].double(), expected.detach(), rtol=1e-6, atol=1e-9)


def test_clip_fraction_and_dual_clip_counted(seed):
    logp = torch.log(torch.tensor([2.0, 0.5, 5.0, 1.0], dtype=torch.float64))  # ratios vs old=0
    old = torch.zeros(4, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(4, dtype=torch.bool)
    _, m = policy_loss(logp, old, adv, mask, seq_index=torch.zeros(4, dtype=torch.long), dual_clip=3.0)
    # token 0: A>0, r=2 > 1.2 clipped; token 1: A<0, r=0.5 < 0.8 clipped; token 2: r=5 > c=3 dual
    assert float(m["clip_frac"]) == pytest.approx(0.5)
    assert float(m["dual_clip_frac"]) == pytest.approx(0.25)
    assert float(m["ratio_mean"]) == pytest.approx((2 + 0.5 + 5 + 1) / 4)


def test_compact_advantages_equal_per_token(seed):
    n, num_seqs, num_mem = 150, 6, 9
    b = random_batch(n, num_seqs=num_seqs)
    traj_adv = torch.randn(num_seqs, dtype=torch.float64)
    mem_adv = torch.randn(num_mem, dtype=torch.float64)
    segment_index = torch.where(torch.rand(n) < 0.3, torch.randint(0, num_mem, (n,)), -1)
    compact = MemPOAdvantages(traj_adv, b["seq_index"], mem_adv, segment_index, mem_coef=0.7)
    per_token = token_advantages_reference(n, None, traj_adv, b["seq_index"], mem_adv, segment_index, 0.7)
    l1 = b["logp"].clone().requires_grad_()
    l2 = b["logp"].clone().requires_grad_()
    loss_c, _ = policy_loss(l1, b["old"], compact, b["mask"])
    loss_t, _ = policy_loss(l2, b["old"], per_token, b["mask"], seq_index=b["seq_index"])
    torch.testing.assert_close(loss_c, loss_t, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(loss_c, l1)[0], torch.autograd.grad(loss_t, l2)[0])


def test_two_dim_input_rows_are_sequences(seed):
    B, T = 4, 11
    b = random_batch(B * T, num_seqs=1)
    shape = lambda t: t.reshape(B, T)  # noqa: E731
    loss2d, _ = policy_loss(shape(b["logp"]), shape(b["old"]), shape(b["adv"]), shape(b["mask"]))
    seq = torch.arange(B).repeat_interleave(T)
    loss1d, _ = policy_loss(b["logp"], b["old"], b["adv"], b["mask"], seq_index=seq)
    torch.testing.assert_close(loss2d, loss1d)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_empty_and_all_masked_give_zero_not_nan(loss_agg):
    for n in (0, 5):
        logp = torch.zeros(n, requires_grad=True)
        loss, metrics = policy_loss(logp, torch.zeros(n), torch.ones(n), torch.zeros(n, dtype=torch.bool),
                                    seq_index=torch.zeros(n, dtype=torch.long), loss_agg=loss_agg)
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert torch.all(logp.grad == 0)
        assert all(torch.isfinite(v) for v in metrics.values())


def test_bad_input_errors_name_the_argument():
    x = torch.zeros(4)
    seq = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(x, torch.zeros(3), x, x, seq_index=seq)
    with pytest.raises(ValueError, match="seq_index"):
        policy_loss(x, x, x, torch.ones(4))
    with pytest.raises(ValueError, match="loss_mask must hold only 0 and 1"):
        policy_loss(x, x, x, torch.full((4,), 0.5), seq_index=seq)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(x, x, x, torch.ones(4), seq_index=seq, kl_coef=0.1)
    with pytest.raises(ValueError, match="loss_agg"):
        policy_loss(x, x, x, torch.ones(4), seq_index=seq, loss_agg="mean")
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(x, x, x, torch.ones(4), seq_index=seq, clip_low=1.5)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(x, x, x, torch.ones(4), seq_index=seq, dual_clip=0.5)
    bad = MemPOAdvantages(torch.zeros(2), torch.tensor([0, 1, 2, 0]), torch.zeros(1), torch.full((4,), -1))
    with pytest.raises(ValueError, match="seq_index must lie in"):
        policy_loss(x, x, bad, torch.ones(4))
    bad = MemPOAdvantages(torch.zeros(3), seq, torch.zeros(1), torch.tensor([0, 1, -1, -1]))
    with pytest.raises(ValueError, match="segment_index must lie in"):
        policy_loss(x, x, bad, torch.ones(4))


def test_second_backward_is_an_error():
    logp = torch.zeros(3, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(3), torch.ones(3), torch.ones(3), loss_agg="token-mean")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


def test_policy_loss_ignores_nonfinite_masked_tokens_and_nonfinite_options(seed):
    n = 9
    logp = torch.randn(n, dtype=torch.float64, requires_grad=True)
    old, adv = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1])
    seq = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    clean, _ = ops.policy_loss(logp, old, adv, mask, seq_index=seq)
    (grad_clean,) = torch.autograd.grad(clean, logp)
    dirty_old, dirty_adv = old.clone(), adv.clone()
    dirty_old[2], dirty_adv[4], dirty_old[7] = float("nan"), float("inf"), -float("inf")
    dirty, metrics = ops.policy_loss(logp, dirty_old, dirty_adv, mask, seq_index=seq)
    (grad_dirty,) = torch.autograd.grad(dirty, logp)
    assert torch.equal(dirty, clean) and torch.equal(grad_dirty, grad_clean)
    assert all(math.isfinite(float(v)) for v in metrics.values())
    for bad in ({"clip_high": float("nan")}, {"kl_coef": float("nan")}, {"clip_low": float("nan")},
                {"dual_clip": float("inf")}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a finite number"):
            ops.policy_loss(logp, old, adv, mask, seq_index=seq, **bad)
    with pytest.raises(ValueError, match="mem_coef must be a finite number"):
        ops.MemPOAdvantages(torch.zeros(3), seq, torch.zeros(1), torch.full((n,), -1), mem_coef=float("nan"))
