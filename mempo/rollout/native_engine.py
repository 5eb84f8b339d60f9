"""The in-process rollout engine: a Hugging Face causal LM with our own KV cache.

The trainer's model object is used directly (no weight sync). `feed` runs one batched
forward over a chunk of new tokens per row (prompt prefill, a sampled token, tool output),
writing their keys/values into the cache and returning hidden states; `evict` drops token
ranges from rows' caches in place. Positions are trajectory token indices, never reused.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from mempo.ops.lm_head_chunks import logits_chunk

from .cached_attention import CacheWrite, register
from .kv_cache import RolloutKVCache


@contextmanager
def attention_implementation(model, name: str):
    """Temporarily switch a HF model's attention function (a config string)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


class NativeEngine:
    """Batched forward passes of `model` over a RolloutKVCache."""

    def __init__(self, model, max_context_tokens: int):
        self.model = model
        self.max_context_tokens = max_context_tokens
        self.cache: RolloutKVCache | None = None
        self.tokens_fed = 0
        register()

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    def begin(self, batch: int) -> None:
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dtype = self.model.get_output_embeddings().weight.dtype
        self.cache = RolloutKVCache(cfg.num_hidden_layers, batch, kv_heads, head_dim,
                                    self.max_context_tokens, dtype, self.device)
        self.tokens_fed = 0

    @torch.no_grad()
    def feed(self, rows: list[int], chunks: list[list[int]], first_index: list[int],
             first_position: list[int] | None = None) -> Tensor:
        """Run the model on `chunks[i]` (trajectory tokens first_index[i]..) for cache row
        rows[i], at rotary positions first_position[i].. (default: the token indices).
        Returns hidden states [b, n, H] (final norm applied; row i valid up to len(chunks[i]))."""
        assert self.cache is not None, "call begin() first"
        counts = [len(c) for c in chunks]
        if min(counts) <= 0:
            raise ValueError("every fed chunk needs at least one token")
        first_slots = [self.cache.reserve(r, f, c) for r, f, c in zip(rows, first_index, counts)]
        n = max(counts)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        pos = torch.zeros(len(rows), n, dtype=torch.long)
        for i, (chunk, f) in enumerate(zip(chunks, first_index if first_position is None else first_position)):
            ids[i, : len(chunk)] = torch.tensor(chunk)
            pos[i] = torch.arange(f, f + n).clamp(max=f + len(chunk) - 1)
        write = CacheWrite.build(self.cache, rows, first_slots, counts)
        self.tokens_fed += sum(counts)
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        with attention_implementation(self.model, "mempo_rollout"):
            out = base(input_ids=ids.to(self.device), position_ids=pos.to(self.device), use_cache=False,
                       rollout_cache=self.cache, cache_write=write)
        return out.last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        """[..., H] -> float32 logits [..., V], through the trainer's own LM-head GEMM
        (`logits_chunk`: bf16 x bf16 -> fp32 accumulators on CUDA), so sampling log-probs are
        computed the way the training forward computes them, not from a bf16-rounded nn.Linear."""
        weight = self.model.get_output_embeddings().weight
        x = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
        out = torch.empty(x.shape[0], weight.shape[0], device=x.device,
                          dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32)
        return logits_chunk(x, weight, out).reshape(*hidden.shape[:-1], weight.shape[0])

    def evict(self, drops: dict[int, list[tuple[int, int]]]) -> None:
        """Drop trajectory-token ranges from the given rows' caches."""
        assert self.cache is not None
        self.cache.evict_tokens(drops)
