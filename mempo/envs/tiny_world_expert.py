"""Expert demonstrations: a scripted policy that searches each needed fact once, keeps what it
still needs in its memory, and answers from that memory.

Two memory styles (turn texts with the default tags):
  facts    every fact found so far, verbatim, one sentence each:
           <mem>Ana was born in Kavaizi. The mentor of Bo is Ana.</mem><search>Ana works as</search>
  answers  one entry per objective, in order, a to-do list: its number, then its answer once
           found, else the relation and the entity of the hop found so far (the bridge the next
           query starts from), else `?` (not begun); the numbers are the only separators:
           <mem>1 ? 2 ?</mem><search>Bo born</search>
           <mem>1 Kavaizi 2 mentor Ana</mem><search>Ana works as</search>
           <mem>1 Kavaizi 2 baker</mem><answer>Kavaizi; baker</answer>
With the mempo context policy the agent sees only the prompt and its last memory when it picks
the next query and when it answers, so the memory must say which objectives are done: the next
query serves the first entry that is not an answer, and no such entry left means answer. (Listing
the objectives not begun as `?` makes that choice local to the memory; at 300 warm-start steps it
raised held-out EM at 1/2/4 objectives from 0.30/0.16/0.04 to 0.32/0.18/0.05, one run each.
An entry costs two tokens plus its value; "1: x; 2: y" cost four and put the expert's peak
context at 4 objectives at 1.52x that at 1, "1 x 2 y" puts it at 1.43x; 1.45x since the tokenizer
gives every word a leading space, which shortens 1-objective contexts the most.)

A lossy expert (`omit` > 0, answers style) writes `UNKNOWN` instead of an objective's answer with
probability `omit` when it finds that answer (never recovered; the answer turn then says
UNKNOWN, which scores 0). The entry still shows the objective as done, so the next query stays
readable off the memory; the demonstration's reward is the fraction of answers its memory
kept, and only memory quality separates a lossy demonstration from a faithful one. With omit
near 0.5 a warm-started model is unsure whether to keep an answer (a coin flip under sampling),
which RL can resolve, and the memory advantage scores exactly that choice.

The expert is run through the real environment, so its recorded information blocks are exactly
what the tool returns, and every fact it memorises appears in one of them.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Literal

from mempo.envs.agent_format import render_turn
from mempo.envs.environment import SearchEnv
from mempo.envs.tasks import Task
from mempo.envs.tiny_world_facts import Fact
from mempo.envs.transcript import Transcript

# plan of one task: per objective, the chain of facts leading to its answer
Plan = Sequence[Sequence[Fact]]
MemoryStyle = Literal["facts", "answers"]
MEMORY_STYLES = ("facts", "answers")

# what a lossy expert remembers, and answers, for an objective whose answer it did not keep
UNKNOWN = "unknown"
# the answers-style entry of an objective not begun yet
PENDING = "?"


def format_entries(values: Sequence[str]) -> str:
    """The answers-style memory: ['Kavaizi', 'mentor Ana'] -> '1 Kavaizi 2 mentor Ana'."""
    return " ".join(f"{i} {value}" for i, value in enumerate(values, start=1))


def parse_entries(memory: str) -> dict[int, str]:
    """Inverse of `format_entries` (values hold no numbers):
    '1 Kavaizi 2 mentor Ana' -> {1: 'Kavaizi', 2: 'mentor Ana'}."""
    parts = re.split(r"(?:^| )(\d+) ", memory)  # ['', '1', 'Kavaizi', '2', 'mentor Ana']
    return {int(k): v for k, v in zip(parts[1::2], parts[2::2])}


class ExpertPolicy:
    def __init__(self, plan: Plan, env: SearchEnv, memory: MemoryStyle = "facts", omit: float = 0.0,
                 rng: random.Random | None = None):
        if memory not in MEMORY_STYLES:
            raise ValueError(f"memory must be one of {MEMORY_STYLES}, got {memory!r}")
        if not 0.0 <= omit < 1.0:
            raise ValueError(f"omit must be in [0, 1), got {omit}")
        if omit and memory != "answers":
            raise ValueError(f"omit > 0 (lossy experts) needs the 'answers' memory style, got {memory!r}")
        self.tags = env.config.tags
        self.plan = [tuple(hops) for hops in plan]
        self.style, self.omit, self.rng = memory, omit, rng or random.Random(0)
        self.pending: list[Fact] = []
        for hops in plan:
            self.pending += [f for f in hops if f not in self.pending]
        self.known: list[Fact] = []
        self.kept: dict[int, bool] = {}  # objective -> its answer was kept (decided when found)
        if len(self.pending) + 1 > env.config.max_turns:
            raise ValueError(f"the expert needs {len(self.pending) + 1} turns, env "
                             f"max_turns is {env.config.max_turns}")

    def answers(self) -> list[str]:
        return [hops[-1].object if self.kept.get(i, True) else UNKNOWN for i, hops in enumerate(self.plan)]

    def memory(self) -> str:
        if self.style == "facts":
            return " ".join(f.sentence for f in self.known)
        values = []
        for i, hops in enumerate(self.plan):
            done = 0  # hops found in order (a later hop may be known first, as another objective's)
            while done < len(hops) and hops[done] in self.known:
                done += 1
            if done == len(hops):
                values.append(hops[-1].object if self.kept[i] else UNKNOWN)
            elif done:
                values.append(f"{hops[done - 1].relation} {hops[done - 1].object}")
            else:
                values.append(PENDING)
        return format_entries(values)

    def text(self) -> str:
        if self.pending:
            return render_turn(self.memory(), search=self.pending[0].query, tags=self.tags)
        return render_turn(self.memory(), answers=self.answers(), tags=self.tags)

    def observe(self, information: str) -> None:
        fact = self.pending.pop(0)
        if fact.sentence not in information:
            raise RuntimeError(f"expert query {fact.query!r} did not retrieve {fact.sentence!r}; "
                               f"got {information!r}")
        self.known.append(fact)
        for i, hops in enumerate(self.plan):  # objectives this fact completes: keep the answer?
            if hops[-1] == fact:
                self.kept[i] = not (self.omit and self.rng.random() < self.omit)


def expert_trajectories(env: SearchEnv, tasks: Sequence[Task], plans: Sequence[Plan], memory: MemoryStyle = "facts",
                        omit: float = 0.0, seed: int = 0) -> list[Transcript]:
    """Run the expert on all tasks in lockstep (one batched tool call per turn). omit > 0: the
    lossy expert, its draws seeded by (seed, task id), so a task's demonstration does not depend
    on the other tasks of the batch."""
    if len(tasks) != len(plans):
        raise ValueError(f"plans must match tasks, got {len(plans)} for {len(tasks)}")
    episodes = env.reset(tasks)
    experts = [ExpertPolicy(plan, env, memory, omit, random.Random(f"{seed}/{task.id}"))
               for plan, task in zip(plans, tasks)]
    live = list(range(len(tasks)))
    while live:
        results = env.step([episodes[i] for i in live], [experts[i].text() for i in live])
        for i, result in zip(live, results):
            if not result.step.is_valid:
                raise RuntimeError(f"expert wrote an invalid turn: {result.step.detail}")
            if result.information is not None:
                experts[i].observe(result.information)
        live = [i for i in live if not episodes[i].done]
    for episode, expert in zip(episodes, experts):
        kept = sum(a != UNKNOWN for a in expert.answers()) / len(expert.plan)
        if abs(episode.reward - kept) > 1e-9:
            raise RuntimeError(f"expert scored {episode.reward} on {episode.task.id}, expected {kept}")
    return [e.transcript() for e in episodes]
