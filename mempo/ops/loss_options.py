"""Options of the clipped policy loss, validated once and shared by every backend."""
from __future__ import annotations

import math
from dataclasses import dataclass

LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",  # GRPO / MemPO default
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",  # Dr. GRPO
)
KL_ESTIMATORS = ("k1", "k2", "k3")
# exp() of a log-ratio beyond this is clamped, as verl does: a finite ratio keeps the
# gradient finite when a token's probability collapsed between rollout and update.
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class PolicyLossOptions:
    """clip_low / clip_high: asymmetric PPO clip range [1 - clip_low, 1 + clip_high].
    dual_clip: lower bound c > 1 on the loss of negative-advantage tokens (None = off).
    kl_coef / kl_estimator: KL(pi || pi_ref) penalty added per token (k1, k2 or k3).
    loss_agg: how token losses become one number (see LOSS_AGGREGATIONS).
    num_global_tokens / num_global_seqs: data-parallel normalisers (the counts over all
      ranks); None uses this batch's own counts.
    seq_norm_len: Dr. GRPO's constant length; None uses the longest sequence of the batch."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "seq-mean-token-mean"
    num_global_tokens: int | None = None
    num_global_seqs: int | None = None
    seq_norm_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high", "dual_clip", "kl_coef"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        for name in ("num_global_tokens", "num_global_seqs", "seq_norm_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int (or None), got {value!r}")

    @property
    def kl_kind(self) -> int:
        """0 = no KL term, else 1/2/3 for k1/k2/k3 (the Triton kernel's constexpr)."""
        return 0 if self.kl_coef == 0.0 else KL_ESTIMATORS.index(self.kl_estimator) + 1
