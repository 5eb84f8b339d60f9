"""mempo inside verl: the policy loss through verl's registry, the LM-head log-probs as a drop-in.

Wiring (verl 0.9; one line each on top of a working verl recipe):

    actor_rollout_ref.model.external_lib=mempo.integrations.verl     # verl imports it in every worker
    actor_rollout_ref.actor.policy_loss.loss_mode=mempo              # the switch

1. **Policy loss.** Importing this module registers `compute_policy_loss_mempo` as "mempo" with
   `verl.trainer.ppo.core_algos.register_policy_loss`. verl's actor loss
   (`verl.workers.utils.losses.ppo_loss`) looks it up with `get_policy_loss_fn(loss_mode)` and calls
   it with `(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
   rollout_is_weights)`, all [B, T]. It computes verl's "vanilla" PPO loss with
   `mempo.ops.policy_loss`: `clip_ratio_low/high` (fallback `clip_ratio`) -> `clip_low/high`,
   `clip_ratio_c` -> `dual_clip` (verl always applies its dual clip, default 3), `loss_agg_mode` ->
   `loss_agg` (table `VERL_LOSS_AGG`), and `config.global_batch_info` (dp_size,
   batch_num_tokens, global_batch_size, loss_scale_factor) -> mempo's global normalisers, times
   dp_size as verl does (FSDP averages gradients over ranks). verl adds its entropy bonus and KL
   loss (`kl_penalty`) after the policy loss, outside this function, so they stay verl's.
2. **Log-probs and entropy.** verl's fused LM-head path (`actor_rollout_ref.model.use_fused_kernels
   =True` with `fused_kernel_options.impl_backend=torch`, the default, or `liger`) patches the
   model's forward with `verl.models.transformers.*.forward_with_torch_backend`, which builds
   `verl.utils.experimental.torch_functional.FusedLinearForPPO` at each call and returns
   `(log_probs, entropy)` of the rolled labels. verl has no registry for that module, so
   `patch_fused_linear_for_ppo()` replaces the module attribute with `MemPOFusedLinearForPPO`
   (`mempo.ops.linear_logprobs`, never [tokens, vocab] logits in memory); the import-to-patch
   module is `mempo.integrations.verl_fused` (use it as `external_lib` instead of this one).
   The `triton` backend (`verl.utils.kernel.linear_cross_entropy`) is not replaced. With
   use_fused_kernels=False (verl's default) the engine materialises the logits and calls
   `logprobs_from_logits` / `entropy_from_logits` in `FSDPEngine.prepare_model_outputs`
   (workers/engine/fsdp/transformer_impl.py): there is no hook there, hence the fused path.

Tested with verl 0.9.1 (tests/test_integration_verl.py: against `core_algos` and verl's actor
loss `ppo_loss`, and verl's fused forward on a Qwen2 model); not run inside a Ray job here.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import mempo.ops as ops

LOSS_MODE = "mempo"

# verl loss_agg_mode -> mempo loss_agg. verl's token-sum is mempo's token-mean over a token count
# of 1 (sum_i l_i / 1); the others share the name and the definition.
VERL_LOSS_AGG = {
    "token-mean": "token-mean",
    "token-sum": "token-mean",
    "seq-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum-norm",
}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, Tensor):  # verl hands Python numbers; a tensor costs a host sync here
        value = value.item()
    if isinstance(value, bool) or not float(value).is_integer() or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def loss_options_from_verl(config: Any, loss_agg_mode: str, response_length: int) -> tuple[dict, int]:
    """(mempo.ops.policy_loss options, dp_size) for verl's actor `config` (ActorConfig or DictConfig).

    response_length: T of the [B, T] batch (verl's default seq-mean-token-sum-norm divisor).
    The loss verl expects is mempo's loss times dp_size.
    """
    if loss_agg_mode not in VERL_LOSS_AGG:
        raise ValueError(f"actor_rollout_ref.actor.loss_agg_mode={loss_agg_mode!r} has no mempo equivalent; "
                         f"expected one of {sorted(VERL_LOSS_AGG)}")
    clip = config.get("clip_ratio", 0.2)
    low, high = config.get("clip_ratio_low", None), config.get("clip_ratio_high", None)
    options = {
        "clip_low": clip if low is None else low,
        "clip_high": clip if high is None else high,
        "dual_clip": config.get("clip_ratio_c", 3.0),  # verl's dual clip is always on
        "loss_agg": VERL_LOSS_AGG[loss_agg_mode],
    }
    info = config.get("global_batch_info", None) or {}
    dp_size = _positive_int("global_batch_info['dp_size']", info.get("dp_size", 1))
    num_tokens, num_seqs = info.get("batch_num_tokens"), info.get("global_batch_size")
    if loss_agg_mode == "token-sum":
        options["num_global_tokens"] = 1
    elif loss_agg_mode == "token-mean":
        if num_tokens is None and dp_size > 1:  # as verl's agg_loss: local counts would be wrong
            raise ValueError("global_batch_info['batch_num_tokens'] is required when dp_size > 1")
        if num_tokens is not None:
            options["num_global_tokens"] = _positive_int("global_batch_info['batch_num_tokens']", num_tokens)
    else:
        if num_seqs is None and dp_size > 1:
            raise ValueError("global_batch_info['global_batch_size'] is required when dp_size > 1")
        if num_seqs is not None:
            options["num_global_seqs"] = _positive_int("global_batch_info['global_batch_size']", num_seqs)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            norm = info.get("loss_scale_factor")
            options["seq_norm_len"] = _positive_int(
                "actor_rollout_ref.actor.loss_scale_factor", response_length if norm is None else norm)
    return options, dp_size


def compute_policy_loss_mempo(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """verl `PolicyLossFn` computed by `mempo.ops.policy_loss` (same value and gradient as verl's
    "vanilla" loss; tests/test_integration_verl.py).

    old_log_prob, log_prob, advantages, response_mask, rollout_is_weights: [B, T].
    config: verl's actor config (clip ratios, global_batch_info).
    Returns (loss 0-dim, metrics): verl's metric names, as detached 0-dim tensors (verl's
    `Metric` reads them with .item()).
    """
    if config is None:
        raise ValueError("config must be verl's actor config (it carries the clip ratios), got None")
    options, dp_size = loss_options_from_verl(config, loss_agg_mode, response_mask.shape[-1])
    if rollout_is_weights is not None:
        # w >= 0 scales the clipped token loss: w * max(-A r, -A clip(r)) = max(-wA r, -wA clip(r)),
        # and the dual-clip bound -A c likewise (sign(wA) = sign(A)), so folding w into the advantage
        # is exact; mempo's own TIS weights are applied the same way.
        advantages = advantages * rollout_is_weights
    loss, metrics = ops.policy_loss(log_prob, old_log_prob, advantages, response_mask, **options)
    mask = response_mask.detach().to(torch.bool)
    neg_log_ratio = (old_log_prob - log_prob).detach().clamp(-20.0, 20.0)
    ppo_kl = torch.where(mask, neg_log_ratio, 0.0).sum() / mask.sum().clamp(min=1)  # verl's k1 metric
    return loss * dp_size, {
        "actor/pg_clipfrac": metrics["clip_frac"],
        "actor/ppo_kl": ppo_kl.float(),
        "actor/pg_clipfrac_lower": metrics["dual_clip_frac"],
    }


def register() -> Callable:
    """Register `compute_policy_loss_mempo` as loss_mode "mempo" (idempotent); returns it."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    return register_policy_loss(LOSS_MODE)(compute_policy_loss_mempo)


