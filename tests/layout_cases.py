"""Random segment records and layouts for the layout, attention and HF tests."""
import numpy as np

from mempo.ops.segment_layout import Segment, SegmentLayout


def random_trajectory(rng: np.random.Generator, turns: int = 4, max_len: int = 9,
                      probes: int = 1) -> tuple[list[Segment], np.ndarray]:
    """A MemPO-like trajectory: prompt, then per turn think/memory/information segments
    (some empty or one token) dropped at random later segment starts, then probes that
    see the prompt and one memory. -> (segments, position ids)."""
    kinds = ["prompt"] + [k for _ in range(turns) for k in ("think", "memory", "information")]
    lengths = [int(rng.integers(1, max_len))] + [int(rng.integers(0, max_len)) for _ in kinds[1:]]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    length = int(starts[-1])
    segs = []
    for i, kind in enumerate(kinds):
        dropped = None
        if i > 0 and rng.random() < 0.6:
            dropped = int(rng.choice(starts[i + 1:]))  # a later segment start, or the length
        segs.append(Segment(kind, (i + 2) // 3, int(starts[i]), int(starts[i + 1]), dropped))
    pos = list(range(length))
    memories = [i for i, s in enumerate(segs) if s.kind == "memory"]
    for _ in range(probes):
        n = int(rng.integers(1, max_len))
        mem = int(rng.choice(memories))
        segs.append(Segment("probe", segs[mem].step, length, length + n, sees=[0, mem]))
        pos += list(range(segs[mem].end, segs[mem].end + n))  # the probe continues after its memory
        length += n
    if rng.random() < 0.3:  # drops landing exactly at the end of the trajectory
        segs[-1].dropped_at = length if segs[-1].sees is None else None
    return segs, np.asarray(pos)


def random_layout(rng: np.random.Generator, sequences: int = 3, **kw) -> SegmentLayout:
    trajs = [random_trajectory(rng, **kw) for _ in range(sequences)]
    return SegmentLayout.from_segments([t[0] for t in trajs], [t[1] for t in trajs])
