"""The policy network: a small Qwen2 built from the config, or a local Hugging Face checkpoint.

No hub access: `model.path` must be a local directory. Weights load in float32 - they are
the optimizer's master weights; FSDP's mixed-precision policy casts them for compute.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from mempo.config import ModelConfig


class ModelLoadError(ValueError):
    """model.path does not hold a loadable Hugging Face causal LM."""


def tiny_qwen2_config(cfg: ModelConfig, vocab_size: int, *, bos_token_id: int | None = None,
                      eos_token_id: int | None = None, pad_token_id: int | None = None):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        attn_implementation=cfg.attn_implementation,
    )


def _check_checkpoint_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise ModelLoadError(f"model.path {path!r} is not a directory")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelLoadError(f"model.path {path!r} holds no config.json (expected a Hugging Face model directory)")
    try:
        with open(config_file) as f:
            json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {config_file!r}: {err}") from None
    names = os.listdir(path)
    if not any(n.endswith((".safetensors", ".bin")) or n.endswith(".index.json") for n in names):
        raise ModelLoadError(f"model.path {path!r} holds no weights (*.safetensors or *.bin)")


def build_model(cfg: ModelConfig, vocab_size: int | None = None, *, tokenizer=None,
                seed: int | None = None) -> nn.Module:
    """-> a float32 causal LM on the CPU (move or shard it afterwards).

    cfg.path None: a fresh Qwen2 of cfg's sizes over `vocab_size` ids (or len(tokenizer));
    special-token ids come from `tokenizer` when given. seed: makes the init reproducible
    (all ranks must start from the same weights before sharding).
    cfg.path set: that local checkpoint, with cfg.attn_implementation."""
    if cfg.path is not None:
        return load_pretrained(cfg.path, cfg.attn_implementation)
    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("build_model needs vocab_size or tokenizer when model.path is None")
        vocab_size = len(tokenizer)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    from transformers import Qwen2ForCausalLM

    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = tiny_qwen2_config(cfg, vocab_size, **ids)
    if seed is not None:
        torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    return model


def load_pretrained(path: str, attn_implementation: str = "sdpa") -> nn.Module:
    """A local Hugging Face causal LM in float32, or ModelLoadError naming the path."""
    _check_checkpoint_dir(path)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                     attn_implementation=attn_implementation)
    except Exception as err:  # safetensors, torch and transformers each raise their own types
        raise ModelLoadError(f"cannot load the model at model.path {path!r}: {err}") from err
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
