"""Expert demonstrations: a scripted policy that searches each needed fact once, keeps
exactly the facts found so far in its memory, and answers.

Turn texts (default tags):
    <mem>{facts found so far, one sentence each}</mem><search>{query}</search>
    <mem>{all facts}</mem><answer>{a1}; {a2}; ...</answer>
The expert is run through the real environment, so its recorded information blocks are
exactly what the tool returns, and every fact it memorises appears in one of them.
"""
from __future__ import annotations

from typing import Sequence

from mempo.envs.agent_format import render_turn
from mempo.envs.environment import SearchEnv
from mempo.envs.tasks import Task
from mempo.envs.tiny_world_facts import Fact
from mempo.envs.trajectory import Trajectory

# plan of one task: per objective, the chain of facts leading to its answer
Plan = Sequence[Sequence[Fact]]


class ExpertPolicy:
    def __init__(self, plan: Plan, env: SearchEnv):
        self.tags = env.config.tags
        self.answers = [hops[-1].object for hops in plan]
        self.pending: list[Fact] = []
        for hops in plan:
            self.pending += [f for f in hops if f not in self.pending]
        self.known: list[Fact] = []
        if len(self.pending) + 1 > env.config.max_turns:
            raise ValueError(f"the expert needs {len(self.pending) + 1} turns, env "
                             f"max_turns is {env.config.max_turns}")

    def text(self) -> str:
        memory = " ".join(f.sentence for f in self.known)
        if self.pending:
            return render_turn(memory, search=self.pending[0].query, tags=self.tags)
        return render_turn(memory, answers=self.answers, tags=self.tags)

    def observe(self, information: str) -> None:
        fact = self.pending.pop(0)
        if fact.sentence not in information:
            raise RuntimeError(f"expert query {fact.query!r} did not retrieve {fact.sentence!r}; "
                               f"got {information!r}")
        self.known.append(fact)


def expert_trajectories(env: SearchEnv, tasks: Sequence[Task],
                        plans: Sequence[Plan]) -> list[Trajectory]:
    """Run the expert on all tasks in lockstep (one batched tool call per turn)."""
    if len(tasks) != len(plans):
        raise ValueError(f"plans must match tasks, got {len(plans)} for {len(tasks)}")
    episodes = env.reset(tasks)
    experts = [ExpertPolicy(plan, env) for plan in plans]
    live = list(range(len(tasks)))
    while live:
        results = env.step([episodes[i] for i in live], [experts[i].text() for i in live])
        for i, result in zip(live, results):
            if not result.step.is_valid:
                raise RuntimeError(f"expert wrote an invalid turn: {result.step.detail}")
            if result.information is not None:
                experts[i].observe(result.information)
        live = [i for i in live if not episodes[i].done]
    for episode in episodes:
        if episode.reward != 1.0:
            raise RuntimeError(f"expert scored {episode.reward} on {episode.task.id}")
    return [e.trajectory() for e in episodes]
