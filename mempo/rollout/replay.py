"""Build the `Trajectory` a rollout would record for given text turns, without a model.

Used for the supervised warm start on expert demonstrations and for tests: tokenisation,
segment boundaries and drop times follow the native agent loop's rules exactly (a turn's
memory ends at the first token whose prefix decodes to contain `</mem>`; the turn ends at
the first token whose prefix contains an action stop; dropped segments stop being visible
from the token after the memory). `tests/test_rollout_invariant.py` checks the two agree.
"""
from __future__ import annotations

from typing import Sequence

from mempo.envs.agent_format import DEFAULT_TAGS, AgentTags

from .context_policy import ContextPolicy
from .trajectory import Trajectory, TrajectorySegment


def memory_and_turn_end(tokenizer, turn_ids: Sequence[int], tags: AgentTags) -> tuple[int | None, int]:
    """(tokens up to and including the one closing `</mem>` or None, tokens in the turn),
    scanning prefixes the way the agent loop sees them while sampling."""
    mem_end = None
    for j in range(1, len(turn_ids) + 1):
        text = tokenizer.decode(list(turn_ids[:j]))
        if mem_end is None and tags.mem[1] in text:
            mem_end = j
        if any(s in text for s in tags.action_stops):
            return mem_end, j
    return mem_end, len(turn_ids)


def trajectory_from_turns(
    tokenizer,
    prompt: str,
    turns: Sequence[tuple[str, str | None]],
    policy: ContextPolicy = ContextPolicy(),
    tags: AgentTags = DEFAULT_TAGS,
    task_index: int = 0,
    group_index: int = 0,
) -> Trajectory:
    """turns: (model text, information text or None) per turn, as the env recorded them."""
    traj = Trajectory(task_index=task_index, group_index=group_index)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    _append(traj, ids, loss=False)
    traj.segments.append(TrajectorySegment("prompt", 0, 0, len(ids)))
    for step, (model_text, information) in enumerate(turns, start=1):
        turn_ids = tokenizer(model_text, add_special_tokens=False)["input_ids"]
        mem_end, turn_len = memory_and_turn_end(tokenizer, turn_ids, tags)
        start = len(traj)
        cut = mem_end if mem_end is not None else turn_len
        _append(traj, turn_ids[:cut], loss=True)
        if mem_end is not None:
            traj.segments.append(TrajectorySegment("memory", step, start, start + mem_end))
            if traj.drop_steps(policy.dropped_steps(step), len(traj)) and policy.mode == "reencode":
                traj.reencode_kept(len(traj))  # the copy comes before the rest of the turn
        action_start = len(traj)
        _append(traj, turn_ids[cut:turn_len], loss=True)
        if len(traj) > action_start:
            traj.segments.append(TrajectorySegment("action", step, action_start, len(traj)))
        traj.turn_texts.append(tokenizer.decode(turn_ids[:turn_len]))
        traj.information_texts.append(information)
        if information is not None:
            info_ids = tokenizer(information, add_special_tokens=False)["input_ids"]
            begin = len(traj)
            _append(traj, info_ids, loss=False)
            traj.segments.append(TrajectorySegment("information", step, begin, len(traj)))
    return traj


def _append(traj: Trajectory, ids: Sequence[int], loss: bool) -> None:
    traj.token_ids += list(ids)
    traj.sample_logprobs += [0.0] * len(ids)
    traj.loss_mask += [loss] * len(ids)
