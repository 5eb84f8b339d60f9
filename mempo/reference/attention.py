"""Naive segment-visibility attention: a dense [L, L] mask and an explicit softmax.

The reference that tests and benchmarks compare `mempo.ops.segment_attention` with.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mempo.ops.segment_layout import SegmentLayout


def segment_attention_reference(q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout,
                                scale: float | None = None) -> Tensor:
    """q: [L, Hq, D], k/v: [L, Hkv, D] -> [L, Hq, D], in q's dtype (use float64 for tests)."""
    hq, hkv, dim = q.shape[1], k.shape[1], q.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~layout.dense_mask().to(q.device), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
