"""The training loop behind `torchrun -m mempo.train` (see mempo/train.py for the command line).

With no arguments it runs the built-in default on the tiny world (CPU or GPU): a small
Qwen2 built from the config and the world's tokenizer, a supervised warm start on expert
trajectories, MemPO RL, then evaluation on held-out tasks with 1, 2 and 4 objectives;
metrics, checkpoints and the exported policy go under runs/<name>/.

Per RL step, top to bottom: sample tasks (sharded by rank; a task's G rollouts stay on one
rank) -> roll out with the current weights (native engine: KV of dropped segments evicted;
or engine=vllm with truncated importance sampling)
-> probe memories, MemPO advantages -> packed micro-batches through the fused loss ->
optimizer step -> log, checkpoint. One optimizer and one LR schedule span both phases;
the global step counts warm-start steps first, then RL steps.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from mempo.checkpoint import (
    checkpoint_root,
    export_hf,
    load_checkpoint,
    resolve_resume,
    retire_checkpoints,
    save_checkpoint,
    step_dir_name,
    step_of,
)
from mempo.config import Config
from mempo.distributed import (
    all_reduce_max,
    all_reduce_sum,
    all_reduce_sums,
    balanced_shard,
    barrier,
    clip_grad_norm,
    compute_dtype,
    shard_for_rank,
    shard_model,
)
from mempo.host import describe_device
from mempo.models.builder import build_model
from mempo.ops import PolicyLossOptions
from mempo.optim import build_optimizer, lr_multiplier
from mempo.rollout import ContextPolicy, NativeEngine, SamplingParams, run_rollout
from mempo.rollout.kv_cache import KVBudgetError
from mempo.run_log import RunLogger
from mempo.step_guard import NonFiniteStepGuard
from mempo.training.diagnostics import final_memory_recall, memory_stats
from mempo.training.fused_policy import FusedPolicy
from mempo.training.importance_sampling import RolloutCorrection
from mempo.training.inference_mode import full_weights, initialise_root
from mempo.training.packed_batch import FILLER, pack_trajectories, split_by_token_budget
from mempo.training.rl_step import RLStepOptions, evaluate_answers, rl_step
from mempo.training.task_side import Demonstrations, SetupError, build_task_side, live_query


def step_seed(seed: int, phase: str, step: int) -> int:
    """Same on every rank and across restarts (Python's hash() of a str is not)."""
    return (seed * 1_000_003 + step) * 2 + (phase == "rl")


def learning_rate(cfg: Config, step: int) -> float:
    """Absolute LR at global step `step`: warm-start schedule, then the RL schedule."""
    if step < cfg.sft.steps:
        return cfg.sft.lr * lr_multiplier(step, cfg.sft.warmup_steps, cfg.sft.steps,
                                          decay_steps=round(cfg.sft.decay_fraction * cfg.sft.steps))
    return cfg.optimizer.lr * lr_multiplier(step - cfg.sft.steps, cfg.optimizer.warmup_steps, cfg.trainer.steps,
                                            cfg.optimizer.scheduler, cfg.optimizer.min_lr_ratio)


def sft_step(policy, demos: Demonstrations, cfg: Config, optimizer, guard, step: int) -> dict:
    """One warm-start step: token-mean NLL of the expert's turns over the global batch."""
    rng = random.Random(step_seed(cfg.trainer.seed, "sft", step))
    batch = [demos.trajectory(i, seed) for i, seed in demos.draw(rng, cfg.sft.batch_size)]  # global, every rank
    mine = balanced_shard(batch, [len(t) for t in batch])  # by tokens: the slowest rank sets the pace
    global_tokens = max(1, int(all_reduce_sum(sum(sum(t.loss_mask[1:]) for t in mine))))
    groups = split_by_token_budget(mine, cfg.algorithm.micro_batch_tokens) if mine else []
    nll = torch.zeros((), dtype=torch.float64)
    for k in range(int(all_reduce_max(float(len(groups))))):  # equal forwards on every rank
        batch = pack_trajectories([mine[i] for i in groups[k]]) if k < len(groups) else FILLER
        loss, _ = policy.sft_loss(batch, num_global_tokens=global_tokens)
        (loss * (0.0 if batch is FILLER else 1.0)).backward()
        if batch is not FILLER:
            nll = nll.to(loss.device) + loss.detach()  # stays on the device
    grad_norm = clip_grad_norm(policy, cfg.optimizer.grad_clip)
    nll = all_reduce_sums({"nll": nll})["nll"]  # host sync: the guard decides on the host
    if guard.should_step(step, nll, grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"nll": nll, "grad_norm": grad_norm}


def evaluate(policy, engine, side, cfg: Config) -> dict[str, float]:
    """Greedy rollouts on held-out tasks: EM, F1, TT, PT, memory length and final-memory gold
    recall per objective count."""
    out = {}
    params = SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                            max_total_tokens=cfg.rollout.max_total_tokens, stop_token_ids=side.stop_token_ids)
    context = ContextPolicy(cfg.rollout.context_policy, cfg.rollout.context_k, cfg.rollout.context_mode)
    for n, tasks in side.eval_sets.items():
        mine = shard_for_rank(tasks)
        with full_weights(policy), torch.no_grad():
            trajs = run_rollout(engine, side.env, side.tokenizer, mine, list(range(len(mine))), context, params) \
                if mine else []
        em, f1 = evaluate_answers(trajs, mine)
        # what the memories hold: tokens per memory; gold answers the last memory still holds
        mem = memory_stats(trajs, mine, side.tokenizer, side.env.config.tags)
        recall = final_memory_recall(trajs, mine, side.tokenizer, side.env.config.tags)
        g = all_reduce_sums({"tasks": len(mine), "em": sum(em), "f1": sum(f1), "recall": sum(recall),
                             "TT": sum(t.tokens_processed for t in trajs), "PT": sum(t.peak_context for t in trajs),
                             "mem_tokens": sum(mem["length"]), "memories": len(mem["length"])})  # one collective
        count = max(1.0, g["tasks"])
        out |= {f"{n}obj/em": g["em"] / count, f"{n}obj/f1": g["f1"] / count, f"{n}obj/TT": g["TT"] / count,
                f"{n}obj/PT": g["PT"] / count, f"{n}obj/mem_len": g["mem_tokens"] / max(1.0, g["memories"]),
                f"{n}obj/mem_recall": g["recall"] / count}
    return out


