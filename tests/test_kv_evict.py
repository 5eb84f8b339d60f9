"""evict_segments (mempo._C on CPU and CUDA, the PyTorch fallback) against the token-by-token
reference in mempo/reference/kv_evict.py: ragged shapes, overlapping moves, padding, edge cases, errors."""
import pytest
import torch

from mempo import _native
from mempo.ops import kv_evict
from mempo.ops.kv_evict import evict_segments
from mempo.reference.kv_evict import evict_segments as evict_reference

native = _native.native_ops()
needs_native = pytest.mark.skipif(native is None, reason=f"mempo._C unavailable: {_native.native_error()}")

# (planes, B, H_kv, T_max, D): 0 planes means a 4-D cache [B, H, T, D]. Ragged T and D;
# D * 2 bytes not a multiple of 16 for some (scalar paths), a multiple for others.
SHAPES = [(0, 1, 1, 1, 1), (0, 3, 2, 17, 3), (2, 2, 1, 40, 8), (4, 3, 2, 33, 5), (6, 2, 4, 100, 64)]
DTYPES = [torch.float32, torch.bfloat16]


def random_keep_ranges(batch: int, num_ranges: int, t_max: int) -> torch.Tensor:
    """[batch, num_ranges, 2] sorted disjoint ranges (some adjacent, some empty anywhere),
    then (0, 0) padding at the end of some rows, as a caller's padded batch would have."""
    cuts = torch.randint(0, t_max + 1, (batch, 2 * num_ranges)).sort(dim=1).values
    ranges = cuts.view(batch, num_ranges, 2).clone()
    pad = torch.randint(0, num_ranges + 1, (batch,))
    for b in range(batch):
        ranges[b, num_ranges - int(pad[b]):] = 0
    return ranges


def make_cache(shape, dtype, device="cpu"):
    planes, *rest = shape
    full = rest if planes == 0 else [planes, *rest]
    return torch.randn(full, device=device).to(dtype)


def check_against_reference(cache, ranges, evict=evict_segments):
    before = cache.clone()
    want = cache.clone()
    want_len = evict_reference(want, ranges)
    got_len = evict(cache, ranges)
    assert got_len.dtype == torch.int64 and torch.equal(got_len.cpu(), want_len.cpu())
    planes = cache.view(-1, *cache.shape[-4:])
    for b, n in enumerate(want_len.tolist()):
        kept = planes[:, b, :, :n]
        assert torch.equal(kept, want.view_as(planes)[:, b, :, :n]), f"sequence {b}"
        # Not part of the contract (stale values are allowed there) but true of every
        # backend: nothing at or past the new length is written.
        assert torch.equal(planes[:, b, :, n:], before.view_as(planes)[:, b, :, n:])
    # Direct statement of the contract for the first sequence: its kept tokens, in order.
    index = kv_evict.kept_token_index(ranges.cpu())[0].to(cache.device)
    assert torch.equal(planes[:, 0, :, : index.numel()], before.view_as(planes)[:, 0].index_select(2, index))


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_ranges", [1, 3, 8])
def test_native_cpu_matches_reference(seed, shape, dtype, num_ranges):
    cache = make_cache(shape, dtype)
    check_against_reference(cache, random_keep_ranges(shape[1], num_ranges, shape[3]))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ranges", [
    [[1, 200]],                     # move left by one token: every byte overlaps its source
    [[3, 4], [5, 180], [181, 200]],  # short hop, then long self-overlapping moves
    [[0, 10], [11, 12], [20, 200]],  # first range already in place
    [[150, 200], [0, 0], [0, 0]],    # far move with padding
], ids=["shift1", "hops", "prefix", "tail"])
def test_overlapping_moves(seed, dtype, ranges):
    cache = make_cache((2, 1, 3, 200, 24), dtype)
    check_against_reference(cache, torch.tensor([ranges]))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keep_all_keep_nothing_and_no_ranges(seed, dtype):
    cache = make_cache((2, 3, 2, 30, 8), dtype)
    before = cache.clone()
    keep_all = torch.tensor([[0, 30]] * 3).view(3, 1, 2)
    assert evict_segments(cache, keep_all).tolist() == [30, 30, 30]
    assert torch.equal(cache, before)
    assert evict_segments(cache, torch.zeros(3, 4, 2, dtype=torch.int64)).tolist() == [0, 0, 0]
    assert evict_segments(cache, torch.zeros(3, 0, 2, dtype=torch.int64)).tolist() == [0, 0, 0]
    assert evict_segments(cache, torch.tensor([[[5, 5], [9, 9]]] * 3)).tolist() == [0, 0, 0]
    assert torch.equal(cache, before)


