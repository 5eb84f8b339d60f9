"""`python -m mempo.train --check [--ranks N] [config and overrides]`: build everything a run
needs except the optimizer, print the resolved plan and exit 0, or exit 1 with the first problem.

The model is built on the `meta` device from its config (no weights are read: a 7B plan
checks on a laptop); the weight files' headers are read to check that every parameter is
there with its shape. The search tool answers one live query (an unreachable server is a
problem). Memory per rank (`memory_plan`): parameters, gradients and AdamW state (float32,
sharded over `ranks` by FSDP), the rollout's full weights and paged KV pool (rollout.
kv_cache_memory, and how many rows fit in it at rollout.max_total_tokens), and an estimate of
the update's activations at algorithm.micro_batch_tokens; a pool that cannot hold one row is a
problem, a peak above one 80 GiB GPU a warning.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from mempo.config import Config
from mempo.models.builder import ModelLoadError, tiny_qwen2_config

from .task_side import SetupError, build_task_side, live_query

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
GPU_BYTES = 80 * GiB  # an H100's memory: the plan warns above it


def meta_model(cfg: Config, tokenizer) -> torch.nn.Module:
    """The run's model on the meta device: shapes and parameter count, no memory, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.model.path is None:
        config = tiny_qwen2_config(cfg.model, len(tokenizer))
    else:
        if not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
            raise ModelLoadError(f"model.path {cfg.model.path!r} holds no config.json "
                                 f"(expected a Hugging Face model directory)")
        try:
            config = AutoConfig.from_pretrained(cfg.model.path, local_files_only=True)
        except Exception as err:  # transformers raises several types for a bad config
            raise ModelLoadError(f"cannot read the model config at model.path {cfg.model.path!r}: {err}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def safetensors_header(path: str) -> dict[str, list[int]]:
    """name -> shape, from a .safetensors file's header alone (8-byte length + JSON)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SetupError(f"weight file {path!r} is too short to be safetensors")
        (length,) = struct.unpack("<Q", raw)
        if length > os.path.getsize(path) - 8:
            raise SetupError(f"weight file {path!r} has a header longer than the file")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SetupError(f"weight file {path!r} has an unreadable safetensors header") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def check_weights(path: str, model: torch.nn.Module) -> str:
    """Every parameter of `model` in the directory's safetensors files with its shape, or
    SetupError naming the first missing / mismatched one. -> a summary line."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith(".bin")]
        if bins:
            return f"{len(bins)} PyTorch .bin file(s) (not inspected; safetensors headers are)"
        raise SetupError(f"model.path {path!r} holds no weights (*.safetensors or *.bin)")
    shapes: dict[str, list[int]] = {}
    for name in files:
        shapes.update(safetensors_header(os.path.join(path, name)))
    aliases: dict[int, list[str]] = {}  # tied weights: one present name is enough
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for names in aliases.values():
        present = [n for n in names if n in shapes]
        if not present:
            raise SetupError(f"model.path {path!r}: parameter {names[0]} is in none of its safetensors files")
        expected = list(model.get_parameter(names[0]).shape)
        if shapes[present[0]] != expected:
            raise SetupError(f"model.path {path!r}: {present[0]} has shape {shapes[present[0]]} in the weights, "
                             f"{expected} in config.json")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    return f"{len(files)} safetensors file(s), {_fmt_bytes(size)}: every parameter present with its shape"


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def plan_lines(cfg: Config, ranks: int) -> list[tuple[str, str]]:
    """[(topic, line)] of the resolved run; raises SetupError / ModelLoadError at the first problem."""
    side = build_task_side(cfg)
    model = meta_model(cfg, side.tokenizer)
    mc = model.config
    params = sum(p.numel() for p in model.parameters())
    if len(side.tokenizer) > mc.vocab_size:
        raise SetupError(f"the tokenizer has {len(side.tokenizer)} tokens, more than the model's vocab_size "
                         f"{mc.vocab_size}")
    lines = []
    origin = f"from {cfg.model.path} (meta device, no weights loaded)" if cfg.model.path else "built from the config"
    lines.append(("model", f"{type(model).__name__} {origin}: {_fmt_count(params)} parameters, "
                           f"{mc.num_hidden_layers} layers, hidden {mc.hidden_size}, {mc.num_attention_heads} heads / "
                           f"{getattr(mc, 'num_key_value_heads', mc.num_attention_heads)} KV heads, "
                           f"vocab {mc.vocab_size}"))
    if cfg.model.path:
        lines.append(("weights", check_weights(cfg.model.path, model)))
    dtype = {"auto": "bfloat16 on CUDA, float32 on CPU (auto)"}.get(cfg.model.dtype, cfg.model.dtype)
    lines.append(("dtype", f"compute {dtype}; float32 master weights and gradient reduction; "
                           f"activation checkpointing {'on' if cfg.model.activation_checkpointing else 'off'}"))
    tok = side.tokenizer
    lines.append(("tokenizer", f"{cfg.model.path or 'tiny world BPE'} ({type(tok).__name__}, {len(tok)} tokens); "
                               f"prompt: {side.prompt_format}"
                               f"{' (chat template)' if side.prompt_format == 'chat' else ''}; "
                               f"turns end at the action tags and at token ids {list(side.stop_token_ids)} "
                               f"(EOS / end of turn)"))
    counts = {}
    for t in side.train_tasks:
        counts[t.num_objectives] = counts.get(t.num_objectives, 0) + 1
    train = ", ".join(f"{n} obj: {c}" for n, c in sorted(counts.items()))
    evals = ", ".join(f"{n} obj: {len(ts)}" for n, ts in side.eval_sets.items())
    lines.append(("tasks", f"train {train}; eval {evals} ({side.source})"))
    relabeled = f"; {cfg.env.relabel_names:.0%} shown relabeled (env.relabel_names)" \
        if side.relabel is not None and cfg.env.relabel_names else ""
    sft = (f"{cfg.sft.steps} steps on {len(side.expert_trajectories)} demonstrations "
           f"({cfg.sft.data_path or 'tiny world experts'}{relabeled})") if cfg.sft.steps else "none (sft.steps 0)"
    lines.append(("warm start", sft))
    lines.append(("search", live_query(side, cfg)))
    per_rank_tasks = math.ceil(cfg.rollout.batch_size / ranks)
    rows = per_rank_tasks * cfg.rollout.group_size
    lines.append(("batches", f"{cfg.rollout.batch_size} tasks x G={cfg.rollout.group_size} per step over {ranks} "
                             f"rank(s): {rows} trajectories per rank; micro-batches of "
                             f"{cfg.algorithm.micro_batch_tokens} tokens per rank"))
    plan = memory_plan(cfg, mc, params, ranks)
    lines.append(("memory", plan.summary()))
    lines.append(("kv pool", plan.kv_line()))
    if plan.pool_tokens < cfg.rollout.max_total_tokens:
        raise SetupError(f"rollout.kv_cache_memory={cfg.rollout.kv_cache_memory}: the KV pool "
                         f"({_fmt_bytes(plan.pool)}) holds {plan.pool_tokens} tokens; one row needs room for "
                         f"rollout.max_total_tokens={cfg.rollout.max_total_tokens}")
    if plan.peak > GPU_BYTES:
        lines.append(("warning", f"{_fmt_bytes(plan.peak)} per rank is more than one {GPU_BYTES // GiB} GiB GPU "
                                 f"holds: lower algorithm.micro_batch_tokens or rollout.kv_cache_memory, or use "
                                 f"more ranks"))
    return lines


@dataclass
class MemoryPlan:
    """Bytes per rank of one GPU (GPU_BYTES), by phase. The rollout holds the sharded training
    state, the full compute-dtype weights (unsharded for the rollout) and the KV pool; the
    update holds the state and the activations of one micro-batch (the pool is freed between
    rollouts and its memory reused). Activations are an estimate (see `activation_bytes`)."""

    state: float  # float32 weights + grads + AdamW moments, sharded
    rollout_weights: float  # compute-dtype full weights during the rollout
    activations: float
    pool: float  # the KV pool the budget gives (capped at what every row needs)
    kv_per_token: int
    rows: int  # trajectories per rank
    row_tokens: int  # rollout.max_total_tokens
    ranks: int
    micro_batch_tokens: int

    @property
    def pool_tokens(self) -> int:
        return int(self.pool // self.kv_per_token)

    @property
    def rows_at_full_length(self) -> int:
        """Rows resident at once if every one held max_total_tokens (keep_all's worst case)."""
        return min(self.rows, self.pool_tokens // self.row_tokens)

    @property
    def dense(self) -> float:
        """What a dense rows x max_total_tokens cache would take."""
        return float(self.rows) * self.row_tokens * self.kv_per_token

    @property
    def peak(self) -> float:
        return self.state + max(self.rollout_weights + self.pool, self.activations)

    def summary(self) -> str:
        return (f"per rank: weights + grads + AdamW {_fmt_bytes(self.state)} (float32, sharded over {self.ranks}); "
                f"rollout: full weights {_fmt_bytes(self.rollout_weights)} + KV pool {_fmt_bytes(self.pool)}; "
                f"update: activations ~{_fmt_bytes(self.activations)} at {self.micro_batch_tokens} tokens; "
                f"peak {_fmt_bytes(self.peak)} of {GPU_BYTES // GiB} GiB")

    def kv_line(self) -> str:
        return (f"{self.pool_tokens} tokens ({self.kv_per_token // 1024} KiB per token): {self.rows_at_full_length} "
                f"of {self.rows} rows at once even if every row held {self.row_tokens} tokens (no eviction); "
                f"rows beyond wait for blocks; a dense cache would need {_fmt_bytes(self.dense)}")


def activation_bytes(mc, tokens: int, dtype_bytes: int, checkpointing: bool) -> float:
    """A layer's activations kept for backward, per token: the attention block (norm, q/k/v,
    attention output, o-proj, residual: ~6 hidden-sized vectors plus the KV heads) and the MLP
    (gate, up, their product: 3 intermediate-sized, plus norm and residual). With activation
    checkpointing only each layer's input is kept, and one layer's set is rebuilt at a time.
    The LM head is chunked by the fused loss (no [tokens, vocab] logits)."""
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    kv_heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
    layer = tokens * dtype_bytes * (8 * mc.hidden_size + 2 * kv_heads * head_dim + 3 * mc.intermediate_size)
    if checkpointing:
        return mc.num_hidden_layers * tokens * mc.hidden_size * dtype_bytes + layer
    return mc.num_hidden_layers * layer


def memory_plan(cfg: Config, mc, params: int, ranks: int) -> MemoryPlan:
    """The per-rank memory of the run from the model's config alone (meta device)."""
    per_rank_tasks = math.ceil(cfg.rollout.batch_size / ranks)
    rows = per_rank_tasks * cfg.rollout.group_size
    dtype_bytes = DTYPE_BYTES["bfloat16" if cfg.model.dtype != "float32" else "float32"]
    state = 16 * params / ranks  # fp32 weights + grads + AdamW exp_avg + exp_avg_sq, sharded
    rollout_weights = float(params * dtype_bytes)
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    kv_heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
    per_token = mc.num_hidden_layers * 2 * kv_heads * head_dim * dtype_bytes
    # as NativeEngine.pool_blocks: a fraction of what is free when the rollout starts, or GiB
    budget = cfg.rollout.kv_cache_memory
    free = max(0.0, GPU_BYTES - state - rollout_weights)
    pool = budget * free if budget <= 1 else budget * GiB
    block = cfg.rollout.kv_block_size * per_token
    row_blocks = math.ceil(cfg.rollout.max_total_tokens / cfg.rollout.kv_block_size)
    pool = min(pool // block, rows * row_blocks) * block
    activations = activation_bytes(mc, cfg.algorithm.micro_batch_tokens, dtype_bytes,
                                   cfg.model.activation_checkpointing)
    return MemoryPlan(state, rollout_weights, activations, pool, per_token, rows, cfg.rollout.max_total_tokens, ranks,
                      cfg.algorithm.micro_batch_tokens)


def _fmt_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / (1 << 20):.0f} MiB"


def check_run(cfg: Config, ranks: int = 1) -> int:
    """Print the plan (exit code 0) or the first problem (exit code 1)."""
    try:
        lines = plan_lines(cfg, ranks)
    except (SetupError, ModelLoadError) as err:
        print(f"mempo.train --check: problem: {err}")
        return 1
    width = max(len(topic) for topic, _ in lines)
    print("mempo.train --check: the run is ready")
    for topic, line in lines:
        print(f"  {topic:<{width}}  {line}")
    return 0
