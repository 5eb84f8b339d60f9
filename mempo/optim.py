"""AdamW and its learning-rate schedule (linear warmup, then constant or cosine).

Build the optimizer after `shard_model`: it must hold the sharded (DTensor) parameters.
The schedule is a LambdaLR, so its state is one step counter and checkpoints restore it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mempo.config import OptimizerConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; lr overrides cfg.lr (the SFT warm start)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.lr if lr is None else lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, scheduler: str = "constant",
                  min_lr_ratio: float = 0.0, decay_steps: int = 0) -> float:
    """Factor on the peak lr before optimizer step `step` (0-based). constant with decay_steps > 0:
    warmup-stable-decay, the last decay_steps steps (at most those after warmup) go linearly
    towards 0 (the last one at 1/decay_steps)."""
    if scheduler not in ("constant", "cosine"):
        raise ValueError(f"scheduler must be 'constant' or 'cosine', got {scheduler!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        decay_steps = min(decay_steps, total_steps - warmup_steps)
        return min(1.0, (total_steps - step) / decay_steps) if decay_steps > 0 else 1.0
    span = max(1, total_steps - warmup_steps)  # cosine: the whole run after warmup
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_steps: int = 0,
                       scheduler: str = "constant", min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, scheduler, min_lr_ratio))
