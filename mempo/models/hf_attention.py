"""Segment attention as a Hugging Face transformers attention backend.

`register_segment_attention()` adds "mempo_segment" to transformers' AttentionInterface;
a stock model (Qwen2, Llama, ...) then runs it with

    model.set_attn_implementation("mempo_segment")
    model(input_ids=ids[None], position_ids=layout.position_ids[None], segment_layout=layout)

The layout travels as a forward kwarg (transformers 5 passes **kwargs down to the
attention function). "mempo_segment" is not in AttentionMaskInterface, so transformers
builds no 4D mask on this path (attention_mask arrives as None).
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface

from mempo.ops.segment_attention import segment_attention
from mempo.segment_layout import SegmentLayout

ATTENTION_NAME = "mempo_segment"


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
    out = segment_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                            segment_layout, scale=scaling, backend=segment_backend)
    return out[None], None


def register_segment_attention() -> str:
    """Register the backend (idempotent) -> its attn_implementation name."""
    AttentionInterface.register(ATTENTION_NAME, hf_segment_attention)
    return ATTENTION_NAME