class MemPOFusedLinearForPPO(torch.nn.Module):
    """Drop-in for `verl.utils.experimental.torch_functional.FusedLinearForPPO`.

    forward(hidden_states [..., H], vocab_weights [V, H], input_ids [...], temperature) ->
      (log_probs [...], entropy [...]), both float32: log_softmax(hidden @ W.T / T)[input_ids] and
      the entropy of that distribution, differentiable w.r.t. hidden_states and vocab_weights,
      computed by `mempo.ops.linear_logprobs` in row chunks (no [tokens, vocab] logits kept).
    chunk_size: rows per logits chunk; None (what verl's forward passes, since it never sets
      it) lets mempo size chunks from its memory budget.
    impl_backend: verl's "torch" / "liger" name, accepted so verl's constructor call works; both
      are replaced by mempo (its own backend is picked by MEMPO_BACKEND / the device).
    """

    def __init__(self, chunk_size: int | None = None, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"impl_backend must be 'torch' or 'liger' (verl's names), got {impl_backend!r}")
        self.chunk_size = chunk_size

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        if input_ids.shape != hidden_states.shape[:-1]:
            raise ValueError(f"input_ids shape {list(input_ids.shape)} must equal hidden_states.shape[:-1] "
                             f"{list(hidden_states.shape[:-1])}")
        logp, entropy = ops.linear_logprobs(
            hidden_states.reshape(-1, hidden_states.shape[-1]), vocab_weights, input_ids.reshape(-1),
            float(temperature), return_entropy=True, chunk_rows=self.chunk_size)
        return logp.reshape(input_ids.shape), entropy.reshape(input_ids.shape)


def patch_fused_linear_for_ppo() -> Callable[[], None]:
    """Make verl's fused LM-head forward (use_fused_kernels=True, impl_backend torch/liger) use
    `MemPOFusedLinearForPPO`. verl imports the class from its module at every forward call, so
    replacing the module attribute is enough. Returns a function that restores verl's class."""
    import verl.utils.experimental.torch_functional as verl_tf

    original = verl_tf.FusedLinearForPPO
    verl_tf.FusedLinearForPPO = MemPOFusedLinearForPPO

    def undo() -> None:
        verl_tf.FusedLinearForPPO = original

    return undo


register()
