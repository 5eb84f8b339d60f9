"""Public fused ops of mempo (`import mempo.ops`).

- linear_logprobs: hidden states + LM head -> per-token log-probs (and entropy), chunked.
- policy_loss: clipped PPO/GRPO loss on given log-probs (MemPO advantages, KL, dual clip).
- linear_policy_loss: hidden states + LM head -> that loss in one pass (dX, dW in forward).
- MemPOAdvantages: the compact trajectory + memory advantage form both losses accept.
- segment_attention + SegmentLayout/Segment: packed varlen GQA attention under segment
  visibility (what each token saw at rollout), no L x L mask on the fast path.
- evict_segments: compact a rollout KV cache in place to the kept token ranges.
"""
from .linear_logprobs import linear_logprobs
from .linear_policy_loss import linear_policy_loss
from .loss_inputs import MemPOAdvantages
from .loss_options import KL_ESTIMATORS, LOSS_AGGREGATIONS, PolicyLossOptions
from .policy_loss import policy_loss
from .segment_attention import segment_attention
from .kv_evict import evict_segments
from mempo.segment_layout import Segment, SegmentLayout

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
