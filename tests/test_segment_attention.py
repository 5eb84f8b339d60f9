"""segment_attention (Triton kernel under the interpreter, torch fallback) vs the float64
dense-mask reference: outputs and gradients of q, k, v."""
import numpy as np
import pytest
import torch
from layout_cases import random_layout, random_trajectory
from loss_cases import assert_within_low_precision_error

from mempo.ops.segment_attention import segment_attention
from mempo.ops.segment_blocks import layout_blocks
from mempo.ops.segment_layout import Segment, SegmentLayout
from mempo.reference.attention import segment_attention_reference


def _inputs(layout, hq, hkv, dim, dtype):
    L = layout.num_tokens
    return [torch.randn(L, h, dim, dtype=dtype, requires_grad=True) for h in (hq, hkv, hkv)]


def _check_against_reference(layout, hq, hkv, dim, dtype, atol, scale=None, **kw):
    q, k, v = _inputs(layout, hq, hkv, dim, dtype)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = segment_attention_reference(q64, k64, v64, layout, scale=scale)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out = segment_attention(q, k, v, layout, scale=scale, **kw)
    out.backward(grad.to(dtype))
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    for name, t, t64 in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        torch.testing.assert_close(t.grad.double(), t64.grad, atol=atol * 4, rtol=0, msg=f"grad {name}")


@pytest.mark.parametrize("hq, hkv, dim, blocks", [
    (2, 2, 16, (16, 16)),
    (4, 1, 32, (16, 32)),
    (6, 2, 64, (32, 16)),
    (2, 1, 128, (16, 16)),
])
def test_triton_matches_reference(seed, hq, hkv, dim, blocks):
    layout = random_layout(np.random.default_rng(seed), sequences=2, turns=3, max_len=12)
    _check_against_reference(layout, hq, hkv, dim, torch.float32, atol=2e-5, backend="triton", block_sizes=blocks)


def test_triton_ragged_head_dim_and_scale(seed):
    """head_dim 24 (padded to 32 in the kernel), custom scale, one-token sequences around."""
    segs, pos = random_trajectory(np.random.default_rng(seed), turns=2)
    one = [Segment("prompt", 0, 0, 1)]
    layout = SegmentLayout.from_segments([one, segs, one], [None, pos, None])
    _check_against_reference(layout, 4, 2, 24, torch.float32, atol=2e-5, scale=0.3, backend="triton")


def test_triton_self_only_tokens(seed):
    """Every token a segment of its own that sees nothing else: output = v of itself."""
    n = 37
    layout = SegmentLayout.from_tables([[1] * n], [np.zeros((n, n), bool)])
    q, k, v = _inputs(layout, 2, 1, 16, torch.float32)
    out = segment_attention(q, k, v, layout, backend="triton")
    torch.testing.assert_close(out, v.detach().expand(-1, 2, -1), atol=1e-6, rtol=0)
    _check_against_reference(layout, 2, 1, 16, torch.float32, atol=2e-5, backend="triton")


def test_triton_half_precision(seed):
    layout = random_layout(np.random.default_rng(seed), sequences=2, turns=2)
    _check_against_reference(layout, 4, 2, 32, torch.float16, atol=1e-2, backend="triton")


@pytest.mark.parametrize("hq, hkv, dim", [(4, 4, 64), (8, 2, 128), (3, 1, 16)])
def test_torch_fallback_matches_reference(seed, hq, hkv, dim):
    layout = random_layout(np.random.default_rng(seed), sequences=3, turns=5, max_len=15)
    _check_against_reference(layout, hq, hkv, dim, torch.float64, atol=1e-10, backend="torch")


def test_tile_skipping_follows_density(seed):
    """A 16-turn MemPO-like layout lists far fewer tiles than causal attention."""
    segs, start = [Segment("prompt", 0, 0, 64)], 64
    for turn in range(1, 17):
        for kind in ("think", "memory"):
            segs.append(Segment(kind, turn, start, start + 32))
            start += 32
    for i in range(1, len(segs) - 2):
        segs[i].dropped_at = segs[i + 2].start if segs[i].kind == "memory" else segs[i + 1].start
    layout = SegmentLayout.from_segments([segs])
    blocks = layout_blocks(layout, 16, 16)
    assert blocks.density < 0.3
    _check_against_reference(layout, 2, 1, 16, torch.float32, atol=2e-5, backend="triton")


