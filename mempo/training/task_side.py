"""Everything the trainer needs from the task side, built from what the config names: the
tokenizer, the environment (search tool + grammar + prompt + rewards), training tasks,
held-out evaluation sets and demonstrations for the warm start.

Sources, and nothing else (`Config.validate` rejects the combinations that cannot work):
- tokenizer: `model.path`'s, or the tiny world's when the model is built from the config;
- tasks: `env.train_tasks_path` / `env.eval_tasks_path` when set, else the tiny world's
  (a run that names a file, a corpus or a server never falls back to the tiny world);
- search: `env.search=http` -> `HttpSearch(env.search_url)`; `bm25` -> an in-process index
  over `env.corpus_path`, or over the tiny world's corpus;
- prompt: the tokenizer's chat template when `env.prompt_format` resolves to chat;
- demonstrations: `sft.data_path`, else the tiny world's experts (only when sft.steps > 0);
  on the tiny world, `Demonstrations` shows a fraction of them relabeled (`env.relabel_names`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from mempo.config import Config
from mempo.envs import EnvConfig, SearchEnv, Task, compose_multi_objective, load_tasks
from mempo.envs.prompts import chat_template_prompt


class SetupError(ValueError):
    """A file, directory or server the config names cannot be used (one line, names it)."""


@dataclass
class TaskSide:
    tokenizer: object
    env: SearchEnv
    train_tasks: list[Task]
    eval_sets: dict[int, list[Task]]  # objectives -> held-out tasks
    expert_trajectories: list  # envs Trajectory records (prompt + turns) for the warm start
    stop_token_ids: tuple[int, ...]  # end a turn besides the action tags (EOS, end of turn)
    prompt_format: str  # "chat" or "plain", as resolved
    source: str  # where tasks and search come from, in words
    relabel: Callable | None = None  # tiny world: (transcript, rng) -> the transcript in a relabeled world


class Demonstrations:
    """The warm start's demonstrations as token trajectories, each tokenized once. With
    `relabel` and fraction > 0, each pick is shown in a relabeled world with that probability
    (tokenized afresh: 1.4 ms on a 2-core EPYC; every rank builds the whole global batch, ~1% of a
    warm-start step, to share it out by tokens). `draw` makes every random choice for the global
    batch before it is sharded, so the batch does not depend on the number of ranks; with fraction
    0 it draws exactly the picks it drew before relabeling existed."""

    def __init__(self, transcripts: list, tokenizer, context, relabel: Callable | None = None,
                 fraction: float = 0.0):
        from mempo.rollout import trajectory_from_turns

        self._tokenize = lambda t: trajectory_from_turns(tokenizer, t.prompt, [(x.model, x.information)
                                                                              for x in t.turns], context)
        self.transcripts = transcripts
        self.trajectories = [self._tokenize(t) for t in transcripts]
        self.relabel = relabel
        self.fraction = fraction if relabel is not None else 0.0

    def __len__(self) -> int:
        return len(self.trajectories)

    def draw(self, rng: random.Random, batch_size: int) -> list[tuple[int, int | None]]:
        """batch_size picks (index, relabel seed or None)."""
        picks = [rng.randrange(len(self.trajectories)) for _ in range(batch_size)]
        if not self.fraction:
            return [(i, None) for i in picks]
        return [(i, rng.getrandbits(64) if rng.random() < self.fraction else None) for i in picks]

    def trajectory(self, index: int, seed: int | None):
        if seed is None:
            return self.trajectories[index]
        return self._tokenize(self.relabel(self.transcripts[index], random.Random(seed)))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model_tokenizer(path: str):
    """The tokenizer saved with the model at `path`: AutoTokenizer's, unless it splits text
    differently from the saved tokenizer.json (`matches_saved_pipeline`), then tokenizer.json as
    written. SetupError naming the directory when there is none or it does not load."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise SetupError(f"model.path {path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                         f"save the tokenizer next to the model (tokenizer.save_pretrained)")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not matches_saved_pipeline(tokenizer, path):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    except Exception as err:  # tokenizers, sentencepiece and transformers raise their own types
        raise SetupError(f"cannot load the tokenizer at model.path {path!r}: {err}") from None
    return tokenizer


