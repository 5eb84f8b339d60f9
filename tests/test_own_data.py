"""A user's own model and data: chat-template prompts through rollout and training, turn stop
tokens, demonstration files, and the task side built from what the config names."""
import json
import random

import pytest
import torch
from model_dirs import END_OF_TURN, chat_tokenizer, save_chat_model
from rollout_fixtures import tiny_model, tiny_world

from mempo.config import parse_args
from mempo.envs.demonstrations import load_demonstrations
from mempo.envs.export_tiny_world import write_demonstrations
from mempo.envs.prompts import chat_template_prompt
from mempo.ops import linear_logprobs
from mempo.rollout import ContextPolicy, NativeEngine, SamplingParams, run_rollout, trajectory_from_turns
from mempo.training.fused_policy import packed_hidden
from mempo.training.packed_batch import pack_trajectories
from mempo.training.task_side import Demonstrations, SetupError, build_task_side


def test_chat_prompt_rollout_equals_training_and_template_ids(tmp_path):
    world, _ = tiny_world()
    tok = chat_tokenizer(tmp_path)
    env = world.env(None, chat_template_prompt(tok, system_prompt="Be brief."))
    tasks = world.tasks("train", 2)[:2]
    experts = world.expert_trajectories(tasks, env)
    model = tiny_model(len(tok), seed=1)
    trajs = run_rollout(NativeEngine(model, 4096), env, tok, tasks, [0, 1], ContextPolicy("mempo"),
                        SamplingParams(max_new_tokens=256), forced_turns=[[t.model for t in e.turns] for e in experts])
    for task, traj, expert in zip(tasks, trajs, experts):
        user = env.prompt(task)
        assert user.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
        assert user.endswith("<|im_end|>\n<|im_start|>assistant\n")
        template_ids = tok.apply_chat_template(
            [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": user.split("user\n", 1)[1].split("<|im_end|>")[0]}],
            tokenize=True, add_generation_prompt=True)
        template_ids = list(template_ids["input_ids"] if hasattr(template_ids, "keys") else template_ids)
        prompt = next(s for s in traj.segments if s.kind == "prompt")
        assert traj.token_ids[prompt.start:prompt.end] == template_ids  # the template's own ids
        replay = trajectory_from_turns(tok, expert.prompt, [(t.model, t.information) for t in expert.turns])
        assert traj.token_ids == replay.token_ids and traj.reward == 1.0
        assert any(s.dropped_at is not None for s in traj.segments)
        mask = torch.tensor(traj.loss_mask[1:])
        batch = pack_trajectories([traj])
        with torch.no_grad():
            trainer = linear_logprobs(packed_hidden(model, batch, "segment"), model.lm_head.weight, batch.targets)[:-1]
        assert (trainer[mask] - torch.tensor(traj.sample_logprobs[1:])[mask]).abs().max() <= 1e-4


@pytest.mark.parametrize("stop_ids", [True, False])
def test_end_of_turn_token_ends_the_turn(tmp_path, stop_ids):
    world, _ = tiny_world()
    tok = chat_tokenizer(tmp_path)
    end = tok.convert_tokens_to_ids(END_OF_TURN)
    task = world.tasks("train", 1)[0]
    params = SamplingParams(max_new_tokens=64, stop_token_ids=(end,) if stop_ids else ())
    (traj,) = run_rollout(NativeEngine(tiny_model(len(tok)), 4096), world.env(), tok, [task], [0], ContextPolicy(),
                          params, forced_turns=[[f"<mem></mem>{END_OF_TURN}<search>x</search>"]])
    if stop_ids:  # the model ended its turn: nothing after the end-of-turn token, an invalid turn
        assert traj.turn_texts == [f"<mem></mem>{END_OF_TURN}"] and traj.finish_reason == "format_error"
    else:
        assert traj.turn_texts[0].endswith("<search> x</search>")  # the tiny tokenizer's space after a tag


def test_exported_demonstrations_load_to_the_experts(tmp_path):
    world, _ = tiny_world()
    path = tmp_path / "demos.jsonl"
    count = write_demonstrations(world, path, [1, 2])
    env = world.env()
    loaded = load_demonstrations(path, env)
    tasks = [t for n in (1, 2) for t in world.tasks("train", n)]
    assert len(loaded) == count == len(tasks)
    assert loaded == world.expert_trajectories(tasks, env)


@pytest.mark.parametrize("turns, message", [
    ([{"memory": "", "answer": "Kavaizi", "information": []}], "an answer turn gets no 'information'"),
    ([{"memory": "", "search": "q"}], "the last turn must answer"),
    ([{"memory": "", "search": "q", "information": "raw text"}, {"memory": "", "answer": "a"}],
     "a search turn needs 'information'"),
    ([{"memory": "", "search": "q", "answer": "a"}], "exactly one of 'search' or 'answer'"),
    ([{"search": "q", "information": []}, {"memory": "", "answer": "a"}], "'memory' must be a string"),
    ([{"memory": "", "answer": "a; b"}], "wrong_answer_count"),
    ([{"memory": "", "search": " ", "information": []}, {"memory": "", "answer": "a"}], "empty_query"),
])
def test_bad_demonstrations_name_line_turn_and_field(tmp_path, turns, message):
    world, _ = tiny_world()
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answers": ["a"], "turns": turns}) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_demonstrations(path, world.env())
    assert "demos.jsonl:1" in str(info.value)


def test_passages_are_rendered_by_the_runs_env(tmp_path):
    world, _ = tiny_world()
    line = {"question": "Q?", "answers": ["a"], "turns": [
        {"memory": "", "search": "q", "information": [{"title": "T", "text": "x <mem> y"}]},
        {"memory": "x", "think": "so", "answer": ["a"]}]}
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps(line) + "\n")
    (demo,) = load_demonstrations(path, world.env())
    assert demo.turns[0].information == world.env().render_information(
        [__import__("mempo.envs", fromlist=["Doc"]).Doc("", "T", "x <mem> y")])
    assert demo.turns[1].model == "<mem>x</mem><think>so</think><answer>a</answer>"


