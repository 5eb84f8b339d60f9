"""Full (unsharded) weights for the rollout, whatever the FSDP2 sharding.

The rollout runs hundreds of small forwards through the decoder directly (not through the
root module), so under FSDP2 the root's parameters (embeddings, final norm, LM head)
would stay sharded and every layer would all-gather and free its weights once per
generated token. Unsharding every FSDP module once for the whole rollout, with
resharding after forward switched off, costs one all-gather per layer per step instead.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _fsdp_modules(model: nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights(model: nn.Module):
    """Within the block, every FSDP2 module of `model` holds its full parameters."""
    modules = _fsdp_modules(model)
    if not modules:
        yield
        return
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def initialise_root(model: nn.Module, batch) -> None:
    """Run the root module once (no gradient), then reshard everything.

    FSDP2 initialises lazily at the root's first forward; the rollout calls the decoder
    layers directly, which would make each layer initialise as a root of its own. Call this
    after building the optimizer (which must hold the sharded parameters)."""
    modules = _fsdp_modules(model)
    if not modules:
        return
    with torch.no_grad():
        model(batch)
    for m in modules:
        m.reshard()