TEXT_PIPELINE = ("normalizer", "pre_tokenizer", "post_processor", "decoder")


def matches_saved_pipeline(tokenizer, path: str) -> bool:
    """Whether `tokenizer` splits and normalises text as the `tokenizer.json` saved at `path`
    does (True when there is none, or for a slow tokenizer). transformers 5's AutoTokenizer
    rebuilds some model types' pipelines in Python (every qwen2 directory gets Qwen2Tokenizer's
    regex, whatever tokenizer.json says), so a tokenizer trained with other rules, such as the
    tiny world's in an exported `runs/<name>/hf/`, would silently encode text differently from
    the run that trained the model."""
    saved = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(saved) or not hasattr(tokenizer, "backend_tokenizer"):
        return True
    with open(saved, encoding="utf-8") as f:
        written = json.load(f)
    loaded = json.loads(tokenizer.backend_tokenizer.to_str())
    return all(written.get(k) == loaded.get(k) for k in TEXT_PIPELINE)


def model_stop_token_ids(path: str | None, tokenizer) -> tuple[int, ...]:
    """EOS ids of the model's generation config (an instruct model's end-of-turn tokens, e.g.
    Qwen's <|im_end|>) and of the tokenizer: each ends a turn."""
    ids = [tokenizer.eos_token_id]
    gen_file = os.path.join(path, "generation_config.json") if path else None
    if gen_file and os.path.isfile(gen_file):
        with open(gen_file) as f:
            eos = json.load(f).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    return tuple(sorted({i for i in ids if isinstance(i, int)}))


def build_search_tool(cfg: Config):
    """The search tool the config names (None: the tiny world's own in-process index)."""
    if cfg.env.search == "http":
        from mempo.envs import HttpSearch

        return HttpSearch(cfg.env.search_url)
    if cfg.env.corpus_path is not None:
        from mempo.envs import BM25Search

        try:
            return BM25Search.from_jsonl(cfg.env.corpus_path)
        except ValueError as err:
            raise SetupError(f"env.corpus_path {cfg.env.corpus_path!r}: {err}") from None
    return None


def _prompt_template(cfg: Config, tokenizer, where: str):
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.env.prompt_format == "chat" and not has_template:
        raise SetupError(f"env.prompt_format is 'chat' but the tokenizer of {where} has no chat template "
                         f"(use plain or auto)")
    if cfg.env.prompt_format == "plain" or not has_template:
        return None
    try:
        return chat_template_prompt(tokenizer, cfg.env.system_prompt)
    except ValueError as err:
        raise SetupError(f"env.prompt_format: {err}") from None


def _env_config(cfg: Config, base: EnvConfig) -> EnvConfig:
    """A run that mixes objective counts words every prompt alike, a single question included."""
    counts = set(cfg.env.train_objectives) | set(cfg.env.eval_objectives)
    return dataclasses.replace(base, top_k=cfg.env.top_k, max_turns=cfg.rollout.max_turns,
                               info_max_chars=cfg.env.info_max_chars, info_max_tokens=cfg.env.info_max_tokens,
                               numbered_questions=max(counts) > 1)


def _task_sets(path: str, objectives: list[int], count: int | None, seed: int, option: str) -> dict[int, list[Task]]:
    """Tasks of a file per objective count: its rows with that many objectives, plus (n > 1)
    `count` tasks composed of its single-objective rows (count None: as many as there are)."""
    try:
        rows = load_tasks(path)
    except (ValueError, ImportError) as err:
        raise SetupError(f"{option}: {err}") from None
    singles = [t for t in rows if t.num_objectives == 1]
    out = {}
    for n in objectives:
        tasks = [t for t in rows if t.num_objectives == n]
        if n > 1 and len(singles) >= n:
            tasks += compose_multi_objective(singles, n, len(singles) if count is None else count, seed + n)
        if not tasks:
            raise SetupError(f"{option} {path!r} has no {n}-objective rows and fewer than {n} single questions "
                             f"to compose them from (objective counts asked for: {objectives})")
        out[n] = tasks if count is None else tasks[:count]
    return out


