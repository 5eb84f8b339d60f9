"""Shared tiny world, tokenizer and random-init Qwen2 for the rollout/training tests."""
from __future__ import annotations

import functools

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mempo.reference.visibility import visible_keys


@functools.lru_cache(maxsize=1)
def tiny_world():
    from mempo.envs import build_tiny_world, tiny_world_tokenizer

    world = build_tiny_world(seed=0)
    return world, tiny_world_tokenizer(world)


def tiny_model(vocab_size: int, seed: int = 0, init_std: float = 0.2, num_heads: int = 4,
               num_kv_heads: int = 2) -> Qwen2ForCausalLM:
    """float32, eval mode; a large init std makes attention sharp, so visibility errors
    show up as large log-prob differences. hidden 64: head_dim = 64 / num_heads."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, max_position_embeddings=4096,
                      initializer_range=init_std, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def dense_visibility_logprobs(model, traj, causal: bool = False) -> torch.Tensor:
    """Per-token log-probs [L-1] of one trajectory from a forward with a dense [L, L]
    boolean mask built from `mempo.reference.visibility.visible_keys` (or plain causal): the slow reference."""
    L = len(traj)
    ids = torch.tensor([traj.token_ids])
    mask = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        if causal:
            mask[q, : q + 1] = True
        else:
            mask[q, visible_keys(traj.segments, q)] = True
    with torch.no_grad():
        out = model(ids, position_ids=torch.arange(L)[None], attention_mask=mask[None, None])
    return out.logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
