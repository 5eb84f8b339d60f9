"""Build the `Trajectory` a rollout would record for given text turns, without a model.

Used for the supervised warm start on expert demonstrations and for tests: tokenisation,
segment boundaries and drop times follow the native agent loop's rules exactly (a turn's
memory ends at the first token whose prefix contains `</mem>`; the turn ends at the first
token whose prefix contains an action stop (both found by `TurnScanner`); dropped segments stop being visible
from the token after the memory). `tests/test_rollout_invariant.py` checks the two agree.
"""
from __future__ import annotations

from collections.abc import Sequence

from mempo.envs.agent_format import DEFAULT_TAGS, AgentTags
from mempo.ops.segment_layout import Segment

from .context_policy import ContextPolicy
from .trajectory import Trajectory


class TurnScanner:
    """The one rule for where a turn's memory and the turn itself end: the first token whose
    prefix contains `</mem>` (resp. an action stop such as `</search>`), found incrementally on
    token ids. Each token id's text is decoded once (cached); a tag is looked for only where
    the new token's text could complete it, and a hit is confirmed by decoding the turn so far
    (once per tag, not once per token). The native loop, the vLLM loop and the text replay all
    use this, so their segment boundaries agree."""

    def __init__(self, tokenizer, tags: AgentTags):
        self.tokenizer = tokenizer
        self.mem_tag = tags.mem[1]
        self.stops = tuple(tags.action_stops)
        self.keep = max(len(t) for t in (self.mem_tag, *self.stops)) - 1  # text a tag may start in
        self.pieces: dict[int, str] = {}

    def turn(self) -> TurnText:
        return TurnText(self)

    def piece(self, token: int) -> str:
        text = self.pieces.get(token)
        if text is None:
            text = self.pieces[token] = self.tokenizer.decode([token])
        return text


class TurnText:
    """One turn being scanned: `push(token)` -> (this token closes the memory, this token
    completes an action stop)."""

    def __init__(self, scanner: TurnScanner):
        self.scanner = scanner
        self.ids: list[int] = []
        self.tail = ""
        self.mem_closed = False

    def push(self, token: int) -> tuple[bool, bool]:
        sc = self.scanner
        self.ids.append(token)
        window = self.tail + sc.piece(token)
        self.tail = window[-sc.keep:] if sc.keep else ""
        mem = not self.mem_closed and sc.mem_tag in window
        stop = any(s in window for s in sc.stops)
        if mem or stop:  # confirm on the decoded prefix: the rule is stated on the turn's text
            text = sc.tokenizer.decode(self.ids)
            mem = mem and sc.mem_tag in text
            stop = stop and any(s in text for s in sc.stops)
        self.mem_closed |= mem
        return mem, stop


def memory_and_turn_end(tokenizer, turn_ids: Sequence[int], tags: AgentTags,
                        scanner: TurnScanner | None = None) -> tuple[int | None, int]:
    """(tokens up to and including the one closing `</mem>` or None, tokens in the turn),
    scanning the turn the way the agent loop sees it while sampling (`TurnScanner`)."""
    text = (scanner or TurnScanner(tokenizer, tags)).turn()
    mem_end = None
    for j, token in enumerate(turn_ids, start=1):
        mem, stop = text.push(token)
        if mem:
            mem_end = j
        if stop:
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
    traj.segments.append(Segment("prompt", 0, 0, len(ids)))
    scanner = TurnScanner(tokenizer, tags)
    for step, (model_text, information) in enumerate(turns, start=1):
        turn_ids = tokenizer(model_text, add_special_tokens=False)["input_ids"]
        mem_end, turn_len = memory_and_turn_end(tokenizer, turn_ids, tags, scanner)
        start = len(traj)
        cut = mem_end if mem_end is not None else turn_len
        _append(traj, turn_ids[:cut], loss=True)
        if mem_end is not None:
            traj.segments.append(Segment("memory", step, start, start + mem_end))
            if traj.drop_steps(policy.dropped_steps(step), len(traj)) and policy.mode == "reencode":
                traj.reencode_kept(len(traj))  # the copy comes before the rest of the turn
        action_start = len(traj)
        _append(traj, turn_ids[cut:turn_len], loss=True)
        if len(traj) > action_start:
            traj.segments.append(Segment("action", step, action_start, len(traj)))
        traj.turn_texts.append(tokenizer.decode(turn_ids[:turn_len]))
        traj.information_texts.append(information)
        if information is not None:
            info_ids = tokenizer(information, add_special_tokens=False)["input_ids"]
            begin = len(traj)
            _append(traj, info_ids, loss=False)
            traj.segments.append(Segment("information", step, begin, len(traj)))
    return traj


def _append(traj: Trajectory, ids: Sequence[int], loss: bool) -> None:
    traj.token_ids += list(ids)
    traj.sample_logprobs += [0.0] * len(ids)
    traj.loss_mask += [loss] * len(ids)
