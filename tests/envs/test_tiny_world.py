"""Tiny world: determinism, question structure, splits, faithful experts that score 1.0."""
import random
import subprocess
import sys

import pytest

from mempo.envs import BM25Search, SearchEnv, build_tiny_world, parse_step
from mempo.envs.search_tool import Doc


def test_same_seed_same_world_other_seed_other_world(seed):
    a, b = build_tiny_world(seed=seed, num_people=12), build_tiny_world(seed=seed, num_people=12)
    assert a.corpus == b.corpus and a.questions == b.questions
    assert a.tasks("train", 2) == b.tasks("train", 2)
    tasks = a.tasks("heldout", 2)[:5]
    assert a.expert_trajectories(tasks) == b.expert_trajectories(tasks)
    assert build_tiny_world(seed=seed + 1, num_people=12).corpus != a.corpus


def test_deterministic_across_processes():
    code = ("import hashlib, mempo.envs as e; w = e.build_tiny_world(seed=7, num_people=10);"
            "t = w.tasks('train', 2)[:3];"
            "print(hashlib.sha256(repr((w.corpus, t, w.expert_trajectories(t))).encode()).hexdigest())")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, check=True).stdout for _ in range(2)}
    assert len(outputs) == 1


def test_sizes_and_questions(world):
    config = world.config
    assert len(world.facts.people) == config.num_people
    assert len(world.corpus) == 3 * config.num_people + 2 * config.num_cities
    assert len({d.id for d in world.corpus}) == len(world.corpus)
    sentences = {d.text for d in world.corpus}
    for q in world.questions:
        question, answer = q.task.questions[0], q.task.answers[0][0]
        assert answer.lower() not in question.lower()  # needs a search to answer
        assert all(h.sentence in sentences for h in q.hops)
        assert 1 <= len(q.hops) <= 2 and q.hops[-1].object == answer
        if len(q.hops) == 2:
            assert q.hops[0].object == q.hops[1].subject
    assert sum(len(q.hops) == 2 for q in world.questions) == 4 * config.num_people


def test_every_name_is_fictional_and_distinct(world):
    names = world.facts.people + world.facts.cities + world.facts.countries
    assert len({n.lower() for n in names}) == len(names)
    assert all(n.isalpha() and n[0].isupper() for n in names)


def test_splits_are_disjoint_and_composed_within_a_split(world):
    train = {t.questions[0] for t in world.tasks("train")}
    heldout = {t.questions[0] for t in world.tasks("heldout")}
    assert train and heldout and not train & heldout
    assert len(heldout) == round(world.config.heldout_fraction * len(world.questions))
    for task in world.tasks("heldout", 4):
        assert task.num_objectives == 4 and set(task.questions) <= heldout
    with pytest.raises(ValueError, match="split"):
        world.tasks("test")


@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("num_objectives", [1, 2, 3, 4])
def test_expert_replays_to_reward_one(world, split, num_objectives):
    tasks = world.tasks(split, num_objectives)
    trajectories = world.expert_trajectories(tasks)
    env = world.env()
    for task, trajectory in zip(tasks, trajectories):
        episode = env.replay(trajectory)
        assert episode.done and episode.reward == 1.0 and episode.format_valid, task.id
        assert episode.answers == tuple(a[0] for a in task.answers)


def test_expert_memory_keeps_exactly_the_facts_found(world):
    tasks = world.tasks("train", 4)[:40] + world.tasks("train", 1)
    for trajectory in world.expert_trajectories(tasks):
        found: list[str] = []
        needed = {h.sentence for q in trajectory.task.questions for h in
                  world.plan(trajectory.task)[trajectory.task.questions.index(q)]}
        for turn in trajectory.turns:
            step = parse_step(turn.model, num_objectives=trajectory.task.num_objectives)
            assert step.is_valid and step.memory == " ".join(found)
            if turn.information is not None:
                query_fact = next(h for hops in world.plan(trajectory.task) for h in hops
                                  if h.query == step.query)
                assert query_fact.sentence in turn.information
                assert query_fact.sentence not in found  # never searches a known fact twice
                found.append(query_fact.sentence)
        assert set(found) == needed


def test_bad_config():
    with pytest.raises(ValueError, match="num_people"):
        build_tiny_world(num_people=1)
    with pytest.raises(ValueError, match="heldout_fraction"):
        build_tiny_world(heldout_fraction=1.0)


def test_write_files_load_back(world, tmp_path):
    from mempo.envs import BM25Search, load_tasks
    world.write_tasks(tmp_path / "train.jsonl", "train")
    assert load_tasks(tmp_path / "train.jsonl") == world.tasks("train")
    world.write_corpus(tmp_path / "corpus.jsonl")
    assert BM25Search.from_jsonl(tmp_path / "corpus.jsonl").search(["x"], 1) is not None


