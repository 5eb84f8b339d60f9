"""SegmentLayout builders and tile tables vs brute-force token-level visibility."""

import numpy as np
import pytest
import torch
from layout_cases import random_layout, random_trajectory

from mempo.ops.segment_blocks import build_blocks
from mempo.ops.segment_layout import Segment, SegmentLayout


def brute_force_mask(sequences: list[list[Segment]]) -> torch.Tensor:
    """Token-level rule straight from the issue: k <= q and k's segment not dropped at q."""
    blocks = []
    for segs in sequences:
        n = segs[-1].end
        seg_of = [i for i, s in enumerate(segs) for _ in range(s.start, s.end)]
        m = torch.zeros(n, n, dtype=torch.bool)
        for q in range(n):
            sq = segs[seg_of[q]]
            for k in range(q + 1):
                sk = segs[seg_of[k]]
                if sq.sees is not None:
                    m[q, k] = seg_of[k] in sq.sees or seg_of[k] == seg_of[q]
                else:
                    m[q, k] = sk.dropped_at is None or q < sk.dropped_at
        blocks.append(m)
    return torch.block_diag(*blocks).bool()


def test_from_segments_matches_token_rule(seed):
    rng = np.random.default_rng(seed)
    trajs = [random_trajectory(rng, turns=int(rng.integers(1, 6))) for _ in range(4)]
    layout = SegmentLayout.from_segments([t[0] for t in trajs], [t[1] for t in trajs])
    assert torch.equal(layout.dense_mask(), brute_force_mask([t[0] for t in trajs]))
    assert torch.equal(layout.position_ids, torch.from_numpy(np.concatenate([t[1] for t in trajs])))
    assert layout.cu_seqlens.tolist() == [0, *np.cumsum([t[0][-1].end for t in trajs]).tolist()]


