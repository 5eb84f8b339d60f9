"""Agent tasks, search tools and scoring for MemPO search agents.

Grammar and parsing: `agent_format`; tools: `search_tool` (interface), `bm25_search`,
`http_search`, `retrieval_server`; tasks: `tasks`, `prompts`, `tiny_world`; scoring and
rewards: `scoring`; stepping, replay and TT/PT: `environment`, `trajectory`.
"""
from mempo.envs.agent_format import DEFAULT_TAGS, ActionKind, AgentTags, FormatError, Step, cut_after_action, parse_step
from mempo.envs.bm25_search import BM25Search
from mempo.envs.environment import EnvConfig, Episode, SearchEnv, StepResult
from mempo.envs.http_search import HttpSearch, SearchServerError
from mempo.envs.prompts import agent_instructions, build_prompt
from mempo.envs.scoring import RewardConfig, exact_match, normalize_answer, score_answers, token_f1, trajectory_reward
from mempo.envs.search_tool import Doc, SearchTool, format_information
from mempo.envs.tasks import Task, compose_multi_objective, load_tasks
from mempo.envs.tiny_world import TinyWorld, TinyWorldConfig, build_tiny_world
from mempo.envs.tokenizer import load_tokenizer, save_tokenizer, tiny_world_tokenizer, train_tokenizer
from mempo.envs.transcript import TokenUsage, Transcript, Turn, token_usage, visible_context

__all__ = [
    "DEFAULT_TAGS", "ActionKind", "AgentTags", "FormatError", "Step", "cut_after_action",
    "parse_step",
    "BM25Search", "EnvConfig", "Episode", "SearchEnv", "StepResult", "HttpSearch",
    "SearchServerError", "agent_instructions", "build_prompt", "RewardConfig", "exact_match",
    "normalize_answer", "score_answers", "token_f1", "trajectory_reward", "Doc", "SearchTool",
    "format_information", "Task", "compose_multi_objective", "load_tasks", "TinyWorld",
    "TinyWorldConfig", "build_tiny_world", "load_tokenizer", "save_tokenizer",
    "tiny_world_tokenizer", "train_tokenizer", "TokenUsage", "Transcript", "Turn",
    "token_usage", "visible_context",
]