def test_bad_inputs_raise():
    layout = SegmentLayout.from_segments([[Segment("prompt", 0, 0, 8)]])
    q, k = torch.randn(8, 4, 16), torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        segment_attention(q, torch.randn(8, 3, 16), torch.randn(8, 3, 16), layout)
    with pytest.raises(ValueError, match="layout has 8 tokens"):
        segment_attention(q[:7], k[:7], k[:7], layout)
    with pytest.raises(ValueError, match="share a dtype"):
        segment_attention(q, k.double(), k.double(), layout)
    with pytest.raises(ValueError, match="backend"):
        segment_attention(q, k, k, layout, backend="cuda")
    with pytest.raises(ValueError, match=r"q must be \[L, heads, head_dim\]"):
        segment_attention(q[None], k, k, layout)
    with pytest.raises(ValueError, match="powers of two"):
        segment_attention(q, k, k, layout, backend="triton", block_sizes=(16, 24))
    with pytest.raises(ValueError, match="float64"):
        segment_attention(q.double(), k.double(), k.double(), layout, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, dim", [(torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 128)])
def test_cuda_kernel_matches_reference(seed, dtype, dim):
    """The GPU path with its default 128 x 64 tiles on longer sequences."""
    layout = random_layout(np.random.default_rng(seed), sequences=3, turns=8, max_len=200).to("cuda")
    q, k, v = (torch.randn(layout.num_tokens, h, dim, device="cuda", dtype=dtype, requires_grad=True)
               for h in (8, 2, 2))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = segment_attention_reference(q64, k64, v64, layout)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out = segment_attention(q, k, v, layout)
    out.backward(grad.to(dtype))
    qp, kp, vp = (t.detach().requires_grad_() for t in (q, k, v))  # plain PyTorch in the same dtype
    pt = segment_attention_reference(qp, kp, vp, layout)
    pt.backward(grad.to(dtype))
    assert_within_low_precision_error(out, ref, pt, name="out")
    for name, t, t64, tp in (("dq", q, q64, qp), ("dk", k, k64, kp), ("dv", v, v64, vp)):
        assert_within_low_precision_error(t.grad, t64.grad, tp.grad, name=name)


@pytest.mark.parametrize("dtype", ["*bf16", "*fp32"])
def test_kernels_compile_for_h100(dtype):
    """Compile every kernel to an sm_90 cubin at the GPU tile sizes, without a GPU: catches
    what the interpreter lets through (non-constexpr globals, dot shapes, shared memory)."""
    import subprocess
    import sys
    code = f"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mempo.kernels import segment_attention as K
from mempo.ops.segment_attention import GPU_BLOCKS, GPU_BWD_BLOCKS
for kern, (bm, bn) in ((K._fwd_kernel, GPU_BLOCKS), (K._bwd_dkdv_kernel, GPU_BWD_BLOCKS),
                       (K._bwd_dq_kernel, GPU_BWD_BLOCKS)):
    consts = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=bm, BLOCK_N=bn,
                  PRECISION="ieee" if "{dtype}" == "*fp32" else None)
    sig = {{}}
    for n in kern.arg_names:
        sig[n] = ("constexpr" if n in consts else "fp32" if n in ("qk_scale", "scale") else
                  "i32" if n.startswith("stride") or n in ("W", "L") else
                  "{dtype}" if n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV") else
                  "*fp32" if n in ("LSE", "DELTA") else "*i32")
    src = ASTSource(kern, sig, constexprs={{(kern.arg_names.index(k),): v for k, v in consts.items()}})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=2))
    assert c.metadata.shared <= 227 * 1024, (kern.fn.__name__, c.metadata.shared)
    print(kern.fn.__name__, c.metadata.shared)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("\n") == 3


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
