"""MemPO's memory reward (the paper's Eq. for r_mem):

    P(ans | q, m_t)   = exp(mean_j log p(a_j | q, m_t, a_<j))   geometric mean of the gold
                        answer's token probabilities with the model seeing only the prompt
                        and memory m_t (plus an answer cue)
    eps_t             = the same with the full, uncompressed history before m_t
    r_mem(m_t)        = P(ans | q, m_t) - eps_t

The log-probs come from probe segments (mempo.algo.probes) scored in the packed training
forward (`FusedPolicy.memory_rewards`); here the arithmetic, on flat per-token arrays.
"""
from __future__ import annotations

import torch
from torch import Tensor


def answer_probability(answer_logprobs: Tensor, probe_index: Tensor, num_probes: int) -> Tensor:
    """Geometric-mean answer probability of each probe.

    answer_logprobs: [K] log-probs of gold-answer tokens; probe_index: [K] in [0, num_probes).
    Returns [num_probes] float64; a probe without answer tokens is an error (its answer was
    empty), not a silent probability."""
    if answer_logprobs.shape != probe_index.shape or answer_logprobs.dim() != 1:
        raise ValueError("answer_logprobs and probe_index must be matching 1-D tensors")
    lp = answer_logprobs.double()
    total = torch.zeros(num_probes, dtype=torch.float64, device=lp.device).index_add_(0, probe_index, lp)
    count = torch.zeros_like(total).index_add_(0, probe_index, torch.ones_like(lp))
    if num_probes and bool((count == 0).any()):
        raise ValueError("every probe needs at least one answer token (probe_index misses some probes)")
    return torch.exp(total / count.clamp(min=1))


def memory_rewards(p_given_memory: Tensor, p_given_history: Tensor) -> Tensor:
    """r_mem = P(ans | q, m_t) - P(ans | q, full history before m_t); both [M]."""
    if p_given_memory.shape != p_given_history.shape:
        raise ValueError(f"p_given_history must have shape {list(p_given_memory.shape)}, "
                         f"got {list(p_given_history.shape)}")
    return p_given_memory - p_given_history


def batch_memory_rewards(answer_logprobs: Tensor, batch) -> Tensor:
    """r_mem [num_memories] float64 (CPU) of a packed batch (`PackedBatch`) with probes, from the
    log-probs [K] of its answer rows (`batch.probe_rows`), memories in batch order."""
    p = answer_probability(answer_logprobs, batch.probe_index.to(answer_logprobs.device), len(batch.probes)).cpu()
    given_memory = torch.full((batch.num_memories,), float("nan"), dtype=torch.float64)
    given_history = given_memory.clone()
    for i, probe in enumerate(batch.probes):
        (given_history if probe.given_history else given_memory)[batch.probe_memory[i]] = p[i]
    if torch.isnan(given_memory).any() or torch.isnan(given_history).any():
        raise ValueError("every memory needs both probes (given_memory and given_history)")
    return memory_rewards(given_memory, given_history)
