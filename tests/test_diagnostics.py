"""Rollout diagnostics: memory contents and log-prob drift by span kind."""
import pytest
import torch
from rollout_fixtures import tiny_world

import mempo.rollout.agent_loop as agent_loop  # NativeEngine.rollout calls agent_loop.run_rollout
from mempo.envs import DEFAULT_TAGS
from mempo.rollout import ContextPolicy, trajectory_from_turns
from mempo.training.diagnostics import drift_by_kind, final_memory_recall, memory_stats, token_kinds


def _traj(turns):
    world, tok = tiny_world()
    task = world.tasks("train", 1)[0]
    prompt = world.env().prompt(task)
    return task, tok, trajectory_from_turns(tok, prompt, turns, ContextPolicy("mempo"))


def test_token_kinds_memory_think_action_answer():
    info = "<information>Zaputh was born in Kavaizi.</information>"
    task, tok, traj = _traj([("<mem></mem><think>look it up</think><search>Zaputh born</search>", info),
                             ("<mem>Zaputh was born in Kavaizi.</mem><answer>Kavaizi</answer>", None)])
    kinds = token_kinds(traj, tok, DEFAULT_TAGS)
    ids = {k: [t for t, kk in zip(traj.token_ids, kinds) if kk == k] for k in ("memory", "think", "action", "answer")}
    expected = {"memory": "<mem></mem><mem>Zaputh was born in Kavaizi.</mem>", "think": "<think>look it up</think>",
                "action": "<search>Zaputh born</search>", "answer": "<answer>Kavaizi</answer>"}
    assert ids == {k: tok(text, add_special_tokens=False)["input_ids"] for k, text in expected.items()}
    assert all(k is None for k, m in zip(kinds, traj.loss_mask) if not m)
    gaps = torch.zeros(len(traj) - 1)
    think_rows = [i - 1 for i, k in enumerate(kinds) if k == "think"]
    gaps[think_rows] = 0.5
    drift = drift_by_kind([traj], [torch.zeros(len(traj) - 1)], [gaps], tok, DEFAULT_TAGS)
    assert drift["think"] == (pytest.approx(0.5 * len(think_rows)), len(think_rows))
    assert drift["memory"][0] == 0.0 and drift["answer"][1] > 0


def test_memory_stats_gold_recall_length_and_dropped():
    info = "<information>Zaputh was born in Kavaizi.</information>"
    task, tok, traj = _traj([("<mem></mem><search>Zaputh born</search>", info),
                             ("<mem>Zaputh was born in Kavaizi.</mem><answer>x</answer>", None)])
    assert task.answers == (("Kavaizi",),)
    stats = memory_stats([traj], [task], tok, DEFAULT_TAGS)
    assert stats["gold_recall"] == [0.0, 1.0]
    first, second = traj.memory_segments()
    assert stats["length"] == [first.end - first.start, second.end - second.start]
    dropped = sum(s.end - s.start for s in traj.segments if s.step == 1)  # all of turn 1 when memory 2 closes
    assert stats["dropped"] == [0.0, float(dropped)]


def test_final_memory_recall_reads_the_last_memory_only():
    world, tok = tiny_world()
    task = world.tasks("train", 2)[0]
    prompt = world.env().prompt(task)
    first, second = (a[0] for a in task.answers)
    info = "<information>x</information>"
    # the second memory holds both answers, the last one only objective 2's: the first is forgotten
    turns = [("<mem></mem><search>q</search>", info), (f"<mem>{first}; {second}.</mem><search>q</search>", info),
             (f"<mem>it is {second}.</mem><answer>a; b</answer>", None)]
    traj = trajectory_from_turns(tok, prompt, turns, ContextPolicy("mempo"))
    empty = trajectory_from_turns(tok, prompt, [("<answer>a; b</answer>", None)], ContextPolicy("mempo"))
    assert final_memory_recall([traj, empty], [task, task], tok, DEFAULT_TAGS) == [0.5, 0.0]
    assert memory_stats([traj], [task], tok, DEFAULT_TAGS)["gold_recall"] == [0.0, 1.0, 0.5]


def test_rl_step_logs_memory_diagnostics_and_drift(monkeypatch):
    from rollout_fixtures import tiny_model
    from test_rl_step import _forced_rollout

    from mempo.rollout import NativeEngine, SamplingParams
    from mempo.training.fused_policy import FusedPolicy
    from mempo.training.rl_step import RLStepOptions, rl_step

    world, tok = tiny_world()
    monkeypatch.setattr(agent_loop, "run_rollout", _forced_rollout(world))
    model = tiny_model(len(tok), seed=7, init_std=0.02)
    opts = RLStepOptions(group_size=2, sampling=SamplingParams(max_new_tokens=200, seed=1), micro_batch_tokens=400,
                         recompute_old_logprobs=True)
    metrics = rl_step(FusedPolicy(model, attention="segment"), NativeEngine(model, 2048), world.env(), tok,
                      world.tasks("train", 1)[:2], opts, torch.optim.SGD(model.parameters(), lr=0.1), step=0)
    # odd rows forget the facts in their last memory: gold recall strictly between 0 and 1
    assert 0.0 < metrics["memory/gold_recall"] < 1.0 and metrics["memory/length_mean"] > 1
    assert metrics["memory/dropped_mean"] > 0
    assert 0.0 <= metrics["drift/memory"] < 1e-4 and 0.0 <= metrics["drift/answer"] < 1e-4  # float32: exact
    assert metrics["rollout/kl"] == pytest.approx(0.0, abs=1e-6)
