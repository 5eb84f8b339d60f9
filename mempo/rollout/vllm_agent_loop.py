"""The MemPO agent loop on vLLM: the same `Trajectory` record as the native loop.

Each request submits a row's retained context (the token ids of its not-dropped segments,
then the turn so far) and generates until a stop string. A turn runs in up to two phases:
phase 1 stops at `</mem>` or an action stop; if the memory closed, the policy's segments are
dropped (their `dropped_at` = the token after the memory, exactly as in the native loop) and
phase 2 re-submits the smaller context (prompt + the new memory for "mempo") and continues
the turn to `</search>` / `</answer>`. Token boundaries are re-derived from the token ids
with `memory_and_turn_end` (tokens vLLM returned past a boundary are discarded), so
`trajectory_from_turns` replays the record. vLLM always re-encodes the kept context; with
context_mode=reencode the record says so (context copies at contiguous positions), so the
trainer's packed forward reproduces vLLM's log-probs; with evict it cannot (tokens reweighted).
Teacher-forced turns are scored with
`prompt_logprobs` on the same contexts (such requests skip the prefix cache in vLLM).

Under data parallelism (an engine per rank, `engine.data_parallel_size` > 1) every `generate`
is a collective over the ranks, but how many turn phases a rank needs depends on its own
rows. So the loop runs in lockstep: it goes on while any rank has a live row, and a rank whose
rows are all done (or that has none) still calls `generate` with no prompts (a dummy request).
"""
from __future__ import annotations

from dataclasses import dataclass

from mempo.distributed import all_reduce_max
from mempo.envs import SearchEnv, Task
from mempo.envs.agent_format import AgentTags
from mempo.ops.segment_layout import Segment

from .agent_loop import SamplingParams, _finish, fits_reply, turn_stop_ids
from .context_policy import ContextPolicy
from .replay import memory_and_turn_end
from .trajectory import Trajectory
from .vllm_engine import VLLMEngine


@dataclass
class _Row:
    traj: Trajectory
    episode: object
    step: int = 0
    turn_start: int = 0
    turn_ids: list[int] | None = None
    mem_closed: bool = False
    forced: list[list[int]] | None = None
    tokens_processed: int = 0
    peak_context: int = 0
    done: bool = False


def run_rollout_vllm(
    engine: VLLMEngine,
    env: SearchEnv,
    tokenizer,
    tasks: list[Task],
    group_index: list[int],
    policy: ContextPolicy = ContextPolicy(),
    params: SamplingParams = SamplingParams(),
    forced_turns: list[list[str]] | None = None,
) -> list[Trajectory]:
    """Roll out one trajectory per task on vLLM (repeat a task G times for a group).

    forced_turns: optional model text per row and turn to teacher-force instead of sampling
    (scored with vLLM's prompt log-probs; needs temperature 0 or 1).
    tokens_processed counts what vLLM computed: per request, prompt tokens minus prefix-cache
    hits, plus the generated tokens but the last (the native engine's "fed tokens");
    peak_context is the longest context a request held."""
    if forced_turns is not None and params.temperature not in (0.0, 1.0):
        raise ValueError(f"forced_turns needs params.temperature 0 or 1 (vLLM's prompt log-probs are not "
                         f"temperature-scaled), got {params.temperature}")
    tags: AgentTags = env.config.tags
    episodes = env.reset(tasks)
    rows = [_Row(Trajectory(task_index=i, group_index=g), e) for i, (g, e) in enumerate(zip(group_index, episodes))]
    if forced_turns is not None:
        for row, turns in zip(rows, forced_turns):
            row.forced = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in turns]
    for row, e in zip(rows, episodes):
        ids = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        _append(row.traj, ids, [0.0] * len(ids), loss=False)
        row.traj.segments.append(Segment("prompt", 0, 0, len(ids)))
    stop_ids = turn_stop_ids(tokenizer, params)
    live = list(range(len(rows)))
    calls = 0
    while _any_rank_live(engine, live):
        requests, prompts, sps, ctx_lens = [], [], [], []
        for r in live:
            row = rows[r]
            if row.turn_ids is None:
                row.step += 1
                row.turn_start, row.turn_ids, row.mem_closed = len(row.traj), [], False
            ctx = _retained_context(row.traj)
            if row.forced is not None:
                turn = row.forced[row.step - 1]
                mem_end, turn_len = memory_and_turn_end(tokenizer, turn, tags)
                end = mem_end if mem_end is not None and not row.mem_closed else turn_len
                prompt, sp = ctx + turn[len(row.turn_ids): end], engine.scoring_params(params)
            else:
                budget = min(params.max_new_tokens - len(row.turn_ids), params.max_total_tokens - len(row.traj),
                             engine.max_model_len - len(ctx))
                stops = list(tags.action_stops) if row.mem_closed else [tags.mem[1], *tags.action_stops]
                prompt = ctx
                sp = engine.sampling_params(params, max_tokens=max(1, budget), stop=stops, stop_token_ids=stop_ids,
                                            seed=params.seed * 1_000_003 + calls * 4099 + r)
            if len(prompt) >= engine.max_model_len:  # vLLM would reject it: the retained context is full
                _stop_context_full(row, tokenizer)
                continue
            requests.append(r)
            prompts.append(prompt)
            sps.append(sp)
            ctx_lens.append(len(ctx))
        outputs = engine.generate(prompts, sps)  # no prompts: nothing, or a dummy request (lockstep)
        calls += 1
        ended = []
        for r, prompt, n_ctx, out in zip(requests, prompts, ctx_lens, outputs):
            row = rows[r]
            cached = out.num_cached_tokens or 0
            if row.forced is not None:
                new_ids = prompt[n_ctx:]
                new_lps = [_logprob(out.prompt_logprobs[j], t) for j, t in zip(range(n_ctx, len(prompt)), new_ids)]
                row.tokens_processed += len(prompt) - cached
                row.peak_context = max(row.peak_context, len(prompt))
            else:
                gen = out.outputs[0]
                new_ids = list(gen.token_ids)
                new_lps = [_logprob(lp, t) for lp, t in zip(gen.logprobs, new_ids)]
                # like the native engine: the last sampled token has not been fed yet
                row.tokens_processed += len(prompt) - cached + len(new_ids) - 1
                row.peak_context = max(row.peak_context, len(prompt) + len(new_ids) - 1)
            if _take(row, new_ids, new_lps, tokenizer, tags, policy, params, stop_ids):
                ended.append(r)
        results = env.step([rows[r].episode for r in ended],
                           [tokenizer.decode(rows[r].turn_ids) for r in ended]) if ended else []
        for r, res in zip(ended, results):
            row = rows[r]
            _close_turn(row, tokenizer)
            info_ids = [] if res.done else tokenizer(res.information, add_special_tokens=False)["input_ids"]
            if res.done or not fits_reply(row.traj, info_ids, params):
                _finish(row, res)
                continue
            row.traj.information_texts[-1] = res.information
            if info_ids:
                begin = len(row.traj)
                _append(row.traj, info_ids, [0.0] * len(info_ids), loss=False)
                row.traj.segments.append(Segment("information", row.step, begin, len(row.traj)))
        live = [r for r in live if not rows[r].done]
    for row in rows:
        row.traj.tokens_processed = row.tokens_processed
        row.traj.peak_context = row.peak_context
    return [row.traj for row in rows]


