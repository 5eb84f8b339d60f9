"""The trainable policy: a Hugging Face causal LM whose forward ends in mempo's fused ops.

`packed_hidden` runs the base model (no LM head: the fused ops take hidden states) once over
a packed micro-batch, every token at its rollout position and seeing exactly what it saw at
rollout: attention="segment" calls `mempo.ops.segment_attention` through the
"mempo_segment" attention backend (Triton on CUDA, per-sequence SDPA on the CPU; no L x L
mask anywhere); attention="dense" builds the layout's dense mask (a reference, small batches).

Under FSDP2 the LM head and embeddings belong to the root module, whose parameters are
unsharded only inside the root's forward methods. So each use of the policy is one method
of `FusedPolicy` (base forward, then `linear_policy_loss` / `linear_logprobs` on the hidden
states with the unsharded LM-head weight), registered as an FSDP forward method; [L, V]
logits never exist.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from mempo.algo.memory_reward import batch_memory_rewards
from mempo.models.hf import attention_implementation, decoder_of, lm_head_weight
from mempo.models.hf_attention import register_segment_attention
from mempo.ops import MemPOAdvantages, PolicyLossOptions, linear_logprobs, linear_policy_loss

from .packed_batch import PackedBatch

ATTENTION_MODES = ("segment", "dense")


def packed_hidden(model: nn.Module, batch: PackedBatch, attention: str = "segment") -> Tensor:
    """-> hidden states [L, H] of the packed batch (final norm applied)."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    device = lm_head_weight(model).device
    ids = batch.input_ids.to(device)[None]
    pos = batch.position_ids.to(device)[None]
    if attention == "dense":
        mask = batch.layout.dense_mask().to(device)[None, None]
        return decoder_of(model)(input_ids=ids, position_ids=pos, attention_mask=mask,
                                 use_cache=False).last_hidden_state[0]
    layout = batch.layout.to(device)
    with attention_implementation(model, register_segment_attention()):
        out = decoder_of(model)(input_ids=ids, position_ids=pos, use_cache=False, segment_layout=layout)
    return out.last_hidden_state[0]


class FusedPolicy(nn.Module):
    """One method per use; each runs the packed base forward once, inside FSDP's unshard."""

    # the methods `mempo.distributed.shard_model` registers as FSDP2 forward methods
    fsdp_methods = ("policy_loss", "sft_loss", "logprobs", "memory_rewards", "score")

    def __init__(self, causal_lm: nn.Module, attention: str = "segment"):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.lm = causal_lm
        self.attention = attention

    def forward(self, batch: PackedBatch) -> Tensor:
        """-> hidden states [L, H]."""
        return self._hidden(batch)

    def _hidden(self, batch: PackedBatch) -> Tensor:
        # not self(batch): under FSDP2 that would run the root's hooks again and reshard the
        # LM head on return, inside the method that still needs it
        return packed_hidden(self.lm, batch, self.attention)

    def policy_loss(self, batch: PackedBatch, advantages: MemPOAdvantages | Tensor, options: PolicyLossOptions, *,
                    temperature: float = 1.0, ref_logprobs: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped policy loss of the batch's loss tokens -> (loss, detached metrics)."""
        hidden, weight = self._hidden(batch), lm_head_weight(self.lm)
        device = weight.device
        ref = None if ref_logprobs is None else ref_logprobs.to(device)
        seq_index = None if isinstance(advantages, MemPOAdvantages) else batch.seq_index.to(device)
        return linear_policy_loss(hidden, weight, batch.targets.to(device), batch.old_logprobs.to(device), advantages,
                                  batch.loss_mask.to(device), ref, seq_index=seq_index, temperature=temperature,
                                  **dataclasses.asdict(options))

    def sft_loss(self, batch: PackedBatch, *, num_global_tokens: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Token-mean NLL of the loss tokens (over num_global_tokens when given) -> (loss, metrics)."""
        hidden, weight = self._hidden(batch), lm_head_weight(self.lm)
        rows = batch.loss_mask.to(weight.device).nonzero().squeeze(1)
        targets = batch.targets.to(weight.device).index_select(0, rows)
        logp = linear_logprobs(hidden.index_select(0, rows), weight, targets)
        loss = -logp.sum() / (num_global_tokens if num_global_tokens is not None else max(1, rows.numel()))
        return loss, {"nll": -logp.detach().mean() if rows.numel() else logp.new_zeros(()),
                      "num_loss_tokens": torch.tensor(float(rows.numel()))}

    @torch.no_grad()
    def logprobs(self, batch: PackedBatch, *, temperature: float = 1.0) -> Tensor:
        """[L] float32 log-probs of the targets on loss rows, 0 elsewhere (old or reference log-probs)."""
        return self._target_logprobs(self._hidden(batch), batch, temperature)

    @torch.no_grad()
    def memory_rewards(self, batch: PackedBatch, *, temperature: float = 1.0) -> Tensor:
        """r_mem [num_memories] float64 (CPU) from the batch's probes."""
        return self._memory_rewards(self._hidden(batch), batch, temperature)

    @torch.no_grad()
    def score(self, batch: PackedBatch, *, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """(r_mem, log-probs) from one forward: the probes and the recomputed old log-probs."""
        hidden = self._hidden(batch)
        return self._memory_rewards(hidden, batch, temperature), self._target_logprobs(hidden, batch, temperature)

    def _target_logprobs(self, hidden: Tensor, batch: PackedBatch, temperature: float) -> Tensor:
        weight = lm_head_weight(self.lm)
        rows = batch.loss_mask.to(weight.device).nonzero().squeeze(1)
        out = torch.zeros(batch.num_tokens, dtype=torch.float32, device=weight.device)
        out[rows] = linear_logprobs(hidden.index_select(0, rows), weight,
                                    batch.targets.to(weight.device).index_select(0, rows), temperature).float()
        return out

    def _memory_rewards(self, hidden: Tensor, batch: PackedBatch, temperature: float) -> Tensor:
        """P(ans | q, m_t) - P(ans | q, history before m_t) per memory, from the probe rows."""
        weight = lm_head_weight(self.lm)
        rows = batch.probe_rows.to(weight.device)
        targets = batch.targets.to(weight.device).index_select(0, rows)
        logp = linear_logprobs(hidden.index_select(0, rows), weight, targets, temperature)
        return batch_memory_rewards(logp, batch)


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
