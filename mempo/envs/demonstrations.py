"""Warm-start demonstrations as JSONL: one task per line, then its turns.

    {"id": "q7", "question": "Where was Ana born?", "answers": ["Kavaizi"],
     "turns": [{"memory": "", "search": "Ana born",
                "information": [{"id": "d3", "title": "Ana", "text": "Ana was born in Kavaizi."}]},
               {"memory": "Ana was born in Kavaizi.", "think": "optional", "answer": ["Kavaizi"]}]}

The task part is any layout `load_tasks` reads (`question`/`questions`, `answers`/
`golden_answers`/...). Each turn has a `memory` (may be empty), an optional `think`, and one
action: `search` (a query) or `answer` (one string per objective, or one `;`-joined string).
A search turn carries the tool's reply as `information`: a list of passages (`title`, `text`),
rendered with the run's own environment (caps, titles, tags) exactly as a rollout would
render them, or the finished `<information>...</information>` block as a string. The last
turn answers. The prompt is not stored: the run's environment builds it (chat template
included), so warm start and RL see the same prompt for the same task.

`python -m mempo.envs.export_tiny_world --out DIR` writes the tiny world's experts in this form.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mempo.envs.agent_format import ActionKind, parse_step, render_turn
from mempo.envs.environment import SearchEnv
from mempo.envs.search_tool import Doc
from mempo.envs.tasks import task_from_record
from mempo.envs.transcript import Transcript, Turn


def _passages(value: Any, where: str) -> list[Doc]:
    docs = []
    for i, p in enumerate(value):
        if not isinstance(p, dict) or not isinstance(p.get("text"), str):
            raise ValueError(f"{where}: information[{i}] must be an object with a 'text' string, got {p!r:.200}")
        docs.append(Doc(id=str(p.get("id", "")), title=str(p.get("title") or ""), text=p["text"]))
    return docs


def _turn(record: Any, where: str, env: SearchEnv, num_objectives: int, last: bool) -> Turn:
    tags = env.config.tags
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a turn must be an object, got {type(record).__name__}")
    memory, think = record.get("memory"), record.get("think")
    if not isinstance(memory, str):
        raise ValueError(f"{where}: 'memory' must be a string (may be empty), got {memory!r:.200}")
    if think is not None and not isinstance(think, str):
        raise ValueError(f"{where}: 'think' must be a string, got {think!r:.200}")
    search, answers = record.get("search"), record.get("answer")
    if (search is None) == (answers is None):
        raise ValueError(f"{where}: a turn has exactly one of 'search' or 'answer'")
    if isinstance(answers, list):
        if not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: 'answer' must be a string or a list of strings")
    elif answers is not None:
        answers = [answers]
    text = render_turn(memory, search=search, answers=answers, think=think, tags=tags)
    step = parse_step(text, tags, num_objectives)
    if not step.is_valid:
        raise ValueError(f"{where}: the turn is not valid agent output ({step.error.value}: {step.detail})")
    info = record.get("information")
    if step.kind == ActionKind.ANSWER:
        if not last:
            raise ValueError(f"{where}: an answer turn must be the last turn")
        if info is not None:
            raise ValueError(f"{where}: an answer turn gets no 'information'")
        return Turn(text, None)
    if last:
        raise ValueError(f"{where}: the last turn must answer")
    if isinstance(info, list):
        return Turn(text, env.render_information(_passages(info, where)))
    if isinstance(info, str) and info.startswith(tags.information[0]) and info.endswith(tags.information[1]):
        return Turn(text, info)
    raise ValueError(f"{where}: a search turn needs 'information': a list of passages, or the whole "
                     f"{tags.information[0]}...{tags.information[1]} block as a string; got {info!r:.200}")


def demonstration_from_record(record: Any, where: str, env: SearchEnv) -> Transcript:
    """One JSONL object -> a `Transcript` (text turns) with the env's prompt; ValueError names
    the line, the turn and the field."""
    task = task_from_record(record, where)
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: 'turns' must be a non-empty list")
    if len(turns) > env.config.max_turns:
        raise ValueError(f"{where}: {len(turns)} turns, more than rollout.max_turns={env.config.max_turns}")
    parsed = tuple(_turn(t, f"{where} turn {i + 1}", env, task.num_objectives, i == len(turns) - 1)
                   for i, t in enumerate(turns))
    return Transcript(task=task, prompt=env.prompt(task), turns=parsed)


def load_demonstrations(path: str | os.PathLike, env: SearchEnv) -> list[Transcript]:
    """All demonstrations of a JSONL file, prompts and information rendered by `env`."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        raise ValueError(f"demonstrations must be a .jsonl file, got {str(path)!r}")
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg})") from None
            out.append(demonstration_from_record(record, where, env))
    if not out:
        raise ValueError(f"{path} holds no demonstrations")
    return out


def demonstration_record(transcript: Transcript, passages: Iterable[list[Doc] | None],
                         env: SearchEnv) -> dict:
    """The JSONL object of a recorded transcript; `passages[i]` are the docs behind turn i's
    information (None for the answer turn)."""
    tags = env.config.tags
    turns = []
    for turn, docs in zip(transcript.turns, passages):
        step = parse_step(turn.model, tags, transcript.task.num_objectives)
        if not step.is_valid:
            raise ValueError(f"task {transcript.task.id}: turn {turn.model!r:.200} is not valid agent output")
        record: dict[str, Any] = {"memory": step.memory}
        if step.think is not None:
            record["think"] = step.think
        if step.kind == ActionKind.SEARCH:
            record["search"] = step.query
            record["information"] = [{"id": d.id, "title": d.title, "text": d.text} for d in docs]
        else:
            record["answer"] = list(step.answers)
        turns.append(record)
    return {"id": transcript.task.id, "questions": list(transcript.task.questions),
            "answers": [list(a) for a in transcript.task.answers], "turns": turns}
