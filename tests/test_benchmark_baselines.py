"""The baselines the benchmarks time are the computations they claim: the lean naive loss of
benchmarks/loss.py is mempo.reference's naive pipeline (value, gradients, entropy), and the
causal varlen row of benchmarks/attention.py is causal attention within each packed sequence."""
import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mempo.ops.segment_layout import SegmentLayout
from mempo.reference.logprobs import linear_policy_loss_reference, logprobs_reference

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("with_entropy", [False, True])
def test_lean_naive_loss_is_the_reference_pipeline(seed, with_entropy):
    loss_bench = load_benchmark("loss")
    n, h, v, seqs = 45, 8, 33, 5
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    seq_index = torch.arange(n) * seqs // n
    adv = torch.randn(seqs, dtype=torch.float64)[seq_index]
    mask = torch.rand(n) < 0.6
    mask[seq_index == 2] = False  # a sequence without loss tokens: not counted in the mean
    with torch.no_grad():
        logp, entropy_ref = logprobs_reference(hidden, weight, targets)
    old = logp + 0.3 * torch.randn(n, dtype=torch.float64)  # some tokens clip
    loss, entropy = loss_bench.naive_policy_loss(hidden, weight, targets, old, adv, mask, seq_index, seqs,
                                                 with_entropy=with_entropy)
    expected = linear_policy_loss_reference(hidden, weight, targets, old, adv, mask, seq_index)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, [hidden, weight])
    for g, g_ref in zip(grads, torch.autograd.grad(expected, [hidden, weight])):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    if with_entropy:
        torch.testing.assert_close(entropy, entropy_ref, rtol=1e-12, atol=1e-12)
        assert not entropy.requires_grad  # a metric, as in mempo
    else:
        assert entropy is None


def _layout(seed: int) -> SegmentLayout:
    attention = load_benchmark("attention")
    trajs = attention.batch_trajectories(np.random.default_rng(seed), 1500, 700)
    return SegmentLayout.from_segments(trajs)


def test_pair_counts_match_the_dense_masks(seed):
    attention = load_benchmark("attention")
    layout = _layout(seed)
    visible, causal = attention.visible_pairs(layout)
    assert visible == int(layout.dense_mask().sum())
    seq = torch.repeat_interleave(torch.arange(layout.num_sequences), torch.diff(layout.cu_seqlens.long()))
    idx = torch.arange(layout.num_tokens)
    assert causal == int(((seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])).sum())
    assert visible < causal


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2)])
def test_causal_varlen_is_causal_within_each_sequence(seed, hq, hkv):
    attention = load_benchmark("attention")
    layout = _layout(seed)
    L = layout.num_tokens
    name, fn = attention.causal_varlen_method(layout, hq, hkv, "cpu", torch.float32)
    assert "sdpa per sequence" in name  # flash-attn only on CUDA
    q, k, v = (torch.randn(L, h, 16, dtype=torch.float64) for h in (hq, hkv, hkv))
    seq = torch.repeat_interleave(torch.arange(layout.num_sequences), torch.diff(layout.cu_seqlens.long()))
    idx = torch.arange(L)
    mask = (seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                          enable_gqa=hq != hkv).transpose(0, 1)
    torch.testing.assert_close(fn(q, k, v), want, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_warm_start_benchmark_runs_as_documented(tmp_path):
    """`torchrun --nproc_per_node 2 benchmarks/warm_start.py` (README's benchmarks table) at a small
    model: both shardings timed on the same batches, the device named, the JSON written."""
    import json
    import subprocess
    import sys

    from small_runs import SMALL, free_port

    from mempo.host import cpu_description

    out = tmp_path / "warm_start.json"
    i = SMALL.index("--sft.steps")
    small = SMALL[:i] + SMALL[i + 2:]  # the benchmark counts its own steps
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(BENCHMARKS, "warm_start.py"), "--steps", "8", "--json", str(out), *small,
           "--trainer.run_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == cpu_description() and report["ranks"] == 2
    assert f"2 ranks on {cpu_description()}" in proc.stdout
    rows = {r["sharding"]: r for r in report["rows"]}
    assert len(rows) == 2 and all(r["steps"] == 2 and r["s_per_step"] > 0 for r in rows.values())
    assert all(r["slowest_rank_tokens"] > 0 for r in rows.values())