def _files(tmp_path):
    world, _ = tiny_world()
    world.write_corpus(tmp_path / "corpus.jsonl")
    world.write_tasks(tmp_path / "train.jsonl", "train")
    world.write_tasks(tmp_path / "heldout.jsonl", "heldout")
    write_demonstrations(world, tmp_path / "demos.jsonl", [1])
    return ["--env.corpus_path", str(tmp_path / "corpus.jsonl"),
            "--env.train_tasks_path", str(tmp_path / "train.jsonl"),
            "--env.eval_tasks_path", str(tmp_path / "heldout.jsonl"), "--sft.data_path", str(tmp_path / "demos.jsonl")]


def test_task_side_from_files_uses_the_models_tokenizer_and_template(tmp_path):
    model_dir = save_chat_model(tmp_path / "model")
    cfg = parse_args(_files(tmp_path) + ["--model.path", str(model_dir), "--env.eval_objectives", "1,3"])
    side = build_task_side(cfg)
    from transformers import AutoTokenizer

    assert len(side.tokenizer) == len(AutoTokenizer.from_pretrained(model_dir)) and side.prompt_format == "chat"
    assert side.stop_token_ids == tuple(sorted({side.tokenizer.convert_tokens_to_ids(END_OF_TURN),
                                                side.tokenizer.eos_token_id}))
    assert "bm25 over" in side.source and "tiny world" not in side.source
    assert {n: len(t) for n, t in side.eval_sets.items()} == {1: 60, 3: 64}  # env.eval_tasks: 64 per count
    assert all(t.num_objectives == 3 for t in side.eval_sets[3])
    counts = [t.num_objectives for t in side.train_tasks]  # the file's tasks of env.train_objectives, in order
    assert counts == sorted(counts) and set(counts) == set(cfg.env.train_objectives) and counts.count(1) == 240
    assert len(side.expert_trajectories) == 240 and side.expert_trajectories[0].prompt.startswith("<|im_start|>user")
    assert side.relabel is None  # your own demonstrations are never renamed
    plain = build_task_side(parse_args(_files(tmp_path) + ["--model.path", str(model_dir),
                                                           "--env.prompt_format", "plain"]))
    assert plain.prompt_format == "plain" and plain.expert_trajectories[0].prompt.startswith("Answer by searching")


def test_task_side_errors_name_the_file(tmp_path):
    files = _files(tmp_path)
    model_dir = save_chat_model(tmp_path / "model")
    (tmp_path / "weird.jsonl").write_text('{"prompt": "Q?", "target": "a"}\n')
    bad_tasks = files[:3] + [str(tmp_path / "weird.jsonl")] + files[4:]
    with pytest.raises(SetupError, match=r"env.train_tasks_path: weird.jsonl:1: no question column; found columns"):
        build_task_side(parse_args(bad_tasks + ["--model.path", str(model_dir)]))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(SetupError, match=r"model.path .*bare' holds no tokenizer"):
        build_task_side(parse_args(files + ["--model.path", str(bare)]))
    with pytest.raises(SetupError, match="env.prompt_format is 'chat' but the tokenizer of the tiny world has no chat"):
        build_task_side(parse_args(["--env.prompt_format", "chat", "--sft.steps", "0"]))


def test_expert_turns_beyond_max_turns_is_a_setup_error():
    from mempo.training.task_side import SetupError, build_task_side

    with pytest.raises(SetupError, match=r"rollout.max_turns=2 is too small .*the expert needs 4 turns"):
        build_task_side(parse_args(["--rollout.max_turns", "2", "--env.train_objectives", "2"]))


