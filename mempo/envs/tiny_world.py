"""Tiny world, part 2: questions, the train/held-out split, N-objective tasks, and the
`TinyWorld` API (corpus, tasks, expert trajectories, search tool, tokenizer).

Everything is a deterministic function of the seed and sizes; nothing is downloaded.
Single-hop questions need one search, multi-hop ones two ("Where was the mentor of X
born?"). N-objective tasks join N distinct questions of the same split.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mempo.envs.bm25_search import BM25Search
from mempo.envs.environment import EnvConfig, SearchEnv
from mempo.envs.prompts import build_prompt
from mempo.envs.search_tool import Doc
from mempo.envs.tasks import Task, compose_multi_objective
from mempo.envs.tiny_world_expert import MEMORY_STYLES, UNKNOWN, MemoryStyle, expert_trajectories
from mempo.envs.tiny_world_facts import OCCUPATIONS, PRODUCTS, Fact, WorldFacts, generate_facts
from mempo.envs.transcript import Transcript, Turn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

Split = Literal["train", "heldout"]

# (question template, relation chain from the question's subject)
SINGLE_HOP = {
    "person": (("Where was {s} born?", ("born",)),
               ("What does {s} work as?", ("works",)),
               ("Who is the mentor of {s}?", ("mentor",))),
    "city": (("In which country is {s}?", ("country",)),
             ("What is {s} known for?", ("known",))),
}
MULTI_HOP = (("Where was the mentor of {s} born?", ("mentor", "born")),
             ("What does the mentor of {s} work as?", ("mentor", "works")),
             ("In which country was {s} born?", ("born", "country")),
             ("What is the birthplace of {s} known for?", ("born", "known")))


@dataclass(frozen=True)
class WorldQuestion:
    task: Task  # single-objective
    hops: tuple[Fact, ...]  # facts to find, in order; the last one's object is the answer
    split: Split


def _derived_seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _make_questions(facts: WorldFacts, seed: int, heldout_fraction: float) -> list[WorldQuestion]:
    items = []
    for kind, subjects in (("person", facts.people), ("city", facts.cities)):
        for subject in subjects:
            chains = SINGLE_HOP[kind] + (MULTI_HOP if kind == "person" else ())
            for template, relations in chains:
                hops, current = [], subject
                for relation in relations:
                    hops.append(facts.facts[current, relation])
                    current = hops[-1].object
                items.append((template.format(s=subject), tuple(hops)))
    order = list(range(len(items)))
    random.Random(_derived_seed(seed, "split")).shuffle(order)
    num_heldout = round(heldout_fraction * len(items))
    heldout = set(order[:num_heldout])
    return [WorldQuestion(task=Task(id=f"q{i}", questions=(question,),
                                    answers=((hops[-1].object,),)),
                          hops=hops, split="heldout" if i in heldout else "train")
            for i, (question, hops) in enumerate(items)]


@dataclass(frozen=True)
class TinyWorldConfig:
    seed: int = 0
    num_people: int = 40
    num_cities: int = 10
    num_countries: int = 4
    heldout_fraction: float = 0.2
    tasks_per_count: int = 256  # N-objective tasks per split and N >= 2
    # the experts' memories (tiny_world_expert): "facts" verbatim, or "answers" (one entry per objective)
    expert_memory: MemoryStyle = "facts"
    # lossy experts (answers style): each answer is written as "unknown" with this probability
    expert_omit: float = 0.0
    # passages already start with their subject, so titles would only repeat it
    env: EnvConfig = EnvConfig(top_k=3, max_turns=10, info_max_chars=400, info_show_titles=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.tasks_per_count < 1:
            raise ValueError(f"tasks_per_count must be >= 1, got {self.tasks_per_count}")
        if self.expert_memory not in MEMORY_STYLES:
            raise ValueError(f"expert_memory must be one of {MEMORY_STYLES}, got {self.expert_memory!r}")
        if not 0.0 <= self.expert_omit < 1.0:
            raise ValueError(f"expert_omit must be in [0, 1), got {self.expert_omit}")
        if self.expert_omit and self.expert_memory != "answers":
            raise ValueError(f"expert_omit > 0 needs expert_memory 'answers', got {self.expert_memory!r}")


class TinyWorld:
    """A generated world.

    corpus: passages (`Doc`, one fact each); questions: single-objective `WorldQuestion`s
    with their fact chain and split; tasks(split, n): 1..N-objective tasks; env(): a
    `SearchEnv` over the corpus; expert_trajectories(tasks): demonstrations (`Transcript`);
    tokenizer(): the world's BPE tokenizer; write_corpus / write_tasks: JSONL files.
    """

    def __init__(self, config: TinyWorldConfig):
        self.config = config
        self.facts = generate_facts(config.seed, config.num_people, config.num_cities,
                                    config.num_countries)
        self.corpus: list[Doc] = self.facts.corpus()
        self.questions = _make_questions(self.facts, config.seed, config.heldout_fraction)
        self._hops_by_question = {q.task.questions[0]: q.hops for q in self.questions}

    @cached_property
    def search_tool(self) -> BM25Search:
        return BM25Search.from_docs(self.corpus)

    def env(self, count_tokens: Callable[[str], int] | None = None,
            prompt_template: Callable[[str], str] | None = None) -> SearchEnv:
        """An environment over this world's corpus with the world's `EnvConfig`."""
        return SearchEnv(self.search_tool, self.config.env, count_tokens, prompt_template)

    def tasks(self, split: Split, num_objectives: int = 1) -> list[Task]:
        """All questions of the split (N = 1) or `tasks_per_count` composed tasks (N >= 2)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        singles = [q.task for q in self.questions if q.split == split]
        if num_objectives == 1:
            return singles
        return compose_multi_objective(singles, num_objectives, self.config.tasks_per_count,
                                       _derived_seed(self.config.seed, split, num_objectives))

    def plan(self, task: Task) -> list[tuple[Fact, ...]]:
        """Per objective, the facts the expert searches for."""
        try:
            return [self._hops_by_question[q] for q in task.questions]
        except KeyError as error:
            raise ValueError(f"task {task.id} holds a question not from this world: {error}") \
                from None

    def expert_trajectories(self, tasks: list[Task], env: SearchEnv | None = None, memory: MemoryStyle | None = None,
                            omit: float | None = None) -> list[Transcript]:
        """Expert demonstrations, run through `env` (default `self.env()`; pass the training
        run's env so that prompts and information blocks are the ones RL sees); memory style and
        lossiness default to `config.expert_memory` / `config.expert_omit`."""
        memory = self.config.expert_memory if memory is None else memory
        omit = self.config.expert_omit if omit is None else omit
        return expert_trajectories(env or self.env(), tasks, [self.plan(t) for t in tasks], memory, omit,
                                   self.config.seed)

    @cached_property
    def name_kinds(self) -> tuple[tuple[str, ...], ...]:
        """The world's names by kind: people, cities, countries, occupations, goods."""
        return self.facts.people, self.facts.cities, self.facts.countries, OCCUPATIONS, PRODUCTS

    @cached_property
    def _name_pattern(self) -> re.Pattern:
        names = sorted((n for kind in self.name_kinds for n in kind), key=len, reverse=True)
        return re.compile(r"\b(?:" + "|".join(map(re.escape, names)) + r")\b")

    def name_permutation(self, rng: random.Random) -> dict[str, str]:
        """A random permutation of each kind of name, as one mapping."""
        mapping: dict[str, str] = {}
        for kind in self.name_kinds:
            shuffled = list(kind)
            rng.shuffle(shuffled)
            mapping.update(zip(kind, shuffled))
        return mapping

    def rename(self, text: str, mapping: dict[str, str]) -> str:
        """`text` with every whole-word name replaced through `mapping`."""
        return self._name_pattern.sub(lambda m: mapping[m.group(0)], text)

    def relabel(self, transcript: Transcript, rng: random.Random) -> Transcript:
        """The transcript in a relabeled world: one `name_permutation(rng)` applied to every text
        (task, prompt, queries, information, memories, answers), so the demonstration stays
        consistent while the facts it shows change. Mixed into the warm start
        (env.relabel_names), it makes a tiny model read and copy names instead of recalling the
        facts it memorised (benchmarks/RESULTS.md)."""
        mapping = self.name_permutation(rng)
        task = transcript.task
        task = dataclasses.replace(task, questions=tuple(self.rename(q, mapping) for q in task.questions),
                                   answers=tuple(tuple(self.rename(a, mapping) for a in accepted)
                                                 for accepted in task.answers))
        return Transcript(task, self.rename(transcript.prompt, mapping),
                          tuple(Turn(self.rename(t.model, mapping),
                                     None if t.information is None else self.rename(t.information, mapping))
                                for t in transcript.turns))

    def prompt(self, task: Task) -> str:
        return build_prompt(task, self.config.env.tags, self.config.env.numbered_questions)

    def training_texts(self, max_objectives: int = 4) -> list[str]:
        """Every kind of text the agent meets (corpus, prompts, expert turns), in a fixed
        order; the tokenizer is trained on it."""
        texts = [f"{d.title}: {d.text}" for d in self.corpus]
        # enough turns for any expert: the vocabulary must not depend on a run's rollout.max_turns
        env = SearchEnv(self.search_tool, dataclasses.replace(self.config.env, max_turns=4 * max_objectives + 1))
        for n in range(1, max_objectives + 1):
            tasks = self.tasks("train", n)[:64]
            for memory in MEMORY_STYLES:  # one vocabulary whatever the experts' style
                for trajectory in self.expert_trajectories(tasks, env, memory, omit=0.0):
                    texts.append(trajectory.prompt)
                    texts += [t.model + (t.information or "") for t in trajectory.turns]
        texts += [q.task.questions[0] for q in self.questions] + [UNKNOWN]  # the lossy experts' answer
        return texts

    def tokenizer(self, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
        """A byte-level BPE tokenizer trained on `training_texts()` (deterministic; ~1 s)."""
        from mempo.envs.tokenizer import train_tokenizer  # transformers only when asked
        return train_tokenizer(self.training_texts(), vocab_size, self.config.env.tags)

    def write_corpus(self, path: str | os.PathLike) -> None:
        """The corpus as JSONL ({"id","title","text"} lines) for the bm25 tool or a server."""
        with open(path, "w", encoding="utf-8") as f:
            for doc in self.corpus:
                f.write(json.dumps({"id": doc.id, "title": doc.title, "text": doc.text}) + "\n")

    def write_tasks(self, path: str | os.PathLike, split: Split) -> None:
        """Single-objective tasks of a split as JSONL loadable by `load_tasks`."""
        with open(Path(path), "w", encoding="utf-8") as f:
            for task in self.tasks(split, 1):
                f.write(json.dumps({"id": task.id, "question": task.questions[0],
                                    "answers": list(task.answers[0])}) + "\n")


def build_tiny_world(seed: int = 0, num_people: int = 40, num_cities: int = 10,
                     num_countries: int = 4, **config: object) -> TinyWorld:
    """Build a tiny world; extra keyword arguments go to `TinyWorldConfig`."""
    return TinyWorld(TinyWorldConfig(seed=seed, num_people=num_people, num_cities=num_cities,
                                     num_countries=num_countries, **config))
