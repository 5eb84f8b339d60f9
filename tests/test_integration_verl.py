"""mempo inside verl, checked against verl's own code: `core_algos`' vanilla policy loss (every
aggregation mode verl and mempo share, asymmetric and dual clip, global normalisers), its KL
estimators (`kl_penalty`), its actor loss (`workers.utils.losses.ppo_loss`) switched by
`policy_loss.loss_mode`, and its fused LM-head module. Skipped where verl is not installed."""
import math

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

import mempo.ops as ops  # noqa: E402
from mempo.integrations import verl as mempo_verl  # noqa: E402

VERL_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
CLIPS = [(0.2, 0.2, 3.0), (0.1, 0.28, 1.5)]  # clip_ratio_low, clip_ratio_high, clip_ratio_c (dual clip)
# (verl kl_penalty name, mempo kl_estimator)
KL_PAIRS = [("kl", "k1"), ("k1", "k1"), ("mse", "k2"), ("k2", "k2"), ("low_var_kl", "k3"), ("k3", "k3")]
TOL = {torch.float64: dict(rtol=1e-7, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=1e-6)}


def ragged_batch(B=6, T=23, dtype=torch.float64):
    """[B, T] responses of random lengths (one full, one empty) with holes in the loss mask;
    log-ratios wide enough that the PPO clip and the dual clip both act."""
    lengths = torch.randint(1, T, (B,))
    lengths[0], lengths[1] = T, 0
    mask = (torch.arange(T) < lengths[:, None]) & (torch.rand(B, T) > 0.15)
    logp = -torch.rand(B, T, dtype=dtype) * 4
    old = logp + 0.8 * torch.randn(B, T, dtype=dtype)
    ref = logp + (0.5 * torch.randn(B, T, dtype=dtype)).clamp(-2, 2)  # k3 < 10: verl's clamp idle
    adv = torch.randn(B, T, dtype=dtype)
    if T >= 3:  # three tokens the dual clip always bounds: ratio e^2 > c, negative advantage
        old[0, :3], adv[0, :3], mask[0, :3] = logp[0, :3] - 2.0, -adv[0, :3].abs(), True
    return dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask)


def actor_config(low=0.2, high=0.2, c=3.0, global_info=None, **kw):
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                         clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=c, **kw)
    config.global_batch_info.update(global_info or {})
    return config


def global_info(mask):
    """What verl's engine fills in with data parallelism: counts over all ranks (here the other
    rank is pretended: more tokens and sequences than this batch holds)."""
    return dict(dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 5, global_batch_size=2 * mask.shape[0] + 1,
                loss_scale_factor=31)