@pytest.mark.parametrize("counts, numbered", [(("1", "1"), False), (("1", "1,2"), True), (("1,2,3,4", "1,2,4"), True)])
def test_a_run_mixing_objective_counts_numbers_every_prompt(counts, numbered):
    """One instruction text per run: when train or eval tasks have several objectives, a
    single question is worded like several ("Question 1: ...")."""
    side = build_task_side(parse_args(["--sft.steps", "0", "--env.train_objectives", counts[0],
                                       "--env.eval_objectives", counts[1]]))
    assert side.env.config.numbered_questions is numbered
    single = next(t for t in side.train_tasks if t.num_objectives == 1)
    assert ("\nQuestion 1: " in side.env.prompt(single)) is numbered


def test_tasks_per_count_sizes_the_tiny_worlds_composed_tasks():
    side = build_task_side(parse_args(["--sft.steps", "0", "--env.tasks_per_count", "3"]))
    counts = [t.num_objectives for t in side.train_tasks]
    assert [counts.count(n) for n in (1, 2, 3, 4)] == [240, 3, 3, 3]  # singles: every train question
    assert all(len(tasks) == 3 for n, tasks in side.eval_sets.items() if n > 1)  # under eval_tasks 64


def test_warm_start_shows_a_fraction_of_the_demonstrations_relabeled():
    side = build_task_side(parse_args(["--env.tasks_per_count", "16"]))
    transcripts = side.expert_trajectories[-48:]  # 2- to 4-objective demonstrations
    context = ContextPolicy("mempo")
    plain = Demonstrations(transcripts, side.tokenizer, context)
    mixed = Demonstrations(transcripts, side.tokenizer, context, side.relabel, 0.5)
    rng = random.Random(5)
    old_picks = [rng.randrange(48) for _ in range(400)]
    assert plain.draw(random.Random(5), 400) == [(i, None) for i in old_picks]  # relabel 0: the draws of before
    draws = mixed.draw(random.Random(5), 400)
    assert [i for i, _ in draws] == old_picks and 160 < sum(s is not None for _, s in draws) < 240
    assert all(s is not None for _, s in Demonstrations(transcripts, side.tokenizer, context, side.relabel,
                                                        1.0).draw(random.Random(5), 20))
    index, seed = next((i, s) for i, s in draws if s is not None)
    relabeled = mixed.trajectory(index, seed)
    expected = trajectory_from_turns(side.tokenizer, *_prompt_and_turns(side.relabel(transcripts[index],
                                                                                     random.Random(seed))), context)
    assert relabeled.token_ids == expected.token_ids != mixed.trajectory(index, None).token_ids
    assert len(relabeled.segments) == len(mixed.trajectory(index, None).segments)
    assert mixed.trajectory(index, seed).token_ids == relabeled.token_ids  # a seed is one world


def _prompt_and_turns(transcript):
    return transcript.prompt, [(t.model, t.information) for t in transcript.turns]


def test_a_model_directorys_tokenizer_encodes_as_it_was_saved(tmp_path):
    """transformers 5's AutoTokenizer gives every qwen2 directory Qwen2Tokenizer's splitting,
    whatever tokenizer.json says; the tiny world's tokenizer (as in an exported runs/<name>/hf/)
    splits differently, so load_model_tokenizer falls back to tokenizer.json as written. A
    directory whose tokenizer.json already has Qwen's splitting keeps AutoTokenizer's class."""
    from transformers import AutoTokenizer

    from mempo.envs import build_tiny_world
    from mempo.envs.tokenizer import add_chat_template
    from mempo.training.task_side import load_model_tokenizer, matches_saved_pipeline

    world = build_tiny_world(seed=0)
    model_dir = save_chat_model(tmp_path / "model")
    task = world.tasks("heldout", 4)[0]
    expert = world.expert_trajectories([task])[0]
    text = expert.prompt + "".join(t.model + (t.information or "") for t in expert.turns)
    trained_with = add_chat_template(world.tokenizer())(text)["input_ids"]

    auto = AutoTokenizer.from_pretrained(model_dir)
    assert not matches_saved_pipeline(auto, str(model_dir)) and auto(text)["input_ids"] != trained_with
    loaded = load_model_tokenizer(str(model_dir))
    assert loaded(text)["input_ids"] == trained_with and len(loaded) == len(auto)
    assert loaded.chat_template == auto.chat_template and loaded.eos_token == auto.eos_token

    qwen_like = tmp_path / "qwen_like"  # tokenizer.json written by Qwen2Tokenizer, next to the same config
    auto.save_pretrained(qwen_like)
    (qwen_like / "config.json").write_text((model_dir / "config.json").read_text())
    kept = load_model_tokenizer(str(qwen_like))
    assert type(kept) is type(auto) and kept(text)["input_ids"] == auto(text)["input_ids"]
