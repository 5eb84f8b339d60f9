"""SQuAD normalisation, EM / F1 per objective, partial credit, format-gated reward."""
import random

import pytest

from mempo.envs import RewardConfig, exact_match, normalize_answer, score_answers, token_f1, trajectory_reward
from mempo.envs.scoring import objective_scores


@pytest.mark.parametrize("raw,normal", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("an apple, a pear", "apple pear"),
    ("Theatre", "theatre"),  # "the" only as a whole word
    ("  ", ""),
    ("A", ""),
    ("Zoë's café", "zoës café"),
])
def test_normalize(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match_and_f1():
    assert exact_match("the Baker", "baker") == 1.0
    assert exact_match("bakers", "baker") == 0.0
    assert token_f1("new york city", "new york") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("paris", "london") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 1.0  # both normalise to empty
    assert token_f1("x", "the") == 0.0


def test_f1_counts_repeated_tokens_once_each():
    assert token_f1("york york", "york") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_f1_matches_a_direct_count(seed):
    rng = random.Random(seed)
    words = ["red", "blue", "green", "cat", "dog"]
    for _ in range(200):
        pred = [rng.choice(words) for _ in range(rng.randint(1, 6))]
        gold = [rng.choice(words) for _ in range(rng.randint(1, 6))]
        common = sum(min(pred.count(w), gold.count(w)) for w in set(pred))
        expected = 0.0 if common == 0 else 2 * common / (len(pred) + len(gold))
        assert token_f1(" ".join(pred), " ".join(gold)) == pytest.approx(expected)


def test_best_over_accepted_answers_and_objectives():
    accepted = [("NYC", "New York"), ("Paris",)]
    assert objective_scores(["new york", "paris"], accepted) == [1.0, 1.0]
    assert objective_scores(["paris"], accepted) == [0.0, 0.0]
    assert objective_scores(["nyc"], accepted) == [1.0, 0.0]  # missing objective scores 0
    assert score_answers(["nyc", "rome"], accepted) == 0.5
    assert score_answers(["nyc", "rome"], accepted, partial_credit=False) == 0.0
    assert score_answers(["nyc", "paris", "extra"], accepted, partial_credit=False) == 1.0
    assert score_answers(["new york city", "paris"], accepted, "f1") == pytest.approx(0.9)


def test_reward_is_gated_by_format():
    accepted = [("a",), ("b",)]
    assert trajectory_reward(["a", "b"], accepted, format_valid=True) == 1.0
    assert trajectory_reward(["a", "b"], accepted, format_valid=False) == 0.0
    assert trajectory_reward(None, accepted, format_valid=True) == 0.0
    assert trajectory_reward(["a", "x"], accepted, True, RewardConfig("em", False)) == 0.0
    assert trajectory_reward(["a", "x"], accepted, True, RewardConfig("f1", True)) == 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="metric"):
        RewardConfig(metric="bleu")
    with pytest.raises(ValueError, match="accepted"):
        score_answers(["a"], [])
    with pytest.raises(ValueError, match="accepted"):
        score_answers(["a"], ["abc"])  # a bare string is not a list of answers
