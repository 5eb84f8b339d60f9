"""One MemPO step end to end in one process: rollout, probes, advantages, update."""
import math

import pytest
import torch
from rollout_fixtures import tiny_model, tiny_world

import mempo.rollout.agent_loop as agent_loop  # NativeEngine.rollout calls agent_loop.run_rollout
from mempo.ops import PolicyLossOptions
from mempo.rollout import NativeEngine, SamplingParams, run_rollout
from mempo.training.fused_policy import FusedPolicy
from mempo.training.rl_step import RLStepOptions, rl_step


def _forced_rollout(world):
    """Run the real agent loop, teacher-forcing expert turns; odd rows answer wrongly, so
    rewards differ within each group and memories (from the expert) exist."""
    def rollout(engine, env, tokenizer, tasks, group_index, policy, params):
        forced = []
        for i, expert in enumerate(world.expert_trajectories(tasks)):
            turns = [t.model for t in expert.turns]
            if i % 2:  # forget the facts in the last memory, answer wrongly
                turns[-1] = "<mem>nothing</mem><answer>nobody</answer>"
            forced.append(turns)
        return run_rollout(engine, env, tokenizer, tasks, group_index, policy, params, forced_turns=forced)
    return rollout


def _sgd_update(world, tok, tasks, make_engine=lambda m: NativeEngine(m, 2048), **options):
    """One rl_step with SGD (lr 0.1, no grad clipping) from a fixed init -> (metrics, parameter
    deltas in float64)."""
    model = tiny_model(len(tok), seed=7, init_std=0.02)
    policy = FusedPolicy(model, attention="segment")
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    opts = RLStepOptions(group_size=2, sampling=SamplingParams(max_new_tokens=200, seed=1), micro_batch_tokens=400,
                         grad_clip=0.0, **options)
    before = [p.detach().clone().double() for p in model.parameters()]
    metrics = rl_step(policy, make_engine(model), world.env(), tok, tasks, opts, opt, step=0)
    return metrics, [p.detach().double() - b for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("mem_coef", [1.0, 0.0])
def test_rl_step_moves_the_policy_towards_higher_reward(monkeypatch, mem_coef):
    world, tok = tiny_world()
    monkeypatch.setattr(agent_loop, "run_rollout", _forced_rollout(world))
    model = tiny_model(len(tok), seed=7, init_std=0.02)
    policy = FusedPolicy(model, attention="dense")
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    opts = RLStepOptions(group_size=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=200, seed=1),
                         micro_batch_tokens=400, mem_coef=mem_coef)
    tasks = world.tasks("train", num_objectives=1)[:2]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = rl_step(policy, NativeEngine(model, 2048), world.env(), tok, tasks, opts, opt, step=0)
    for key in ("reward/mean", "em", "f1", "memory_reward/mean", "loss", "clip_fraction", "kl", "grad_norm", "TT",
                "PT", "tokens_per_s"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["reward/mean"] == pytest.approx(0.5) and metrics["em"] == pytest.approx(0.5)
    assert metrics["traj_adv/abs_mean"] > 0.5 and metrics["skipped"] == 0.0
    assert metrics["memory_adv/abs_mean"] > 0  # the last memories differ within each group
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert metrics["clip_fraction"] == 0.0 and metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-4)  # on-policy


