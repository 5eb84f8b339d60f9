"""The CUDA KV eviction kernel (csrc/cuda/kv_evict.cu, reached through
mempo.ops.kv_evict.evict_segments) on a GPU: it must be built (a GPU check that silently ran
the PyTorch fallback would prove nothing) and match the gather-and-copy reference on a
rollout-sized cache with MemPO-like, ragged keep ranges (the contract as the reference states
it: each row's kept tokens in order, as mempo.reference.kv_evict writes them; nothing past the new
length written).
The same checks run on the CPU through the C++ path at small shapes."""
import pytest
import torch

from mempo import _native
from mempo.ops import kv_evict
from mempo.ops.kv_evict import evict_segments
from mempo.reference.kv_evict import evict_segments as evict_reference


def mempo_keep_ranges(batch: int, t_max: int, prompt: int, generator: torch.Generator):
    """[batch, 4, 2] ranges of a MemPO fold per row: the prompt, the newest memory, the turn
    being written, padding; plus each row's current length (ragged)."""
    ranges, lengths = torch.zeros(batch, 4, 2, dtype=torch.int64), torch.empty(batch, dtype=torch.int64)
    for b in range(batch):
        length = int(torch.randint(t_max // 2, t_max + 1, (1,), generator=generator))
        mem_start = int(torch.randint(prompt, length - 2, (1,), generator=generator))
        mem_end = int(torch.randint(mem_start + 1, length, (1,), generator=generator))
        tail = int(torch.randint(mem_end, length + 1, (1,), generator=generator))
        ranges[b, :3] = torch.tensor([[0, prompt], [mem_start, mem_end], [tail, length]])
        lengths[b] = length
    return ranges, lengths


def check_eviction(device: str, planes: int, batch: int, heads: int, t_max: int, dim: int, dtype):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    cache = torch.randn(planes, batch, heads, t_max, dim, device=device).to(dtype)
    ranges, lengths = mempo_keep_ranges(batch, t_max, prompt=min(512, t_max // 8), generator=g)
    before = cache.clone()
    got_len = evict_segments(cache, ranges.to(device), lengths.to(device))
    assert torch.equal(got_len.cpu(), (ranges[..., 1] - ranges[..., 0]).sum(-1))
    want = before.cpu().clone()
    for b, n in enumerate(evict_reference(want, ranges).tolist()):
        assert torch.equal(cache[:, b, :, :n].cpu(), want[:, b, :, :n]), f"sequence {b}"
        assert torch.equal(cache[:, b, :, n:], before[:, b, :, n:]), f"sequence {b} wrote past its new length"


@pytest.mark.skipif(_native.native_ops() is None, reason="mempo._C unavailable")
def test_cpu_native_eviction_mempo_ranges(seed, monkeypatch):
    monkeypatch.setattr(kv_evict, "_evict_torch", None)  # the C++ path must run
    check_eviction("cpu", planes=4, batch=3, heads=2, t_max=200, dim=24, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_cuda_kernel_is_built():
    ops = _native.native_ops()
    assert ops is not None and ops.has_cuda, (
        f"mempo._C {'is unavailable (' + str(_native.native_error()) + ')' if ops is None else 'lacks CUDA'}: "
        "build it on this machine (`pip install --no-build-isolation -e .` or `python setup.py build_ext "
        "--inplace`); without it evict_segments falls back to PyTorch and the CUDA kernel goes untested")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, heads, dim", [(torch.bfloat16, 4, 128), (torch.float16, 2, 64),
                                               (torch.float32, 3, 40)], ids=str)
def test_cuda_kernel_rollout_sized_cache(seed, monkeypatch, dtype, heads, dim):
    """28 layers x K/V, 16 rows of 4096 tokens (bf16: 3.5 GiB), through the CUDA kernel."""
    ops = _native.native_ops()
    if ops is None or not ops.has_cuda:
        pytest.fail("mempo._C with CUDA is not built (see test_cuda_kernel_is_built)")
    monkeypatch.setattr(kv_evict, "_evict_torch", None)  # a fallback would raise here
    check_eviction("cuda", planes=56, batch=16, heads=heads, t_max=4096, dim=dim, dtype=dtype)
