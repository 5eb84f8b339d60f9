"""The MemPO algorithm (Self-Memory Policy Optimization), as the paper states it:

1. Roll out G trajectories per task with the current policy (`mempo.rollout`); every turn
   writes a `<mem>` block m_t, after which the context policy drops older context.
2. Probe every memory (`probes.build_probes`): two probe segments end with an answer cue and
   the gold answer; one sees only the prompt and a fresh copy of m_t, the other the full
   history before m_t. They ride along in the packed training forward, without gradient.
3. Probe probabilities (`memory_reward.answer_probability`): the geometric mean of the gold
   answer's token probabilities, P(ans | q, m_t) and eps_t = P(ans | q, history before m_t).
4. Memory reward (`memory_reward.memory_rewards`): r_mem(m_t) = P(ans | q, m_t) - eps_t.
5. Advantages (`advantages`): the trajectory advantage is the group-normalised task reward
   (GRPO); the memory advantage is r_mem normalised over the group's memories of the same
   step (`memory_grouping=step`) or of the whole group.
6. Token advantage = traj_adv on every model-written token, + mem_coef * mem_adv on the tokens
   of each memory (`mempo.ops.MemPOAdvantages`), into the clipped policy loss.
"""
from .advantages import BatchAdvantages, batch_advantages, memory_advantages, trajectory_advantages
from .memory_reward import answer_probability, batch_memory_rewards, memory_rewards
from .probes import Probe, answer_cue_and_ids, build_probes

__all__ = ["BatchAdvantages", "Probe", "answer_cue_and_ids", "answer_probability", "batch_advantages",
           "batch_memory_rewards", "build_probes", "memory_advantages", "memory_rewards", "trajectory_advantages"]
