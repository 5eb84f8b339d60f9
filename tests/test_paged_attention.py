"""Paged attention over the rollout's block pool: the Triton kernel (interpreted on the CPU) and
the CPU gather + SDPA path against the plain reference, on ragged rows with shuffled blocks."""
import os
import subprocess
import sys

import pytest
import torch

from mempo.ops.paged_attention import CacheWrite
from mempo.ops.paged_attention import paged_attention as rollout_paged_attention
from mempo.reference.paged_attention import paged_attention as reference
from mempo.rollout.kv_cache import PagedKVCache

triton_runs = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="needs a GPU or TRITON_INTERPRET=1")


def _ragged_cache(lengths, counts, hq, hkv, d, page, dtype=torch.float32, device="cpu"):
    """A pool with rows of `lengths` live tokens (the last counts[i] of them this forward's new
    tokens), blocks handed out in shuffled order, stale random data everywhere else."""
    cache = PagedKVCache(1, hkv, d, num_blocks=sum(-(-n // page) for n in lengths) + 3, block_size=page,
                         max_rows=len(lengths) + 1, max_row_tokens=max(lengths) + page, dtype=dtype,
                         device=torch.device(device))
    cache.free = [int(b) for b in torch.randperm(cache.num_blocks)]  # not in order: the table matters
    rows = [cache.acquire_row() for _ in lengths][::-1]  # rows not 0..b-1 in order either
    firsts = [cache.reserve(r, 0, n) + n - c for r, n, c in zip(rows, lengths, counts)]
    cache.sync_table()
    cache.pool.normal_()
    total = sum(counts)
    q = torch.randn(total, hq, d, dtype=dtype, device=device)
    meta = torch.tensor(rows + firsts + list(counts), device=device).view(3, -1)
    w = CacheWrite.build(cache, meta[0], meta[1], meta[2], total, kv_len=max(lengths), max_count=max(counts))
    return cache, q, w


CASES = [  # (lengths, counts): decode steps, prefill chunks, a one-token row, block boundaries
    ([1], [1]),
    ([5, 17, 16, 33], [1, 1, 1, 1]),
    ([40, 7, 64], [9, 7, 1]),
    ([3, 31, 32, 1], [3, 2, 5, 1]),
]


@triton_runs
@pytest.mark.parametrize("lengths, counts", CASES)
@pytest.mark.parametrize("hq, hkv, d, page", [(4, 2, 16, 16), (3, 1, 24, 8)])
def test_triton_kernel_matches_reference(seed, lengths, counts, hq, hkv, d, page):
    from mempo.kernels.paged_attention import paged_attention

    cache, q, w = _ragged_cache(lengths, counts, hq, hkv, d, page)
    k, v = cache.layer(0)
    out = paged_attention(q, k, v, w.block_table, w.tok_row, w.tok_limit, d ** -0.5)
    ref = reference(q.double(), k.double(), v.double(), w.block_table, w.tok_row, w.tok_limit, d ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lengths, counts", CASES)
@pytest.mark.parametrize("hq, hkv, d, page", [(4, 2, 16, 16), (3, 1, 24, 8)])
def test_cpu_gather_path_matches_reference(seed, lengths, counts, hq, hkv, d, page):
    cache, q, w = _ragged_cache(lengths, counts, hq, hkv, d, page)
    k, v = cache.layer(0)
    out = rollout_paged_attention(q, k, v, w, d ** -0.5)
    ref = reference(q.double(), k.double(), v.double(), w.block_table, w.tok_row, w.tok_limit, d ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_reference_sees_only_the_row_prefix(seed):
    """The reference itself: changing a key past a token's limit, or in another row's block,
    changes nothing; changing a visible one does."""
    cache, q, w = _ragged_cache([20, 9], [4, 1], 2, 1, 8, 4)
    k, v = cache.layer(0)
    before = reference(q.double(), k.double(), v.double(), w.block_table, w.tok_row, w.tok_limit, 0.3)
    row0 = cache.blocks[int(w.rows[0])]
    k[row0[-1], 3] += 5.0  # slot 19 of row 0: only its last new token (limit 19) sees it
    after = reference(q.double(), k.double(), v.double(), w.block_table, w.tok_row, w.tok_limit, 0.3)
    changed = (after - before).abs().amax(dim=(1, 2)) > 1e-6
    assert changed.tolist() == [False, False, False, True, False]


def test_kernel_compiles_for_h100():
    """Compile the kernel to an sm_90 cubin at the rollout's GPU settings (bf16 pool, head dim
    128, GQA 7, block size 16), without a GPU: catches what the interpreter lets through."""
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mempo.kernels import paged_attention as P
kern = P._paged_attention_kernel
for dtype, page in (("*bf16", 16), ("*fp32", 256)):
    consts = dict(GROUP=7, HEAD_DIM=128, BLOCK_D=128, PAGE=page, BLOCK_N=P.BLOCK_N)
    sig = {n: "constexpr" if n in consts else "fp32" if n == "scale" else
           "i32" if n.startswith("stride") else dtype if n in ("Q", "K", "V", "O") else
           "*i32" if n == "BT" else "*i64" for n in kern.arg_names}
    src = ASTSource(kern, sig, constexprs={(kern.arg_names.index(k),): v for k, v in consts.items()})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert c.metadata.shared <= 227 * 1024, c.metadata
    print("ok", dtype, page)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("ok ") == 2, run.stdout


@pytest.mark.gpu
def test_triton_kernel_on_gpu_bf16(seed):
    from mempo.kernels.paged_attention import paged_attention

    cache, q, w = _ragged_cache([700, 33, 1, 4096], [1, 1, 1, 1], 14, 2, 64, 16, torch.bfloat16, "cuda")
    k, v = cache.layer(0)
    out = paged_attention(q, k, v, w.block_table, w.tok_row, w.tok_limit, 0.125)
    ref = reference(q.double(), k.double(), v.double(), w.block_table, w.tok_row, w.tok_limit, 0.125)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)


def test_cpu_path_is_finite_over_never_written_memory(seed):
    """The pool is torch.empty: a block's first user may find NaN bit patterns. The CPU path
    gathers whole blocks (and rows shorter than the longest) and masks scores, and 0 * NaN is
    NaN, so the cache zeroes a block the first time it hands it out."""
    cache = PagedKVCache(1, 1, 8, num_blocks=6, block_size=4, max_rows=2, max_row_tokens=16, dtype=torch.float32,
                         device=torch.device("cpu"))
    cache.pool.fill_(float("nan"))  # what uninitialised memory may hold
    rows = [cache.acquire_row(), cache.acquire_row()]
    for r, n in zip(rows, (9, 2)):
        cache.reserve(r, 0, n)
        slots = torch.tensor(cache.physical_slots(r, range(n)))
        cache.pool.view(2, -1, 1, 8)[:, slots] = torch.randn(2, n, 1, 8)  # only the live slots are written
    cache.sync_table()
    meta = torch.tensor([rows, [8, 1], [1, 1]])
    w = CacheWrite.build(cache, meta[0], meta[1], meta[2], 2, kv_len=9, max_count=1)
    k, v = cache.layer(0)
    q = torch.randn(2, 2, 8)
    out = rollout_paged_attention(q, k, v, w, 0.35)
    assert torch.isfinite(out).all()
    ref = reference(q.double(), k.double(), v.double(), w.block_table, w.tok_row, w.tok_limit, 0.35)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@triton_runs
def test_rollout_through_the_triton_kernel_keeps_the_invariant(monkeypatch):
    """The engine's GPU path end to end, interpreted: a forced rollout with real drops whose
    attention runs in the Triton kernel records the log-probs the dense replay gives."""
    from rollout_fixtures import dense_visibility_logprobs, tiny_model, tiny_world

    import mempo.ops.paged_attention as paged_attention_op
    from mempo.rollout import ContextPolicy, NativeEngine, SamplingParams, run_rollout

    monkeypatch.setattr(paged_attention_op, "BACKEND", "triton")
    world, tok = tiny_world()
    task = world.tasks("train", num_objectives=1)[0]
    (expert,) = world.expert_trajectories([task])
    model = tiny_model(len(tok), seed=1)
    (traj,) = run_rollout(NativeEngine(model, 1024), world.env(), tok, [task], [0], ContextPolicy("mempo"),
                          SamplingParams(max_new_tokens=128), forced_turns=[[t.model for t in expert.turns]])
    assert any(s.dropped_at is not None for s in traj.segments) and traj.finish_reason == "answer"
    mask = torch.tensor(traj.loss_mask[1:])
    recorded = torch.tensor(traj.sample_logprobs[1:])
    assert (dense_visibility_logprobs(model, traj)[mask] - recorded[mask]).abs().max() <= 1e-4
