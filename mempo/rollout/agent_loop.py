"""The MemPO agent loop on the native engine: sample turns, call tools, drop context.

Per row: prefill the prompt; then token by token sample the model's turn; the token that
completes `</mem>` is fed with the old context still visible (the memory is written from
it), and right after that forward the policy's dropped segments are evicted from the
row's KV blocks, so every later token sees only the prompt, the new memory and what
follows. A turn ends at `</search>` / `</answer>`, EOS or another stop token id, or the per-turn limit; the tool runs
for all rows that searched at once and its `<information>` is fed with the last token.
With context_mode=reencode the kept context (prompt aside) is evicted as well and a copy of
it is fed at contiguous positions after the prompt before the turn goes on (the token
sampled from the old context is discarded), as an engine that re-submits the context does.
The `Trajectory` records exactly this (segments with `dropped_at`, "context" copies,
positions), which is what the trainer's single packed forward replays.

Continuous batching: the whole batch is one stream. Rows are admitted in order while the free
KV blocks cover what the running rows may still grow to plus the new row (`_room_for_one_more`,
sized by the longest live context seen so far); a finished row
releases its blocks at once and the next trajectory starts in the same step. A running row
whose next chunk finds no free block waits; when every running row waits, the youngest is
swapped out to host memory (its KV kept bit for bit, so the invariant holds) and swapped back
in first when blocks free up. A trajectory that could never fit its row (a prompt or a
context over the engine's max_context_tokens) ends with finish_reason "max_tokens".

Per decode step the host sends one small int tensor (the new token ids with their rows and
positions; `NativeEngine.feed`) and reads back one (the sampled tokens and log-probs):
sampling, masks and slot arithmetic stay on the device. Teacher-forced turns (tests, the
benchmark, replay) are fed a phase at a time: all tokens up to the memory's end, then the
rest of the turn, each phase one forward whose logits score every forced token.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mempo.envs import SearchEnv, Task
from mempo.envs.agent_format import AgentTags
from mempo.ops.segment_layout import Segment

from .context_policy import ContextPolicy
from .native_engine import NativeEngine
from .replay import TurnScanner, TurnText, memory_and_turn_end
from .sampling import sample_tokens
from .trajectory import Trajectory


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
    order: int  # admission order (the youngest is swapped out first)
    scanner: TurnScanner  # finds memory and turn ends (shared by the rollout's rows)
    pending_start: int = 0  # the next chunk: traj tokens [pending_start:] (+ forced look-ahead)
    step: int = 0
    turn_start: int = 0
    turn: TurnText | None = None  # the turn being written (None between turns)
    evict_after_feed: bool = False
    reencode_from: int | None = None  # context_mode=reencode: first token of the copy still to feed
    forced: list[list[int]] | None = None  # teacher-forced turns (token ids), tests/replay
    forced_ends: list[tuple[int | None, int]] | None = None  # (memory end, turn end) of each forced turn
    slot: int | None = None  # cache row while resident
    swapped: tuple | None = None  # host copy of its KV while swapped out
    peak: int = 0
    done: bool = False


@dataclass
class RolloutStats:
    """What one rollout took: the most rows resident at once, the KV pool's peak, swaps."""

    peak_rows: int = 0
    peak_kv_bytes: int = 0
    pool_bytes: int = 0
    swaps: int = 0
    forwards: int = 0
    row_forwards: int = 0  # resident rows summed over forwards (/ forwards: mean concurrency)


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
    forced ones are sampled. `engine.stats` holds the rollout's RolloutStats afterwards."""
    tags: AgentTags = env.config.tags
    scanner = TurnScanner(tokenizer, tags)
    episodes = env.reset(tasks)
    rows = [_Row(Trajectory(task_index=i, group_index=g), e, i, scanner)
            for i, (g, e) in enumerate(zip(group_index, episodes))]
    if forced_turns is not None:
        for row, turns in zip(rows, forced_turns):
            row.forced = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in turns]
            row.forced_ends = [memory_and_turn_end(tokenizer, t, tags, scanner) for t in row.forced]
    cache = engine.begin(len(rows))
    stats = RolloutStats(pool_bytes=cache.pool.numel() * cache.pool.element_size())
    limit = min(cache.max_row_tokens, params.max_total_tokens)
    device = engine.device
    generator = torch.Generator(device=device).manual_seed(params.seed)
    stop_ids = turn_stop_ids(tokenizer, params)
    bar = tqdm(total=len(rows), desc="rollout", disable=not progress, leave=False)

    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in episodes]
    for row, ids in zip(rows, prompts):
        _append(row.traj, ids, [0.0] * len(ids), loss=False)
        row.traj.segments.append(Segment("prompt", 0, 0, len(ids)))
    waiting = deque(range(len(rows)))
    swapped: deque[int] = deque()
    resident: list[int] = []
    longest = 0  # the longest live context of any row so far: what admission expects a row to need

    def finish(r: int, result, reason: str | None = None) -> None:
        row = rows[r]
        _finish(row, result, reason)
        if row.slot is not None:
            cache.release_row(row.slot)
            resident.remove(r)
            row.slot = None
        bar.update(1)

    while waiting or swapped or resident:
        # 1. admission: swapped-out rows first, then new trajectories in order, while the free
        #    blocks cover the resident rows' expected growth and the new row (_room_for_one_more)
        while swapped and cache.free_rows:
            row = rows[swapped[0]]
            size = row.swapped[1] + len(row.traj) - row.pending_start
            if resident and not _room_for_one_more(cache, [rows[i].slot for i in resident], size, longest):
                break
            row.slot, row.swapped = cache.swap_in(row.swapped), None
            resident.append(swapped.popleft())
        while waiting and not swapped and cache.free_rows:
            r = waiting[0]
            if len(prompts[r]) >= limit:  # the prompt alone fills the row: nothing can be written
                waiting.popleft()
                finish(r, None, "max_tokens")
                continue
            if resident and not _room_for_one_more(cache, [rows[i].slot for i in resident], len(prompts[r]), longest):
                break
            waiting.popleft()
            rows[r].slot = cache.acquire_row()
            resident.append(r)
        if not resident:
            continue
        stats.peak_rows = max(stats.peak_rows, len(resident))

        # 2. the rows that can grow this step: their chunk's new blocks are free
        batch, chunks, lookahead, free = [], [], [], len(cache.free)
        for r in list(resident):  # finish() may remove a row
            row = rows[r]
            forced = _forced_phase(row, params, stop_ids, limit)
            chunk = row.traj.token_ids[row.pending_start:] + forced[:-1]
            if cache.lengths[row.slot] + len(chunk) > limit:  # the row's context is full
                _end_turn_if_open(row, tokenizer)
                finish(r, None, "max_tokens")
                continue
            need = cache.blocks_needed(row.slot, len(chunk))
            if need <= free:
                free -= need
                batch.append(r)
                chunks.append(chunk)
                lookahead.append(forced)
        if not batch:
            if len(resident) == 1:  # the pool holds one row at the row limit (pool_blocks): unreachable
                raise AssertionError("a lone row cannot grow in the KV pool")
            if resident:  # every resident row waits on blocks the others hold
                r = max(resident, key=lambda i: rows[i].order)
                rows[r].swapped, rows[r].slot = cache.swap_out(rows[r].slot), None
                resident.remove(r)
                swapped.appendleft(r)
                stats.swaps += 1
            continue

        # 3. one forward for all of them; the logits each row needs (its last position, or
        #    one per forced token)
        hidden = engine.feed([rows[r].slot for r in batch], chunks, [rows[r].pending_start for r in batch],
                             [rows[r].traj.position_of(rows[r].pending_start) for r in batch])
        stats.forwards += 1
        for r in batch:
            rows[r].peak = max(rows[r].peak, cache.lengths[rows[r].slot])
            longest = max(longest, rows[r].peak)
        stats.row_forwards += len(resident)
        wanted = [max(1, len(f)) for f in lookahead]
        if all(len(c) == 1 for c in chunks):  # a pure decode step: one hidden row per row
            last = hidden
        else:
            index, offset = [], 0
            for c, k in zip(chunks, wanted):
                offset += len(c)
                index += range(offset - k, offset)
            last = hidden[torch.tensor(index, device=hidden.device)]
        logits = engine.logits(last)
        _evict_closed_memories(engine, rows, batch, policy)
        chosen = _choose_tokens(logits, lookahead, wanted, params, generator)

        # 4. the host's part: append tokens, find memory ends and turn ends, run the tools
        ended, at = [], 0
        for r, k in zip(batch, wanted):
            row, picks = rows[r], chosen[at: at + k]
            at += k
            if row.reencode_from is not None:  # chosen from the old context: the copy is fed first
                row.pending_start, row.reencode_from = row.reencode_from, None
                continue
            for j, (tok, lp) in enumerate(picks):
                event = _take_token(row, tok, lp, params, stop_ids, limit)
                if event and j < len(picks) - 1:
                    raise AssertionError("a forced phase ran past a memory or turn end")  # see _forced_phase
                if event == "end":
                    ended.append(r)
            row.pending_start = len(row.traj) - 1
        results = env.step([rows[r].episode for r in ended],
                           [tokenizer.decode(rows[r].turn.ids) for r in ended]) if ended else []
        for r, res in zip(ended, results):
            row = rows[r]
            _close_turn(row, tokenizer)
            info_ids = [] if res.done else tokenizer(res.information, add_special_tokens=False)["input_ids"]
            if res.done or not fits_reply(row.traj, info_ids, params):
                finish(r, res)
                continue
            row.traj.information_texts[-1] = res.information
            if info_ids:
                begin = len(row.traj)
                _append(row.traj, info_ids, [0.0] * len(info_ids), loss=False)
                row.traj.segments.append(Segment("information", row.step, begin, len(row.traj)))
        stats.peak_kv_bytes = max(stats.peak_kv_bytes, cache.peak_blocks * cache.block_bytes)
    bar.close()
    for row in rows:
        row.traj.tokens_processed = _fed_tokens(row)
        row.traj.peak_context = row.peak
    engine.stats = stats
    engine.end()
    return [row.traj for row in rows]


