"""Answer scoring (SQuAD-style EM / token F1) and the trajectory reward.

Per objective the score is the best over its accepted answers; a task's score averages its
objectives (partial credit) or is all-or-nothing. The reward gates that score on format:
a trajectory with any invalid turn, or without a final answer, earns 0.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)

Metric = Literal["em", "f1"]


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (0 if either is empty,
    1 if both are)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_METRICS = {"em": exact_match, "f1": token_f1}


def best_over_accepted(prediction: str, accepted: Sequence[str], metric: Metric = "em") -> float:
    if metric not in _METRICS:
        raise ValueError(f"metric must be 'em' or 'f1', got {metric!r}")
    if isinstance(accepted, str) or not accepted:
        raise ValueError("accepted must be a non-empty sequence of answer strings")
    return max(_METRICS[metric](prediction, gold) for gold in accepted)


def objective_scores(predicted: Sequence[str], accepted: Sequence[Sequence[str]],
                     metric: Metric = "em") -> list[float]:
    """Score of each objective: predicted[i] against accepted[i]; a missing answer scores 0,
    extra answers are ignored (the parser rejects a wrong count when it knows the task)."""
    if not accepted:
        raise ValueError("accepted must hold at least one objective")
    return [best_over_accepted(predicted[i], gold, metric) if i < len(predicted) else 0.0
            for i, gold in enumerate(accepted)]


def score_answers(predicted: Sequence[str], accepted: Sequence[Sequence[str]],
                  metric: Metric = "em", partial_credit: bool = True) -> float:
    """Task score in [0, 1]: mean over objectives, or 1 only if every objective scores 1."""
    scores = objective_scores(predicted, accepted, metric)
    if partial_credit:
        return sum(scores) / len(scores)
    return float(all(s == 1.0 for s in scores))


@dataclass(frozen=True)
class RewardConfig:
    """metric: "em" or "f1"; partial_credit: average objectives (else all-or-nothing)."""

    metric: Metric = "em"
    partial_credit: bool = True

    def __post_init__(self) -> None:
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be 'em' or 'f1', got {self.metric!r}")


def trajectory_reward(answers: Sequence[str] | None, accepted: Sequence[Sequence[str]],
                      format_valid: bool, config: RewardConfig = RewardConfig()) -> float:
    """Reward of a finished trajectory: task score if every turn was valid and it answered,
    else 0. answers: the final answer's parts (None when the trajectory never answered)."""
    if not format_valid or answers is None:
        return 0.0
    return score_answers(answers, accepted, config.metric, config.partial_credit)
