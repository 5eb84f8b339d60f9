"""The MemPO agent loop on the native engine: sample turns, call tools, drop context.

Per row: prefill the prompt; then token by token sample the model's turn; the token that
completes `</mem>` is fed with the old context still visible (the memory is written from
it), and right after that forward the policy's dropped segments are evicted from the
row's KV cache, so every later token sees only the prompt, the new memory and what
follows. A turn ends at `</search>` / `</answer>`, EOS or another stop token id, or the per-turn limit; the tool runs
for all rows that searched at once and its `<information>` is fed with the last token.
With context_mode=reencode the kept context (prompt aside) is evicted as well and a copy of
it is fed at contiguous positions after the prompt before the turn goes on (the token
sampled from the old context is discarded), as an engine that re-submits the context does.
The `Trajectory` records exactly this (segments with `dropped_at`, "context" copies,
positions), which is what the trainer's single packed forward replays.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mempo.envs import SearchEnv, Task
from mempo.envs.agent_format import AgentTags

from .context_policy import ContextPolicy
from .native_engine import NativeEngine
from .sampling import sample_tokens
from .trajectory import Trajectory, TrajectorySegment


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128  # per turn
    max_total_tokens: int = 4096  # per trajectory (prompt included)
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()  # end a turn besides the action tags and the tokenizer's EOS


def turn_stop_ids(tokenizer, params: SamplingParams) -> frozenset[int]:
    """Token ids that end a turn: the tokenizer's EOS and `params.stop_token_ids` (an instruct
    model's end-of-turn tokens; see `mempo.training.task_side.model_stop_token_ids`)."""
    return frozenset(i for i in (tokenizer.eos_token_id, *params.stop_token_ids) if i is not None)


@dataclass
class _Row:
    traj: Trajectory
    episode: object
    step: int = 0
    turn_start: int = 0
    turn_tokens: list[int] | None = None
    mem_closed: bool = False
    evict_after_feed: bool = False
    reencode_from: int | None = None  # context_mode=reencode: first token of the copy still to feed
    next_token: int | None = None
    forced: list[list[int]] | None = None  # teacher-forced turns (token ids), tests/replay
    done: bool = False


@torch.no_grad()
def run_rollout(
    engine: NativeEngine,
    env: SearchEnv,
    tokenizer,
    tasks: list[Task],
    group_index: list[int],
    policy: ContextPolicy = ContextPolicy(),
    params: SamplingParams = SamplingParams(),
    forced_turns: list[list[str]] | None = None,
    progress: bool = False,
) -> list[Trajectory]:
    """Roll out one trajectory per task (repeat a task G times for a group).

    forced_turns: optional model text per row and turn to teacher-force instead of
    sampling (the log-probs of forced tokens are still the model's); turns after a row's
    forced ones are sampled."""
    tags: AgentTags = env.config.tags
    episodes = env.reset(tasks)
    rows = [_Row(Trajectory(task_index=i, group_index=g), e) for i, (g, e) in enumerate(zip(group_index, episodes))]
    if forced_turns is not None:
        for row, turns in zip(rows, forced_turns):
            row.forced = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in turns]
    engine.begin(len(rows))
    device = engine.device
    generator = torch.Generator(device=device).manual_seed(params.seed)
    stop_ids = turn_stop_ids(tokenizer, params)
    bar = tqdm(total=len(rows), desc="rollout", disable=not progress, leave=False)

    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in episodes]
    for row, ids in zip(rows, prompts):
        row.traj.token_ids += ids
        row.traj.sample_logprobs += [0.0] * len(ids)
        row.traj.loss_mask += [False] * len(ids)
        row.traj.segments.append(TrajectorySegment("prompt", 0, 0, len(ids)))
    live = list(range(len(rows)))
    chunks = {r: prompts[r] for r in live}
    starts = {r: 0 for r in live}

    while live:
        hidden = engine.feed(live, [chunks[r] for r in live], [starts[r] for r in live],
                             [rows[r].traj.position_of(starts[r]) for r in live])
        last = torch.tensor([len(chunks[r]) - 1 for r in live], device=hidden.device)
        logits = engine.logits(hidden[torch.arange(len(live), device=hidden.device), last])
        _evict_closed_memories(engine, rows, live, policy)
        tokens, logps = _choose_tokens(rows, live, logits, params, generator)
        ended = []
        for r, tok, lp in zip(live, tokens, logps):
            row = rows[r]
            if row.reencode_from is not None:  # sampled from the old context: the copy is fed first
                continue
            if row.turn_tokens is None:
                row.step += 1
                row.turn_start = len(row.traj)
                row.turn_tokens, row.mem_closed = [], False
            row.traj.token_ids.append(tok)
            row.traj.sample_logprobs.append(lp)
            row.traj.loss_mask.append(True)
            row.turn_tokens.append(tok)
            text = tokenizer.decode(row.turn_tokens)
            if not row.mem_closed and tags.mem[1] in text:
                row.mem_closed, row.evict_after_feed = True, True
                row.traj.segments.append(TrajectorySegment("memory", row.step, row.turn_start, len(row.traj)))
            stop = any(s in text for s in tags.action_stops) or tok in stop_ids
            if stop or len(row.turn_tokens) >= params.max_new_tokens or _forced_turn_over(row):
                ended.append(r)
            elif len(row.traj) >= params.max_total_tokens:
                ended.append(r)
        results = env.step([rows[r].episode for r in ended], [tokenizer.decode(rows[r].turn_tokens) for r in ended]) \
            if ended else []
        chunks, starts = {}, {}
        for r in live:
            row = rows[r]
            info_ids: list[int] = []
            if row.reencode_from is not None:  # context_mode=reencode: feed the kept context's copy
                starts[r], chunks[r] = row.reencode_from, row.traj.token_ids[row.reencode_from:]
                row.reencode_from = None
                continue
            if r in ended:
                res = results[ended.index(r)]
                _close_turn(row, tokenizer)
                info_ids = [] if res.done else tokenizer(res.information, add_special_tokens=False)["input_ids"]
                if res.done or not fits_reply(row.traj, info_ids, params):
                    _finish(row, res, params)
                    bar.update(1)
                    continue
                row.traj.information_texts[-1] = res.information
            starts[r] = len(row.traj) - 1
            chunks[r] = [row.traj.token_ids[-1]] + info_ids
            if info_ids:
                begin = len(row.traj)
                row.traj.token_ids += info_ids
                row.traj.sample_logprobs += [0.0] * len(info_ids)
                row.traj.loss_mask += [False] * len(info_ids)
                row.traj.segments.append(TrajectorySegment("information", row.step, begin, len(row.traj)))
        live = [r for r in live if not rows[r].done]
    bar.close()
    for r, row in enumerate(rows):
        row.traj.tokens_processed = _fed_tokens(row)
        row.traj.peak_context = engine.cache.peak_lengths[r]
    return [row.traj for row in rows]


