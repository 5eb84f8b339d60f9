"""The packed forward with segment visibility, through a stock Hugging Face model.

`segment_hidden` converts the packed batch's segment table into a `SegmentLayout` (bitset
rows, no mask tensor) and runs the base model once over the whole batch with
attn_implementation "mempo_segment": every attention layer calls
`mempo.ops.segment_attention`, i.e. the Triton flash kernel that skips invisible tiles on
CUDA and per-sequence SDPA on the CPU. No [L_total, L_total] tensor exists on either path.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from mempo.models.hf_attention import register_segment_attention
from mempo.rollout.native_engine import attention_implementation
from mempo.segment_layout import SegmentLayout

from .packed_batch import PackedBatch


def batch_layout(batch: PackedBatch) -> SegmentLayout:
    """The SegmentLayout of a packed batch (segment visibility from each segment's `sees`)."""
    lengths, visible, kinds, steps, positions = [], [], [], [], []
    for segs in batch.segments:
        n = len(segs)
        vis = np.zeros((n, n), dtype=bool)
        for i, seg in enumerate(segs):
            vis[i, seg.sees] = True
        lengths.append([s.end - s.start for s in segs])
        visible.append(vis)
        kinds.append([s.kind for s in segs])
        steps.append([s.step for s in segs])
        positions.append(batch.position_ids[segs[0].start:segs[-1].end])
    return SegmentLayout.from_tables(lengths, visible, positions, kinds, steps)


def segment_hidden(model, batch: PackedBatch, ids: Tensor, pos: Tensor) -> Tensor:
    """Hidden states [L, H] of the packed batch with segment visibility."""
    name = register_segment_attention()
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layout = batch_layout(batch).to(ids.device)
    with attention_implementation(model, name):
        out = base(input_ids=ids, position_ids=pos, use_cache=False, segment_layout=layout)
    return out.last_hidden_state[0]
