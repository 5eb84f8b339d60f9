"""The packed policy step: MemPO loss through FusedPolicy equals the naive pipeline."""
import torch
from rollout_fixtures import tiny_model, tiny_world

from mempo.ops import PolicyLossOptions
from mempo.reference.logprobs import linear_policy_loss_reference, token_advantages_reference
from mempo.rollout import ContextPolicy, trajectory_from_turns
from mempo.training.fused_policy import FusedPolicy, micro_batch_advantages
from mempo.training.packed_batch import pack_trajectories


def _batch(seed=0):
    world, tok = tiny_world()
    tasks = world.tasks("train", num_objectives=2)[:3]
    trajs = [trajectory_from_turns(tok, e.prompt, [(t.model, t.information) for t in e.turns], ContextPolicy())
             for e in world.expert_trajectories(tasks)]
    g = torch.Generator().manual_seed(seed)
    for t in trajs:  # pretend sampling log-probs near -2
        t.sample_logprobs = (-2 + 0.3 * torch.randn(len(t), generator=g)).tolist()
    return tok, trajs, pack_trajectories(trajs)


def test_policy_loss_grads_match_naive_full_logits(seed):
    tok, trajs, batch = _batch()
    model = tiny_model(len(tok), seed=5)
    traj_adv = torch.randn(len(trajs))
    mem_adv = torch.randn(batch.num_memories)
    policy = FusedPolicy(model, attention="dense")
    adv = micro_batch_advantages(batch, traj_adv, mem_adv, 0.5, torch.device("cpu"))
    opts = dict(clip_low=0.2, clip_high=0.28, loss_agg="seq-mean-token-mean")
    loss, metrics = policy.policy_loss(batch, adv, PolicyLossOptions(**opts), temperature=0.9)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = model.model(batch.input_ids[None], position_ids=batch.position_ids[None],
                         attention_mask=batch.layout.dense_mask()[None, None]).last_hidden_state[0]
    per_token = token_advantages_reference(batch.num_tokens, None, traj_adv, batch.seq_index, mem_adv,
                                           batch.memory_index, 0.5)
    expected = linear_policy_loss_reference(hidden, model.lm_head.weight, batch.targets, batch.old_logprobs,
                                            per_token, batch.loss_mask, batch.seq_index, temperature=0.9, **opts)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert 0 <= float(metrics["clip_frac"]) <= 1


def test_sft_loss_is_token_mean_nll_and_decreases():
    tok, trajs, batch = _batch()
    model = tiny_model(len(tok), seed=6)
    policy = FusedPolicy(model, attention="dense")
    loss, metrics = policy.sft_loss(batch)
    logits = model(batch.input_ids[None], position_ids=batch.position_ids[None],
                   attention_mask=batch.layout.dense_mask()[None, None]).logits[0].float()
    nll = -logits.log_softmax(-1).gather(1, batch.targets[:, None]).squeeze(1)[batch.loss_mask].mean()
    torch.testing.assert_close(loss, nll, rtol=1e-5, atol=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = float(loss.detach())
    for _ in range(5):
        opt.zero_grad()
        loss, _ = policy.sft_loss(batch)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first - 0.5
