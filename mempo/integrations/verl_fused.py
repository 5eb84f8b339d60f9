"""Import-to-enable module for verl: registers mempo's policy loss ("mempo") and routes verl's
fused LM-head log-probs/entropy through `mempo.ops.linear_logprobs`.

    actor_rollout_ref.model.external_lib=mempo.integrations.verl_fused
    actor_rollout_ref.model.use_fused_kernels=True     # fused_kernel_options.impl_backend: torch (default)
    actor_rollout_ref.actor.policy_loss.loss_mode=mempo

verl imports `external_lib` in each worker when it builds the model config, before the model.
"""
from mempo.integrations.verl import patch_fused_linear_for_ppo

patch_fused_linear_for_ppo()
