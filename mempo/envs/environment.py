"""The search environment: batched stepping of episodes, rewards, and trajectory replay.

A rollout loop drives it like this:
    episodes = env.reset(tasks)                      # prompts in episodes[i].prompt
    while live := [e for e in episodes if not e.done]:
        texts = generate(visible contexts of live)   # each ends at </search> or </answer>
        results = env.step(live, texts)              # one batched tool call for all searches
        # results[i].information is appended to the context when not None

Episode ends: a valid answer (reward = task score), an invalid turn (reward 0), or a
search at the last allowed turn (reward 0, no more information).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mempo.envs.agent_format import DEFAULT_TAGS, ActionKind, AgentTags, Step, parse_step
from mempo.envs.prompts import build_prompt
from mempo.envs.scoring import RewardConfig, trajectory_reward
from mempo.envs.search_tool import SearchTool, format_information
from mempo.envs.tasks import Task
from mempo.envs.transcript import TokenUsage, Transcript, Turn, token_usage


@dataclass(frozen=True)
class EnvConfig:
    """top_k: passages per search. max_turns: model turns per episode (answer included).
    info_max_chars / info_max_tokens: cap of each information block (tokens need the env's
    `count_tokens`). info_show_titles: print "Title: " before each passage. numbered_questions:
    single-question prompts worded like several-question ones (`build_prompt(numbered=True)`)."""

    top_k: int = 3
    max_turns: int = 10
    info_max_chars: int | None = 2000
    info_max_tokens: int | None = None
    info_show_titles: bool = True
    numbered_questions: bool = False
    reward: RewardConfig = RewardConfig()
    tags: AgentTags = DEFAULT_TAGS

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.max_turns < 1:
            raise ValueError(f"top_k and max_turns must be >= 1, got {self.top_k}, "
                             f"{self.max_turns}")


@dataclass
class Episode:
    task: Task
    prompt: str
    turns: list[Turn] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    done: bool = False
    reward: float | None = None

    @property
    def format_valid(self) -> bool:
        return all(s.is_valid for s in self.steps)

    @property
    def answers(self) -> tuple[str, ...] | None:
        last = self.steps[-1] if self.steps else None
        return last.answers if last is not None and last.kind == ActionKind.ANSWER else None

    def transcript(self) -> Transcript:
        return Transcript(task=self.task, prompt=self.prompt, turns=tuple(self.turns))


@dataclass(frozen=True)
class StepResult:
    step: Step
    information: str | None  # text to append to the context, None when the episode ended
    done: bool
    reward: float | None  # set when done


class SearchEnv:
    """prompt_template: maps the plain prompt (instructions + questions) to the text the model
    is given, e.g. `chat_template_prompt(tokenizer)`; None keeps the plain prompt."""

    def __init__(self, tool: SearchTool, config: EnvConfig = EnvConfig(),
                 count_tokens: Callable[[str], int] | None = None,
                 prompt_template: Callable[[str], str] | None = None):
        if config.info_max_tokens is not None and count_tokens is None:
            raise ValueError("config.info_max_tokens needs count_tokens")
        self.tool, self.config, self.count_tokens = tool, config, count_tokens
        self.prompt_template = prompt_template

    def prompt(self, task: Task) -> str:
        text = build_prompt(task, self.config.tags, self.config.numbered_questions)
        return text if self.prompt_template is None else self.prompt_template(text)

    def reset(self, tasks: Sequence[Task]) -> list[Episode]:
        return [Episode(task=t, prompt=self.prompt(t)) for t in tasks]

    def step(self, episodes: Sequence[Episode], texts: Sequence[str]) -> list[StepResult]:
        """Apply one model turn per episode (texts[i] to episodes[i]); searches run batched."""
        if len(episodes) != len(texts):
            raise ValueError(f"texts must match episodes, got {len(texts)} for {len(episodes)}")
        if any(e.done for e in episodes):
            raise ValueError("episodes must all be live (done=False)")
        steps = [parse_step(t, self.config.tags, e.task.num_objectives)
                 for e, t in zip(episodes, texts)]
        searching = [i for i, (e, s) in enumerate(zip(episodes, steps))
                     if s.kind == ActionKind.SEARCH and len(e.turns) + 1 < self.config.max_turns]
        ranked = self.tool.search([steps[i].query for i in searching], self.config.top_k) \
            if searching else []
        information = dict(zip(searching, (self.render_information(docs) for docs in ranked)))
        results = []
        for i, (episode, text, step) in enumerate(zip(episodes, texts, steps)):
            info = information.get(i)
            episode.turns.append(Turn(model=text, information=info))
            episode.steps.append(step)
            if info is None:
                episode.done = True
                episode.reward = trajectory_reward(episode.answers, episode.task.answers,
                                                   episode.format_valid, self.config.reward)
            results.append(StepResult(step, info, episode.done, episode.reward))
        return results

    def render_information(self, docs) -> str:
        """Ranked docs -> the `<information>` block the model is shown (caps and tags of this env)."""
        return format_information(docs, self.config.info_max_chars, self.config.info_max_tokens,
                                  self.count_tokens, self.config.tags,
                                  self.config.info_show_titles)

    def replay(self, transcript: Transcript, check_information: bool = True) -> Episode:
        """Feed recorded model turns through the env; with `check_information`, the
        information the tool returns now must equal the recorded one (ValueError if not)."""
        (episode,) = self.reset([transcript.task])
        if episode.prompt != transcript.prompt:
            raise ValueError(f"transcript.prompt differs from the env's prompt for "
                             f"{transcript.task.id}")
        for number, turn in enumerate(transcript.turns):
            if episode.done:
                raise ValueError(f"transcript {transcript.task.id}: turn {number} after the end")
            (result,) = self.step([episode], [turn.model])
            if check_information and result.information != turn.information:
                raise ValueError(f"transcript {transcript.task.id}: turn {number} information "
                                 f"differs: recorded {turn.information!r}, "
                                 f"got {result.information!r}")
        return episode

    def token_usage(self, episode: Episode, prune_on_memory: bool = True) -> TokenUsage:
        if self.count_tokens is None:
            raise ValueError("token_usage needs the env's count_tokens")
        return token_usage(episode.prompt, episode.turns, self.count_tokens, self.config.tags,
                           prune_on_memory)
