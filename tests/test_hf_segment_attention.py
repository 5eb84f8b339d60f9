"""A stock HF model with attn_implementation="mempo_segment": one packed forward over a
trajectory (drops + probes) gives the log-probs of replaying it segment by segment on a KV
cache from which dropped segments were evicted, at the original positions."""
import numpy as np
import pytest
import torch
from layout_cases import random_trajectory
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mempo.models.hf_attention import register_segment_attention
from mempo.ops.segment_layout import Segment, SegmentLayout

VOCAB = 101


def _tiny_model(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = (Qwen2ForCausalLM(Qwen2Config(**common)) if family == "qwen2"
             else LlamaForCausalLM(LlamaConfig(**common)))
    return model.float().eval()


def _separate_logprobs(model, ids: torch.Tensor, pos: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """Replay the rollout segment by segment: each segment runs on a KV cache holding exactly
    the keys/values of the earlier segments it sees, as they were computed when those were
    generated (eviction keeps keys, it does not recompute them), at the original positions.
    -> [L, V] log-probs of the packed rows."""
    model.set_attn_implementation("sdpa")
    vis = layout.visible_segments()
    bounds = layout.segment_bounds.tolist()
    layers = model.config.num_hidden_layers
    kv = [[None] * len(bounds) for _ in range(layers)]  # per layer, per segment: (k, v) [1, Hkv, n, D]
    out = torch.zeros(len(ids), VOCAB)
    for a, (s0, s1) in enumerate(bounds):
        if s1 == s0:
            continue
        seen = [b for b in range(a) if vis[a, b] and bounds[b][1] > bounds[b][0]]
        cache = DynamicCache()
        past = 0
        if seen:
            for layer in range(layers):
                cache.update(torch.cat([kv[layer][b][0] for b in seen], 2),
                             torch.cat([kv[layer][b][1] for b in seen], 2), layer)
            past = cache.get_seq_length()
        n = s1 - s0
        with torch.no_grad():
            logits = model(input_ids=ids[s0:s1][None], position_ids=pos[s0:s1][None], past_key_values=cache,
                           attention_mask=torch.ones(1, past + n, dtype=torch.long), use_cache=True).logits[0]
        for layer in range(layers):
            kv[layer][a] = (cache.layers[layer].keys[:, :, past:], cache.layers[layer].values[:, :, past:])
        out[s0:s1] = torch.log_softmax(logits, dim=-1)
    return out


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_packed_forward_equals_separate_contexts(seed, family):
    torch.manual_seed(seed)
    model = _tiny_model(family)
    segs, pos = random_trajectory(np.random.default_rng(seed), turns=4, max_len=8, probes=2)
    for s in segs[1:]:  # make sure something is dropped, so causal attention cannot match
        if s.kind == "think" and s.dropped_at is None:
            s.dropped_at = segs[-3].start
    layout = SegmentLayout.from_segments([segs], [pos])
    ids = torch.randint(0, VOCAB, (layout.num_tokens,))
    positions = layout.position_ids
    expected = _separate_logprobs(model, ids, positions, layout)

    model.set_attn_implementation(register_segment_attention())
    with torch.no_grad():
        logits = model(input_ids=ids[None], position_ids=positions[None], segment_layout=layout).logits[0]
    torch.testing.assert_close(torch.log_softmax(logits, -1), expected, atol=1e-5, rtol=0)

    model.set_attn_implementation("sdpa")  # plain causal attention on the same packed row
    with torch.no_grad():
        causal = model(input_ids=ids[None], position_ids=positions[None],
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    assert (torch.log_softmax(causal, -1) - expected).abs().max() > 1e-3


def test_packed_forward_triton_backend(seed):
    """The same equivalence through the Triton kernel (interpreter), gradients flowing."""
    torch.manual_seed(seed)
    model = _tiny_model("qwen2")
    segs, pos = random_trajectory(np.random.default_rng(seed), turns=2, max_len=8, probes=1)
    layout = SegmentLayout.from_segments([segs], [pos])
    ids = torch.randint(0, VOCAB, (layout.num_tokens,))
    expected = _separate_logprobs(model, ids, layout.position_ids, layout)
    model.set_attn_implementation(register_segment_attention())
    logits = model(input_ids=ids[None], position_ids=layout.position_ids[None], segment_layout=layout,
                   segment_backend="triton").logits[0]
    torch.testing.assert_close(torch.log_softmax(logits, -1).detach(), expected, atol=1e-5, rtol=0)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.model.layers[0].self_attn.parameters())


def test_missing_layout_raises():
    model = _tiny_model("qwen2")
    model.set_attn_implementation(register_segment_attention())
    with pytest.raises(ValueError, match="segment_layout"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_hf_backend_rejects_padding_masks_and_foreign_positions():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mempo.models.hf_attention import register_segment_attention

    register_segment_attention()
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation="mempo_segment")
    model = Qwen2ForCausalLM(cfg)
    layout = SegmentLayout.from_segments([[Segment("prompt", 0, 0, 5), Segment("action", 1, 5, 8)]],
                                         position_ids=[[0, 1, 2, 3, 4, 9, 10, 11]])
    ids = torch.randint(0, 40, (1, 8))
    pos = layout.position_ids[None]
    ref = model(input_ids=ids, position_ids=pos, segment_layout=layout).logits
    ones = model(input_ids=ids, position_ids=pos.clone(), segment_layout=layout,
                 attention_mask=torch.ones(1, 8, dtype=torch.long)).logits
    assert torch.equal(ref, ones)
    with pytest.raises(ValueError, match="takes no padding: the 2-D attention_mask has zeros"):
        model(input_ids=ids, position_ids=pos, segment_layout=layout, attention_mask=torch.tensor([[1] * 7 + [0]]))
    with pytest.raises(ValueError, match=r"position_ids differ from segment_layout.position_ids"):
        model(input_ids=ids, segment_layout=layout)  # transformers' default 0..7 is not the layout's
