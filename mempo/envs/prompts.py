"""The task prompt: instructions documenting the agent grammar, then the question(s); for an
instruct model, wrapped in its chat template (`chat_template_prompt`)."""
from __future__ import annotations

from collections.abc import Callable

from mempo.envs.agent_format import DEFAULT_TAGS, AgentTags
from mempo.envs.tasks import Task


def agent_instructions(num_objectives: int, tags: AgentTags = DEFAULT_TAGS, numbered: bool = False) -> str:
    """The grammar in a few plain sentences (kept short: it sits in every context). numbered: the
    several-questions wording even for one question (see `build_prompt`)."""
    mem, search, answer, info = tags.mem, tags.search, tags.answer, tags.information
    answer_rule = (f"{answer[0]}answer{answer[1]}" if num_objectives == 1 and not numbered else
                   f"{answer[0]}answer 1{tags.answer_separator} answer 2 ...{answer[1]} "
                   f"with one answer per question, in order")
    return (f"Answer by searching. Each turn, first write {mem[0]}...{mem[1]} with every fact "
            f"you still need, then either {search[0]}query{search[1]} (results come back in "
            f"{info[0]}...{info[1]}) or {answer_rule}.")


def format_questions(task: Task, numbered: bool = False) -> str:
    if task.num_objectives == 1 and not numbered:
        return f"Question: {task.questions[0]}"
    return "\n".join(f"Question {i}: {q}" for i, q in enumerate(task.questions, start=1))


def build_prompt(task: Task, tags: AgentTags = DEFAULT_TAGS, numbered: bool = False) -> str:
    """Instructions + questions, ending in a newline; the model's first turn follows.

    numbered: a single question is written like one of several ("Question 1: ...", answers
    "answer 1; answer 2 ..."), so that every task of a run that mixes objective counts gets the
    same instructions (EnvConfig.numbered_questions)."""
    return f"{agent_instructions(task.num_objectives, tags, numbered)}\n{format_questions(task, numbered)}\n"


def chat_template_prompt(tokenizer, system_prompt: str | None = None) -> Callable[[str], str]:
    """-> a function from the user text (`build_prompt`) to the chat-templated prompt text:
    `[system?, user]` with the generation prompt, so the agent's turns and the tool's
    `<information>` blocks continue inside the assistant turn.

    The text is what the rollout tokenizes (`add_special_tokens=False`); a template whose text
    does not re-tokenize to the ids `apply_chat_template` gives raises ValueError, since the
    model would then be trained on other ids than the template's."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (use env.prompt_format plain)")

    def render(user_text: str) -> str:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + \
                   [{"role": "user", "content": user_text.rstrip("\n")}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
            raise ValueError("the chat template's text does not re-tokenize to its own ids "
                             "(use env.prompt_format plain, or a tokenizer whose specials are added tokens)")
        return text

    return render
