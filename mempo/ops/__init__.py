"""Public fused ops of mempo (`import mempo.ops`). One op, one file:

    lm_head.py            linear_logprobs, linear_policy_loss (chunking, autograd Functions)
    policy_loss.py        PolicyLossOptions, MemPOAdvantages, surrogate, aggregation, policy_loss
    epilogue.py           the chunk epilogue's backends (Triton kernel, C++ extension, PyTorch)
    segment_attention.py  segment_attention (+ segment_layout.py, segment_blocks.py: its metadata)
    paged_attention.py    paged_attention over the rollout's paged KV pool (+ CacheWrite)
    kv_evict.py           evict_segments

- linear_logprobs: hidden states + LM head -> per-token log-probs (and entropy), chunked.
- policy_loss: clipped PPO/GRPO loss on given log-probs (MemPO advantages, KL, dual clip).
- linear_policy_loss: hidden states + LM head -> that loss in one pass (dX, dW in forward).
- MemPOAdvantages: the compact trajectory + memory advantage form both losses accept.
- segment_attention + SegmentLayout/Segment: packed varlen GQA attention under segment
  visibility (what each token saw at rollout), no L x L mask on the fast path.
- evict_segments: compact a rollout KV cache in place to the kept token ranges.
"""
from .kv_evict import evict_segments
from .lm_head import linear_logprobs, linear_policy_loss
from .policy_loss import KL_ESTIMATORS, LOSS_AGGREGATIONS, MemPOAdvantages, PolicyLossOptions, policy_loss
from .segment_attention import segment_attention
from .segment_layout import Segment, SegmentLayout

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "MemPOAdvantages",
    "PolicyLossOptions",
    "Segment",
    "SegmentLayout",
    "evict_segments",
    "linear_logprobs",
    "linear_policy_loss",
    "policy_loss",
    "segment_attention",
]
