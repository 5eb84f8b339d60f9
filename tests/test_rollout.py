"""The native rollout: trajectories, eviction, sampling, and the rollout == training invariant."""
import pytest
import torch
from rollout_fixtures import dense_visibility_logprobs, tiny_model, tiny_world

from mempo.ops import linear_logprobs
from mempo.rollout import ContextPolicy, NativeEngine, SamplingParams, run_rollout, trajectory_from_turns
from mempo.rollout.sampling import sample_tokens
from mempo.training.fused_policy import packed_hidden
from mempo.training.packed_batch import pack_trajectories


def _expert_rollout(num_objectives=2, n=3, policy=ContextPolicy(), seed=0):
    world, tok = tiny_world()
    tasks = world.tasks("train", num_objectives=num_objectives)[:n]
    experts = world.expert_trajectories(tasks)
    model = tiny_model(len(tok), seed=seed)
    trajs = run_rollout(NativeEngine(model, 4096), world.env(), tok, tasks, list(range(n)), policy,
                        SamplingParams(max_new_tokens=256), forced_turns=[[t.model for t in e.turns] for e in experts])
    return world, tok, model, experts, trajs


def _segments(traj):
    return [(s.kind, s.step, s.start, s.end, s.dropped_at) for s in traj.segments]


def test_forced_rollout_equals_text_replay_and_scores_expert():
    world, tok, _, experts, trajs = _expert_rollout()
    for traj, expert in zip(trajs, experts):
        replay = trajectory_from_turns(tok, expert.prompt, [(t.model, t.information) for t in expert.turns])
        assert traj.token_ids == replay.token_ids
        assert _segments(traj) == _segments(replay)
        assert traj.reward == 1.0 and traj.finish_reason == "answer" and traj.format_valid
        assert any(s.dropped_at is not None for s in traj.segments)  # drops really happened
        written = sum(s.end - s.start for s in traj.segments if s.kind in ("memory", "action"))
        assert traj.loss_mask.count(True) == written


@pytest.mark.parametrize("policy", [ContextPolicy("mempo"), ContextPolicy("keep_last_k", 1)])
def test_rollout_logprobs_equal_single_pass_with_visibility(policy):
    """The design invariant: what the model saw at rollout is what it sees in training."""
    _, _, model, _, trajs = _expert_rollout(policy=policy, seed=1)
    for traj in trajs:
        mask = torch.tensor(traj.loss_mask[1:])
        recorded = torch.tensor(traj.sample_logprobs[1:])
        replayed = dense_visibility_logprobs(model, traj)
        assert (replayed[mask] - recorded[mask]).abs().max() <= 1e-4
        # the trainer's own path: packed batch, per-sequence segment visibility, fused log-probs
        batch = pack_trajectories([traj])
        with torch.no_grad():
            hidden = packed_hidden(model, batch, "segment")
            trainer = linear_logprobs(hidden, model.lm_head.weight, batch.targets)[:-1]
        assert (trainer[mask] - recorded[mask]).abs().max() <= 1e-4
        causal = dense_visibility_logprobs(model, traj, causal=True)
        assert (causal[mask] - recorded[mask]).abs().max() > 1e-2  # the check can fail


def test_sampled_rollout_respects_limits_and_invariant():
    world, tok = tiny_world()
    tasks = world.tasks("train", num_objectives=1)[:2]
    model = tiny_model(len(tok), seed=2)
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=12, seed=3)
    trajs = run_rollout(NativeEngine(model, 2048), world.env(), tok, tasks * 2, [0, 1, 0, 1], ContextPolicy(), params)
    assert len(trajs) == 4
    for traj in trajs:
        assert traj.finish_reason in ("format_error", "max_turns", "max_tokens", "answer")
        for step in range(1, len(traj.turn_texts) + 1):
            written = sum(s.end - s.start for s in traj.segments if s.step == step and s.kind in ("memory", "action"))
            assert 1 <= written <= 12
        mask = torch.tensor(traj.loss_mask[1:])
        assert mask.any()
        replayed = dense_visibility_logprobs(model, traj)
        assert (replayed[mask] - torch.tensor(traj.sample_logprobs[1:])[mask]).abs().max() <= 1e-4
    again = run_rollout(NativeEngine(model, 2048), world.env(), tok, tasks * 2, [0, 1, 0, 1], ContextPolicy(), params)
    assert [t.token_ids for t in again] == [t.token_ids for t in trajs]  # seeded