def recompute_old_logprobs(cfg: Config, device: torch.device) -> bool:
    """algorithm.old_logprobs resolved: the native engine's sampling log-probs are the old
    policy's only in float32 (the invariant); in bf16 the trainer recomputes them."""
    if cfg.algorithm.old_logprobs != "auto":
        return cfg.algorithm.old_logprobs == "recompute"
    return cfg.rollout.engine != "native" or compute_dtype(cfg.model.dtype, device) != torch.float32


def rl_options(cfg: Config, stop_token_ids: tuple[int, ...], device: torch.device) -> RLStepOptions:
    return RLStepOptions(
        group_size=cfg.rollout.group_size,
        sampling=SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k,
                                cfg.rollout.max_new_tokens, cfg.rollout.max_total_tokens, cfg.rollout.seed,
                                stop_token_ids),
        context=ContextPolicy(cfg.rollout.context_policy, cfg.rollout.context_k, cfg.rollout.context_mode),
        mem_coef=cfg.algorithm.mem_coef, memory_adv_by_step=cfg.algorithm.memory_grouping == "step",
        scale_by_std=cfg.algorithm.scale_by_std, micro_batch_tokens=cfg.algorithm.micro_batch_tokens,
        grad_clip=cfg.optimizer.grad_clip, ppo_epochs=cfg.algorithm.ppo_epochs,
        mini_batches=cfg.algorithm.mini_batches,
        correction=RolloutCorrection(cfg.rollout.tis_level, cfg.rollout.tis_mode, cfg.rollout.tis_cap,
                                     cfg.rollout.tis_low),
        recompute_old_logprobs=recompute_old_logprobs(cfg, device),
        loss_options=PolicyLossOptions(clip_low=cfg.algorithm.clip_low, clip_high=cfg.algorithm.clip_high,
                                       dual_clip=cfg.algorithm.dual_clip, kl_coef=cfg.algorithm.kl_coef,
                                       kl_estimator=cfg.algorithm.kl_estimator, loss_agg=cfg.algorithm.loss_agg),
    )


def vllm_rollout(policy, tokenizer, cfg: Config, device: torch.device):
    """The engine=vllm rollout: an in-process vLLM loaded from an export of the policy."""
    from mempo.training.vllm_rollout import VLLMRollout

    dtype = str(compute_dtype(cfg.model.dtype, device)).removeprefix("torch.")
    return VLLMRollout(policy, tokenizer, f"{cfg.trainer.output_dir}/vllm_policy", dtype=dtype,
                       max_model_len=cfg.rollout.max_total_tokens, seed=cfg.rollout.seed,
                       gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization)