def _choose_tokens(rows, live, logits, params, generator):
    tokens, logps = sample_tokens(logits, params.temperature, params.top_p, params.top_k, generator)
    tokens, logps = tokens.tolist(), logps.tolist()
    forced_idx = [i for i, r in enumerate(live) if _forced_turn(rows[r]) is not None]
    if forced_idx:
        scaled = logits[forced_idx] / (params.temperature if params.temperature > 0 else 1.0)
        logp_all = torch.log_softmax(scaled, dim=-1)
        for j, i in enumerate(forced_idx):
            row = rows[live[i]]
            turn = _forced_turn(row)
            pos = 0 if row.turn_tokens is None else len(row.turn_tokens)
            tokens[i] = turn[pos]
            logps[i] = float(logp_all[j, tokens[i]])
    return tokens, logps


def fits_reply(traj: Trajectory, info_ids: list[int], params: SamplingParams) -> bool:
    """The tool's reply fits with room for one more model token (the trajectory, and so the KV
    cache sized by max_total_tokens, never exceeds max_total_tokens); else the row ends."""
    return len(traj) + len(info_ids) < params.max_total_tokens


def _forced_turn(row: _Row) -> list[int] | None:
    """The teacher-forced ids of the row's current (or, between turns, next) turn; None once
    its forced turns are used up: later turns are sampled."""
    index = row.step if row.turn_tokens is None else row.step - 1
    return row.forced[index] if row.forced is not None and index < len(row.forced) else None


def _forced_turn_over(row: _Row) -> bool:
    turn = _forced_turn(row)
    return turn is not None and len(row.turn_tokens) >= len(turn)


def _close_turn(row: _Row, tokenizer) -> None:
    row.traj.close_turn(row.step, row.turn_start, row.mem_closed, tokenizer.decode(row.turn_tokens))
    row.turn_tokens = None


def _finish(row: _Row, result, params: SamplingParams) -> None:
    row.done = True
    ep = row.episode
    row.traj.answers = ep.answers
    row.traj.format_valid = ep.format_valid
    row.traj.reward = float(result.reward or 0.0)
    if ep.answers is not None and ep.format_valid:
        row.traj.finish_reason = "answer"
    elif not ep.format_valid:
        row.traj.finish_reason = "format_error"
    elif not ep.done:  # the env would go on: the trajectory hit max_total_tokens (a turn or a reply)
        row.traj.finish_reason = "max_tokens"
    else:
        row.traj.finish_reason = "max_turns"


def _evict_closed_memories(engine: NativeEngine, rows, live, policy: ContextPolicy) -> None:
    """After the forward that consumed a `</mem>` token: drop the policy's segments."""
    drops = {}
    for r in live:
        row = rows[r]
        if not row.evict_after_feed:
            continue
        row.evict_after_feed = False
        # len(traj): the first token that will not see them
        at = len(row.traj)
        ranges = row.traj.drop_steps(policy.dropped_steps(row.step), at)
        if ranges and policy.mode == "reencode":  # the kept context goes too; its copy is fed next
            ranges += row.traj.reencode_kept(at)
            row.reencode_from = at
        if ranges:
            drops[r] = ranges
    engine.evict(drops)


def _fed_tokens(row: _Row) -> int:
    # every token but a finished trajectory's last sampled one went through the model
    return max(0, len(row.traj) - 1)