def test_eviction_cuts_peak_context():
    _, _, _, _, mempo = _expert_rollout(num_objectives=4, n=2)
    _, _, _, _, keep_all = _expert_rollout(num_objectives=4, n=2, policy=ContextPolicy("keep_all"))
    for m, k in zip(mempo, keep_all):
        assert m.token_ids == k.token_ids  # same text, only visibility differs
        assert k.peak_context == len(k) - 1 or k.peak_context == len(k)
        assert m.peak_context < 0.6 * k.peak_context


def test_context_policy():
    assert list(ContextPolicy("mempo").dropped_steps(4)) == [1, 2, 3]
    assert list(ContextPolicy("keep_all").dropped_steps(4)) == []
    assert list(ContextPolicy("keep_last_k", 1).dropped_steps(4)) == [1, 2]
    with pytest.raises(ValueError, match="context policy"):
        ContextPolicy("forget")


def test_sampling_logprobs_and_truncation(seed):
    logits = torch.randn(64, 30)
    g = torch.Generator().manual_seed(0)
    tokens, logp = sample_tokens(logits, 0.7, top_k=3, generator=g)
    top3 = logits.topk(3, dim=-1).indices
    assert all(t in row for t, row in zip(tokens.tolist(), top3.tolist()))
    torch.testing.assert_close(logp, (logits / 0.7).log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))
    probs = logits.softmax(-1)
    tokens, _ = sample_tokens(logits, 1.0, top_p=0.5, generator=g)
    sorted_p, order = probs.sort(-1, descending=True)
    for row, t in enumerate(tokens.tolist()):
        rank = (order[row] == t).nonzero().item()
        assert sorted_p[row, :rank].sum() < 0.5 + 1e-6
    greedy, _ = sample_tokens(logits, 0.0)
    assert torch.equal(greedy, logits.argmax(-1))
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(logits, 1.0, top_p=0.0)


def test_sampled_turns_after_real_drops_keep_the_invariant():
    """Two expert turns forced (the second memory drops the first turn), then sampled turns: the
    sampled tokens see the evicted cache, and training must see exactly that."""
    world, tok = tiny_world()
    tasks = [t for t in world.tasks("train", num_objectives=1)
             if t.questions[0].startswith("Where was the mentor")][:2]  # 2-hop
    experts = world.expert_trajectories(tasks)
    assert all(len(e.turns) == 3 for e in experts)
    model = tiny_model(len(tok), seed=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=5)
    forced = [[t.model for t in e.turns[:2]] for e in experts]
    trajs = run_rollout(NativeEngine(model, 2048), world.env(), tok, tasks, [0, 1], ContextPolicy("mempo"), params,
                        forced_turns=forced)
    for traj in trajs:
        first = [s for s in traj.segments if s.step == 1]
        assert first and all(s.dropped_at is not None for s in first)  # turn 1 really dropped
        sampled = [i for s in traj.segments if s.step == 3 and s.kind in ("memory", "action")
                   for i in range(s.start, s.end)]
        assert sampled  # turn 3 was sampled after the drop
        rows = torch.tensor(sampled) - 1
        replayed = dense_visibility_logprobs(model, traj)
        recorded = torch.tensor(traj.sample_logprobs[1:])
        assert (replayed[rows] - recorded[rows]).abs().max() <= 1e-4
        batch = pack_trajectories([traj])
        with torch.no_grad():
            trainer = linear_logprobs(packed_hidden(model, batch, "segment"), model.lm_head.weight, batch.targets)
        assert (trainer[rows] - recorded[rows]).abs().max() <= 1e-4
        causal = dense_visibility_logprobs(model, traj, causal=True)
        assert (causal[rows] - recorded[rows]).abs().max() > 1e-3  # the drop matters for these tokens


