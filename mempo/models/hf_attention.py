"""mempo's two attention backends for Hugging Face transformers, registered by name.

- "mempo_segment" (training): the packed forward with segment visibility, below.
- "mempo_rollout" (rollout): each layer's rotated q/k/v are written into the paged rollout KV
  cache the engine reserved, then attend over each row's live slots
  (`mempo.ops.paged_attention`); see `register_rollout_attention`.
No model code is copied: the model computes projections and rotary; mempo owns the attention.

Segment attention as a Hugging Face transformers attention backend:

`register_segment_attention()` adds "mempo_segment" to transformers' AttentionInterface;
a stock model (Qwen2, Llama, ...) then runs it with

    model.set_attn_implementation("mempo_segment")
    model(input_ids=ids[None], position_ids=layout.position_ids[None], segment_layout=layout)

The layout travels as a forward kwarg (transformers 5 passes **kwargs down to the
attention function). Visibility comes from the layout alone: the mask function registered
for "mempo_segment" builds no mask, and a 2-D attention_mask with zeros (padding) is an
error rather than silently ignored. The rotary positions must be the layout's: position_ids
that differ from `layout.position_ids` (including the 0..L-1 transformers uses when they are
omitted, for a layout whose positions are not that) are an error.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from mempo.ops.paged_attention import CacheWrite, paged_attention
from mempo.ops.segment_attention import segment_attention
from mempo.ops.segment_layout import SegmentLayout

ATTENTION_NAME = "mempo_segment"
ROLLOUT_ATTENTION_NAME = "mempo_rollout"


def hf_segment_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         segment_layout: SegmentLayout | None = None, segment_backend: str = "auto",
                         **kwargs) -> tuple[Tensor, None]:
    """query: [1, Hq, L, D], key/value: [1, Hkv, L, D] -> ([1, L, Hq, D], None)."""
    if segment_layout is None:
        raise ValueError(f"attn_implementation={ATTENTION_NAME!r} needs the forward kwarg segment_layout=")
    if query.shape[0] != 1:
        raise ValueError(f"segment attention takes one packed row (batch 1), got batch {query.shape[0]}")
    if attention_mask is not None:
        raise ValueError("segment attention takes no attention_mask: visibility comes from segment_layout")
    if dropout:
        raise ValueError(f"segment attention has no dropout, got dropout={dropout}")
    if kwargs.get("position_ids") is not None:
        _check_positions(kwargs["position_ids"], segment_layout)
    out = segment_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                            segment_layout, scale=scaling, backend=segment_backend)
    return out[None], None


def _check_positions(position_ids: Tensor, layout: SegmentLayout) -> None:
    """position_ids must be the layout's; checked once per tensor (the trainer passes a view of
    layout.position_ids itself, which needs no comparison and so no device sync)."""
    key = (position_ids.data_ptr(), position_ids.numel())
    # the checked tensors are kept alive with the layout, so a freed one's address cannot come
    # back as another (unchecked) tensor and skip the comparison
    checked = layout._cache.setdefault("checked_positions", {})
    if key in checked or key == (layout.position_ids.data_ptr(), layout.position_ids.numel()):
        return
    flat = position_ids.reshape(-1)
    if flat.shape != layout.position_ids.shape or not torch.equal(flat.to(layout.position_ids.device),
                                                                    layout.position_ids):
        raise ValueError("position_ids differ from segment_layout.position_ids (the positions tokens were generated "
                         "at): pass position_ids=layout.position_ids[None] to the model")
    checked[key] = position_ids


def _no_mask(attention_mask: Tensor | None = None, **kwargs) -> None:
    """Mask function for "mempo_segment": none is built (the layout is the mask); a 2-D padding
    mask with zeros would be ignored, so it is an error."""
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        raise ValueError(f"attn_implementation={ATTENTION_NAME!r} takes no padding: the 2-D attention_mask has "
                         f"zeros; pack sequences without padding (segment_layout says who sees whom)")
    return None


def register_segment_attention() -> str:
    """Register the backend and its (empty) mask function (idempotent) -> the attn_implementation name."""
    AttentionInterface.register(ATTENTION_NAME, hf_segment_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    return ATTENTION_NAME


def rollout_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                      dropout: float = 0.0, rollout_cache=None,
                      cache_write: CacheWrite | None = None, **kwargs):
    """query [1, Hq, N, D], key/value [1, Hkv, N, D] (rotated, flat tokens) -> ([1, N, Hq, D], None).
    rollout_cache: the engine's PagedKVCache; cache_write: this forward's slots and visibility."""
    if rollout_cache is None or cache_write is None:
        raise ValueError(f"attn_implementation={ROLLOUT_ATTENTION_NAME!r} needs rollout_cache= and cache_write= "
                         "(use mempo.rollout.NativeEngine)")
    w = cache_write
    k_cache, v_cache = rollout_cache.layer(module.layer_idx)
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    # write first: a token sees itself and its row's earlier new tokens
    k_cache.view(-1, hkv, d).index_copy_(0, w.tok_phys, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, w.tok_phys, value[0].transpose(0, 1).to(v_cache.dtype))
    scale = scaling if scaling is not None else d ** -0.5
    out = paged_attention(query[0].transpose(0, 1), k_cache, v_cache, w, scale)
    return out[None], None


def register_rollout_attention() -> str:
    """Register the rollout attention with transformers (idempotent); returns its name."""
    AttentionInterface.register(ROLLOUT_ATTENTION_NAME, rollout_attention)
    AttentionMaskInterface.register(ROLLOUT_ATTENTION_NAME, lambda *args, **kwargs: None)  # the write is the mask
    return ROLLOUT_ATTENTION_NAME
