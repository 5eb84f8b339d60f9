"""The in-process rollout engine: a Hugging Face causal LM over our own paged KV cache.

The trainer's model object is used directly (no weight sync). `begin` sizes a block pool
from the KV budget; `feed` runs one forward over chunks of new tokens of several rows (prompt
prefill, a sampled token, teacher-forced tokens, tool output), flat and unpadded, writing
their keys/values into the rows' blocks and returning hidden states; `evict` drops token
ranges from rows in place and frees blocks. Positions are trajectory token indices (or the
record's re-encode positions), never reused.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mempo.models.hf import attention_implementation, decoder_of, lm_head_weight
from mempo.models.hf_attention import ROLLOUT_ATTENTION_NAME, register_rollout_attention
from mempo.ops.lm_head import logits_chunk
from mempo.ops.paged_attention import CacheWrite

from .kv_cache import GiB, KVBudgetError, PagedKVCache, budget_bytes, kv_bytes_per_token

DEFAULT_BLOCK_SIZE = 16


class NativeEngine:
    """Batched forwards of `model` over a PagedKVCache.

    max_context_tokens: the most tokens one row may hold (rollout.max_total_tokens).
    kv_cache_memory: the pool budget, as rollout.kv_cache_memory (a fraction <= 1 of the free
    device memory when `begin` runs, or GiB); None: as many blocks as every row at
    max_context_tokens needs (what a dense cache would take; for tests and benchmarks).
    kv_cache_bytes: the budget in bytes (wins over kv_cache_memory; benchmarks)."""

    exact_logprobs = True  # the trainer's own model and visibility: exact in float32 (the invariant)

    def __init__(self, model, max_context_tokens: int, *, kv_cache_memory: float | None = None,
                 kv_cache_bytes: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE):
        if max_context_tokens <= 0:
            raise ValueError(f"max_context_tokens must be positive, got {max_context_tokens}")
        if block_size <= 0:
            raise ValueError(f"rollout.kv_block_size must be >= 1, got {block_size}")
        self.model = model
        self.max_context_tokens = max_context_tokens
        self.kv_cache_memory = kv_cache_memory
        self.kv_cache_bytes = kv_cache_bytes
        self.block_size = block_size
        self.cache: PagedKVCache | None = None
        self.stats = None  # the last rollout's agent_loop.RolloutStats
        self.tokens_fed = 0
        register_rollout_attention()

    @property
    def device(self) -> torch.device:
        return lm_head_weight(self.model).device

    def _shape(self) -> tuple[int, int, int, torch.dtype]:
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cfg.num_hidden_layers, kv_heads, head_dim, lm_head_weight(self.model).dtype

    def pool_blocks(self, rows: int) -> int:
        """Blocks of the pool for `rows` trajectories: the budget's, never more than every row
        at max_context_tokens would need. KVBudgetError when the budget cannot hold one row."""
        layers, kv_heads, head_dim, dtype = self._shape()
        block_bytes = kv_bytes_per_token(layers, kv_heads, head_dim, dtype) * self.block_size
        row_blocks = -(-self.max_context_tokens // self.block_size)
        if self.kv_cache_bytes is None and self.kv_cache_memory is None:
            return rows * row_blocks
        budget = self.kv_cache_bytes if self.kv_cache_bytes is not None else \
            budget_bytes(self.kv_cache_memory, self.device)
        blocks = budget // block_bytes
        if blocks < row_blocks:
            what = f"rollout.kv_cache_memory={self.kv_cache_memory}" if self.kv_cache_bytes is None else \
                f"kv_cache_bytes={self.kv_cache_bytes}"
            raise KVBudgetError(f"{what} ({budget / GiB:.3g} GiB) holds {blocks * self.block_size} tokens of KV "
                                f"cache; one row needs room for rollout.max_total_tokens={self.max_context_tokens} "
                                f"tokens ({row_blocks * block_bytes / GiB:.3g} GiB): raise it")
        return min(blocks, rows * row_blocks)

    def begin(self, rows: int) -> PagedKVCache:
        """A fresh pool for a rollout of `rows` trajectories (any number may wait for room)."""
        layers, kv_heads, head_dim, dtype = self._shape()
        self.cache = None  # the previous rollout's pool goes back to the allocator first
        self.cache = PagedKVCache(layers, kv_heads, head_dim, num_blocks=self.pool_blocks(rows),
                                  block_size=self.block_size, max_rows=rows, max_row_tokens=self.max_context_tokens,
                                  dtype=dtype, device=self.device)
        self.tokens_fed = 0
        return self.cache

    def end(self) -> None:
        """Free the pool: between rollouts its memory serves the training pass."""
        self.cache = None

    @torch.no_grad()
    def feed(self, rows: list[int], chunks: list[list[int]], first_index: list[int],
             first_position: list[int] | None = None) -> Tensor:
        """Run the model on `chunks[i]` (trajectory tokens first_index[i]..) for cache row
        rows[i], at rotary positions first_position[i].. (default: the token indices). The
        caller has checked that the rows' new blocks are free. Returns hidden states [N, H]
        (final norm applied), the chunks back to back in order.
        Host -> device: one int64 tensor (token ids, positions, rows, first slots, counts),
        plus the block table rows that changed (`sync_table`)."""
        cache = self.cache
        assert cache is not None, "call begin() first"
        counts = [len(c) for c in chunks]
        if min(counts) <= 0:
            raise ValueError("every fed chunk needs at least one token")
        firsts = [cache.reserve(r, f, c) for r, f, c in zip(rows, first_index, counts)]
        cache.sync_table()
        total, b = sum(counts), len(rows)
        ids, pos = [], []
        for chunk, p in zip(chunks, first_index if first_position is None else first_position):
            ids += chunk
            pos += range(p, p + len(chunk))
        meta = torch.tensor(ids + pos + rows + firsts + counts, dtype=torch.int64).to(self.device, non_blocking=True)
        ids_t, pos_t = meta[:total], meta[total: 2 * total]
        rows_t, first_t, counts_t = meta[2 * total:].view(3, b)
        write = CacheWrite.build(cache, rows_t, first_t, counts_t, total,
                                 kv_len=max(f + c for f, c in zip(firsts, counts)), max_count=max(counts))
        self.tokens_fed += total
        with attention_implementation(self.model, ROLLOUT_ATTENTION_NAME):
            out = decoder_of(self.model)(input_ids=ids_t[None], position_ids=pos_t[None], use_cache=False,
                                         rollout_cache=cache, cache_write=write)
        return out.last_hidden_state[0]

    def logits(self, hidden: Tensor) -> Tensor:
        """[..., H] -> float32 logits [..., V], through the trainer's own LM-head GEMM
        (`logits_chunk`: bf16 x bf16 -> fp32 accumulators on CUDA), so sampling log-probs are
        computed the way the training forward computes them, not from a bf16-rounded nn.Linear."""
        weight = lm_head_weight(self.model)
        x = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
        out = torch.empty(x.shape[0], weight.shape[0], device=x.device,
                          dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32)
        return logits_chunk(x, weight, out).reshape(*hidden.shape[:-1], weight.shape[0])

    def evict(self, drops: dict[int, list[tuple[int, int]]]) -> None:
        """Drop trajectory-token ranges from the given rows; their freed blocks return to the pool."""
        assert self.cache is not None
        self.cache.evict_tokens(drops)

    def rollout(self, policy, env, tokenizer, tasks, group_index, context, params) -> list:
        """The engine interface the trainer calls (`VLLMRollout.rollout` is the other one):
        roll out with `policy`'s current weights (this engine's model is the policy's own
        module, unsharded for the rollout) -> trajectories."""
        from mempo.training.inference_mode import full_weights  # the trainer's FSDP2 helper

        from . import agent_loop  # module lookup: tests substitute agent_loop.run_rollout

        with full_weights(policy):
            return agent_loop.run_rollout(self, env, tokenizer, tasks, group_index, context, params)