def _room_for_one_more(cache, slots: list[int], prompt: int, longest: int) -> bool:
    """Admission: the free blocks cover what every resident row may still grow to and a new
    row of that size, a row's expected size being the longest live context seen so far in
    this rollout (at least the new prompt plus a block). An early guess that proves short is
    corrected by swapping, never by a wrong result."""
    expect = cache.blocks_for(max(longest, prompt + cache.block_size))
    growth = sum(max(0, expect - len(cache.blocks[s])) for s in slots)
    return len(cache.free) - growth >= expect


def _forced_phase(row: _Row, params: SamplingParams, stop_ids, limit: int) -> list[int]:
    """The teacher-forced tokens this row takes in its next forward ([] when it samples): the
    rest of the current forced turn up to its next event (the memory's closing token, the
    turn's end, a stop id, a limit), so that no token is fed past a point where visibility
    changes. Right after a memory closed, one token (its closing token is fed alone, with
    the old context, before the eviction)."""
    turn = _forced_turn(row)
    if turn is None or row.reencode_from is not None:
        return []
    pos = 0 if row.turn is None else len(row.turn.ids)
    if row.evict_after_feed:
        return turn[pos: pos + 1]
    mem_end, turn_len = row.forced_ends[row.step if row.turn is None else row.step - 1]
    end = turn_len
    if mem_end is not None and mem_end > pos and not (row.turn is not None and row.turn.mem_closed):
        end = mem_end
    for j in range(pos, end):
        if turn[j] in stop_ids:
            end = j + 1
            break
    end = min(end, params.max_new_tokens, pos + limit - len(row.traj))
    return turn[pos: max(end, pos + 1)]