def loss_and_grad(fn, b, **kw):
    logp = b["logp"].clone().requires_grad_()
    loss, metrics = fn(old_log_prob=b["old"], log_prob=logp, advantages=b["adv"], response_mask=b["mask"], **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


def test_registered_in_verl():
    assert core_algos.get_policy_loss_fn("mempo") is mempo_verl.compute_policy_loss_mempo


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_global_info", [False, True])
@pytest.mark.parametrize("low,high,c", CLIPS)
@pytest.mark.parametrize("mode", VERL_MODES)
def test_policy_loss_matches_verl_vanilla(seed, mode, low, high, c, with_global_info, dtype):
    b = ragged_batch(dtype=dtype)
    config = actor_config(low, high, c, global_info(b["mask"]) if with_global_info else None)
    verl_loss, verl_grad, verl_m = loss_and_grad(core_algos.get_policy_loss_fn("vanilla"), b,
                                                 loss_agg_mode=mode, config=config)
    loss, grad, m = loss_and_grad(core_algos.get_policy_loss_fn("mempo"), b, loss_agg_mode=mode, config=config)
    torch.testing.assert_close(loss, verl_loss, **TOL[dtype])
    torch.testing.assert_close(grad, verl_grad, **TOL[dtype])
    for name in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert float(m[name]) == pytest.approx(verl_m[name], rel=1e-5, abs=1e-7), name
    assert verl_m["actor/pg_clipfrac"] > 0 and verl_m["actor/pg_clipfrac_lower"] > 0  # both clips acted


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_rollout_is_weights_match_verl(seed, mode):
    b = ragged_batch()
    w = torch.rand_like(b["logp"]) * 2
    w[torch.rand_like(w) < 0.2] = 0.0  # masked-out tokens of a rollout-correction mode
    config = actor_config(0.2, 0.28, 3.0)
    ref = loss_and_grad(core_algos.get_policy_loss_fn("vanilla"), b, loss_agg_mode=mode, config=config,
                        rollout_is_weights=w)
    ours = loss_and_grad(core_algos.get_policy_loss_fn("mempo"), b, loss_agg_mode=mode, config=config,
                         rollout_is_weights=w)
    torch.testing.assert_close(ours[0], ref[0], **TOL[torch.float64])
    torch.testing.assert_close(ours[1], ref[1], **TOL[torch.float64])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("verl_name,estimator", KL_PAIRS)
def test_kl_estimators_match_verl_kl_penalty(seed, verl_name, estimator, mode):
    """mempo's fused KL term == verl's policy loss + kl_loss_coef * agg_loss(kl_penalty(...))."""
    b = ragged_batch()
    beta = 0.3
    info = global_info(b["mask"])
    config = actor_config(0.2, 0.28, 3.0, info)
    options, dp = mempo_verl.loss_options_from_verl(config, mode, b["mask"].shape[-1])

    logp_v = b["logp"].clone().requires_grad_()
    pg, _ = core_algos.get_policy_loss_fn("vanilla")(b["old"], logp_v, b["adv"], b["mask"], mode, config)
    kld = core_algos.kl_penalty(logp_v, b["ref"], verl_name)
    verl_loss = pg + beta * core_algos.agg_loss(kld, b["mask"], mode, **info)
    (verl_grad,) = torch.autograd.grad(verl_loss, logp_v)

    logp = b["logp"].clone().requires_grad_()
    loss, metrics = ops.policy_loss(logp, b["old"], b["adv"], b["mask"], b["ref"], kl_coef=beta,
                                    kl_estimator=estimator, **options)
    loss = loss * dp
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(loss.detach(), verl_loss.detach(), **TOL[torch.float64])
    torch.testing.assert_close(grad, verl_grad, **TOL[torch.float64])
    mean_kl = core_algos.agg_loss(kld.detach(), b["mask"], "token-mean")
    assert float(metrics["kl_ref"]) == pytest.approx(float(mean_kl), rel=1e-6)


def test_low_var_kl_clamp_is_verls_own():
    """Documented difference: verl clamps low_var_kl (k3) to [-10, 10], so a token whose
    estimate exceeds 10 contributes 10 and no gradient; mempo's k3 is not clamped there (both
    clamp the log-ratio to +-20 before exp)."""
    logp = torch.tensor([[-1.0, -5.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, -1.0]], dtype=torch.float64)  # d = ref - logp = 1 and 4
    mask = torch.ones(1, 2, dtype=torch.bool)
    verl = core_algos.kl_penalty(logp, ref, "low_var_kl")
    k3 = [math.exp(d) - d - 1 for d in (1.0, 4.0)]
    assert verl.detach()[0].tolist() == pytest.approx([k3[0], 10.0])
    loss, _ = ops.policy_loss(logp, logp.detach(), torch.zeros(1, 2, dtype=torch.float64), mask, ref,
                              kl_coef=1.0, kl_estimator="k3", loss_agg="token-mean", num_global_tokens=1)
    assert float(loss) == pytest.approx(sum(k3))  # unclamped: 1.718 + 49.598
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0].tolist() == pytest.approx([1 - math.e, 1 - math.exp(4.0)])  # verl's: [1 - e, 0]


