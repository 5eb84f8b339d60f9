"""Rollouts: the native engine with segment-aware KV eviction, the agent loop, trajectories,
context policies (memory probes: mempo.algo.probes)."""
from .agent_loop import SamplingParams, run_rollout
from .context_policy import ContextPolicy
from .native_engine import NativeEngine
from .replay import trajectory_from_turns
from .trajectory import Trajectory

__all__ = ["ContextPolicy", "NativeEngine", "SamplingParams", "Trajectory",
           "run_rollout", "trajectory_from_turns"]
