"""SearchEnv stepping (batched tool calls, endings, rewards), replay, context and TT/PT."""
import pytest

from mempo.envs import Doc, EnvConfig, SearchEnv, Task, Transcript, Turn, build_prompt, token_usage, visible_context


class _CountingTool:
    def __init__(self):
        self.calls: list[list[str]] = []

    def search(self, queries, top_k):
        self.calls.append(list(queries))
        return [[Doc(f"d{i}", "T", f"about {q}")] for i, q in enumerate(queries)]


def _task(n=1):
    return Task("t", tuple(f"Q{i}?" for i in range(n)), tuple((f"a{i}",) for i in range(n)))


def test_batched_step_endings_and_rewards():
    tool = _CountingTool()
    env = SearchEnv(tool, EnvConfig(top_k=1))
    episodes = env.reset([_task(), _task(), _task(2), _task()])
    assert episodes[2].prompt == build_prompt(_task(2))
    results = env.step(episodes, ["<mem></mem><search>one</search>",
                                  "<mem></mem><answer>a0</answer>",
                                  "<mem></mem><answer>a0; wrong</answer>",
                                  "prose"])
    assert tool.calls == [["one"]]  # one batched call, searches only
    assert results[0].information == "<information>T: about one</information>"
    assert not results[0].done and results[0].reward is None
    assert results[1].done and results[1].reward == 1.0 and results[1].information is None
    assert results[2].done and results[2].reward == 0.5
    assert results[3].done and results[3].reward == 0.0 and not episodes[3].format_valid
    with pytest.raises(ValueError, match="live"):
        env.step(episodes[1:2], ["<mem></mem><answer>a0</answer>"])
    with pytest.raises(ValueError, match="texts"):
        env.step(episodes[:1], [])
    (final,) = env.step(episodes[:1], ["<mem>about one</mem><answer>A0</answer>"])
    assert final.reward == 1.0 and len(episodes[0].turns) == 2


def test_wrong_answer_count_and_invalid_after_search_score_zero():
    env = SearchEnv(_CountingTool())
    (episode,) = env.reset([_task(2)])
    env.step([episode], ["<mem></mem><search>q</search>"])
    (result,) = env.step([episode], ["<mem></mem><answer>a0</answer>"])
    assert result.done and result.reward == 0.0 and result.step.error.value == "wrong_answer_count"


def test_max_turns_ends_without_information():
    tool = _CountingTool()
    env = SearchEnv(tool, EnvConfig(max_turns=2))
    (episode,) = env.reset([_task()])
    assert env.step([episode], ["<mem></mem><search>a</search>"])[0].information is not None
    (last,) = env.step([episode], ["<mem></mem><search>b</search>"])
    assert last.done and last.information is None and last.reward == 0.0
    assert tool.calls == [["a"]]


def test_replay_checks_information_and_length(world):
    task = world.tasks("train", 2)[0]
    (trajectory,) = world.expert_trajectories([task])
    env = world.env()
    tampered = Transcript(task, trajectory.prompt,
                          (Turn(trajectory.turns[0].model, "<information>x</information>"),)
                          + trajectory.turns[1:])
    with pytest.raises(ValueError, match="turn 0 information"):
        env.replay(tampered)
    assert env.replay(tampered, check_information=False).reward == 1.0
    too_long = Transcript(task, trajectory.prompt, trajectory.turns + trajectory.turns[-1:])
    with pytest.raises(ValueError, match="after the end"):
        env.replay(too_long)


def test_visible_context_drops_all_but_prompt_and_newest_memory():
    turns = [Turn("<mem></mem><search>q1</search>", "<information>i1</information>"),
             Turn("<mem>m2</mem><search>q2</search>", "<information>i2</information>")]
    assert visible_context("P|", turns) == "P|<mem>m2</mem><search>q2</search><information>i2</information>"
    assert visible_context("P|", turns, prune_on_memory=False) == \
        "P|" + "".join(t.model + t.information for t in turns)
    no_mem = [turns[0], Turn("<search>q3</search>", "<information>i3</information>")]
    assert visible_context("P|", no_mem).endswith("i1</information><search>q3</search><information>i3</information>")


def test_token_usage_by_hand():
    count = lambda text: len(text.split())  # noqa: E731
    prompt = "p p p"  # 3
    turns = [Turn("<mem> </mem> <search>a b</search>", "i i i i"),  # model 4, info 4
             Turn("<mem> m m </mem> <answer>x</answer>", None)]  # model 5, mem span 4
    usage = token_usage(prompt, turns, count)
    # turn 1: context 3 + 4 = 7, then info -> 11. turn 2: peak 11 + 4 = 15 before pruning,
    # then 3 + 5 = 8.  TT = 7 + 8, PT = 15.
    assert (usage.total_tokens, usage.peak_tokens, usage.num_turns) == (15, 15, 2)
    full = token_usage(prompt, turns, count, prune_on_memory=False)
    assert (full.total_tokens, full.peak_tokens) == (7 + 16, 16)


def test_memory_saves_tokens_on_four_objectives(world):
    tasks = world.tasks("heldout", 4)[:10]
    env = SearchEnv(world.search_tool, world.config.env, count_tokens=lambda t: len(t.split()))
    for trajectory in world.expert_trajectories(tasks):
        episode = env.replay(trajectory)
        pruned, full = env.token_usage(episode), env.token_usage(episode, prune_on_memory=False)
        assert pruned.peak_tokens < full.peak_tokens and pruned.total_tokens < full.total_tokens


def test_token_cap_needs_counter():
    with pytest.raises(ValueError, match="count_tokens"):
        SearchEnv(_CountingTool(), EnvConfig(info_max_tokens=10))
    with pytest.raises(ValueError, match="count_tokens"):
        SearchEnv(_CountingTool()).token_usage(None)
    with pytest.raises(ValueError, match="top_k"):
        EnvConfig(top_k=0)


def test_trajectory_dict_roundtrip(world):
    import json
    (trajectory,) = world.expert_trajectories(world.tasks("train", 3)[:1])
    again = Transcript.from_dict(json.loads(json.dumps(trajectory.to_dict())))
    assert again == trajectory and world.env().replay(again).reward == 1.0


def test_numbered_questions_word_a_single_question_like_several():
    """A run that mixes objective counts gives every task the same instructions: with
    numbered_questions a single question reads "Question 1: ..." under the several-answers rule."""
    one, two = build_prompt(_task(1)), build_prompt(_task(2))
    assert "Question: Q0?" in one and "answer 1; answer 2" not in one
    numbered = SearchEnv(_CountingTool(), EnvConfig(numbered_questions=True)).prompt(_task(1))
    assert numbered == build_prompt(_task(1), numbered=True)
    assert numbered.splitlines()[0] == two.splitlines()[0]  # the same instructions
    assert numbered.splitlines()[1:] == ["Question 1: Q0?"]
    assert SearchEnv(_CountingTool(), EnvConfig(numbered_questions=True)).prompt(_task(2)) == two
