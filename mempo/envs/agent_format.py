"""The agent grammar: tag strings, the parsed `Step`, and a strict, total parser.

Grammar of one model turn (whitespace between blocks is allowed, nothing else is):

    turn    := mem [think] action
    mem     := "<mem>" text "</mem>"          (may be empty: nothing known yet)
    think   := "<think>" text "</think>"
    action  := "<search>" query "</search>"   (query: non-blank)
             | "<answer>" answers "</answer>"  (answers: a1 ";" a2 ";" ... one per objective)

The tool's reply is appended by the environment as "<information>...</information>"; the
model never writes that tag. The memory block is a rewrite of everything the agent still
needs: when it closes, older context is dropped (see `mempo.envs.context`).

`parse_step` never raises on model output: every string maps to a `Step` whose `kind` is
SEARCH or ANSWER, or INVALID with a `FormatError` code saying which rule broke.
"""
from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property


class ActionKind(str, enum.Enum):
    SEARCH = "search"
    ANSWER = "answer"
    INVALID = "invalid"


class FormatError(str, enum.Enum):
    """Why a turn is not in the grammar (one code per rule, checked in this order)."""

    EMPTY_OUTPUT = "empty_output"  # blank text
    FORBIDDEN_TAG = "forbidden_tag"  # the model wrote <information> itself
    NESTED_TAG = "nested_tag"  # a tag opened inside another block
    UNMATCHED_CLOSE = "unmatched_close"  # a closing tag with no open block
    UNCLOSED_TAG = "unclosed_tag"  # output ends inside a block
    TEXT_OUTSIDE_TAGS = "text_outside_tags"  # non-whitespace between blocks
    MISSING_MEMORY = "missing_memory"  # the turn does not start with <mem>
    DUPLICATE_BLOCK = "duplicate_block"  # a second <mem> or <think>
    MISPLACED_BLOCK = "misplaced_block"  # <think> before <mem>, or a block after the action
    MULTIPLE_ACTIONS = "multiple_actions"  # a second search/answer in one turn
    NO_ACTION = "no_action"  # neither <search> nor <answer>
    EMPTY_QUERY = "empty_query"  # <search> with a blank query
    EMPTY_ANSWER = "empty_answer"  # <answer> blank, or one objective's answer blank
    WRONG_ANSWER_COUNT = "wrong_answer_count"  # answers != objectives (when known)


@dataclass(frozen=True)
class AgentTags:
    """Tag strings of the template; change them to serve another prompt format.

    `answer_separator` splits a multi-objective answer; it must not occur in an answer.
    """

    mem: tuple[str, str] = ("<mem>", "</mem>")
    think: tuple[str, str] = ("<think>", "</think>")
    search: tuple[str, str] = ("<search>", "</search>")
    answer: tuple[str, str] = ("<answer>", "</answer>")
    information: tuple[str, str] = ("<information>", "</information>")
    answer_separator: str = ";"

    def __post_init__(self) -> None:
        strings = [s for pair in self._pairs().values() for s in pair]
        if any(not s for s in strings) or len(set(strings)) != len(strings):
            raise ValueError(f"tags must be non-empty and distinct, got {strings}")
        if not self.answer_separator.strip():
            raise ValueError("answer_separator must be a non-blank string")

    def _pairs(self) -> dict[str, tuple[str, str]]:
        return {"mem": self.mem, "think": self.think, "search": self.search,
                "answer": self.answer, "information": self.information}

    @cached_property
    def tag_index(self) -> dict[str, tuple[str, bool]]:
        """Every tag string -> (block name, is_closing)."""
        index = {}
        for name, (open_tag, close_tag) in self._pairs().items():
            index[open_tag] = (name, False)
            index[close_tag] = (name, True)
        return index

    @cached_property
    def tag_regex(self) -> re.Pattern:
        """Matches any tag string."""
        # Longest first so that a tag that is a prefix of another never shadows it.
        alternatives = sorted(self.tag_index, key=len, reverse=True)
        return re.compile("|".join(re.escape(t) for t in alternatives))

    @property
    def action_stops(self) -> tuple[str, str]:
        """Strings that end a model turn (generation stops after either)."""
        return (self.search[1], self.answer[1])

    def wrap(self, block: str, text: str) -> str:
        open_tag, close_tag = self._pairs()[block]
        return f"{open_tag}{text}{close_tag}"


DEFAULT_TAGS = AgentTags()


def render_turn(memory: str, *, search: str | None = None, answers: Sequence[str] | None = None,
                think: str | None = None, tags: AgentTags = DEFAULT_TAGS) -> str:
    """The text of one well-formed turn: `<mem>` [`<think>`] then `<search>` or `<answer>`
    (answers joined by the separator); the inverse of `parse_step` for valid turns."""
    if (search is None) == (answers is None):
        raise ValueError("a turn has exactly one action: search or answers")
    text = tags.wrap("mem", memory) + (tags.wrap("think", think) if think is not None else "")
    if search is not None:
        return text + tags.wrap("search", search)
    return text + tags.wrap("answer", f"{tags.answer_separator} ".join(answers))