def _flat_response(x, lengths, prompt_len):
    """[B, T] response values -> verl's no-padding layout [total_nnz] (prompt + response per row,
    a response token's value at the position that predicts it)."""
    rows = []
    for row, n in zip(x, lengths.tolist()):
        seq = torch.zeros(prompt_len + n, dtype=x.dtype)
        seq[prompt_len - 1:prompt_len - 1 + n] = row[:n]
        rows.append(seq)
    return torch.cat(rows)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl_actor_loss_switches_with_loss_mode(seed, mode):
    """verl's own actor loss (`ppo_loss`: policy loss + entropy bonus + KL loss) with
    policy_loss.loss_mode=mempo equals loss_mode=vanilla, value and gradient."""
    tensordict = pytest.importorskip("tensordict")
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    B, P, T = 5, 3, 17
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    response_mask = torch.arange(T) < lengths[:, None]
    b = ragged_batch(B, T)
    entropy = torch.rand(B, T, dtype=torch.float64)

    def run(loss_mode):
        config = actor_config(0.1, 0.28, 2.0, loss_agg_mode=mode, use_kl_loss=True, kl_loss_type="low_var_kl",
                              kl_loss_coef=0.1, entropy_coeff=0.01, policy_loss=PolicyLossConfig(loss_mode=loss_mode))
        log_probs = _flat_response(b["logp"], lengths, P).requires_grad_()
        data = tensordict.TensorDict({
            "prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.ones(B, T, dtype=torch.long),
            "attention_mask": torch.cat([torch.ones(B, P, dtype=torch.long), response_mask.long()], 1),
            "response_mask": response_mask.long(), "old_log_probs": b["old"], "advantages": b["adv"],
            "ref_log_prob": b["ref"]}, batch_size=[B])
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=B)
        loss, metrics = ppo_loss(config, {"log_probs": log_probs, "entropy": _flat_response(entropy, lengths, P)}, data)
        (grad,) = torch.autograd.grad(loss, log_probs)
        return loss.detach(), grad, {k: v.aggregate() for k, v in metrics.items() if hasattr(v, "aggregate")}

    vanilla, mempo = run("vanilla"), run("mempo")
    torch.testing.assert_close(mempo[0], vanilla[0], **TOL[torch.float64])
    torch.testing.assert_close(mempo[1], vanilla[1], **TOL[torch.float64])
    assert mempo[2] == pytest.approx(vanilla[2], rel=1e-6)


def test_bad_options_name_the_setting():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="loss_agg_mode='token-median'"):
        mempo_verl.loss_options_from_verl(actor_config(), "token-median", 3)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        mempo_verl.loss_options_from_verl(actor_config(global_info={"dp_size": 2}), "token-mean", 3)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        mempo_verl.compute_policy_loss_mempo(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), mask,
                                             "token-mean", actor_config(c=1.0))
    with pytest.raises(ValueError, match="config"):
        mempo_verl.compute_policy_loss_mempo(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), mask)


@pytest.mark.parametrize("shape", [(2, 19), (1, 37)])  # [B, T] padded, [1, total_nnz] rmpad
def test_fused_linear_for_ppo_matches_verl(seed, shape):
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    H, V, temperature = 40, 97, 0.7
    hidden = torch.randn(*shape, H)
    weight = torch.randn(V, H) * 0.3
    ids = torch.randint(0, V, shape)
    g_logp, g_ent = torch.randn(shape), torch.randn(shape)
    results = []
    for module in (FusedLinearForPPO(impl_backend="torch"), mempo_verl.MemPOFusedLinearForPPO()):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = module(h, w, ids, temperature)
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        results.append((logp.detach(), ent.detach(), h.grad, w.grad))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_patch_routes_verl_fused_forward_through_mempo(seed, monkeypatch):
    """verl's fused forward (use_fused_kernels=True, impl_backend=torch) on a Qwen2 model gives
    the same log-probs, entropies and parameter gradients through mempo, and does call mempo."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    # verl replaces the forward on the class: put the original back after the test
    monkeypatch.setattr(Qwen2ForCausalLM, "forward", Qwen2ForCausalLM.forward)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(config)
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    ids = torch.randint(0, 97, (3, 13))

    def run():
        model.zero_grad()
        out = model(input_ids=ids, return_dict=True, temperature=0.8)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    linear_logprobs = ops.linear_logprobs
    monkeypatch.setattr(ops, "linear_logprobs", lambda *a, **k: calls.append(1) or linear_logprobs(*a, **k))
    verl_out = run()
    assert not calls
    undo = mempo_verl.patch_fused_linear_for_ppo()
    try:
        mempo_out = run()
    finally:
        undo()
    assert calls
    torch.testing.assert_close(mempo_out[0], verl_out[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mempo_out[1], verl_out[1], rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(mempo_out[2], verl_out[2]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
