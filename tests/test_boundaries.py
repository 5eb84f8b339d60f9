"""Misuse at the boundaries is a clear error or correct behaviour, never a silent wrong result."""
import math

import numpy as np
import pytest
import torch

import mempo.ops as ops
from mempo.config import ConfigError, parse_args
from mempo.ops import Segment, SegmentLayout, segment_attention
from mempo.reference.attention import segment_attention_reference
from mempo.rollout.kv_cache import PagedKVCache


def test_from_tables_accepts_bool_or_0_1_only():
    vis = np.array([[1, 0], [1, 1]])
    same = SegmentLayout.from_tables([[2, 3]], [vis.astype(bool)])
    assert torch.equal(SegmentLayout.from_tables([[2, 3]], [vis]).visible_bits, same.visible_bits)
    additive = np.array([[0.0, -np.inf], [0.0, 0.0]])  # an additive mask: would be inverted by a bool cast
    with pytest.raises(ValueError, match=r"visible\[0\] must be bool or hold only 0 and 1.*additive"):
        SegmentLayout.from_tables([[2, 3]], [additive])
    with pytest.raises(ValueError, match="must be bool or hold only 0 and 1"):
        SegmentLayout.from_tables([[2, 3]], [np.array([[1, 0.5], [1, 1]])])
    with pytest.raises(ValueError, match=r"segment_lengths\[0\].*at least one token"):
        SegmentLayout.from_tables([[0, 0]], [vis])


def test_sees_must_index_the_sequence():
    segs = [Segment("prompt", 0, 0, 2), Segment("memory", 1, 2, 4), Segment("probe", 1, 4, 6, sees=[-2])]
    with pytest.raises(ValueError, match=r"sequences\[0\]\[2\].sees must hold segment indices in \[0, 3\)"):
        SegmentLayout.from_segments([segs])


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