@needs_native
def test_int32_ranges_and_lengths(seed):
    cache = make_cache((2, 2, 2, 50, 4), torch.float32)
    ranges = torch.tensor([[[2, 9], [12, 20]], [[0, 3], [0, 0]]], dtype=torch.int32)
    check_against_reference(cache, ranges.long(),
                            evict=lambda c, r: evict_segments(c, r.int(), lengths=torch.tensor([20, 3])))
    with pytest.raises(ValueError, match=r"keep_ranges\[0, 1\] = \(12, 20\).*<= 19"):
        evict_segments(cache, ranges, lengths=torch.tensor([19, 3]))


@pytest.mark.parametrize("ranges,match", [
    ([[[5, 9], [2, 4]]], "sorted and disjoint"),
    ([[[5, 9], [8, 12]]], "sorted and disjoint"),
    ([[[5, 9], [0, 0], [7, 12]]], "sorted and disjoint"),
    ([[[-1, 3]]], r"0 <= start <= end"),
    ([[[4, 3]]], r"0 <= start <= end"),
    ([[[4, 51]]], r"<= 50"),
])
def test_bad_ranges_raise(ranges, match):
    cache = make_cache((1, 1, 1, 50, 2), torch.float32)
    with pytest.raises(ValueError, match=match):
        evict_segments(cache, torch.tensor(ranges))


def test_bad_arguments_raise():
    cache = make_cache((1, 2, 1, 10, 2), torch.float32)
    with pytest.raises(ValueError, match=r"shape \[2, R, 2\]"):
        evict_segments(cache, torch.zeros(3, 1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int32/int64"):
        evict_segments(cache, torch.zeros(2, 1, 2))
    with pytest.raises(ValueError, match="contiguous"):
        evict_segments(cache.transpose(-1, -2), torch.zeros(2, 1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="B, H_kv, T_max, D"):
        evict_segments(cache[0, 0], torch.zeros(2, 1, 2, dtype=torch.int64))


@needs_native
def test_native_op_checks_its_own_inputs():
    """mempo._C.evict_segments_ called directly must refuse ranges that would write out of bounds."""
    cache = make_cache((1, 1, 1, 10, 2), torch.float32)
    with pytest.raises(IndexError, match=r"keep_ranges\[0, 0\] = \(3, 11\)"):
        native.evict_segments_(cache, torch.tensor([[[3, 11]]]))
    with pytest.raises(ValueError, match="sorted and disjoint"):
        native.evict_segments_(cache, torch.tensor([[[3, 6], [5, 7]]]))
    with pytest.raises(ValueError, match="int64"):
        native.evict_segments_(cache, torch.tensor([[[3, 6]]], dtype=torch.int32))


def test_fallback_when_disabled(seed, monkeypatch):
    """MEMPO_DISABLE_EXT=1: the PyTorch fallback runs (and gives the reference's answer)."""
    monkeypatch.setenv("MEMPO_DISABLE_EXT", "1")
    calls = []
    fallback = kv_evict._evict_torch
    monkeypatch.setattr(kv_evict, "_evict_torch", lambda c, r: calls.append(1) or fallback(c, r))
    cache = make_cache((2, 3, 2, 40, 8), torch.bfloat16)
    check_against_reference(cache, random_keep_ranges(3, 4, 40))
    assert calls == [1]


@needs_native
def test_native_path_is_taken(monkeypatch):
    monkeypatch.setattr(kv_evict, "_evict_torch", None)  # would fail if called
    cache = make_cache((1, 1, 1, 10, 2), torch.float32)
    assert evict_segments(cache, torch.tensor([[[2, 5]]])).tolist() == [3]


needs_cuda_ext = pytest.mark.skipif(native is None or not getattr(native, "has_cuda", False),
                                    reason="mempo._C built without CUDA")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dim", [1, 3, 4, 8, 64, 128])  # 2-16+ byte tokens: every vector width
def test_cuda_matches_reference(seed, dtype, dim):
    cache = make_cache((4, 3, 2, 300, dim), dtype, device="cuda")
    check_against_reference(cache, random_keep_ranges(3, 6, 300).cuda())


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_long_overlapping_moves(seed, dtype):
    """Ranges spanning many 16 KiB chunks, moved by less than a chunk: the chunked in-place
    move must read each chunk before any of it is overwritten."""
    cache = make_cache((2, 2, 2, 4096, 128), dtype, device="cuda")
    ranges = torch.tensor([[[1, 4000], [4001, 4096]], [[0, 100], [130, 4096]]], device="cuda")
    check_against_reference(cache, ranges)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_4d_cache_at_unaligned_address(seed):
    """A cache starting 2 bytes into its allocation: 16-byte vectors would be misaligned."""
    shape = (2, 2, 64, 8)
    flat = torch.randn(1 + 2 * 2 * 64 * 8, device="cuda").to(torch.bfloat16)
    cache = flat[1:].view(shape)
    assert cache.data_ptr() % 16 != 0
    check_against_reference(cache, random_keep_ranges(2, 3, 64).cuda())
