"""One MemPO step: roll out G trajectories per task, score memories, update the policy.

    rollout (native engine, current weights) -> rewards
    probes in one no-grad packed forward      -> memory rewards r_mem
    group-normalised advantages               -> traj_adv, mem_adv
    packed micro-batches (token budget)       -> fused loss, backward, optimizer step

With the native engine in float32 the rollout's own sampling log-probs are the old policy's
(the rollout == training invariant makes them exact), so nothing is recomputed. In bf16 (a
decode step and the packed forward round differently) or with another engine (`VLLMRollout`,
which re-encodes kept context) the rollout samples from a slightly different distribution:
then the probe forward also recomputes the old log-probs (opts.recompute_old_logprobs, or any
engine but the native one), and tokens are reweighted by truncated importance sampling
(opts.correction: per token, turn or sequence; truncated or masked). No reference model is involved unless kl_coef > 0 (`ref_policy` scores it).
Normalisers are global (all micro-batches, all data-parallel ranks) so the gradient does
not depend on how the batch was split.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from mempo.ops.loss_inputs import token_advantages
from mempo.distributed import all_reduce_max, all_reduce_sum, all_reduce_sums, clip_grad_norm, get_rank
from mempo.envs import score_answers
from mempo.rollout import ContextPolicy, NativeEngine, SamplingParams, build_probes, run_rollout
from mempo.rollout.trajectory import Trajectory

from .diagnostics import DRIFT_KINDS, drift_by_kind, memory_stats
from .fused_policy import FusedPolicy, micro_batch_advantages
from .importance_sampling import RolloutCorrection, trajectory_rows, use_trainer_old_logprobs
from .inference_mode import full_weights
from .mempo_advantages import batch_advantages
from .packed_batch import FILLER, pack_trajectories, split_by_token_budget
from .policy_forward import lm_head_weight


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
    loss_options: dict = field(default_factory=dict)  # PolicyLossOptions fields
    correction: RolloutCorrection = field(default_factory=RolloutCorrection)  # when old log-probs are recomputed
    recompute_old_logprobs: bool = False  # the native engine too (bf16); other engines always recompute


def answer_cue_and_ids(tokenizer, task, tags) -> tuple[list[int], list[int]]:
    """Tokens of the probe's answer cue (the answer tag) and of the gold answer."""
    cue = tokenizer(tags.answer[0], add_special_tokens=False)["input_ids"]
    gold = f"{tags.answer_separator} ".join(a[0] for a in task.answers)
    return cue, tokenizer(gold, add_special_tokens=False)["input_ids"]


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
    engine: a NativeEngine over the policy's model (exact log-probs), or an object with
    `rollout(policy, env, tokenizer, tasks, group_index, context, params)` (e.g. VLLMRollout)
    whose log-probs are recomputed by the trainer.
    ref_policy: the frozen reference, needed (only) when loss_options has kl_coef > 0.
    Returns metrics over all ranks."""
    if opts.loss_options.get("kl_coef", 0.0) and ref_policy is None:
        raise ValueError("loss_options kl_coef > 0 needs ref_policy")
    t0 = time.perf_counter()
    group_tasks = [t for t in tasks for _ in range(opts.group_size)]
    group_index = [i for i in range(len(tasks)) for _ in range(opts.group_size)]
    params = SamplingParams(**{**opts.sampling.__dict__, "seed": opts.sampling.seed + 1000 * step + get_rank()})
    native = isinstance(engine, NativeEngine)  # the trainer's own model, in process
    exact = native and not opts.recompute_old_logprobs  # else: recompute the old log-probs, reweight tokens
    if native:
        with full_weights(policy):
            trajs = run_rollout(engine, env, tokenizer, group_tasks, group_index, opts.context, params)
    else:
        trajs = engine.rollout(policy, env, tokenizer, group_tasks, group_index, opts.context, params)
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
                rewards = policy(batch, mode="memory_rewards", temperature=temperature)  # inside the root forward
            else:
                rewards, logp = policy(batch, mode="score", temperature=temperature)
            if batch is not FILLER:
                mem_rewards.append(rewards)
                if not exact:
                    logp = logp.cpu()  # one device -> host copy per micro-batch
                    rows = trajectory_rows(batch, [len(trajs[i]) for i in batch.trajectory_ids])
                    for i, (a, b) in zip(batch.trajectory_ids, rows):
                        trainer_logprobs[i] = logp[a:b]
    mem_rewards = torch.cat(mem_rewards) if mem_rewards else torch.zeros(0, dtype=torch.float64)
    adv = batch_advantages(trajs, mem_rewards, by_step=opts.memory_adv_by_step, scale_by_std=opts.scale_by_std)
    t_score = time.perf_counter() - t0 - t_rollout

    # update: ppo_epochs passes, each in mini_batches optimizer steps; old log-probs are the
    # rollout's (exact engine) or the trainer's recomputed ones (then tokens are reweighted)
    device = lm_head_weight(policy.lm).device
    traj_offsets = [0]
    for t in trajs:
        traj_offsets.append(traj_offsets[-1] + len(t.memory_segments()))
    sums = {"loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0, "kl_ref": 0.0, "tis_weight": 0.0,
            "tis_masked": 0.0, "rollout_logprob_gap": 0.0, "rollout_kl": 0.0}
    grad_norms, skipped, updates = [], 0, 0
    order = list(range(len(trajs)))
    for _ in range(opts.ppo_epochs):
        for chunk in _split_even(order, opts.mini_batches):
            seqs_with_loss = sum(1 for i in chunk if any(trajs[i].loss_mask[1:]))
            loss_tokens = sum(sum(trajs[i].loss_mask[1:]) for i in chunk)
            global_seqs = max(1, int(all_reduce_sum(float(seqs_with_loss))))
            global_tokens = max(1, int(all_reduce_sum(float(loss_tokens))))
            loss_options = {**opts.loss_options, "num_global_seqs": global_seqs, "num_global_tokens": global_tokens}
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for batch in _collective_batches(trajs, chunk, opts.micro_batch_tokens):
                if batch is FILLER:  # same number of forwards on every rank (FSDP collectives)
                    zero = micro_batch_advantages(batch, torch.zeros(1), torch.zeros(0), 0.0, device)
                    ref = ref_policy(batch, mode="logprobs") if opts.loss_options.get("kl_coef", 0.0) else None
                    loss, _ = policy(batch, advantages=zero, loss_options=opts.loss_options, ref_logprobs=ref)
                    (loss * 0.0).backward()
                    continue
                ids = batch.trajectory_ids
                mem_slice = torch.cat([adv.mem_adv[traj_offsets[i]:traj_offsets[i + 1]] for i in ids])
                batch_adv = micro_batch_advantages(batch, adv.traj_adv[ids], mem_slice, opts.mem_coef, device)
                if not exact:  # old = the trainer's log-probs; tokens reweighted by opts.correction
                    rollout_old = batch.old_logprobs.clone()
                    tis, masked = use_trainer_old_logprobs(batch, [trajs[i] for i in ids],
                                                           [trainer_logprobs[i] for i in ids], opts.correction)
                    batch_adv = token_advantages(batch_adv, torch.float32) * tis.to(device)
                    m = batch.loss_mask
                    log_ratio = (batch.old_logprobs - rollout_old)[m].double()  # log pi_old - log pi_rollout
                    share = 1.0 / max(1, global_tokens)
                    sums["tis_weight"] += float(tis[m].sum()) * share
                    sums["tis_masked"] += float(masked[m].sum()) * share
                    sums["rollout_logprob_gap"] += float(log_ratio.abs().sum()) * share
                    # KL(rollout || trainer) on the rollout's samples, k3: r - 1 - log r with r = pi_old / pi_rollout
                    sums["rollout_kl"] += float((log_ratio.exp() - 1 - log_ratio).sum()) * share
                ref = None
                if opts.loss_options.get("kl_coef", 0.0):
                    ref = ref_policy(batch, mode="logprobs", temperature=temperature)
                # gradients are summed over ranks: the loss already carries 1 / global count
                loss, metrics = policy(batch, advantages=batch_adv, temperature=temperature,
                                       loss_options=loss_options, ref_logprobs=ref)
                loss.backward()
                weight = float(batch.loss_mask.sum()) / max(1, global_tokens)
                loss_sum += float(metrics["loss"])
                for key in ("clip_frac", "approx_kl", "ratio_mean", "kl_ref"):
                    sums[key] += float(metrics.get(key, 0.0)) * weight
            grad_norm = clip_grad_norm(policy, opts.grad_clip)
            total_loss = all_reduce_sum(loss_sum)
            if guard is None or guard.should_step(step, total_loss, grad_norm):
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            sums["loss"] += total_loss
            grad_norms.append(grad_norm)
            updates += 1
    t_total = time.perf_counter() - t0

    rewards = [t.reward for t in trajs]
    em, f1 = evaluate_answers(trajs, group_tasks)
    # diagnostics: what the memories hold; where rollout and trainer log-probs drift (one collective)
    mem = memory_stats(trajs, group_tasks, tokenizer, tags)
    totals = {f"memory/{k}": float(sum(v)) for k, v in mem.items()} | {"memory/count": float(len(mem["length"]))}
    if not exact:
        drift = drift_by_kind(trajs, [torch.tensor(trajs[i].sample_logprobs[1:]) for i in range(len(trajs))],
                              [trainer_logprobs[i] for i in range(len(trajs))], tokenizer, tags)
        totals |= {f"drift/{k}": s for k, (s, _) in drift.items()} | {f"drift_n/{k}": float(n) for k, (_, n) in
                                                                         drift.items()}
    totals = all_reduce_sums(totals)
    diagnostics = {f"memory/{k}_mean" if k != "gold_recall" else "memory/gold_recall":
                   totals[f"memory/{k}"] / max(1.0, totals["memory/count"]) for k in mem}
    if not exact:
        diagnostics |= {f"drift/{k}": totals[f"drift/{k}"] / max(1.0, totals[f"drift_n/{k}"]) for k in DRIFT_KINDS}
    # float() on both sides: ranks must pass the same dtype to the collective (an empty list sums to int 0)
    mean = lambda xs: all_reduce_sum(float(sum(xs))) / max(1.0, all_reduce_sum(float(len(xs))))  # noqa: E731
    tokens = all_reduce_sum(float(sum(t.tokens_processed for t in trajs)))
    return {
        "reward/mean": mean(rewards),
        "reward/std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "em": mean(em),
        "f1": mean(f1),
        "memory_reward/mean": mean(mem_rewards.tolist()),
        "memory_adv/abs_mean": mean(adv.mem_adv.abs().tolist()),
        "traj_adv/abs_mean": mean(adv.traj_adv.abs().tolist()),
        "loss": sums["loss"] / updates,
        "clip_fraction": all_reduce_sum(sums["clip_frac"]) / updates,
        "kl": all_reduce_sum(sums["approx_kl"]) / updates,
        "kl_ref": all_reduce_sum(sums["kl_ref"]) / updates,
        "ratio/mean": all_reduce_sum(sums["ratio_mean"]) / updates,
        **({} if exact else {"tis/weight_mean": all_reduce_sum(sums["tis_weight"]) / updates,
                             "tis/masked_fraction": all_reduce_sum(sums["tis_masked"]) / updates,
                             "rollout/logprob_gap": all_reduce_sum(sums["rollout_logprob_gap"]) / updates,
                             "rollout/kl": all_reduce_sum(sums["rollout_kl"]) / updates}),
        **diagnostics,
        "grad_norm": statistics.mean(grad_norms),
        "skipped": float(skipped),
        "TT": mean([float(t.tokens_processed) for t in trajs]),
        "PT": mean([float(t.peak_context) for t in trajs]),
        "format_valid": mean([float(t.format_valid) for t in trajs]),
        "rollout_s": t_rollout,
        "score_s": t_score,
        "step_s": t_total,
        "tokens_per_s": tokens / t_total,
    }