def build_task_side(cfg: Config) -> TaskSide:
    if cfg.model.path is not None:
        tokenizer, where = load_model_tokenizer(cfg.model.path), f"model.path {cfg.model.path!r}"
    else:
        tokenizer, where = None, "the tiny world"
    world = None
    if not cfg.env.uses_files:
        from mempo.envs import build_tiny_world

        probe = build_tiny_world(seed=cfg.env.world_seed)
        world = build_tiny_world(seed=cfg.env.world_seed, num_people=cfg.env.num_people,
                                 num_cities=cfg.env.num_cities, num_countries=cfg.env.num_countries,
                                 heldout_fraction=cfg.env.heldout_fraction, tasks_per_count=cfg.env.tasks_per_count,
                                 expert_memory=cfg.env.expert_memory,
                                 expert_omit=cfg.env.expert_omit,
                                 env=_env_config(cfg, probe.config.env))
        if tokenizer is None:
            tokenizer = world.tokenizer(cfg.env.tokenizer_vocab_size)
    count_tokens = (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])) \
        if cfg.env.info_max_tokens is not None else None
    template = _prompt_template(cfg, tokenizer, where)
    if world is not None:
        env = world.env(count_tokens, template)
        train_tasks = [t for n in cfg.env.train_objectives for t in world.tasks("train", n)]
        eval_sets = {n: world.tasks("heldout", n)[: cfg.env.eval_tasks] for n in cfg.env.eval_objectives}
        source = f"tiny world (seed {cfg.env.world_seed}), bm25 over its {len(world.corpus)} passages"
    else:
        env = SearchEnv(build_search_tool(cfg), _env_config(cfg, EnvConfig()), count_tokens, template)
        train = _task_sets(cfg.env.train_tasks_path, cfg.env.train_objectives, None, 0, "env.train_tasks_path")
        train_tasks = [t for n in cfg.env.train_objectives for t in train[n]]
        eval_sets = _task_sets(cfg.env.eval_tasks_path, cfg.env.eval_objectives, cfg.env.eval_tasks, 1000,
                               "env.eval_tasks_path")
        tool = f"http retrieval server {cfg.env.search_url}" if cfg.env.search == "http" else \
            f"bm25 over {cfg.env.corpus_path}"
        source = f"tasks {cfg.env.train_tasks_path} / {cfg.env.eval_tasks_path}, {tool}"
    experts = []
    if cfg.sft.steps and cfg.sft.data_path is not None:
        from mempo.envs.demonstrations import load_demonstrations

        try:
            experts = load_demonstrations(cfg.sft.data_path, env)
        except ValueError as err:
            raise SetupError(f"sft.data_path: {err}") from None
    elif cfg.sft.steps:  # Config.validate: files need sft.data_path, so this is the tiny world
        try:
            experts = world.expert_trajectories(train_tasks, env)
        except ValueError as err:  # "the expert needs N turns, env max_turns is M"
            raise SetupError(f"rollout.max_turns={cfg.rollout.max_turns} is too small for the tiny world's "
                             f"warm-start demonstrations ({err}); raise it or lower env.train_objectives") from None
    return TaskSide(tokenizer, env, train_tasks, eval_sets, experts, model_stop_token_ids(cfg.model.path, tokenizer),
                    "plain" if template is None else "chat", source, None if world is None else world.relabel)


def live_query(side: TaskSide, cfg: Config) -> str:
    """One search with the first training question: a run fails here, in one line, when the
    retrieval server is unreachable, not hours later in its first rollout. -> a summary."""
    from mempo.envs import HttpSearch

    tool = side.env.tool
    if isinstance(tool, HttpSearch):  # one attempt, short timeout: a reachability check
        tool = HttpSearch(tool.url, timeout_s=10.0, retries=0)
    query = side.train_tasks[0].questions[0]
    start = time.perf_counter()
    try:
        (docs,) = tool.search([query], cfg.env.top_k)
    except Exception as err:  # connection, HTTP and protocol errors alike
        where = f"env.search_url {cfg.env.search_url!r}" if cfg.env.search == "http" else "the search tool"
        raise SetupError(f"{where}: the live query failed: {err}") from None
    ms = (time.perf_counter() - start) * 1e3
    first = f': first "{docs[0].title or docs[0].text[:40]}"' if docs else ""
    return f"live query {query!r} -> {len(docs)} passages in {ms:.0f} ms{first}"