def test_many_segments_span_several_words(seed):
    rng = np.random.default_rng(seed)
    segs, pos = random_trajectory(rng, turns=25, max_len=3)  # > 64 segments -> 3 words
    small, small_pos = random_trajectory(rng, turns=1)
    layout = SegmentLayout.from_segments([segs, small], [pos, small_pos])
    assert layout.visible_bits.shape[1] == -(-len(segs) // 32) >= 3
    assert torch.equal(layout.dense_mask(), brute_force_mask([segs, small]))


def test_from_tables_arbitrary_visibility(seed):
    rng = np.random.default_rng(seed)
    lengths = [rng.integers(0, 5, size=n).tolist() for n in (6, 3)]
    for lens in lengths:
        lens[0] += 1
    tables = [rng.random((len(x), len(x))) < 0.5 for x in lengths]
    layout = SegmentLayout.from_tables(lengths, tables)
    mask = layout.dense_mask()
    off = 0
    for lens, table in zip(lengths, tables):
        seg = np.repeat(np.arange(len(lens)), lens)
        n = len(seg)
        expect = (table | np.eye(len(lens), dtype=bool))[seg][:, seg] & np.tri(n, dtype=bool)
        assert np.array_equal(mask[off:off + n, off:off + n].numpy(), expect)
        assert not mask[off:off + n, off + n:].any() and not mask[off:off + n, :off].any()
        off += n


@pytest.mark.parametrize("bad, match", [
    ([[Segment("prompt", 0, 0, 3), Segment("think", 1, 4, 6)]], "tile"),
    ([[Segment("prompt", 0, 0, 3), Segment("think", 1, 3, 6, dropped_at=4)]], "dropped_at"),
    ([[Segment("prompt", 0, 0, 3), Segment("think", 1, 3, 6, dropped_at=3), Segment("memory", 1, 6, 7)]],
     "dropped_at"),
    ([[]], "no segments"),
])
def test_bad_segments_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        SegmentLayout.from_segments(bad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kind"):
        Segment("thought", 0, 0, 1)
    with pytest.raises(ValueError, match=r"position_ids\[0\]"):
        SegmentLayout.from_segments([[Segment("prompt", 0, 0, 3)]], [[0, 1]])
    from types import SimpleNamespace
    odd = SimpleNamespace(kind="thought", step=1, start=3, end=5, dropped_at=None)  # any segment-like object
    with pytest.raises(ValueError, match=r"sequences\[0\]\[1\]: segment kind must be one of .* got 'thought'"):
        SegmentLayout.from_segments([[Segment("prompt", 0, 0, 3), odd]])
    with pytest.raises(ValueError, match=r"visible\[0\]"):
        SegmentLayout.from_tables([[2, 2]], [np.ones((3, 3), bool)])


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 32), (32, 16), (64, 64)])
def test_tile_kinds_are_sound(seed, block_m, block_n):
    """empty tiles hold no visible pair, full tiles only visible pairs (whole blocks)."""
    rng = np.random.default_rng(seed)
    layout = random_layout(rng, sequences=2, turns=6, max_len=30)
    mask = layout.dense_mask()
    cu = layout.cu_seqlens.tolist()
    blocks = build_blocks(layout, block_m, block_n)
    listed = {}
    for r in range(len(blocks.q_block_seq)):
        for t in range(blocks.row_ptr[r], blocks.row_ptr[r + 1]):
            listed[(int(blocks.q_block_seq[r]), int(blocks.q_block_index[r]), int(blocks.row_kblock[t]))] = \
                int(blocks.row_partial[t])
    cols = {(int(blocks.k_block_seq[c]), int(blocks.col_qblock[t]), int(blocks.k_block_index[c])):
            int(blocks.col_partial[t])
            for c in range(len(blocks.k_block_seq)) for t in range(blocks.col_ptr[c], blocks.col_ptr[c + 1])}
    assert cols == listed
    for s in range(len(cu) - 1):
        m = mask[cu[s]:cu[s + 1], cu[s]:cu[s + 1]]
        n = m.shape[0]
        for i in range(-(-n // block_m)):
            for j in range(-(-n // block_n)):
                tile = m[i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n]
                key = (s, i, j)
                if key not in listed:
                    assert not tile.any()
                elif listed[key] == 0:  # partial tiles may be conservative: no check
                    assert tile.shape == (block_m, block_n) and tile.all()
    assert 0 < blocks.density <= 1


def test_tiles_skip_dropped_context():
    """prompt, then two long turns; turn 2 no longer sees turn 1: its tiles are skipped."""
    vis = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=bool)
    blocks = build_blocks(SegmentLayout.from_tables([[64, 64, 64]], [vis]), 16, 16)
    kinds = np.zeros((12, 12), dtype=np.int8)  # 0 empty (not listed), 1 full, 2 partial
    for r in range(12):
        for t in range(blocks.row_ptr[r], blocks.row_ptr[r + 1]):
            kinds[r, blocks.row_kblock[t]] = 2 if blocks.row_partial[t] else 1
    assert (kinds[8:, 4:8] == 0).all() and (kinds[8:, :4] == 1).all()
    assert (np.diag(kinds) == 2).all()


def test_many_long_trajectories(seed):
    """MemPO-like: 64 trajectories of a 512-token prompt + 16 turns (~4k tokens each); the
    bitset rows equal the drop rule evaluated segment by segment. (Build time per trajectory
    is reported by benchmarks/attention.py.)"""
    rng = np.random.default_rng(seed)
    trajs = []
    for _ in range(64):
        segs, start = [Segment("prompt", 0, 0, 512)], 512
        for turn in range(1, 17):
            for kind in ("think", "memory", "information"):
                n = int(rng.integers(20, 300))
                segs.append(Segment(kind, turn, start, start + n))
                start += n
        # a turn's think/information and the previous memory go at the next memory's close
        for i, s in enumerate(segs[1:], 1):
            s.dropped_at = segs[min(i + 3, len(segs) - 1)].start if i + 3 < len(segs) else None
        trajs.append(segs)
    layout = SegmentLayout.from_segments(trajs)
    assert layout.num_tokens == sum(t[-1].end for t in trajs)
    vis = layout.visible_segments()
    row = 0
    for segs in trajs:
        for a in segs:
            expected = [b.start <= a.start and (b.dropped_at is None or a.start < b.dropped_at) for b in segs]
            assert vis[row, :len(segs)].tolist() == expected and not vis[row, len(segs):].any()
            row += 1


def test_tile_tables_of_a_moved_layout_come_from_its_host_copy(seed):
    """layout.to(device) keeps the host copy it came from, and tile tables are built from
    it: no device -> host transfer (a 'meta' device stands in for CUDA: reading it would fail)."""
    layout = random_layout(np.random.default_rng(seed), sequences=3, turns=4, max_len=20)
    moved = layout.to("meta")
    assert moved.device.type == "meta" and moved.host() is layout
    want, got = build_blocks(layout, 16, 32), build_blocks(moved, 16, 32)
    for name, value in vars(want).items():
        other = getattr(got, name)
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name
    assert layout.to("cpu").host().device.type == "cpu"


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