def _any_rank_live(engine, live: list[int]) -> bool:
    """The loop's condition: this rank's rows, or under data parallelism any rank's (one
    all-reduce per turn phase; a host sync on the GPU, next to vLLM's own per engine step)."""
    if engine.data_parallel_size > 1:
        return all_reduce_max(len(live)) > 0
    return bool(live)


def _take(row: _Row, new_ids, new_lps, tokenizer, tags, policy, params, stop_ids) -> bool:
    """Append one request's tokens to the turn, cut at the native loop's boundaries; close
    the memory (and drop segments) if it ended. Returns whether the turn is over."""
    turn = row.turn_ids + new_ids
    mem_end, turn_len = memory_and_turn_end(tokenizer, turn, tags)
    cut = mem_end if mem_end is not None and not row.mem_closed else turn_len
    keep = max(0, cut - len(row.turn_ids))
    new_ids, new_lps = new_ids[:keep], new_lps[:keep]
    row.turn_ids += new_ids
    _append(row.traj, new_ids, new_lps, loss=True)
    if mem_end is not None and not row.mem_closed:
        row.mem_closed = True
        end = row.turn_start + mem_end
        row.traj.segments.append(Segment("memory", row.step, row.turn_start, end))
        if row.traj.drop_steps(policy.dropped_steps(row.step), end) and policy.mode == "reencode":
            row.traj.reencode_kept(end)  # what vLLM computes from here on: the kept context re-submitted
    text = tokenizer.decode(row.turn_ids)
    if any(s in text for s in tags.action_stops) or (row.turn_ids and row.turn_ids[-1] in stop_ids):
        return True
    if len(row.turn_ids) >= params.max_new_tokens or len(row.traj) >= params.max_total_tokens:
        return True
    if row.forced is not None:
        return len(row.turn_ids) >= len(row.forced[row.step - 1])
    return not new_ids  # nothing usable came back: end the turn rather than loop


def _stop_context_full(row: _Row, tokenizer) -> None:
    if row.turn_ids:
        _close_turn(row, tokenizer)
    row.turn_ids = None
    row.done = True
    row.traj.answers, row.traj.format_valid = row.episode.answers, row.episode.format_valid
    row.traj.finish_reason = "context_full"


def _close_turn(row: _Row, tokenizer) -> None:
    row.traj.close_turn(row.step, row.turn_start, row.mem_closed, tokenizer.decode(row.turn_ids))
    row.turn_ids = None


def _retained_context(traj: Trajectory) -> list[int]:
    """Token ids of the not-dropped segments in order, then the turn in progress."""
    ids, covered = [], 0
    for seg in traj.segments:
        if seg.dropped_at is None:
            ids += traj.token_ids[seg.start: seg.end]
        covered = max(covered, seg.end)
    return ids + traj.token_ids[covered:]


def _append(traj: Trajectory, ids, logprobs, loss: bool) -> None:
    traj.token_ids += list(ids)
    traj.sample_logprobs += [float(x) for x in logprobs]
    traj.loss_mask += [loss] * len(ids)


def _logprob(entry, token: int) -> float:
    """`token`'s log-prob from one position of vLLM's sample or prompt log-probs."""
    return float(entry[token].logprob)