def _choose_tokens(logits, lookahead, wanted, params: SamplingParams, generator) -> list[tuple[int, float]]:
    """Sampled tokens (rows without forced tokens) and forced tokens' log-probs, all on the
    device; one device -> host copy. Log-probs are log softmax(logits / T) over the vocabulary."""
    if not any(lookahead):
        tokens, logps = sample_tokens(logits, params.temperature, params.top_p, params.top_k, generator)
    else:
        device = logits.device
        forced = [t for f in lookahead for t in f]
        sampled_rows = [i for i, f in enumerate(lookahead) if not f]
        starts = [0]
        for k in wanted:
            starts.append(starts[-1] + k)
        tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=device)
        logps = torch.empty(logits.shape[0], dtype=torch.float32, device=device)
        f_idx = torch.tensor([starts[i] + j for i, f in enumerate(lookahead) if f for j in range(len(f))],
                             device=device)
        scaled = logits[f_idx] / (params.temperature if params.temperature > 0 else 1.0)
        f_tok = torch.tensor(forced, device=device)
        tokens[f_idx] = f_tok
        logps[f_idx] = torch.log_softmax(scaled, dim=-1).gather(1, f_tok[:, None]).squeeze(1).float()
        if sampled_rows:
            s_idx = torch.tensor([starts[i] for i in sampled_rows], device=device)
            s_tok, s_lp = sample_tokens(logits[s_idx], params.temperature, params.top_p, params.top_k, generator)
            tokens[s_idx], logps[s_idx] = s_tok, s_lp
    pairs = torch.stack([tokens.double(), logps.double()], 1).tolist()  # the step's one device -> host sync
    return [(int(t), lp) for t, lp in pairs]