@dataclass(frozen=True)
class Step:
    """One parsed model turn.

    kind: SEARCH (query set), ANSWER (answers set, one per objective) or INVALID (error set).
    memory / think: block contents (stripped), None when absent or unparseable.
    detail: a human-readable explanation of the error.
    """

    kind: ActionKind
    memory: str | None = None
    think: str | None = None
    query: str | None = None
    answers: tuple[str, ...] = ()
    error: FormatError | None = None
    detail: str = ""

    @property
    def is_valid(self) -> bool:
        return self.error is None


def _invalid(error: FormatError, detail: str, memory: str | None = None) -> Step:
    return Step(kind=ActionKind.INVALID, memory=memory, error=error, detail=detail)


def _split_blocks(text: str, tags: AgentTags) -> list[tuple[str, str]] | Step:
    """Tokenise `text` into [(block name, content)], or an INVALID Step."""
    blocks: list[tuple[str, str]] = []
    open_name: str | None = None
    content_start = 0
    cursor = 0
    for match in tags.tag_regex.finditer(text):
        name, closing = tags.tag_index[match.group()]
        if name == "information":
            return _invalid(FormatError.FORBIDDEN_TAG,
                            f"the model must not write {match.group()!r} at {match.start()}")
        if open_name is None:
            if closing:
                return _invalid(FormatError.UNMATCHED_CLOSE,
                                f"{match.group()!r} at {match.start()} closes nothing")
            if text[cursor:match.start()].strip():
                return _invalid(FormatError.TEXT_OUTSIDE_TAGS,
                                f"text before {match.group()!r} at {match.start()}")
            open_name, content_start = name, match.end()
        elif not closing:
            return _invalid(FormatError.NESTED_TAG,
                            f"{match.group()!r} at {match.start()} inside <{open_name}>")
        elif name != open_name:
            return _invalid(FormatError.NESTED_TAG,
                            f"{match.group()!r} at {match.start()} closes inside <{open_name}>")
        else:
            blocks.append((name, text[content_start:match.start()]))
            open_name, cursor = None, match.end()
    if open_name is not None:
        return _invalid(FormatError.UNCLOSED_TAG, f"<{open_name}> is never closed")
    if text[cursor:].strip():
        return _invalid(FormatError.TEXT_OUTSIDE_TAGS, "text after the last block")
    return blocks


def parse_step(text: str, tags: AgentTags = DEFAULT_TAGS,
               num_objectives: int | None = None) -> Step:
    """Parse one model turn into a `Step`; total on any `str` (never raises on content).

    num_objectives: when given, an answer must hold exactly that many `;`-separated parts.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if num_objectives is not None and num_objectives < 1:
        raise ValueError(f"num_objectives must be >= 1 or None, got {num_objectives}")
    if not text.strip():
        return _invalid(FormatError.EMPTY_OUTPUT, "blank output")
    blocks = _split_blocks(text, tags)
    if isinstance(blocks, Step):
        return blocks
    return _step_from_blocks(blocks, tags, num_objectives)


def _step_from_blocks(blocks: list[tuple[str, str]], tags: AgentTags,
                      num_objectives: int | None) -> Step:
    if not blocks or blocks[0][0] != "mem":
        first = blocks[0][0] if blocks else "nothing"
        code = FormatError.MISPLACED_BLOCK if any(n == "mem" for n, _ in blocks) else \
            FormatError.MISSING_MEMORY
        return _invalid(code, f"a turn starts with <mem>, got {first}")
    memory = blocks[0][1].strip()
    think: str | None = None
    for i, (name, content) in enumerate(blocks[1:], start=1):
        if name in ("search", "answer"):
            if i != len(blocks) - 1:
                later = [n for n, _ in blocks[i + 1:]]
                code = FormatError.MULTIPLE_ACTIONS if any(
                    n in ("search", "answer") for n in later) else FormatError.MISPLACED_BLOCK
                return _invalid(code, f"blocks {later} after the action", memory)
            return _action_step(name, content, memory, think, tags, num_objectives)
        if name == "mem" or think is not None:
            return _invalid(FormatError.DUPLICATE_BLOCK, f"a second <{name}>", memory)
        think = content.strip()
    return _invalid(FormatError.NO_ACTION, "no <search> or <answer> block", memory)


def _action_step(name: str, content: str, memory: str, think: str | None, tags: AgentTags,
                 num_objectives: int | None) -> Step:
    if name == "search":
        query = " ".join(content.split())
        if not query:
            return _invalid(FormatError.EMPTY_QUERY, "blank search query", memory)
        return Step(kind=ActionKind.SEARCH, memory=memory, think=think, query=query)
    answers = tuple(" ".join(part.split()) for part in content.split(tags.answer_separator))
    if not all(answers):
        return _invalid(FormatError.EMPTY_ANSWER, f"blank answer part in {answers}", memory)
    if num_objectives is not None and len(answers) != num_objectives:
        return _invalid(FormatError.WRONG_ANSWER_COUNT,
                        f"{len(answers)} answers for {num_objectives} objectives", memory)
    return Step(kind=ActionKind.ANSWER, memory=memory, think=think, answers=answers)


def cut_after_action(text: str, tags: AgentTags = DEFAULT_TAGS) -> str:
    """`text` up to and including the first `</search>` or `</answer>` (all of it if none).

    For rollouts whose stop criterion may overshoot the stop string by a few tokens: what
    follows the closing tag was never meant to be part of the turn."""
    ends = [i + len(stop) for stop in tags.action_stops if (i := text.find(stop)) != -1]
    return text[:min(ends)] if ends else text
