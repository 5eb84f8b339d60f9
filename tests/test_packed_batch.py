"""Packing trajectories and probes: visibility, alignment, probes == separate forwards."""
import torch
from rollout_fixtures import tiny_model, tiny_world

from mempo.algo import answer_probability, build_probes
from mempo.ops import linear_logprobs
from mempo.reference.visibility import visible_keys
from mempo.rollout import ContextPolicy, trajectory_from_turns
from mempo.training.fused_policy import FusedPolicy
from mempo.training.packed_batch import pack_trajectories, split_by_token_budget


def _expert_trajs(n=3, objectives=2, policy=None):
    world, tok = tiny_world()
    tasks = world.tasks("train", num_objectives=objectives)[:n]
    experts = world.expert_trajectories(tasks)
    policy = policy or ContextPolicy()
    trajs = [trajectory_from_turns(tok, e.prompt, [(t.model, t.information) for t in e.turns], policy)
             for e in experts]
    return world, tok, tasks, trajs


def _answer_ids(tok, task):
    cue = tok("<answer>", add_special_tokens=False)["input_ids"]
    answer = tok("; ".join(a[0] for a in task.answers), add_special_tokens=False)["input_ids"]
    return cue, answer


def test_packed_visibility_equals_trajectory_rule():
    _, _, _, trajs = _expert_trajs()
    batch = pack_trajectories(trajs)
    mask = batch.layout.dense_mask()
    offset = 0
    for traj in trajs:
        for q in range(len(traj)):
            expect = torch.zeros(batch.num_tokens, dtype=torch.bool)
            expect[[offset + k for k in visible_keys(traj.segments, q)]] = True
            assert torch.equal(mask[offset + q], expect)
        offset += len(traj)


def test_alignment_of_targets_and_old_logprobs():
    _, _, _, trajs = _expert_trajs(n=2)
    for t in trajs:
        t.sample_logprobs = [float(-i) for i in range(len(t))]
    batch = pack_trajectories(trajs)
    a = len(trajs[0])
    assert batch.targets[a - 1] == 0 and not batch.loss_mask[a - 1]  # no row predicts across sequences
    assert batch.targets[a] == trajs[1].token_ids[1]
    assert batch.old_logprobs[a] == -1.0
    assert batch.loss_mask.sum() == sum(sum(t.loss_mask[1:]) for t in trajs)
    mem = trajs[1].memory_segments()[0]
    assert batch.memory_index[a + mem.start - 1] == len(trajs[0].memory_segments())  # global numbering
    assert batch.cu_seqlens.tolist() == [0, a, a + len(trajs[1])]


def _forward_logits(model, ids, pos, mask):
    with torch.no_grad():
        return model(ids[None], position_ids=pos[None], attention_mask=mask[None, None]).logits[0].float()


def test_probes_equal_separate_forwards():
    """given_memory: prompt + memory text alone, from scratch; given_history: the
    trajectory prefix as the rollout computed it (its own visibility), then the answer."""
    _, tok, tasks, trajs = _expert_trajs(n=2)
    model = tiny_model(len(tok), seed=4)
    probes = [build_probes(t, *_answer_ids(tok, task)) for t, task in zip(trajs, tasks)]
    batch = pack_trajectories(trajs, probes)
    with torch.no_grad():
        hidden = model.model(batch.input_ids[None], position_ids=batch.position_ids[None],
                             attention_mask=batch.layout.dense_mask()[None, None]).last_hidden_state[0]
    rows = batch.probe_rows
    p = answer_probability(linear_logprobs(hidden[rows], model.lm_head.weight, batch.targets[rows]), batch.probe_index,
                           len(batch.probes))
    i = 0
    for traj, traj_probes in zip(trajs, probes):
        for probe in traj_probes:
            k = len(probe.token_ids)
            probe_pos = torch.arange(probe.first_position, probe.first_position + k)
            if probe.given_history:
                prefix = pack_trajectories([traj])
                n = probe.memory.start
                ids = torch.cat([prefix.input_ids[:n], torch.tensor(probe.token_ids)])
                pos = torch.cat([prefix.position_ids[:n], probe_pos])
                mask = torch.ones(n + k, n + k, dtype=torch.bool).tril()
                mask[:n, :n] = prefix.layout.dense_mask()[:n, :n]
            else:
                prompt = traj.segments[0]
                n = prompt.end
                ids = torch.tensor(traj.token_ids[:n] + probe.token_ids)
                pos = torch.cat([torch.arange(n), probe_pos])
                mask = torch.ones(n + k, n + k, dtype=torch.bool).tril()
            logits = _forward_logits(model, ids, pos, mask)
            start = n + probe.num_prefix_tokens - 1
            lp = logits[start:-1].log_softmax(-1).gather(1, ids[start + 1:, None]).squeeze(1)
            torch.testing.assert_close(p[i], lp.double().mean().exp(), rtol=1e-5, atol=1e-9)
            i += 1
    r = FusedPolicy(model, attention="dense").memory_rewards(batch)
    assert r.shape == (batch.num_memories,) and torch.isfinite(r).all()
    torch.testing.assert_close(r[0], p[0] - p[1])


def test_split_by_token_budget():
    _, _, _, trajs = _expert_trajs(n=3)
    lengths = [len(t) for t in trajs]
    batches = split_by_token_budget(trajs, max(lengths) + min(lengths))
    assert sorted(i for b in batches for i in b) == [0, 1, 2]
    assert all(sum(lengths[i] for i in b) <= max(lengths) + min(lengths) or len(b) == 1 for b in batches)
    assert split_by_token_budget(trajs, 1) == [[0], [1], [2]]


def test_segment_forward_equals_dense_mask_forward():
    """The per-sequence visibility path the trainer uses == the dense [L, L] reference."""
    from mempo.training.fused_policy import packed_hidden

    _, tok, tasks, trajs = _expert_trajs(n=3)
    model = tiny_model(len(tok), seed=9)
    probes = [build_probes(t, *_answer_ids(tok, task)) for t, task in zip(trajs, tasks)]
    batch = pack_trajectories(trajs, probes)
    with torch.no_grad():
        dense = packed_hidden(model, batch, "dense")
        segment = packed_hidden(model, batch, "segment")
    torch.testing.assert_close(segment, dense, rtol=1e-5, atol=1e-5)


def test_token_budget_counts_the_probes():
    """Scoring batches carry two probes per memory: the budget must bound what is packed."""
    _, tok, tasks, trajs = _expert_trajs(n=6, objectives=2)
    probes = [build_probes(t, *_answer_ids(tok, task)) for t, task in zip(trajs, tasks)]
    budget = 2 * max(len(t) for t in trajs)
    for batch_ids in split_by_token_budget(trajs, budget, probes):
        packed = pack_trajectories([trajs[i] for i in batch_ids], [probes[i] for i in batch_ids])
        assert packed.num_tokens <= budget or len(batch_ids) == 1
    assert len(split_by_token_budget(trajs, budget, probes)) > len(split_by_token_budget(trajs, budget))
