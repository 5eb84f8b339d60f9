"""mempo's fused ops inside trainers people already run (`pip install -e ".[integrations]"`).

- `mempo.integrations.verl`: mempo's policy loss registered in verl's policy-loss registry
  (`actor_rollout_ref.actor.policy_loss.loss_mode=mempo`), and a drop-in for verl's fused
  LM-head log-prob/entropy module (`mempo.integrations.verl_fused`).
- `mempo.integrations.trl`: `MemPOGRPOTrainer`, TRL's `GRPOTrainer` with its loss computed by
  `mempo.ops.linear_policy_loss` from the last hidden states.
- `python -m mempo.integrations.trl_memory`: peak memory of one TRL GRPO step per loss.

Nothing here is imported by `mempo` itself: verl and TRL stay optional.
"""
