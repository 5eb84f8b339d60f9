"""The paged KV pool: eviction and swapping through block tables, the memory budget, and
continuous batching under a budget that holds fewer rows than the batch."""
import pytest
import torch
from rollout_fixtures import dense_visibility_logprobs, tiny_model, tiny_world

from mempo.rollout import ContextPolicy, NativeEngine, SamplingParams, run_rollout
from mempo.rollout.kv_cache import KVBudgetError, PagedKVCache


def _live_kv(cache: PagedKVCache, row: int) -> torch.Tensor:
    """[planes, length, H, D]: the row's live keys/values in logical order, via its blocks."""
    slots = torch.tensor(cache.physical_slots(row, range(cache.lengths[row])), dtype=torch.long)
    return cache.pool.view(cache.pool.shape[0], -1, *cache.pool.shape[3:])[:, slots]


def _filled_cache(lengths, page=4, spare=3):
    cache = PagedKVCache(2, 2, 3, num_blocks=sum(-(-n // page) for n in lengths) + spare, block_size=page,
                         max_rows=len(lengths), max_row_tokens=64, dtype=torch.float64, device=torch.device("cpu"))
    cache.free = [int(b) for b in torch.randperm(cache.num_blocks)]
    rows = [cache.acquire_row() for _ in lengths]
    for r, n in zip(rows, lengths):
        cut = n // 2  # two reservations: ranges merge
        cache.reserve(r, 0, cut)
        cache.reserve(r, cut, n - cut)
    cache.pool.normal_()
    return cache, rows


def test_eviction_compacts_through_the_block_table_and_frees_blocks(seed):
    lengths = [13, 1, 30, 8]
    cache, rows = _filled_cache(lengths)
    before = {r: _live_kv(cache, r).clone() for r in rows}
    drops = {rows[0]: [(2, 5), (9, 11)], rows[2]: [(0, 3), (28, 30), (12, 20)], rows[3]: [(0, 8)]}
    free_before = len(cache.free)
    cache.evict_tokens(drops)
    for r, n in zip(rows, lengths):
        keep = [t for t in range(n) if not any(a <= t < b for a, b in drops.get(r, []))]
        assert cache.lengths[r] == len(keep)
        assert torch.equal(_live_kv(cache, r), before[r][:, keep])  # kept tokens, in order, bit for bit
        assert len(cache.blocks[r]) == -(-len(keep) // cache.block_size)  # trailing blocks returned
    assert cache.slot_ranges[rows[2]] == [(3, 12), (20, 28)] and cache.slot_ranges[rows[3]] == []
    assert len(cache.free) == free_before + (4 - 3) + (8 - 4) + 2


def test_swap_out_and_in_keeps_the_kv_bit_for_bit(seed):
    cache, rows = _filled_cache([10, 21])
    saved = _live_kv(cache, rows[1]).clone()
    ranges = list(cache.slot_ranges[rows[1]])
    handle = cache.swap_out(rows[1])
    assert rows[1] in cache.free_rows and cache.blocks[rows[1]] == []
    cache.reserve(rows[0], 10, 12)  # someone else takes blocks meanwhile
    row = cache.swap_in(handle)
    assert torch.equal(_live_kv(cache, row), saved) and cache.slot_ranges[row] == ranges
    assert not set(cache.blocks[row]) & set(cache.blocks[rows[0]])


def test_budget_too_small_for_one_row_names_the_option():
    model = tiny_model(300)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head dim x float32
    with pytest.raises(KVBudgetError) as err:
        NativeEngine(model, 2048, kv_cache_memory=1e-12).pool_blocks(4)
    message = str(err.value)
    assert "rollout.kv_cache_memory=1e-12" in message and "rollout.max_total_tokens=2048" in message
    assert len(message.splitlines()) == 1
    with pytest.raises(KVBudgetError, match="kv_cache_bytes"):
        NativeEngine(model, 2048, kv_cache_bytes=per_token * 2047).pool_blocks(4)
    assert NativeEngine(model, 2048, kv_cache_bytes=per_token * 2048).pool_blocks(4) == 2048 // 16
    assert NativeEngine(model, 2048, kv_cache_memory=100.0).pool_blocks(4) == 4 * 2048 // 16  # capped


def _forced(world, tasks):
    return [[t.model for t in e.turns] for e in world.expert_trajectories(tasks)]


@pytest.mark.parametrize("name", ["keep_all", "mempo"])
def test_a_small_budget_streams_the_batch_with_the_same_result(name):
    """A pool holding ~2 trajectories runs 6: rows wait and swap, finished rows make room,
    and every trajectory (tokens, segments, log-probs) is what the unbounded pool gives."""
    world, tok = tiny_world()
    tasks = world.tasks("heldout", num_objectives=4)[:6]
    model = tiny_model(len(tok), seed=3)
    params, policy = SamplingParams(max_new_tokens=256, max_total_tokens=800), ContextPolicy(name)
    free = NativeEngine(model, 800)
    ref = run_rollout(free, world.env(), tok, tasks, list(range(6)), policy, params, forced_turns=_forced(world, tasks))
    tight = NativeEngine(model, 800, kv_cache_bytes=512 * 1000, block_size=8)
    trajs = run_rollout(tight, world.env(), tok, tasks, list(range(6)), policy, params,
                        forced_turns=_forced(world, tasks))
    assert free.stats.peak_rows == 6 and free.stats.swaps == 0
    assert tight.stats.peak_kv_bytes <= tight.stats.pool_bytes == 512 * 1000 // (512 * 8) * 512 * 8
    if name == "keep_all":
        assert tight.stats.swaps > 0  # rows grew past the pool together: the youngest waited outside
    for a, b in zip(trajs, ref):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason == "answer"
        assert [(s.kind, s.start, s.end, s.dropped_at) for s in a.segments] == \
            [(s.kind, s.start, s.end, s.dropped_at) for s in b.segments]
        assert a.peak_context == b.peak_context
        torch.testing.assert_close(torch.tensor(a.sample_logprobs), torch.tensor(b.sample_logprobs), atol=1e-5, rtol=0)


def test_sampled_drops_under_a_tight_budget_keep_the_invariant():
    """Sampled turns after real drops, in a pool too small for the batch: what each token saw
    (through waits, swaps and block reuse) is what the single-pass replay sees."""
    world, tok = tiny_world()
    tasks = [t for t in world.tasks("train", num_objectives=1) if t.questions[0].startswith("Where was the mentor")][:3]
    experts = world.expert_trajectories(tasks)
    model = tiny_model(len(tok), seed=5)  # a seed whose three rows all sample long turns: they outgrow the pool
    engine = NativeEngine(model, 300, kv_cache_bytes=512 * 304, block_size=8)
    trajs = run_rollout(engine, world.env(), tok, tasks, [0, 1, 2], ContextPolicy("mempo"),
                        SamplingParams(temperature=1.0, max_new_tokens=60, max_total_tokens=300, seed=5),
                        forced_turns=[[t.model for t in e.turns[:2]] for e in experts])
    assert engine.stats.swaps > 0
    for traj in trajs:
        assert any(s.dropped_at is not None for s in traj.segments)
        mask = torch.tensor(traj.loss_mask[1:])
        recorded = torch.tensor(traj.sample_logprobs[1:])
        assert (dense_visibility_logprobs(model, traj)[mask] - recorded[mask]).abs().max() <= 1e-4


def test_a_prompt_longer_than_a_row_is_a_truncation_record():
    world, tok = tiny_world()
    tasks = world.tasks("train", num_objectives=1)[:2]
    prompt = len(tok(world.env().reset(tasks[:1])[0].prompt, add_special_tokens=False)["input_ids"])
    trajs = run_rollout(NativeEngine(tiny_model(len(tok)), prompt), world.env(), tok, tasks, [0, 1],
                        ContextPolicy(), SamplingParams(max_new_tokens=8, max_total_tokens=prompt))
    assert [t.finish_reason for t in trajs] == ["max_tokens", "max_tokens"]
    assert all(t.reward == 0.0 and not any(t.loss_mask) for t in trajs)


def test_a_row_that_outgrows_its_row_limit_ends_with_a_record_not_an_exception():
    """The engine's row limit below the trajectory limit: the row that reaches it is ended
    (finish_reason max_tokens, its turn closed), the others run on."""
    world, tok = tiny_world()
    tasks = world.tasks("heldout", num_objectives=4)[:2] + world.tasks("train", num_objectives=1)[:1]
    forced = _forced(world, tasks)
    trajs = run_rollout(NativeEngine(tiny_model(len(tok)), 300), world.env(), tok, tasks, [0, 1, 2],
                        ContextPolicy("keep_all"), SamplingParams(max_new_tokens=256, max_total_tokens=4096),
                        forced_turns=forced)
    assert [t.finish_reason for t in trajs] == ["max_tokens", "max_tokens", "answer"]
    for t in trajs[:2]:
        assert t.peak_context <= 300 and t.reward == 0.0 and len(t.turn_texts) == len(t.information_texts) >= 1


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
