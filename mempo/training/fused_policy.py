"""The trainable policy: a Hugging Face causal LM whose forward ends in mempo's fused ops.

Wrapping matters under FSDP2: the LM head and embeddings belong to the root module's
parameter group, which is unsharded only inside the root's forward. So the whole step
(packed base-model forward, then `linear_policy_loss` / `linear_logprobs` on the hidden
states with the unsharded LM-head weight) runs inside `FusedPolicy.forward`, and the
[L, V] logits never exist.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mempo.ops import MemPOAdvantages, linear_logprobs, linear_policy_loss

from .memory_scores import memory_rewards_from_hidden
from .packed_batch import PackedBatch
from .policy_forward import lm_head_weight, packed_hidden


class FusedPolicy(nn.Module):
    """modes: "policy_loss" -> (loss, metrics); "sft" -> (loss, metrics) of token-mean NLL
    on the loss tokens; "logprobs" -> [L] float32 log-probs of the targets on loss rows (0
    elsewhere; no gradient: old or reference log-probs); "memory_rewards" -> r_mem
    [num_memories] from the batch's probes (no gradient); "score" -> (r_mem, log-probs)
    from one forward (engine=vllm: probes and the trainer's old log-probs together);
    "hidden" -> hidden states [L, H]."""

    def __init__(self, causal_lm: nn.Module, attention: str = "segment"):
        super().__init__()
        self.lm = causal_lm
        self.attention = attention

    def forward(self, batch: PackedBatch, mode: str = "policy_loss", *,
                advantages: MemPOAdvantages | Tensor | None = None, temperature: float = 1.0,
                loss_options: dict | None = None, num_global_tokens: int | None = None,
                ref_logprobs: Tensor | None = None):
        hidden = packed_hidden(self.lm, batch, self.attention)
        weight = lm_head_weight(self.lm)
        device = weight.device
        if mode == "hidden":
            return hidden
        if mode == "memory_rewards":
            with torch.no_grad():
                return memory_rewards_from_hidden(hidden, weight, batch, temperature)
        mask = batch.loss_mask.to(device)
        targets = batch.targets.to(device)
        if mode in ("logprobs", "score"):
            with torch.no_grad():
                rows = mask.nonzero().squeeze(1)
                out = torch.zeros(batch.num_tokens, dtype=torch.float32, device=device)
                out[rows] = linear_logprobs(hidden.index_select(0, rows), weight, targets.index_select(0, rows),
                                            temperature).float()
                if mode == "score":
                    return memory_rewards_from_hidden(hidden, weight, batch, temperature), out
                return out
        if mode == "sft":
            rows = mask.nonzero().squeeze(1)
            logp = linear_logprobs(hidden.index_select(0, rows), weight, targets.index_select(0, rows), temperature)
            denom = num_global_tokens if num_global_tokens is not None else max(1, rows.numel())
            loss = -logp.sum() / denom
            return loss, {"nll": (-logp.detach().mean() if rows.numel() else logp.new_zeros(())),
                          "num_loss_tokens": torch.tensor(float(rows.numel()))}
        if mode != "policy_loss":
            raise ValueError("mode must be 'policy_loss', 'sft', 'logprobs', 'memory_rewards', 'score' or "
                             f"'hidden', got {mode!r}")
        if advantages is None:
            raise ValueError("mode='policy_loss' needs advantages=")
        ref = None if ref_logprobs is None else ref_logprobs.to(device)
        seq_index = None if isinstance(advantages, MemPOAdvantages) else batch.seq_index.to(device)
        return linear_policy_loss(hidden, weight, targets, batch.old_logprobs.to(device), advantages, mask, ref,
                                  seq_index=seq_index, temperature=temperature, **(loss_options or {}))


def micro_batch_advantages(batch: PackedBatch, traj_adv: Tensor, mem_adv: Tensor, mem_coef: float,
                           device: torch.device) -> MemPOAdvantages:
    """MemPOAdvantages of one packed micro-batch, from its trajectories' and memories'
    slices of the step's advantages (traj_adv [num trajs in batch], mem_adv [num memories])."""
    if traj_adv.shape[0] != batch.cu_seqlens.numel() - 1:
        raise ValueError(f"traj_adv has {traj_adv.shape[0]} entries for {batch.cu_seqlens.numel() - 1} sequences")
    if mem_adv.shape[0] != batch.num_memories:
        raise ValueError(f"mem_adv has {mem_adv.shape[0]} entries for {batch.num_memories} memories")
    return MemPOAdvantages(traj_adv.to(device), batch.seq_index.to(device), mem_adv.to(device),
                           batch.memory_index.to(device), mem_coef)
