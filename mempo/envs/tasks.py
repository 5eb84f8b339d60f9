"""Question-answering tasks: the `Task` record, a JSONL/parquet loader, the N-objective composer.

File rows: {"question": str, "answers": [str, ...], "id": str (optional)}; `answers` lists
every accepted string for the question. Search-R1's columns (`golden_answers`,
`reward_model.ground_truth.target`) and multi-objective rows (`questions` + one answer list
per question) load too. An N-objective task (MEM1/MemPO) joins N questions into one prompt
and expects one answer per question, in order.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Task:
    """questions[i] is objective i; answers[i] are its accepted answers."""

    id: str
    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not self.questions or len(self.questions) != len(self.answers):
            raise ValueError(f"task {self.id!r}: needs as many answer lists as questions "
                             f"({len(self.questions)} vs {len(self.answers)}), at least one")
        if any(not a for a in self.answers):
            raise ValueError(f"task {self.id!r}: every objective needs an accepted answer")

    @property
    def num_objectives(self) -> int:
        return len(self.questions)


QUESTION_FIELDS = ("question", "questions")
ANSWER_FIELDS = ("answers", "golden_answers", "reward_model.ground_truth.target")
ACCEPTED_LAYOUT = (f"a question in {' | '.join(QUESTION_FIELDS)} (a string, or a list of strings for a "
                   f"multi-objective row) and its answers in {' | '.join(ANSWER_FIELDS)} (a string or a list "
                   f"of strings per question)")


def _plain(value: Any) -> Any:
    """numpy arrays (parquet columns) -> lists, recursively."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _lookup(record: dict, dotted: str) -> Any:
    value: Any = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return _plain(value)


def _answer_list(value: Any, where: str, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not value
            or not all(isinstance(a, str) and a.strip() for a in value)):
        raise ValueError(f"{where}: '{field}' must be a non-empty string or list of non-empty strings "
                         f"per question, got {value!r:.200}")
    return tuple(a.strip() for a in value)


def task_from_record(record: Any, where: str) -> Task:
    """One file row -> Task; ValueError names the row and the field.

    Accepted layouts (`ACCEPTED_LAYOUT`): {"question", "answers"} (mempo), Search-R1's
    {"question", "golden_answers"} or {"question", "reward_model": {"ground_truth": {"target"}}},
    and multi-objective rows {"questions": [q1, q2], "answers": [[a1, ...], [b1, ...]]}."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    q_field = next((f for f in QUESTION_FIELDS if record.get(f) is not None), None)
    a_field = next((f for f in ANSWER_FIELDS if _lookup(record, f) is not None), None)
    if q_field is None or a_field is None:
        missing = "question" if q_field is None else "answers"
        raise ValueError(f"{where}: no {missing} column; found columns {sorted(record)}; accepted: "
                         f"{ACCEPTED_LAYOUT}")
    questions, answers = _plain(record[q_field]), _lookup(record, a_field)
    if q_field == "question":
        if not isinstance(questions, str) or not questions.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string, got {questions!r:.200}")
        questions, answers = [questions], [answers]
    else:
        if (not isinstance(questions, list) or not questions
                or not all(isinstance(q, str) and q.strip() for q in questions)):
            raise ValueError(f"{where}: 'questions' must be a non-empty list of non-empty strings")
        if not isinstance(answers, list) or len(answers) != len(questions):
            raise ValueError(f"{where}: '{a_field}' must hold one answer list per question "
                             f"({len(questions)} questions), got {answers!r:.200}")
    task_id = record.get("id")
    return Task(id=where if task_id is None else str(task_id), questions=tuple(q.strip() for q in questions),
                answers=tuple(_answer_list(a, where, a_field) for a in answers))


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path).to_pylist()


def load_tasks(path: str | os.PathLike) -> list[Task]:
    """Load tasks from a .jsonl or .parquet file (parquet needs pyarrow); rows in any layout of
    `task_from_record`, single- or multi-objective."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {path} is not a file")
    if path.suffix == ".parquet":
        rows = [(f"{path.name}:{i}", r) for i, r in enumerate(_read_parquet(path))]
    elif path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append((f"{path.name}:{number}", json.loads(line)))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path} line {number}: invalid JSON ({error.msg})") \
                            from None
    else:
        raise ValueError(f"path must end in .jsonl or .parquet, got {path.name}")
    tasks = [task_from_record(record, where) for where, record in rows]
    if not tasks:
        raise ValueError(f"{path} holds no tasks")
    return tasks


def compose_multi_objective(tasks: Sequence[Task], num_objectives: int, num_tasks: int,
                            seed: int) -> list[Task]:
    """`num_tasks` N-objective tasks, each joining `num_objectives` distinct single tasks.

    Questions are drawn from successive random permutations of `tasks`, never twice in one
    task, so every question is used equally often (+-1). Deterministic in `seed`.
    """
    singles = list(tasks)
    if any(t.num_objectives != 1 for t in singles):
        raise ValueError("tasks must all be single-objective")
    if not 1 <= num_objectives <= len(singles):
        raise ValueError(f"num_objectives must be in [1, {len(singles)}], got {num_objectives}")
    if num_tasks < 0:
        raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
    rng = random.Random(seed)
    order: list[int] = []  # indices into singles still to be drawn; drawn from the end
    composed = []
    for _ in range(num_tasks):
        if len(order) < num_objectives:
            fresh = list(range(len(singles)))
            rng.shuffle(fresh)
            order = fresh + order  # leftovers first: each permutation is drawn in full
        picks: list[int] = []
        for _ in range(num_objectives):
            # the newest index not yet in this task (a leftover may recur in `fresh`)
            j = next(j for j in range(len(order) - 1, -1, -1) if order[j] not in picks)
            picks.append(order.pop(j))
        parts = [singles[i] for i in picks]
        composed.append(Task(id="+".join(t.id for t in parts),
                             questions=tuple(t.questions[0] for t in parts),
                             answers=tuple(t.answers[0] for t in parts)))
    return composed
