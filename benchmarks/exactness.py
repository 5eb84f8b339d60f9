"""Rollout vs training log-probs, per precision: how far the old policy's ratio is off when the
native engine's sampling log-probs are used as pi_old (algorithm.old_logprobs=rollout), which is
what algorithm.old_logprobs=auto recomputes away in bf16.

    python benchmarks/exactness.py [--tasks 8] [--objectives 2] [--device cpu]

Expert turns are teacher-forced through the real agent loop (memories close, context drops,
KV is evicted), on a random-init Qwen2 of the default run's size; the training side is the
trainer's own packed forward (segment attention) and fused log-probs. |delta| is over the
model-written tokens.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform

import torch

from mempo.envs import build_tiny_world
from mempo.ops import linear_logprobs
from mempo.rollout import ContextPolicy, NativeEngine, SamplingParams, run_rollout
from mempo.training.packed_batch import pack_trajectories
from mempo.training.policy_forward import packed_hidden


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
    print(f"rollout vs training log-probs | {datetime.date.today()} | {platform.machine()} {args.device} | "
          f"torch {torch.__version__} | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{args.tasks} tasks x {args.objectives} objectives, expert turns forced, context policy mempo, "
          f"random Qwen2 (hidden 256, 4 layers)")
    print(f"{'dtype':<10}{'tokens':>8}{'mean |d|':>12}{'max |d|':>12}{'mean |d| after 1st drop':>26}"
          f"{'  pi_old with old_logprobs=auto':>32}")
    for dtype, resolved in ((torch.float32, "rollout (exact)"), (torch.bfloat16, "recompute: |d| -> 0")):
        import copy
        mean, mx, after, n = measure(copy.deepcopy(base), world, tok, tasks, experts, dtype, args.device)
        print(f"{str(dtype).removeprefix('torch.'):<10}{n:>8}{mean:>12.2e}{mx:>12.2e}{after:>26.2e}  {resolved:>30}")


if __name__ == "__main__":
    main()