def test_kl_to_reference_needs_and_uses_the_reference(monkeypatch):
    import copy

    world, tok = tiny_world()
    monkeypatch.setattr(agent_loop, "run_rollout", _forced_rollout(world))
    model = tiny_model(len(tok), seed=8, init_std=0.02)
    policy = FusedPolicy(model, attention="segment")
    opts = RLStepOptions(group_size=2, sampling=SamplingParams(max_new_tokens=200, seed=1), micro_batch_tokens=400,
                         loss_options=PolicyLossOptions(kl_coef=0.1, kl_estimator="k3"))
    tasks = world.tasks("train", num_objectives=1)[:2]
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    with pytest.raises(ValueError, match="ref_policy"):
        rl_step(policy, NativeEngine(model, 2048), world.env(), tok, tasks, opts, opt, step=0)
    ref = FusedPolicy(copy.deepcopy(model), attention="segment")
    same = rl_step(policy, NativeEngine(model, 2048), world.env(), tok, tasks, opts, opt, step=0, ref_policy=ref)
    assert same["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the update
    after = rl_step(policy, NativeEngine(model, 2048), world.env(), tok, tasks, opts, opt, step=1, ref_policy=ref)
    assert after["kl_ref"] > 1e-6  # the update moved the policy away from the frozen reference


@pytest.mark.parametrize("shift, weight", [(math.log(2.0), 0.5), (-5.0, 2.0)])
def test_inexact_engine_recomputes_old_logprobs_and_reweights_tokens(monkeypatch, shift, weight):
    """An engine whose recorded log-probs are off by `shift` (as vLLM's are after a drop):
    the trainer recomputes the old log-probs (ratio 1, on-policy) and every token's
    gradient is scaled by min(pi_old / pi_rollout, cap) = e^-shift capped at 2, so with SGD
    and no clipping the update is exactly `weight` x the native engine's update."""
    world, tok = tiny_world()
    forced = _forced_rollout(world)
    monkeypatch.setattr(agent_loop, "run_rollout", forced)
    tasks = world.tasks("train", num_objectives=1)[:2]

    class ShiftedEngine:
        exact_logprobs = False  # the engine interface: the trainer recomputes the old log-probs

        def __init__(self, model):
            self.native = NativeEngine(model, 2048)

        def rollout(self, policy, env, tokenizer, tasks, group_index, context, params):
            trajs = forced(self.native, env, tokenizer, tasks, group_index, context, params)
            for t in trajs:
                t.sample_logprobs = [lp + shift if m else lp for lp, m in zip(t.sample_logprobs, t.loss_mask)]
            return trajs

    native, native_delta = _sgd_update(world, tok, tasks)
    shifted, shifted_delta = _sgd_update(world, tok, tasks, ShiftedEngine)
    assert "tis/weight_mean" not in native
    assert shifted["tis/weight_mean"] == pytest.approx(weight, rel=1e-5)
    assert shifted["rollout/logprob_gap"] == pytest.approx(abs(shift), rel=1e-3)
    assert shifted["ratio/mean"] == pytest.approx(1.0, abs=1e-5) and shifted["clip_fraction"] == 0.0
    assert shifted["memory_reward/mean"] == pytest.approx(native["memory_reward/mean"], abs=1e-6)
    assert any(d.abs().max() > 0 for d in native_delta)
    for a, b in zip(native_delta, shifted_delta):
        torch.testing.assert_close(b, weight * a, rtol=1e-3, atol=1e-6)  # float32 p + dp - p rounding


def test_memory_advantage_reaches_the_update_linearly(monkeypatch):
    """On-policy with SGD and no clipping the update is linear in the token advantages, which are
    traj_adv + mem_coef * mem_adv on memory tokens: update(c) = update(0) + c * (update(1) - update(0)),
    and the memory part is not zero. Fails if mem_coef or mem_adv is lost on the way to the loss."""
    world, tok = tiny_world()
    monkeypatch.setattr(agent_loop, "run_rollout", _forced_rollout(world))
    tasks = world.tasks("train", num_objectives=1)[:2]

    def update(mem_coef):
        metrics, deltas = _sgd_update(world, tok, tasks, mem_coef=mem_coef)
        assert metrics["memory_adv/abs_mean"] > 0 and metrics["clip_fraction"] == 0.0
        return torch.cat([d.flatten() for d in deltas])

    d0, d1, d3 = update(0.0), update(1.0), update(3.0)
    memory_part = d1 - d0
    assert memory_part.abs().max() > 1e-3 * d0.abs().max()
    torch.testing.assert_close(d3 - d0, 3.0 * memory_part, rtol=1e-3, atol=1e-6)


def test_recompute_old_logprobs_with_the_native_engine(monkeypatch):
    """algorithm.old_logprobs=recompute (the bf16 default): the native engine's log-probs are
    replaced by the trainer's and tokens reweighted; in float32 they agree, so the weights are 1
    and the update equals the exact path's."""
    world, tok = tiny_world()
    monkeypatch.setattr(agent_loop, "run_rollout", _forced_rollout(world))
    tasks = world.tasks("train", num_objectives=1)[:2]

    exact, exact_delta = _sgd_update(world, tok, tasks, recompute_old_logprobs=False)
    recomputed, recomputed_delta = _sgd_update(world, tok, tasks, recompute_old_logprobs=True)
    assert "tis/weight_mean" not in exact
    assert recomputed["tis/weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert recomputed["rollout/logprob_gap"] < 1e-4  # float32: the invariant
    for a, b in zip(exact_delta, recomputed_delta):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-7)


def test_old_logprobs_auto_resolves_by_engine_and_dtype(monkeypatch):
    from mempo.config import ConfigError, parse_args
    from mempo.trainer import recompute_old_logprobs

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not recompute_old_logprobs(parse_args([]), cpu)  # native, float32
    assert recompute_old_logprobs(parse_args([]), cuda)  # native, bf16 (auto dtype on CUDA)
    assert recompute_old_logprobs(parse_args(["--model.dtype", "bfloat16"]), cpu)
    assert not recompute_old_logprobs(parse_args(["--model.dtype", "bfloat16", "--algorithm.old_logprobs",
                                                  "rollout"]), cpu)
    assert recompute_old_logprobs(parse_args(["--algorithm.old_logprobs", "recompute"]), cpu)
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="algorithm.old_logprobs must be 'auto' or 'recompute' with engine=vllm"):
        from mempo.config import Config
        cfg = Config()
        cfg.rollout.engine, cfg.algorithm.old_logprobs = "vllm", "rollout"
        cfg.validate()