def should_save(cfg: Config, done: int) -> bool:
    """Checkpoint after `done` global steps: the end of the warm start, the last step, and every
    trainer.save_every RL steps."""
    rl_done = done - cfg.sft.steps
    every = cfg.trainer.save_every and rl_done > 0 and rl_done % cfg.trainer.save_every == 0
    return done == cfg.sft.steps or done == cfg.sft.steps + cfg.trainer.steps or bool(every)


def should_evaluate(cfg: Config, done: int) -> bool:
    """Evaluate mid-run every trainer.eval_every RL steps (the final evaluation always runs)."""
    rl_done = done - cfg.sft.steps
    return bool(cfg.trainer.eval_every) and 0 < rl_done < cfg.trainer.steps and rl_done % cfg.trainer.eval_every == 0


def finished(checkpoint, total: int, cfg: Config) -> bool:
    """The run's last step is checkpointed and (if asked for) its policy exported: nothing to do."""
    done = checkpoint.name == step_dir_name(total)
    return done and (not cfg.trainer.export_hf or (Path(cfg.trainer.output_dir) / "hf" / "config.json").is_file())


def build_policy(cfg: Config, side, info):
    """The model, its sharded `FusedPolicy`, AdamW and the LR schedule (warm start, then RL)."""
    model = build_model(cfg.model, tokenizer=side.tokenizer, seed=cfg.trainer.seed).to(info.device)
    if len(side.tokenizer) > model.config.vocab_size:
        raise SetupError(f"the tokenizer has {len(side.tokenizer)} tokens, more than the model's vocab_size "
                         f"{model.config.vocab_size}")
    policy = FusedPolicy(model, attention="segment")
    shard_model(policy, param_dtype=compute_dtype(cfg.model.dtype, info.device),
                activation_checkpointing=cfg.model.activation_checkpointing)
    optimizer = build_optimizer(policy, cfg.optimizer, lr=1.0)  # the schedule gives absolute LRs
    initialise_root(policy, FILLER)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate(cfg, s))
    return model, policy, optimizer, scheduler


