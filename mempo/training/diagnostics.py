"""Per-step diagnostics of rollouts: what the memories hold, and where rollout and trainer
log-probs drift apart.

- memory/length_mean: tokens per memory block;
- memory/dropped_tokens_mean: context tokens dropped when a memory is written (what the
  memory had to replace);
- memory/gold_recall: the fraction of (memory, objective) pairs whose gold answer (any
  accepted string, SQuAD-normalised) appears in the memory text; for multi-hop questions the
  answer appears only once the last hop is found, so this rises along a trajectory;
- final memory recall (`final_memory_recall`, held-out evaluation's `{n}obj/mem_recall`): per
  trajectory, the fraction of its objectives whose gold answer the last memory holds, i.e.
  what the agent still knows when it answers (only the memory is visible then);
- drift/{memory,think,action,answer}: mean |log pi_trainer - log pi_rollout| over the model's
  tokens of each kind (only when old log-probs are recomputed: bf16 or engine=vllm). action =
  the search turn's tokens after the memory, answer = the answering turn's, think = tokens
  inside <think>...</think> (found by the tag's token ids; a tag that tokenizes differently in
  context counts as action).
"""
from __future__ import annotations

from mempo.envs.scoring import normalize_answer

DRIFT_KINDS = ("memory", "think", "action", "answer")


def _gold_recall(traj, mem, task, tokenizer, tags) -> float:
    """The fraction of the task's objectives whose gold answer (any accepted string) the
    memory segment `mem` of `traj` holds, SQuAD-normalised, as whole words."""
    raw = tags.tag_regex.sub(" ", tokenizer.decode(traj.token_ids[mem.start:mem.end]))  # "</mem>" glues
    text = f" {normalize_answer(raw)} "
    present = [any(f" {normalize_answer(a)} " in text for a in answers) for answers in task.answers]
    return sum(present) / len(present)


def memory_stats(trajectories, tasks, tokenizer, tags) -> dict[str, list[float]]:
    """Per memory of every trajectory: length, tokens dropped at its write, gold recall."""
    out = {"length": [], "dropped": [], "gold_recall": []}
    for traj, task in zip(trajectories, tasks):
        for mem in traj.memory_segments():
            out["length"].append(float(mem.end - mem.start))
            out["dropped"].append(float(sum(s.end - s.start for s in traj.segments if s.dropped_at == mem.end)))
            out["gold_recall"].append(_gold_recall(traj, mem, task, tokenizer, tags))
    return out


def final_memory_recall(trajectories, tasks, tokenizer, tags) -> list[float]:
    """Per trajectory: gold recall of its last memory (0 when it wrote none)."""
    out = []
    for traj, task in zip(trajectories, tasks):
        mems = traj.memory_segments()
        out.append(_gold_recall(traj, mems[-1], task, tokenizer, tags) if mems else 0.0)
    return out


def _find(ids: list[int], pattern: list[int], start: int = 0) -> int:
    for i in range(start, len(ids) - len(pattern) + 1):
        if ids[i:i + len(pattern)] == pattern:
            return i
    return -1


def token_kinds(traj, tokenizer, tags) -> list[str | None]:
    """The drift kind of every token of `traj` (None: not written by the model)."""
    kinds: list[str | None] = [None] * len(traj)
    think_open = tokenizer(tags.think[0], add_special_tokens=False)["input_ids"]
    think_close = tokenizer(tags.think[1], add_special_tokens=False)["input_ids"]
    answering = {i + 1 for i, text in enumerate(traj.turn_texts) if tags.answer[0] in text}
    for seg in traj.segments:
        if seg.kind == "memory":
            kinds[seg.start:seg.end] = ["memory"] * (seg.end - seg.start)
        elif seg.kind == "action":
            kind = "answer" if seg.step in answering else "action"
            kinds[seg.start:seg.end] = [kind] * (seg.end - seg.start)
            ids = traj.token_ids[seg.start:seg.end]
            a = _find(ids, think_open)
            b = _find(ids, think_close, a + len(think_open)) if a >= 0 else -1
            if a >= 0:
                end = b + len(think_close) if b >= 0 else len(ids)
                kinds[seg.start + a:seg.start + end] = ["think"] * (end - a)
    return [k if m else None for k, m in zip(kinds, traj.loss_mask)]


def drift_by_kind(trajectories, rollout_logprobs, trainer_logprobs, tokenizer, tags) -> dict[str, tuple[float, int]]:
    """kind -> (sum of |trainer - rollout| over its tokens, token count); log-prob lists are
    per trajectory, [len - 1] each, for tokens 1.. ."""
    sums = {k: [0.0, 0] for k in DRIFT_KINDS}
    for traj, rollout, trainer in zip(trajectories, rollout_logprobs, trainer_logprobs):
        gaps = (trainer.double() - rollout.double()).abs().tolist()
        for kind, gap in zip(token_kinds(traj, tokenizer, tags)[1:], gaps):
            if kind is not None:
                sums[kind][0] += gap
                sums[kind][1] += 1
    return {k: (s, n) for k, (s, n) in sums.items()}
