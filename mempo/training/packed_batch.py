"""Trajectories (+ memory probes) -> one packed, padding-free training batch.

Each trajectory is one packed sequence: its tokens at their rollout positions, then its
probes. Row i of the model's output predicts token i+1 of the same sequence, so every
per-token training quantity is stored on the row that predicts it: targets, loss mask,
the rollout's sampling log-prob (the old policy), the trajectory index and, for memory
tokens, the memory block index (for the MemPO memory advantage).

Visibility is the trajectory's own segment record (each segment's `dropped_at`), turned into
bitsets by `SegmentLayout.from_segments`, the one place the rule is written; probe segments
carry an explicit `sees` row (the prompt and one memory, or the history before a memory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mempo.algo.probes import Probe
from mempo.ops.segment_layout import Segment, SegmentLayout
from mempo.rollout.trajectory import Trajectory


@dataclass
class PackedBatch:
    input_ids: Tensor  # [L]
    layout: SegmentLayout  # who sees whom, rotary positions, cu_seqlens (probes included)
    targets: Tensor  # [L] next token (0 where none)
    loss_mask: Tensor  # [L] bool: target is a model-written trajectory token
    old_logprobs: Tensor  # [L] float32: rollout log-prob of the target
    seq_index: Tensor  # [L] int64: trajectory of the row
    memory_index: Tensor  # [L] int64: memory block (global, batch order) of the target, -1 if none
    probe_rows: Tensor  # [K] rows whose targets are probe answer tokens
    probe_index: Tensor  # [K] which probe (batch order) each such row scores
    probes: list[Probe]
    probe_memory: Tensor  # [num_probes] global memory index each probe scores
    num_memories: int
    trajectory_ids: list[int] | None = None  # the caller's indices of the packed trajectories

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def position_ids(self) -> Tensor:
        return self.layout.position_ids

    @property
    def cu_seqlens(self) -> Tensor:
        return self.layout.cu_seqlens


def pack_trajectories(trajectories: list[Trajectory], probes: list[list[Probe]] | None = None) -> PackedBatch:
    """Pack trajectories (and optionally each one's probes) into one batch."""
    ids, targets, loss, old, seq_idx, mem_idx = [], [], [], [], [], []
    probe_rows, probe_index, all_probes, probe_memory, sequences, positions, cu = [], [], [], [], [], [], [0]
    memory_base = 0
    for s, traj in enumerate(trajectories):
        n = len(traj)
        if n == 0:
            raise ValueError(f"trajectory {s} is empty")
        offset = cu[-1]
        segs = sorted(traj.segments, key=lambda x: x.start)  # local token ranges; visibility from dropped_at
        seq_pos = list(traj.position_ids)
        memory_of_token = [-1] * n
        for m, mem in enumerate(traj.memory_segments()):
            for t in range(mem.start, mem.end):
                memory_of_token[t] = memory_base + m
        ids += traj.token_ids
        targets += traj.token_ids[1:] + [0]
        loss += traj.loss_mask[1:] + [False]
        old += traj.sample_logprobs[1:] + [0.0]
        mem_idx += memory_of_token[1:] + [-1]
        seq_idx += [s] * n
        cursor = offset + n
        for probe in (probes[s] if probes is not None else []):
            k = len(probe.token_ids)
            sees = [i for i, seg in enumerate(segs[:len(traj.segments)])
                    if any(a <= seg.start and seg.end <= b for a, b in probe.visible(traj))]
            sees.append(len(segs))
            segs.append(Segment("probe", probe.memory.step, cursor - offset, cursor - offset + k, sees=sees))
            ids += probe.token_ids
            seq_pos += range(probe.first_position, probe.first_position + k)
            targets += probe.token_ids[1:] + [0]
            loss += [False] * k
            old += [0.0] * k
            mem_idx += [-1] * k
            seq_idx += [s] * k
            # the row before each answer token predicts it: rows cue_end-1 .. end-2
            for j in range(probe.num_prefix_tokens - 1, k - 1):
                probe_rows.append(cursor + j)
                probe_index.append(len(all_probes))
            all_probes.append(probe)
            probe_memory.append(memory_base + probe.memory_number)
            cursor += k
        sequences.append(segs)
        positions.append(seq_pos)
        cu.append(cursor)
        memory_base += len(traj.memory_segments())
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedBatch(
        input_ids=long(ids), layout=SegmentLayout.from_segments(sequences, positions), targets=long(targets),
        loss_mask=torch.tensor(loss, dtype=torch.bool),
        old_logprobs=torch.tensor(old, dtype=torch.float32), seq_index=long(seq_idx),
        memory_index=long(mem_idx), probe_rows=long(probe_rows), probe_index=long(probe_index),
        probes=all_probes, probe_memory=long(probe_memory), num_memories=memory_base,
    )


def split_by_token_budget(trajectories: list[Trajectory], max_tokens: int,
                          probes: list[list] | None = None) -> list[list[int]]:
    """Greedy micro-batches of trajectory indices whose total packed length (trajectory plus
    its probes, when given) stays within max_tokens (a longer one goes alone). Order is kept,
    so batches are stable."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    batches, current, size = [], [], 0
    for i, traj in enumerate(trajectories):
        n = len(traj) + (sum(len(p.token_ids) for p in probes[i]) if probes is not None else 0)
        if current and size + n > max_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        batches.append(current)
    return batches


def _filler() -> PackedBatch:
    t = Trajectory(task_index=-1, group_index=-1, token_ids=[0, 0], sample_logprobs=[0.0, 0.0],
                   loss_mask=[False, True], segments=[Segment("prompt", 0, 0, 1),
                                                      Segment("action", 1, 1, 2)])
    return pack_trajectories([t])


# A 2-token batch a rank runs (with zero loss) when it has fewer micro-batches than others.
FILLER = _filler()