@pytest.mark.parametrize("omit", [0.0, 0.5])
@pytest.mark.parametrize("num_objectives", [1, 2, 4])
def test_answers_memory_tells_which_objectives_are_done(world, num_objectives, omit):
    """answers style: one entry per objective (PENDING until begun); each search goes to the first
    objective not done (its first hop, or the hop after its bridge); once written, an answer (or
    UNKNOWN) stays; the answer turn copies the entries; the reward is the fraction of answers kept."""
    from mempo.envs.tiny_world_expert import PENDING, UNKNOWN, parse_entries

    tasks = world.tasks("train", num_objectives)[:64]
    trajectories = world.expert_trajectories(tasks, memory="answers", omit=omit)
    env, unknown = world.env(), 0
    for task, trajectory in zip(tasks, trajectories):
        plan = world.plan(task)
        steps = [parse_step(t.model, num_objectives=num_objectives) for t in trajectory.turns]
        memories = [parse_entries(step.memory) for step in steps]
        assert all(sorted(memory) == list(range(1, num_objectives + 1)) for memory in memories)
        for step, memory in zip(steps[:-1], memories):
            todo = next(i for i in range(num_objectives) if memory[i + 1].split(" ")[0]
                        in (PENDING, "mentor", "born"))
            hops, value = plan[todo], memory[todo + 1]
            expected = hops[0] if value == PENDING else next(h for h in hops[1:] if h.subject == value.split(" ")[1])
            assert step.query == expected.query
        assert all(v == PENDING for v in memories[0].values())
        for before, after in zip(memories, memories[1:]):
            for i, value in before.items():  # entries only move from pending to a bridge to the answer
                assert after[i] == value or value.split(" ")[0] in (PENDING, "mentor", "born")
        last = memories[-1]
        assert sorted(last) == list(range(1, num_objectives + 1))
        assert steps[-1].answers == tuple(last[i + 1] for i in range(num_objectives))
        assert all(last[i + 1] in (hops[-1].object, UNKNOWN) for i, hops in enumerate(plan))
        kept = sum(a != UNKNOWN for a in steps[-1].answers)
        assert env.replay(trajectory).reward == pytest.approx(kept / num_objectives)
        unknown += num_objectives - kept
    fraction = unknown / (len(tasks) * num_objectives)
    assert (fraction == 0.0) if omit == 0.0 else (0.35 < fraction < 0.65)


def test_lossy_expert_is_per_task_and_needs_the_answers_style(world):
    tasks = world.tasks("train", 2)[:20]
    lossy = world.expert_trajectories(tasks, memory="answers", omit=0.5)
    assert world.expert_trajectories(tasks[5:], memory="answers", omit=0.5) == lossy[5:]  # per task, not batch
    assert lossy != world.expert_trajectories(tasks, memory="answers")
    assert build_tiny_world(seed=0, expert_memory="answers", expert_omit=0.5).expert_trajectories(tasks) == lossy
    assert world.expert_trajectories(tasks) == world.expert_trajectories(tasks, memory="facts")  # the default
    with pytest.raises(ValueError, match="expert_omit"):
        build_tiny_world(expert_memory="answers", expert_omit=1.0)
    with pytest.raises(ValueError, match="expert_omit > 0 needs expert_memory 'answers'"):
        build_tiny_world(expert_omit=0.5)
    with pytest.raises(ValueError, match="expert_memory"):
        build_tiny_world(expert_memory="summary")


def test_lossy_answer_and_bridge_are_separate_entries(world):
    """'Where was X born?' + 'In which country was X born?': one search finds X's birthplace; a
    nearly always omitting expert loses the first answer, yet the second entry keeps the bridge."""
    from mempo.envs import Task
    from mempo.envs.tiny_world_expert import PENDING, UNKNOWN

    by_question = {q.task.questions[0]: q for q in world.questions}
    person = next(p for p in world.facts.people if f"Where was {p} born?" in by_question
                  and f"In which country was {p} born?" in by_question)
    single, double = by_question[f"Where was {person} born?"], by_question[f"In which country was {person} born?"]
    task = Task("bridge", single.task.questions + double.task.questions, single.task.answers + double.task.answers)
    (trajectory,) = world.expert_trajectories([task], memory="answers", omit=0.99)
    steps = [parse_step(t.model, num_objectives=2) for t in trajectory.turns]
    city = single.hops[-1].object
    assert [s.memory for s in steps] == [f"1 {PENDING} 2 {PENDING}", f"1 {UNKNOWN} 2 born {city}",
                                         f"1 {UNKNOWN} 2 {UNKNOWN}"]
    assert steps[1].query == double.hops[1].query and steps[-1].answers == (UNKNOWN, UNKNOWN)


@pytest.mark.parametrize("seed", [3, 11])
def test_a_relabeled_expert_is_the_expert_of_the_relabeled_world(world, seed):
    """Replayed against a corpus renamed by the same permutation, every relabeled demonstration
    gets back exactly the information it shows and scores 1.0: the renaming is consistent."""
    mapping = world.name_permutation(random.Random(seed))
    for kind in world.name_kinds:
        assert sorted(mapping[n] for n in kind) == sorted(kind)  # a permutation within each kind
    assert sum(mapping[n] != n for n in world.facts.people) > len(world.facts.people) // 2
    renamed = [Doc(d.id, world.rename(d.title, mapping), world.rename(d.text, mapping)) for d in world.corpus]
    env = SearchEnv(BM25Search.from_docs(renamed), world.config.env)
    answers_world = build_tiny_world(seed=0, expert_memory="answers")
    for memory_world in (world, answers_world):
        tasks = [t for n in (1, 2, 3, 4) for t in memory_world.tasks("train", n)[::37]]
        for original in memory_world.expert_trajectories(tasks):
            relabeled = memory_world.relabel(original, random.Random(seed))
            assert relabeled.task.answers == tuple(tuple(mapping[a] for a in accepted)
                                                   for accepted in original.task.answers)
            episode = env.replay(relabeled)
            assert episode.done and episode.reward == 1.0 and episode.format_valid
            assert len(relabeled.turns) == len(original.turns)
            # only names change: the texts with names blanked out are the same
            def blank(t):
                return [world._name_pattern.sub("#", x) for x in
                        [t.prompt] + [y for turn in t.turns for y in (turn.model, turn.information or "")]]
            assert blank(relabeled) == blank(original)
    assert relabeled != original and memory_world.relabel(original, random.Random(seed)) == relabeled