def run(cfg: Config, info) -> None:
    out_dir = cfg.trainer.output_dir
    torch.manual_seed(cfg.trainer.seed)
    random.seed(cfg.trainer.seed)
    side = build_task_side(cfg)
    searched = live_query(side, cfg)  # every rank: an unreachable server stops all of them at once
    model, policy, optimizer, scheduler = build_policy(cfg, side, info)
    guard = NonFiniteStepGuard(cfg.trainer.max_bad_steps)
    start = 0
    total = cfg.sft.steps + cfg.trainer.steps
    resume = resolve_resume(out_dir, cfg.trainer.resume)
    if resume is not None and (step_of(resume) or 0) > total:
        raise SetupError(f"checkpoint {resume} is step {step_of(resume)}, past this run's last step {total} "
                         f"(sft.steps {cfg.sft.steps} + trainer.steps {cfg.trainer.steps}): raise trainer.steps to "
                         f"continue it, or start another run with --trainer.name")
    if resume is not None and finished(resume, total, cfg):
        if info.is_rank0:
            print(f"[mempo] run {out_dir} already finished: checkpoint {resume.name} is step {total} of {total}"
                  f"{' and the policy is exported to ' + out_dir + '/hf' if cfg.trainer.export_hf else ''}. Raise "
                  f"trainer.steps to continue it, or start another with --trainer.name", flush=True)
        return
    if resume is not None:
        state = load_checkpoint(resume, policy, optimizer, scheduler)
        start = state.step
        guard.load_state_dict(state.extra.get("guard", guard.state_dict()))
    retired = retire_checkpoints(out_dir) if cfg.trainer.resume == "never" else None
    log = RunLogger(out_dir, cfg.logging, enabled=info.is_rank0, config_dict=cfg.to_dict(), resume_step=start)
    log.notice(("resuming from " + str(resume) + "\n" if resume else "")
               + (f"starting afresh (--trainer.resume never): the earlier run's checkpoints moved to {retired}\n"
                  if retired else "") + "config:\n" + cfg.to_yaml())
    log.notice(f"tasks: {side.source}; tokenizer: {cfg.model.path or 'tiny world BPE'} "
               f"({len(side.tokenizer)} tokens, {side.prompt_format} prompt); search: {searched}")
    log.notice(f"device: {describe_device(str(info.device))}; {info.world_size} rank(s), "
               f"{torch.get_num_threads()} torch thread(s) per rank")

    def save(step: int) -> None:
        save_checkpoint(out_dir, step, policy, optimizer, scheduler, data_state={"step": step},
                        extra={"guard": guard.state_dict()}, config_yaml=cfg.to_yaml(),
                        keep_last=cfg.trainer.keep_checkpoints)

    engine = NativeEngine(model, cfg.rollout.max_total_tokens, kv_cache_memory=cfg.rollout.kv_cache_memory,
                          block_size=cfg.rollout.kv_block_size)
    try:  # a KV budget that cannot hold one row stops the run now, in one line, not at the first rollout
        engine.pool_blocks(1)
    except KVBudgetError as err:
        raise SetupError(str(err)) from None
    context = ContextPolicy(cfg.rollout.context_policy, cfg.rollout.context_k, cfg.rollout.context_mode)
    expert = Demonstrations(side.expert_trajectories, side.tokenizer, context, side.relabel,
                            cfg.env.relabel_names) if start < cfg.sft.steps else None
    opts = rl_options(cfg, side.stop_token_ids, info.device)

    def reference() -> FusedPolicy:
        """The frozen reference for kl_coef > 0: the policy as the warm start left it."""
        ref = FusedPolicy(build_model(cfg.model, tokenizer=side.tokenizer, seed=cfg.trainer.seed).to(info.device),
                          attention="segment")
        shard_model(ref, param_dtype=compute_dtype(cfg.model.dtype, info.device))
        if start > cfg.sft.steps:  # resumed mid-RL: the reference is the end-of-warm-start checkpoint
            path = checkpoint_root(out_dir) / step_dir_name(cfg.sft.steps)
            if not path.is_dir():
                raise FileNotFoundError(f"kl_coef > 0 needs the warm-start checkpoint {path} as the reference "
                                        "(raise trainer.keep_checkpoints, or resume from it)")
            load_checkpoint(path, ref, restore_rng=False)
        else:
            with torch.no_grad():
                for mine, theirs in zip(ref.parameters(), policy.parameters()):
                    mine.copy_(theirs)
        ref.requires_grad_(False)
        initialise_root(ref, FILLER)
        return ref

    def end_of_step(step: int, metrics: dict, phase: str) -> None:
        """Log the step; checkpoint and evaluate when their conditions say so."""
        metrics["lr"] = scheduler.get_last_lr()[0]
        scheduler.step()
        done = step + 1
        log.log(done, metrics, phase)
        if should_save(cfg, done):
            save(done)
        if should_evaluate(cfg, done):
            log.log(done, evaluate(policy, engine, side, cfg), "eval")

    log.progress(total, "train", completed=start, phases={"sft": cfg.sft.steps, "rl": cfg.trainer.steps})
    # 1. supervised warm start on expert trajectories
    for step in range(start, cfg.sft.steps):
        end_of_step(step, sft_step(policy, expert, cfg, optimizer, guard, step), "sft")

    # 2. MemPO RL: its pieces are built once, from the warm-started policy
    rl_start = max(start, cfg.sft.steps)
    ref_policy = reference() if cfg.algorithm.kl_coef and rl_start < total else None
    vllm = cfg.rollout.engine == "vllm" and rl_start < total
    rollout_engine = vllm_rollout(policy, side.tokenizer, cfg, info.device) if vllm else engine
    for step in range(rl_start, total):
        rl = step - cfg.sft.steps
        rng = random.Random(step_seed(cfg.trainer.seed, "rl", rl))
        tasks = [side.train_tasks[rng.randrange(len(side.train_tasks))] for _ in range(cfg.rollout.batch_size)]
        metrics = rl_step(policy, rollout_engine, side.env, side.tokenizer, shard_for_rank(tasks), opts, optimizer,
                          rl, guard, ref_policy)
        end_of_step(step, metrics, "rl")

    # 3. evaluation on held-out tasks with 1, 2, 4 objectives, then the exported policy
    final = evaluate(policy, engine, side, cfg)
    log.log(total, final, "eval")
    log.eval_table(total, final)
    if cfg.trainer.export_hf:
        export_hf(policy, side.tokenizer, f"{out_dir}/hf")
        log.notice(f"exported the policy to {out_dir}/hf")
    log.close()
    barrier()
    if vllm:
        rollout_engine.close()  # last: vLLM's teardown destroys the default process group
