"""Hugging Face glue used by training and rollout alike: one way to reach a causal LM's
decoder and LM head, and to switch its attention function for a block."""
from __future__ import annotations

from contextlib import contextmanager

from torch import Tensor, nn


def decoder_of(model: nn.Module) -> nn.Module:
    """The base model under a causal LM's head (`Qwen2ForCausalLM.model`, ...)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def lm_head_weight(model: nn.Module) -> Tensor:
    """The LM head's weight [V, H] (tied to the embeddings or not)."""
    return model.get_output_embeddings().weight


@contextmanager
def attention_implementation(model: nn.Module, name: str):
    """Within the block, `model` runs the registered attention function `name` (a config string)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
