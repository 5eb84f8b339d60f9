"""One MemPO step: roll out G trajectories per task, score memories, update the policy.

    rollout (native engine, current weights) -> rewards
    probes in one no-grad packed forward      -> memory rewards r_mem
    group-normalised advantages               -> traj_adv, mem_adv
    packed micro-batches (token budget)       -> fused loss, backward, optimizer step

With the native engine in float32 the rollout's own sampling log-probs are the old policy's
(the rollout == training invariant makes them exact), so nothing is recomputed. In bf16 (a
decode step and the packed forward round differently) or with another engine (`VLLMRollout`,
which re-encodes kept context) the rollout samples from a slightly different distribution:
then the probe forward also recomputes the old log-probs (opts.recompute_old_logprobs, or an
engine whose `exact_logprobs` is False), and tokens are reweighted by truncated importance sampling
(opts.correction: per token, turn or sequence; truncated or masked). No reference model is
involved unless kl_coef > 0 (`ref_policy` scores it).
Normalisers are global (all micro-batches, all data-parallel ranks) so the gradient does
not depend on how the batch was split.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from mempo.algo import answer_cue_and_ids, batch_advantages, build_probes
from mempo.distributed import all_reduce_max, all_reduce_sums, clip_grad_norm, get_rank
from mempo.envs import score_answers
from mempo.models.hf import lm_head_weight
from mempo.ops import PolicyLossOptions
from mempo.ops.policy_loss import token_advantages
from mempo.rollout import ContextPolicy, SamplingParams
from mempo.rollout.trajectory import Trajectory

from .diagnostics import DRIFT_KINDS, drift_by_kind, memory_stats
from .fused_policy import FusedPolicy, micro_batch_advantages
from .importance_sampling import RolloutCorrection, trajectory_rows, use_trainer_old_logprobs
from .packed_batch import FILLER, pack_trajectories, split_by_token_budget


@dataclass
class RLStepOptions:
    group_size: int = 4
    sampling: SamplingParams = field(default_factory=SamplingParams)
    context: ContextPolicy = field(default_factory=ContextPolicy)
    mem_coef: float = 1.0  # 0 turns MemPO into plain GRPO with the same context policy
    memory_adv_by_step: bool = True
    scale_by_std: bool = True
    micro_batch_tokens: int = 4096
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    loss_options: PolicyLossOptions = field(default_factory=PolicyLossOptions)  # normalisers set per mini-batch
    correction: RolloutCorrection = field(default_factory=RolloutCorrection)  # when old log-probs are recomputed
    recompute_old_logprobs: bool = False  # the native engine too (bf16); other engines always recompute


def evaluate_answers(trajectories: list[Trajectory], tasks) -> tuple[list[float], list[float]]:
    """EM and F1 (mean over objectives, best over accepted answers) of each trajectory."""
    em, f1 = [], []
    for traj, task in zip(trajectories, tasks):
        answers = traj.answers if traj.format_valid and traj.answers is not None else None
        em.append(score_answers(answers, task.answers, "em") if answers else 0.0)
        f1.append(score_answers(answers, task.answers, "f1") if answers else 0.0)
    return em, f1


def _split_even(items: list[int], parts: int) -> list[list[int]]:
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (p < extra)
        out.append(items[start:start + size])
        start += size
    return out


def _collective_batches(trajs: list[Trajectory], ids: list[int], max_tokens: int, probes=None):
    """Packed micro-batches of trajs[ids], padded with FILLER so that every rank runs the
    same number of forwards (FSDP2's weight gathers are collective)."""
    groups = split_by_token_budget([trajs[i] for i in ids], max_tokens,
                                   None if probes is None else [probes[i] for i in ids]) if ids else []
    count = int(all_reduce_max(float(len(groups))))
    for k in range(count):
        if k >= len(groups):
            yield FILLER
            continue
        chosen = [ids[j] for j in groups[k]]
        batch = pack_trajectories([trajs[i] for i in chosen], None if probes is None else [probes[i] for i in chosen])
        batch.trajectory_ids = chosen
        yield batch


def rl_step(policy: FusedPolicy, engine, env, tokenizer, tasks: list, opts: RLStepOptions,
            optimizer: torch.optim.Optimizer, step: int, guard=None, ref_policy: FusedPolicy | None = None
            ) -> dict[str, float]:
    """One MemPO update on this rank's share of tasks (every rank calls it together).
    engine: a rollout engine: `engine.rollout(policy, env, tokenizer, tasks, group_index, context,
    params)` -> trajectories, and `engine.exact_logprobs` (True: its log-probs are the trainer's
    own, as the native engine's; False: the trainer recomputes them, as for VLLMRollout).
    ref_policy: the frozen reference, needed (only) when loss_options has kl_coef > 0.
    Returns metrics over all ranks."""
    if opts.loss_options.kl_coef > 0 and ref_policy is None:
        raise ValueError("loss_options kl_coef > 0 needs ref_policy")
    t0 = time.perf_counter()
    group_tasks = [t for t in tasks for _ in range(opts.group_size)]
    group_index = [i for i in range(len(tasks)) for _ in range(opts.group_size)]
    params = SamplingParams(**{**opts.sampling.__dict__, "seed": opts.sampling.seed + 1000 * step + get_rank()})
    trajs = engine.rollout(policy, env, tokenizer, group_tasks, group_index, opts.context, params)
    exact = engine.exact_logprobs and not opts.recompute_old_logprobs  # else: recompute old log-probs, reweight
    t_rollout = time.perf_counter() - t0

    # memory rewards: probes of every trajectory, scored without gradient
    tags = env.config.tags
    reencode = opts.context.mode == "reencode"
    probes = [build_probes(t, *answer_cue_and_ids(tokenizer, task, tags), reencode=reencode)
              for t, task in zip(trajs, group_tasks)]
    temperature = opts.sampling.temperature or 1.0
    mem_rewards, trainer_logprobs = [], {}  # the latter: recomputed old log-probs (not exact)
    with torch.no_grad():
        for batch in _collective_batches(trajs, list(range(len(trajs))), opts.micro_batch_tokens, probes):
            if exact:
                rewards = policy.memory_rewards(batch, temperature=temperature)
            else:
                rewards, logp = policy.score(batch, temperature=temperature)
            if batch is not FILLER:
                mem_rewards.append(rewards)
                if not exact:
                    logp = logp.cpu()  # host sync: one device -> host copy per micro-batch (the TIS weights)
                    rows = trajectory_rows(batch, [len(trajs[i]) for i in batch.trajectory_ids])
                    for i, (a, b) in zip(batch.trajectory_ids, rows):
                        trainer_logprobs[i] = logp[a:b]
    mem_rewards = torch.cat(mem_rewards) if mem_rewards else torch.zeros(0, dtype=torch.float64)
    adv = batch_advantages(trajs, mem_rewards, by_step=opts.memory_adv_by_step, scale_by_std=opts.scale_by_std)
    t_score = time.perf_counter() - t0 - t_rollout

    # update: ppo_epochs passes, each in mini_batches optimizer steps; old log-probs are the
    # rollout's (exact engine) or the trainer's recomputed ones (then tokens are reweighted).
    # Step metrics stay on the device (sums weighted by each micro-batch's share of the
    # tokens) until the one reduction at the end.
    device = lm_head_weight(policy.lm).device
    kl = opts.loss_options.kl_coef > 0
    traj_offsets = [0]
    for t in trajs:
        traj_offsets.append(traj_offsets[-1] + len(t.memory_segments()))
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in (
        "clip_frac", "approx_kl", "ratio_mean", "kl_ref", "tis_weight", "tis_masked", "rollout_logprob_gap",
        "rollout_kl")}
    grad_norms, losses, skipped, updates = [], [], 0, 0
    order = list(range(len(trajs)))
    for _ in range(opts.ppo_epochs):
        for chunk in _split_even(order, opts.mini_batches):
            # host sync (collective): the global normalisers must be known before the first loss
            counts = all_reduce_sums({"seqs": sum(1 for i in chunk if any(trajs[i].loss_mask[1:])),
                                      "tokens": sum(sum(trajs[i].loss_mask[1:]) for i in chunk)})
            global_seqs, global_tokens = max(1, round(counts["seqs"])), max(1, round(counts["tokens"]))
            loss_options = dataclasses.replace(opts.loss_options, num_global_seqs=global_seqs,
                                               num_global_tokens=global_tokens)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for batch in _collective_batches(trajs, chunk, opts.micro_batch_tokens):
                if batch is FILLER:  # same number of forwards on every rank (FSDP collectives)
                    zero = micro_batch_advantages(batch, torch.zeros(1), torch.zeros(0), 0.0, device)
                    ref = ref_policy.logprobs(batch) if kl else None
                    loss, _ = policy.policy_loss(batch, zero, opts.loss_options, ref_logprobs=ref)
                    (loss * 0.0).backward()
                    continue
                ids = batch.trajectory_ids
                mem_slice = torch.cat([adv.mem_adv[traj_offsets[i]:traj_offsets[i + 1]] for i in ids])
                batch_adv = micro_batch_advantages(batch, adv.traj_adv[ids], mem_slice, opts.mem_coef, device)
                share = float(batch.loss_mask.sum()) / global_tokens  # host: the mask is a CPU tensor
                if not exact:  # old = the trainer's log-probs; tokens reweighted by opts.correction
                    rollout_old = batch.old_logprobs.clone()
                    tis, masked = use_trainer_old_logprobs(batch, [trajs[i] for i in ids],
                                                           [trainer_logprobs[i] for i in ids], opts.correction)
                    batch_adv = token_advantages(batch_adv, torch.float32) * tis.to(device)
                    m = batch.loss_mask
                    log_ratio = (batch.old_logprobs - rollout_old)[m].double()  # log pi_old - log pi_rollout
                    gap = {"tis_weight": tis[m].sum(), "tis_masked": masked[m].sum(),
                             "rollout_logprob_gap": log_ratio.abs().sum(),
                             # KL(rollout || trainer) on the rollout's samples, k3: r - 1 - log r,
                             # r = pi_old / pi_rollout
                             "rollout_kl": (log_ratio.exp() - 1 - log_ratio).sum()}
                    for key, value in gap.items():
                        sums[key] += value.to(device, torch.float64) / global_tokens
                ref = ref_policy.logprobs(batch, temperature=temperature) if kl else None
                # gradients are summed over ranks: the loss already carries 1 / global count
                loss, metrics = policy.policy_loss(batch, batch_adv, loss_options, temperature=temperature,
                                                   ref_logprobs=ref)
                loss.backward()
                loss_sum += metrics["loss"]
                for key in ("clip_frac", "approx_kl", "ratio_mean", "kl_ref"):
                    if key in metrics:
                        sums[key] += metrics[key] * share
            grad_norm = clip_grad_norm(policy, opts.grad_clip)
            # host sync (collective): the non-finite guard decides on the host, on the global loss
            total_loss = all_reduce_sums({"loss": loss_sum})["loss"]
            if guard is None or guard.should_step(step, total_loss, grad_norm):
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            losses.append(total_loss)
            grad_norms.append(grad_norm)
            updates += 1
    t_total = time.perf_counter() - t0

    # metrics: per-rank sums and counts, reduced in one collective (the step's last host sync)
    em, f1 = evaluate_answers(trajs, group_tasks)
    rewards = [t.reward for t in trajs]
    mem = memory_stats(trajs, group_tasks, tokenizer, tags)
    totals = {
        "trajectories": len(trajs), "reward": sum(rewards), "reward_sq": sum(r * r for r in rewards),
        "em": sum(em), "f1": sum(f1), "format_valid": sum(float(t.format_valid) for t in trajs),
        "TT": sum(float(t.tokens_processed) for t in trajs), "PT": sum(float(t.peak_context) for t in trajs),
        "memories": mem_rewards.numel(), "memory_reward": mem_rewards.sum().item(),
        "memory_adv_abs": adv.mem_adv.abs().sum().item(), "traj_adv_abs": adv.traj_adv.abs().sum().item(),
        "memory/count": float(len(mem["length"])), **{f"memory/{k}": float(sum(v)) for k, v in mem.items()},
        **{f"update/{k}": v for k, v in sums.items()},
    }
    if not exact:
        drift = drift_by_kind(trajs, [torch.tensor(trajs[i].sample_logprobs[1:]) for i in range(len(trajs))],
                              [trainer_logprobs[i] for i in range(len(trajs))], tokenizer, tags)
        totals |= {f"drift/{k}": s for k, (s, _) in drift.items()} | {f"drift_n/{k}": float(n) for k, (_, n) in
                                                                         drift.items()}
    g = all_reduce_sums(totals)
    n, n_mem = max(1.0, g["trajectories"]), max(1.0, g["memories"])
    reward_mean = g["reward"] / n
    out = {
        "reward/mean": reward_mean,
        "reward/std": max(0.0, g["reward_sq"] / n - reward_mean ** 2) ** 0.5,  # over all ranks' trajectories
        "em": g["em"] / n,
        "f1": g["f1"] / n,
        "memory_reward/mean": g["memory_reward"] / n_mem,
        "memory_adv/abs_mean": g["memory_adv_abs"] / n_mem,
        "traj_adv/abs_mean": g["traj_adv_abs"] / n,
        "loss": sum(losses) / updates,
        "clip_fraction": g["update/clip_frac"] / updates,
        "kl": g["update/approx_kl"] / updates,
        "kl_ref": g["update/kl_ref"] / updates,
        "ratio/mean": g["update/ratio_mean"] / updates,
    }
    if not exact:
        out |= {"tis/weight_mean": g["update/tis_weight"] / updates,
                "tis/masked_fraction": g["update/tis_masked"] / updates,
                "rollout/logprob_gap": g["update/rollout_logprob_gap"] / updates,
                "rollout/kl": g["update/rollout_kl"] / updates}
    out |= {f"memory/{k}_mean" if k != "gold_recall" else "memory/gold_recall":
            g[f"memory/{k}"] / max(1.0, g["memory/count"]) for k in mem}
    if not exact:
        out |= {f"drift/{k}": g[f"drift/{k}"] / max(1.0, g[f"drift_n/{k}"]) for k in DRIFT_KINDS}
    return out | {
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "skipped": float(skipped),
        "TT": g["TT"] / n,
        "PT": g["PT"] / n,
        "format_valid": g["format_valid"] / n,
        "rollout_s": t_rollout,
        "score_s": t_score,
        "step_s": t_total,
        "tokens_per_s": g["TT"] / t_total,
    }