def test_policy_loss_ignores_nonfinite_masked_tokens_and_nonfinite_options(seed):
    n = 9
    logp = torch.randn(n, dtype=torch.float64, requires_grad=True)
    old, adv = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1])
    seq = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    clean, _ = ops.policy_loss(logp, old, adv, mask, seq_index=seq)
    (grad_clean,) = torch.autograd.grad(clean, logp)
    dirty_old, dirty_adv = old.clone(), adv.clone()
    dirty_old[2], dirty_adv[4], dirty_old[7] = float("nan"), float("inf"), -float("inf")
    dirty, metrics = ops.policy_loss(logp, dirty_old, dirty_adv, mask, seq_index=seq)
    (grad_dirty,) = torch.autograd.grad(dirty, logp)
    assert torch.equal(dirty, clean) and torch.equal(grad_dirty, grad_clean)
    assert all(math.isfinite(float(v)) for v in metrics.values())
    for bad in ({"clip_high": float("nan")}, {"kl_coef": float("nan")}, {"clip_low": float("nan")},
                {"dual_clip": float("inf")}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a finite number"):
            ops.policy_loss(logp, old, adv, mask, seq_index=seq, **bad)
    with pytest.raises(ValueError, match="mem_coef must be a finite number"):
        ops.MemPOAdvantages(torch.zeros(3), seq, torch.zeros(1), torch.full((n,), -1), mem_coef=float("nan"))


@pytest.mark.parametrize("temperature, scale", [(1e-10, 0.1), (0.7, 2e9), (1.0, 3e9)])
def test_native_epilogue_extreme_logits_over_temperature(temperature, scale):
    from mempo.ops.epilogue import available_backends, epilogue_stats

    if "native" not in available_backends(torch.device("cpu")):
        pytest.skip("mempo._C is not built")
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * scale
    targets = torch.randint(0, 300, (6,))
    ref = torch.log_softmax(logits.double() / temperature, -1).gather(1, targets[:, None]).squeeze(1)
    for backend in ("native", "torch"):
        lse, logp, _ = epilogue_stats(backend, logits.clone(), targets, 1.0 / temperature, False)
        assert torch.isfinite(lse).all() and (logp <= 0).all(), backend
        # float32 cannot resolve z ~ 1e9 finer than its spacing (64): compare at that scale
        assert (logp.double() - ref).abs().max() <= 1e-6 * ref.abs().max() + 256, backend


def test_kv_cache_rejects_bad_drops_without_changing_state():
    cache = PagedKVCache(1, 1, 4, num_blocks=8, block_size=4, max_rows=2, max_row_tokens=16, dtype=torch.float32,
                         device=torch.device("cpu"))
    for row in (cache.acquire_row(), cache.acquire_row()):
        cache.reserve(row, 0, 8)
    cache.pool.copy_(torch.arange(cache.pool.numel(), dtype=torch.float32).view_as(cache.pool))
    before = (cache.pool.clone(), list(cache.lengths), [list(r) for r in cache.slot_ranges], list(cache.free))
    for drops, message in (({2: [(0, 2)]}, "row 2 is not a live row"), ({0: [(-3, 2)]}, "0 <= start <= end"),
                           ({0: [(4, 2)]}, "0 <= start <= end"), ({-1: [(0, 1)]}, "row -1")):
        with pytest.raises(ValueError, match=message):
            cache.evict_tokens({1: [(0, 1)], **drops})
        assert torch.equal(cache.pool, before[0]) and cache.lengths == before[1]
        assert cache.slot_ranges == before[2] and cache.free == before[3]
    cache.evict_tokens({0: [(2, 4)]})
    assert cache.lengths == [6, 8] and cache.slot_ranges[0] == [(0, 2), (4, 8)]


@pytest.mark.parametrize("argv, message", [
    (["--trainer.name", ".."], "trainer.name must be a non-empty name without"),
    (["--trainer.name", "."], "trainer.name must be a non-empty name without"),
    (["--optimizer.lr", "inf"], "optimizer.lr must be finite"),
    (["--rollout.temperature", "inf"], "rollout.temperature must be finite"),
    (["--sft.lr", "nan"], "sft.lr must be finite"),
    (["--optimizer.betas", "0.9,nan"], "optimizer.betas must be finite"),
])
def test_config_rejects_escaping_names_and_nonfinite_numbers(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_expert_turns_beyond_max_turns_is_a_setup_error():
    from mempo.training.task_side import SetupError, build_task_side

    with pytest.raises(SetupError, match=r"rollout.max_turns=2 is too small .*the expert needs 4 turns"):
        build_task_side(parse_args(["--rollout.max_turns", "2", "--env.train_objectives", "2"]))


def test_triton_backend_on_cpu_tensors_without_the_interpreter_is_clear(monkeypatch):
    layout = SegmentLayout.from_segments([[Segment("prompt", 0, 0, 4)]])
    q = torch.randn(4, 2, 16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors, got q on cpu"):
        segment_attention(q, q, q, layout, backend="triton")


@pytest.mark.parametrize("where", ["k", "v"])
def test_cpu_attention_nan_in_a_future_token_stays_there(seed, where):
    segs = [Segment("prompt", 0, 0, 6), Segment("memory", 1, 6, 9), Segment("action", 1, 9, 14, )]
    layout = SegmentLayout.from_segments([segs, [Segment("prompt", 0, 0, 5)]])
    L = layout.num_tokens
    q, k, v = (torch.randn(L, 4, 16, dtype=torch.float64) for _ in range(3))
    ref = segment_attention_reference(q, k, v, layout)  # rows that do not see token 11 ignore its value
    (k if where == "k" else v)[11] = float("nan")
    out = segment_attention(q, k, v, layout, backend="torch")
    sees = layout.dense_mask()[:, 11]
    assert torch.isnan(out[sees]).all() and not torch.isnan(out[~sees]).any()
    torch.testing.assert_close(out[~sees], ref[~sees])