def _take_token(row: _Row, tok: int, lp: float, params: SamplingParams, stop_ids, limit: int) -> str | None:
    """Append one model token to the row's turn -> "memory" (it closed the memory), "end" (it
    ended the turn) or None."""
    if row.turn is None:
        row.step += 1
        row.turn_start = len(row.traj)
        row.turn = row.scanner.turn()
    _append(row.traj, [tok], [lp], loss=True)
    mem, stop = row.turn.push(tok)
    event = None
    if mem:
        row.evict_after_feed = True
        row.traj.segments.append(Segment("memory", row.step, row.turn_start, len(row.traj)))
        event = "memory"
    if stop or tok in stop_ids or len(row.turn.ids) >= params.max_new_tokens or _forced_turn_over(row) \
            or len(row.traj) >= limit:
        event = "end"
    return event


def fits_reply(traj: Trajectory, info_ids: list[int], params: SamplingParams) -> bool:
    """The tool's reply fits with room for one more model token (the trajectory, and so the KV
    cache sized by max_total_tokens, never exceeds max_total_tokens); else the row ends."""
    return len(traj) + len(info_ids) < params.max_total_tokens


def _forced_turn(row: _Row) -> list[int] | None:
    """The teacher-forced ids of the row's current (or, between turns, next) turn; None once
    its forced turns are used up: later turns are sampled."""
    index = row.step if row.turn is None else row.step - 1
    return row.forced[index] if row.forced is not None and index < len(row.forced) else None


def _forced_turn_over(row: _Row) -> bool:
    turn = _forced_turn(row)
    return turn is not None and len(row.turn.ids) >= len(turn)


def _close_turn(row: _Row, tokenizer) -> None:
    row.traj.close_turn(row.step, row.turn_start, row.turn.mem_closed, tokenizer.decode(row.turn.ids))
    row.turn = None


def _end_turn_if_open(row: _Row, tokenizer) -> None:
    if row.turn is not None and row.turn.ids:
        _close_turn(row, tokenizer)
    row.turn = None


def _finish(row: _Row, result, reason: str | None = None) -> None:
    row.done = True
    ep = row.episode
    row.traj.answers = ep.answers
    row.traj.format_valid = ep.format_valid
    row.traj.reward = float(result.reward or 0.0) if result is not None else 0.0
    if reason is not None:  # the row's context is full: ended by the engine, not the env
        row.traj.finish_reason = reason
    elif ep.answers is not None and ep.format_valid:
        row.traj.finish_reason = "answer"
    elif not ep.format_valid:
        row.traj.finish_reason = "format_error"
    elif not ep.done:  # the env would go on: the trajectory hit max_total_tokens (a turn or a reply)
        row.traj.finish_reason = "max_tokens"
    else:
        row.traj.finish_reason = "max_turns"


def _evict_closed_memories(engine: NativeEngine, rows, batch, policy: ContextPolicy) -> None:
    """After the forward that consumed a `</mem>` token: drop the policy's segments."""
    drops = {}
    for r in batch:
        row = rows[r]
        if not row.evict_after_feed:  # set when the closing token was taken; this forward fed it
            continue
        row.evict_after_feed = False
        # len(traj): the first token that will not see them
        at = len(row.traj)
        ranges = row.traj.drop_steps(policy.dropped_steps(row.step), at)
        if ranges and policy.mode == "reencode":  # the kept context goes too; its copy is fed next
            ranges += row.traj.reencode_kept(at)
            row.reencode_from = at
        if ranges:
            drops[row.slot] = ranges
    engine.evict(drops)


def _append(traj: Trajectory, ids, logprobs, loss: bool) -> None:
    traj.token_ids += list(ids)
    traj.sample_logprobs += [float(x) for x in logprobs]
    traj.loss_mask += [loss] * len(ids)


def _fed_tokens(row: _Row) -> int:
    # every token but a finished trajectory's last sampled one went through the model
    return max(0, len(row.traj) - 1)
