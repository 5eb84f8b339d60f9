"""The search-tool interface, the `Doc` it returns, and the `<information>` block format."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mempo.envs.agent_format import DEFAULT_TAGS, AgentTags

TRUNCATION_MARK = " ..."


@dataclass(frozen=True)
class Doc:
    """One retrieved passage; `score` is the retriever's, higher is better (None if unknown)."""

    id: str
    title: str
    text: str
    score: float | None = None


@runtime_checkable
class SearchTool(Protocol):
    """Batched retrieval: one ranked list (best first, at most `top_k`) per query."""

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Doc]]:
        ...


# Search-R1 corpora and retrievers carry a passage as one `contents` string: '"Title"\ntext'.
def contents_to_title_text(contents: str) -> tuple[str, str]:
    """Split Search-R1 `contents` ('"Title"\\ntext') into (title, text)."""
    first, _, rest = contents.partition("\n")
    if not rest:
        return "", first
    return first.strip().strip('"'), rest


def title_text_to_contents(title: str, text: str) -> str:
    return f'"{title}"\n{text}'


def check_search_args(queries: Sequence[str], top_k: int) -> list[str]:
    """Shared argument validation for tools; returns the queries as a list."""
    if isinstance(queries, str):
        raise ValueError("queries must be a sequence of str, got a single str")
    queries = list(queries)
    if not all(isinstance(q, str) for q in queries):
        raise ValueError("queries must all be str")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    return queries


def _longest_fitting_prefix(text: str, fits: Callable[[str], bool]) -> str:
    """Longest prefix of `text`, marked as cut, that `fits` ("" if none does)."""
    lo, hi = 0, len(text)  # binary search: a longer prefix never fits better
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(text[:mid].rstrip() + TRUNCATION_MARK):
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + TRUNCATION_MARK if lo else ""


def _remove_tags(text: str, tags: AgentTags) -> str:
    return tags.tag_regex.sub("", text)


def format_information(docs: Sequence[Doc], max_chars: int | None = 2000,
                       max_tokens: int | None = None,
                       count_tokens: Callable[[str], int] | None = None,
                       tags: AgentTags = DEFAULT_TAGS, show_titles: bool = True) -> str:
    """Render ranked docs as `<information>Title: text\\n...</information>` (one line per
    doc, best first; "text" alone when `show_titles` is False).

    The content between the tags is capped at `max_chars` characters and/or `max_tokens`
    tokens (as counted by `count_tokens`), so one huge document cannot blow up the
    context: docs are added best first and the one that crosses the cap is cut with " ...";
    later docs are dropped. No docs gives an explicit "No results." line. Tag strings
    inside passages are removed: a passage must not open or close the agent's blocks.
    """
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    if max_tokens is not None and (max_tokens < 1 or count_tokens is None):
        raise ValueError("max_tokens must be >= 1 and needs count_tokens")

    def size_ok(text: str) -> bool:
        if max_chars is not None and len(text) > max_chars:
            return False
        return max_tokens is None or count_tokens(text) <= max_tokens

    lines = [_remove_tags(f"{d.title}: {d.text}" if d.title and show_titles else d.text, tags)
             for d in docs]
    lines = lines or ["No results."]
    body = ""
    for line in lines:
        candidate = f"{body}\n{line}" if body else line
        if size_ok(candidate):
            body = candidate
            continue
        # Cut this doc to fit what is left of the budget, then stop.
        prefix = f"{body}\n" if body else ""
        cut = _longest_fitting_prefix(line, lambda t, prefix=prefix: size_ok(prefix + t))
        body = prefix + cut if cut else body
        break
    return tags.wrap("information", body)
