"""Rollout vs training log-probs, per precision: how far the old policy's ratio is off when the
native engine's sampling log-probs are used as pi_old (algorithm.old_logprobs=rollout), which is
what algorithm.old_logprobs=auto recomputes away in bf16.

    python benchmarks/exactness.py [--tasks 8] [--objectives 2] [--device cpu]

A second table: with rollout.context_mode=reencode, the training work of mempo's one-pass
layout (every token once, context copies included) against re-prefilling each kept context
as its own sample (MemAgent / verl multi-trajectory / SkyRL / MEM1 style), on expert
trajectories: tokens through the model (~ linear-layer FLOPs) and visible attention pairs.

Expert turns are teacher-forced through the real agent loop (memories close, context drops,
KV is evicted), on a random-init Qwen2 of the default run's size; the training side is the
trainer's own packed forward (segment attention) and fused log-probs. |delta| is over the
model-written tokens.
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch

from mempo.envs import build_tiny_world
from mempo.host import describe_device
from mempo.ops import linear_logprobs
from mempo.rollout import ContextPolicy, NativeEngine, SamplingParams, run_rollout
from mempo.training.fused_policy import packed_hidden
from mempo.training.packed_batch import pack_trajectories


def measure(model, world, tok, tasks, experts, dtype, device):
    model = model.to(device=device, dtype=dtype)
    trajs = run_rollout(NativeEngine(model, 4096), world.env(), tok, tasks, list(range(len(tasks))),
                        ContextPolicy("mempo"), SamplingParams(max_new_tokens=256),
                        forced_turns=[[t.model for t in e.turns] for e in experts])
    deltas, after_drop = [], []
    for traj in trajs:
        batch = pack_trajectories([traj])
        with torch.no_grad():
            hidden = packed_hidden(model, batch, "segment")
            trainer = linear_logprobs(hidden, model.lm_head.weight, batch.targets.to(device))[:-1].float().cpu()
        mask = torch.tensor(traj.loss_mask[1:])
        delta = (trainer - torch.tensor(traj.sample_logprobs[1:]))[mask].abs()
        deltas.append(delta)
        first_drop = min((s.dropped_at for s in traj.segments if s.dropped_at is not None), default=len(traj))
        after = torch.tensor([i + 1 >= first_drop for i in range(len(traj) - 1)])[mask]
        after_drop.append(delta[after])
    d, a = torch.cat(deltas), torch.cat(after_drop)
    return d.mean().item(), d.max().item(), a.mean().item() if a.numel() else float("nan"), len(d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--objectives", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    world = build_tiny_world(seed=0)
    tok = world.tokenizer()
    tasks = world.tasks("train", args.objectives)[: args.tasks]
    experts = world.expert_trajectories(tasks)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    base = Qwen2ForCausalLM(cfg).eval()
    print(f"rollout vs training log-probs | {datetime.date.today()} | {describe_device(args.device)} | "
          f"torch {torch.__version__} | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{args.tasks} tasks x {args.objectives} objectives, expert turns forced, context policy mempo, "
          f"random Qwen2 (hidden 256, 4 layers)")
    print(f"{'dtype':<10}{'tokens':>8}{'mean |d|':>12}{'max |d|':>12}{'mean |d| after 1st drop':>26}"
          f"{'  pi_old with old_logprobs=auto':>32}")
    for dtype, resolved in ((torch.float32, "rollout (exact)"), (torch.bfloat16, "recompute: |d| -> 0")):
        import copy
        mean, mx, after, n = measure(copy.deepcopy(base), world, tok, tasks, experts, dtype, args.device)
        print(f"{str(dtype).removeprefix('torch.'):<10}{n:>8}{mean:>12.2e}{mx:>12.2e}{after:>26.2e}  {resolved:>30}")
    reencode_work(world, tok, [2, 4, 10], 16)


def reencode_work(world, tok, objectives: list[int], tasks_per_count: int) -> None:
    """One-pass vs per-context samples, on the reencode records of expert trajectories."""
    import dataclasses

    from mempo.envs import SearchEnv
    from mempo.ops.segment_layout import SegmentLayout
    from mempo.rollout import trajectory_from_turns

    policy = ContextPolicy("mempo", mode="reencode")
    env = SearchEnv(world.search_tool, dataclasses.replace(world.config.env, max_turns=64))
    print(f"\ncontext_mode=reencode, context policy mempo, expert trajectories ({tasks_per_count} tasks per count)")
    print(f"{'objectives':>10}{'one-pass tokens':>17}{'per-sample tokens':>19}{'saved':>8}"
          f"{'one-pass pairs':>16}{'per-sample pairs':>18}{'saved':>8}")
    for n in objectives:
        one_tok = sample_tok = one_pairs = sample_pairs = 0
        for e in world.expert_trajectories(world.tasks("train", n)[:tasks_per_count], env):
            traj = trajectory_from_turns(tok, e.prompt, [(t.model, t.information) for t in e.turns], policy)
            prompt = traj.segments[0].end
            # samples start where a re-encode starts (the first of a run of context copies)
            cuts = [s.start for i, s in enumerate(traj.segments)
                    if s.kind == "context" and traj.segments[i - 1].kind != "context"]
            bounds = [prompt] + cuts + [len(traj)]
            sizes = [bounds[0] + bounds[1] - bounds[0]] + [prompt + b - a for a, b in zip(bounds[1:-1], bounds[2:])]
            sample_tok += sum(sizes)
            sample_pairs += sum(k * (k + 1) // 2 for k in sizes)
            one_tok += len(traj)
            one_pairs += int(SegmentLayout.from_segments([traj.segments], [traj.position_ids]).dense_mask().sum())
        print(f"{n:>10}{one_tok:>17}{sample_tok:>19}{1 - one_tok / sample_tok:>8.1%}"
              f"{one_pairs:>16}{sample_pairs:>18}{1 - one_pairs / sample_pairs:>8.1%}")


if __name__ == "__main__":
    main()
