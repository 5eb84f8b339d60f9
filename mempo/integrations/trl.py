"""mempo inside TRL: `MemPOGRPOTrainer` = TRL's `GRPOTrainer` whose loss is
`mempo.ops.linear_policy_loss` on the last hidden states and the LM head.

A TRL user changes one line:

    from mempo.integrations.trl import MemPOGRPOTrainer as GRPOTrainer

Everything else (generation, rewards, advantages, old/reference log-probs, the optimizer, logging)
stays TRL's. Only the loss is replaced, the way TRL <= 1.12 ran Liger's fused GRPO loss
(`use_liger_kernel=True`, earlier `use_liger_loss`): the model's forward is redirected through
its wrapper (DDP / ZeRO hooks), the backbone gives the last hidden states of the completion
positions, and the fused op reads `lm_head.weight` directly (gathered under ZeRO-3), computing
dX and dW in its forward (no [tokens, vocab] logits, no logits recompute in backward).

TRL loss types and mempo's aggregation (`TRL_LOSS_AGG`); per micro-batch of B completions:
- grpo: seq-mean-token-mean over all B sequences, / gradient-accumulation steps
- bnpo: token-mean over this micro-batch's tokens, / gradient-accumulation steps
- dr_grpo: seq-mean-token-sum-norm with seq_norm_len = max_completion_length over B sequences
- dapo (TRL's default): token sum / TRL's global token count (`num_items_in_batch` of the
  generation batch, per process and accumulation window), i.e. token-mean over global tokens
Clipping: epsilon -> clip_low, epsilon_high -> clip_high, delta (two-sided clip) -> dual_clip
(identical when delta > 1 + epsilon_high, which is required); beta -> kl_coef with k3 (TRL's
estimator; mempo clamps the log-ratio to +-20 before exp, TRL does not). vLLM importance
sampling ratios (token or sequence) scale the advantages: exact for weights >= 0.
Settings with no mempo equivalent raise ValueError naming the GRPOConfig field: loss types
cispo, sapo, luspo, vespo; importance_sampling_level="sequence"; top_entropy_quantile < 1;
off_policy_mask_threshold; use_bias_correction_kl=True (TRL's default) with beta != 0; an
entropy bonus (entropy_coef, use_adaptive_entropy); the MoE router aux loss; multimodal inputs;
an LM head with a bias.

Cost note: when TRL skips the old log-probs (num_iterations=1 and no vLLM, TRL's default; its
loss then uses old = current, detached), the fused op still needs them as input, so they are
computed by one extra gradient-free `mempo.ops.linear_logprobs` pass over the loss rows.
Tested with TRL 1.16 in one process (tests/test_integration_trl.py); the DDP / ZeRO-3 handling
follows TRL's former Liger path but has not been run here.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer

import mempo.ops as ops

TRL_LOSS_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}
# loss types whose surrogate is not the PPO clipped ratio that mempo's ops compute
NO_MEMPO_EQUIVALENT = {
    "cispo": "the clipped, detached importance weight times A * log-prob, not the PPO clipped surrogate",
    "sapo": "a soft sigmoid gate on the ratio instead of the hard clip",
    "luspo": "sequence-level importance ratios (importance_sampling_level='sequence')",
    "vespo": "sequence-level gamma weights times A * log-prob",
}
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "image_position_ids", "num_tiles", "token_type_ids", "mm_token_type_ids")


def grpo_loss_options(args: GRPOConfig) -> dict[str, Any]:
    """mempo.ops options for a GRPOConfig (those fixed for the run); ValueError naming the
    GRPOConfig field for any setting mempo's loss cannot reproduce exactly."""
    if args.loss_type in NO_MEMPO_EQUIVALENT:
        raise ValueError(f"GRPOConfig.loss_type={args.loss_type!r} has no mempo equivalent "
                         f"({NO_MEMPO_EQUIVALENT[args.loss_type]}); MemPOGRPOTrainer supports "
                         f"{sorted(TRL_LOSS_AGG)}, or use GRPOTrainer")
    if args.loss_type not in TRL_LOSS_AGG:
        raise ValueError(f"GRPOConfig.loss_type={args.loss_type!r} is unknown to MemPOGRPOTrainer; "
                         f"expected one of {sorted(TRL_LOSS_AGG)}")
    unsupported = [
        ("importance_sampling_level", args.importance_sampling_level != "token",
         "mempo's ratios are per token ('token')"),
        ("top_entropy_quantile", args.top_entropy_quantile < 1.0, "mempo has no entropy mask (1.0)"),
        ("off_policy_mask_threshold", args.off_policy_mask_threshold is not None, "no off-policy sequence mask (None)"),
        ("use_bias_correction_kl", args.beta != 0.0 and args.use_bias_correction_kl,
         "with beta != 0, mempo's KL term is not weighted by the ratio (set it to False)"),
        ("entropy_coef", args.entropy_coef != 0.0, "mempo's entropy is a metric, not a loss term (0.0)"),
        ("use_adaptive_entropy", args.use_adaptive_entropy, "no entropy bonus (False)"),
    ]
    for field, bad, expected in unsupported:
        if bad:
            raise ValueError(f"GRPOConfig.{field}={getattr(args, field)!r} is not supported by "
                             f"MemPOGRPOTrainer: {expected}")
    clip_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.delta is not None and not args.delta > 1.0 + clip_high:
        # min(r, delta) equals mempo's dual-clip bound only when delta lies above the clip range
        raise ValueError(f"GRPOConfig.delta={args.delta!r} must be > 1 + epsilon_high ({1.0 + clip_high}) "
                         f"for MemPOGRPOTrainer (it becomes mempo's dual_clip)")
    return {
        "clip_low": args.epsilon,
        "clip_high": clip_high,
        "dual_clip": args.delta,
        "kl_coef": args.beta,
        "kl_estimator": "k3",
        "loss_agg": TRL_LOSS_AGG[args.loss_type],
    }


