"""Warm-start steps over ranks: the global batch shared out by tokens (`balanced_shard`, what
the trainer does) vs in contiguous halves (`shard_for_rank`, what it did before), step by step
in one run, so both see the same load. A step waits for its slowest rank; the table gives the
mean step time and that rank's tokens.

    torchrun --nproc_per_node 2 benchmarks/warm_start.py      # the default run's warm start, 80 steps, 1-2.5 min
    torchrun --nproc_per_node 2 benchmarks/warm_start.py --steps 100 --env.relabel_names 0

Any `mempo.train` option after the benchmark's own (`--steps`, `--json`) changes the run; the
demonstrations, batch size and model are the default run's. Each global batch is stepped twice,
shared out one way then the other (the first two batches not timed), so both ways time the same
batches on the same run's model, not two runs'.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

import mempo.trainer as trainer
from mempo.config import parse_args
from mempo.distributed import (
    all_reduce_max,
    balanced_shard,
    barrier,
    destroy_distributed,
    init_distributed,
    shard_for_rank,
)
from mempo.host import describe_device
from mempo.rollout import ContextPolicy
from mempo.step_guard import NonFiniteStepGuard
from mempo.training.task_side import Demonstrations, build_task_side

WAYS = {"by tokens (balanced_shard)": balanced_shard,
        "contiguous halves (shard_for_rank)": lambda items, sizes: shard_for_rank(items)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80, help="warm-start steps: each batch twice, once each way")
    p.add_argument("--json", default=None, help="also write the results here")
    args, rest = p.parse_known_args()
    cfg = parse_args(rest)
    info = init_distributed(cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    side = build_task_side(cfg)
    _, policy, optimizer, scheduler = trainer.build_policy(cfg, side, info)  # as the run builds them
    context = ContextPolicy(cfg.rollout.context_policy, cfg.rollout.context_k, cfg.rollout.context_mode)
    demos = Demonstrations(side.expert_trajectories, side.tokenizer, context, side.relabel, cfg.env.relabel_names)
    guard = NonFiniteStepGuard(cfg.trainer.max_bad_steps)
    names = list(WAYS)
    seconds = {name: [] for name in names}
    slowest = {name: [] for name in names}
    for step in range(args.steps):
        name = names[step % 2]
        trainer.balanced_shard = WAYS[name]  # what sft_step shares the batch out with
        batch = [demos.trajectory(i, s) for i, s in demos.draw(random.Random(trainer.step_seed(
            cfg.trainer.seed, "sft", step // 2)), cfg.sft.batch_size)]  # sft_step draws the same
        tokens = all_reduce_max(float(sum(len(t) for t in WAYS[name](batch, [len(t) for t in batch]))))
        barrier()
        start = time.perf_counter()
        trainer.sft_step(policy, demos, cfg, optimizer, guard, step // 2)
        barrier()
        elapsed = time.perf_counter() - start
        if step % 2:
            scheduler.step()
        if step >= 2 * len(names):
            seconds[name].append(elapsed)
            slowest[name].append(tokens)
    trainer.balanced_shard = balanced_shard
    if info.is_rank0:
        base = statistics.mean(seconds[names[1]])
        rows = [{"sharding": name, "steps": len(seconds[name]), "s_per_step": statistics.mean(seconds[name]),
                 "median_s": statistics.median(seconds[name]), "slowest_rank_tokens": statistics.mean(slowest[name]),
                 "vs_contiguous": statistics.mean(seconds[name]) / base} for name in names]
        device = describe_device(str(info.device))
        print(f"warm-start steps, {info.world_size} ranks on {device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s) per rank, batch {cfg.sft.batch_size} demonstrations, "
              f"relabel_names {cfg.env.relabel_names}")
        print("| sharding | steps | s / step (mean) | median | slowest rank's tokens | time vs contiguous |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['sharding']} | {r['steps']} | {r['s_per_step']:.3f} | {r['median_s']:.3f} | "
                  f"{r['slowest_rank_tokens']:.0f} | {r['vs_contiguous']:.3f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device, "torch": torch.__version__, "ranks": info.world_size,
                           "threads_per_rank": torch.get_num_threads(), "rows": rows}, f, indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main()