def test_tool_reply_that_would_overflow_max_total_tokens_ends_the_row():
    world, tok = tiny_world()
    task = world.tasks("train", num_objectives=1)[0]
    (expert,) = world.expert_trajectories([task])
    prompt = len(tok(expert.prompt, add_special_tokens=False)["input_ids"])
    turn = len(tok(expert.turns[0].model, add_special_tokens=False)["input_ids"])
    limit = prompt + turn + 5  # the <information> reply (~30 tokens) does not fit
    params = SamplingParams(max_new_tokens=64, max_total_tokens=limit)
    (traj,) = run_rollout(NativeEngine(tiny_model(len(tok)), limit), world.env(), tok, [task], [0], ContextPolicy(),
                          params, forced_turns=[[expert.turns[0].model]])
    assert traj.finish_reason == "max_tokens" and len(traj) <= limit and traj.reward == 0.0


@pytest.mark.parametrize("policy", [ContextPolicy("mempo", mode="reencode"),
                                    ContextPolicy("keep_last_k", 1, "reencode")])
def test_reencode_mode_rollout_equals_replay_and_training(policy):
    """context_mode=reencode: after a drop the kept context is re-encoded after the prompt (as
    vLLM computes it); the record (context copies, positions) replays from text, and the
    trainer's one packed forward reproduces every sampled log-prob."""
    world, tok, model, experts, trajs = _expert_rollout(policy=policy, seed=1)
    _, _, _, _, evicted = _expert_rollout(policy=ContextPolicy(policy.name, policy.k), seed=1)
    for traj, expert, ev in zip(trajs, experts, evicted):
        replay = trajectory_from_turns(tok, expert.prompt, [(t.model, t.information) for t in expert.turns], policy)
        assert traj.token_ids == replay.token_ids and _segments(traj) == _segments(replay)
        assert traj.position_ids == replay.position_ids
        copies = [s for s in traj.segments if s.kind == "context"]
        assert copies and traj.reward == 1.0
        prompt_len = traj.segments[0].end
        first_copy = copies[0]
        assert traj.position_ids[first_copy.start] == prompt_len  # re-encoded right after the prompt
        assert traj.loss_mask.count(True) == ev.loss_mask.count(True)  # copies carry no loss
        mask = torch.tensor(traj.loss_mask[1:])
        recorded = torch.tensor(traj.sample_logprobs[1:])
        batch = pack_trajectories([traj])
        with torch.no_grad():
            trainer = linear_logprobs(packed_hidden(model, batch, "segment"), model.lm_head.weight, batch.targets)[:-1]
        assert (trainer[mask] - recorded[mask]).abs().max() <= 1e-4
        # the model's tokens are the same as with eviction, their log-probs are not (other context)
        assert [t for t, m in zip(traj.token_ids, traj.loss_mask) if m] == \
            [t for t, m in zip(ev.token_ids, ev.loss_mask) if m]
        ev_logp = torch.tensor([lp for lp, m in zip(ev.sample_logprobs, ev.loss_mask) if m])
        re_logp = torch.tensor([lp for lp, m in zip(traj.sample_logprobs, traj.loss_mask) if m])
        assert (ev_logp - re_logp).abs().max() > 1e-3


def test_reencode_sampled_turns_after_drops_keep_the_invariant():
    world, tok = tiny_world()
    tasks = [t for t in world.tasks("train", num_objectives=1) if t.questions[0].startswith("Where was the mentor")][:2]
    experts = world.expert_trajectories(tasks)
    model = tiny_model(len(tok), seed=4)
    policy = ContextPolicy("mempo", mode="reencode")
    trajs = run_rollout(NativeEngine(model, 2048), world.env(), tok, tasks, [0, 1], policy,
                        SamplingParams(temperature=1.0, max_new_tokens=16, seed=5),
                        forced_turns=[[t.model for t in e.turns[:2]] for e in experts])
    for traj in trajs:
        assert any(s.kind == "context" for s in traj.segments)
        mask = torch.tensor(traj.loss_mask[1:])
        batch = pack_trajectories([traj])
        with torch.no_grad():
            trainer = linear_logprobs(packed_hidden(model, batch, "segment"), model.lm_head.weight, batch.targets)[:-1]
        assert (trainer[mask] - torch.tensor(traj.sample_logprobs[1:])[mask]).abs().max() <= 1e-4