def last_hidden_states(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                       logits_to_keep: int) -> Tensor:
    """[B, logits_to_keep, H]: the backbone's last hidden states at the positions that predict
    the last `logits_to_keep` tokens of input_ids [B, L] (what TRL's log-probs are taken at)."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model):
        model = model.base_model.model
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state[:, -logits_to_keep - 1:-1, :]


class MemPOGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` with the policy loss of `mempo.ops.linear_policy_loss` (see the module
    docstring for the loss-type mapping and what is refused). Same constructor as GRPOTrainer."""

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:
            grpo_loss_options(config)  # refuse before the model loads
        super().__init__(*args, **kwargs)
        self.mempo_options = grpo_loss_options(self.args)
        if self.aux_loss_enabled:
            raise ValueError("GRPOConfig.router_aux_loss_coef: the MoE router aux loss is not supported by "
                             "MemPOGRPOTrainer (set router_aux_loss_coef=0.0)")
        from trl.models.utils import _ForwardRedirection

        self._mempo_redirect = _ForwardRedirection()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        unwrapped = self.accelerator.unwrap_model(model)
        # through the wrapper's forward, so DDP / ZeRO-3 see a forward around the loss
        return self._mempo_redirect(model, unwrapped, self.mempo_loss, unwrapped, inputs)

    def mempo_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
        """TRL's loss for `inputs` (one micro-batch of `_prepare_inputs`), computed by mempo."""
        for key in MULTIMODAL_KEYS:
            if inputs.get(key) is not None:
                raise ValueError(f"inputs[{key!r}]: multimodal inputs are not supported by MemPOGRPOTrainer")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        B, K = completion_ids.shape
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        # -- hidden states of the completion positions, and the LM head --
        with self.accelerator.autocast():
            hidden = last_hidden_states(model, input_ids, attention_mask, K)
        lm_head = model.get_output_embeddings()
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError("the LM head has a bias: not supported by MemPOGRPOTrainer (mempo.ops has no bias)")
        weight = lm_head.weight
        hidden = hidden.to(weight.dtype).reshape(B * K, -1)  # cast_lm_head_to_fp32 keeps the head in fp32
        targets, loss_mask = completion_ids.reshape(-1), mask.reshape(-1)

        # -- per-token advantages; vLLM importance ratios (>= 0) scale them, which is exact --
        adv = inputs["advantages"]
        adv = adv[:, None] if adv.dim() == 1 else adv
        if self.use_vllm and self.vllm_importance_sampling_correction:
            adv = adv * inputs["importance_sampling_ratio"]
        adv = adv.expand(B, K).reshape(-1)
        ref = inputs["ref_per_token_logps"].reshape(-1) if self.beta != 0.0 else None

        # -- this micro-batch's normalisers --
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        batch = {"grpo": dict(num_global_seqs=B), "bnpo": {}, "dapo": dict(num_global_tokens=1),
                 "dr_grpo": dict(num_global_seqs=B, seq_norm_len=self.max_completion_length)}[self.loss_type]
        seq_index = torch.arange(B, device=targets.device).repeat_interleave(K)

        from trl.trainer.utils import maybe_gather_lm_head_ctx

        with maybe_gather_lm_head_ctx(weight):
            old = inputs.get("old_per_token_logps")
            # TRL skips the old log-probs when the policy has not moved since generation (old = current,
            # detached); the fused op needs them as input: one gradient-free LM-head pass
            old = self._current_logprobs(hidden, weight, targets, loss_mask) if old is None else old.reshape(-1)
            loss, metrics = ops.linear_policy_loss(
                hidden, weight, targets, old, adv, loss_mask, ref, seq_index=seq_index,
                temperature=self.temperature, compute_entropy=True, **self.mempo_options, **batch)

        if self.loss_type == "dapo":
            # the generation batch's token count, rescaled to one accumulation window (TRL's normaliser)
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        else:
            normalizer = accumulation
        self._log_mempo_metrics(mode, metrics)
        return loss / normalizer

    def _current_logprobs(self, hidden: Tensor, weight: Tensor, targets: Tensor, loss_mask: Tensor) -> Tensor:
        """[N] float32 log-probs of the loss tokens under the current weights, without gradient
        (0 elsewhere: the fused op never reads those rows)."""
        with torch.no_grad():
            rows = loss_mask.nonzero().squeeze(1)
            out = torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device)
            if rows.numel():
                logp = ops.linear_logprobs(hidden.detach().index_select(0, rows), weight.detach(),
                                           targets.index_select(0, rows), self.temperature)
                out.index_copy_(0, rows, logp.float())
            return out

    def _log_mempo_metrics(self, mode: str, metrics: dict[str, Tensor]) -> None:
        """TRL's metric names, averaged over processes; one host sync for all of them."""
        names = {"entropy": "entropy", "clip_ratio/region_mean": "clip_frac"}
        if self.beta != 0.0:
            names["kl"] = "kl_ref"
        values = torch.stack([metrics[key] for key in names.values()])[None]
        for name, value in zip(names, self.accelerator.gather(values).mean(0).tolist()):
            self._metrics[mode][name].append(value)
