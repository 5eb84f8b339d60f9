"""Process group, FSDP2 sharding and the few collectives the trainer needs.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; multi-node runs
use torchrun's own --nnodes / --rdzv-* options and nothing here changes. Without torchrun
the trainer runs as one process in a one-rank group (same code path, nothing to shard).

Gradient normalisation: the loss on each rank is its *sum* over loss tokens divided by the
*global* loss-token count (`all_reduce_sum`), and `shard_model` makes FSDP sum (not
average) gradients across ranks, so the gradient is the global token mean whatever the
world size.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str  # "nccl" or "gloo"

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and pick this rank's device
    (on the CPU, with denormals flushed to zero). device: "auto" (cuda when available), "cpu"
    or "cuda"."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    else:
        # Flush denormals to zero. As a model grows confident, the exps of attention's softmax and
        # the LM head's log-softmax fall below float32's smallest normal (1.2e-38), and x86 cores
        # take microcode assists on such values: a 450-step default run's warm-start step slowed
        # from 0.68 s to 0.87 s (benchmarks/RESULTS.md, tiny_world, eighth session). Rollout and
        # training in this process run under the same mode; that run's logged values were
        # bit-identical with and without the flush.
        torch.set_flush_denormal(True)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=dev if use_cuda else None)
        else:
            # Without torchrun: a one-rank group over an in-memory store, so FSDP2 (mixed
            # precision), DCP and the collectives run the same code path as under torchrun.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev, backend)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo only CPU ones.
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: float | int | torch.Tensor) -> float | int | torch.Tensor:
    """Sum over ranks; a Python number comes back as one (ints stay exact: int64)."""
    if isinstance(value, torch.Tensor):
        out = value.detach().to(_collective_device()).clone()
        if dist.is_initialized():
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(value.device)
    # Always float64 on the wire: ranks passing an int and a float (an empty list sums to
    # int 0) must not meet in one collective with different dtypes. Exact for |ints| < 2**53.
    total = all_reduce_sum(torch.tensor(float(value), dtype=torch.float64)).item()
    return int(round(total)) if isinstance(value, int) and not isinstance(value, bool) else total


def all_reduce_sums(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Sum of each entry over ranks in one collective (per-step metric totals). Entries may be
    Python numbers or 0-dim tensors on any device: device tensors are stacked where they live
    and the numbers travel in one copy, so the one host sync is the `tolist()` of the result."""
    device = _collective_device()
    on_device = sorted(k for k, v in values.items() if isinstance(v, torch.Tensor))
    on_host = sorted(k for k in values if k not in on_device)
    parts = [torch.tensor([float(values[k]) for k in on_host], dtype=torch.float64).to(device)]
    parts += [values[k].detach().to(device, torch.float64).reshape(1) for k in on_device]
    return dict(zip(on_host + on_device, all_reduce_sum(torch.cat(parts)).tolist()))


def all_reduce_max(value: float) -> float:
    out = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.item()


def shard_for_rank(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's contiguous share of `items` (sizes differ by at most one; the first
    len % world ranks get the extra). Shard tasks, not trajectories: a task's G rollouts
    then stay on one rank and its group statistics need no communication."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (rank < extra)])


def balanced_shard(items: Sequence[T], sizes: Sequence[int], rank: int | None = None,
                   world_size: int | None = None) -> list[T]:
    """This rank's share of `items`, balanced by `sizes` (e.g. tokens per trajectory): largest
    first, each to the rank with the least so far (ties: the lower rank), then in their order in
    `items`. Every rank computes the same partition from the same inputs, so the ranks' shares
    are disjoint and cover `items`; the slowest rank, which every collective waits for, gets
    at most the mean plus one item's size."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if len(sizes) != len(items):
        raise ValueError(f"sizes must match items, got {len(sizes)} for {len(items)}")
    loads = [0] * world_size
    mine = []
    for i in sorted(range(len(items)), key=lambda i: -sizes[i]):  # stable: equal sizes keep their order
        owner = loads.index(min(loads))
        loads[owner] += sizes[i]
        if owner == rank:
            mine.append(i)
    return [items[i] for i in sorted(mine)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a Hugging Face decoder (or of a module wrapping one):
    the first ModuleList attribute named `layers`."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"found no ModuleList named 'layers' in {type(model).__name__}")


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """model.dtype ("auto", "float32", "bfloat16") -> the forward's dtype on `device`."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    return getattr(torch, dtype)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in the backward. Hugging Face layers checkpoint their
    own `forward` (FSDP2's hooks stay outside the recompute, the KV cache is turned off);
    other modules get torch's non-reentrant checkpoint wrapper, whose state-dict hooks
    keep the plain parameter names."""
    hf_model = next((m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable")), None)
    if hf_model is not None:
        if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5 name
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = decoder_layers(model)
    for i in range(len(layers)):
        layers[i] = checkpoint_wrapper(layers[i])


def shard_model(model: nn.Module, *, param_dtype: torch.dtype = torch.float32,
                activation_checkpointing: bool = False, sum_gradients: bool = True,
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 in place: `fully_shard` each decoder block, then the root (which keeps
    embeddings, final norm and LM head). Parameters stay float32 (the master weights);
    param_dtype != float32 casts them for compute, gradients are reduced in float32.
    With no process group (init_distributed not called) only activation checkpointing
    is applied.

    sum_gradients: gradients are summed over ranks (not averaged) - pair with a loss
    normalised by the global token count (see module docstring)."""
    layers = decoder_layers(model)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if not dist.is_initialized():
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for i, layer in enumerate(layers):
        # The last block's parameters are needed again first in the backward: keep them.
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for name in getattr(model, "fsdp_methods", ()):  # e.g. FusedPolicy.policy_loss: unshard the root for it
        register_fsdp_forward_method(model, name)
    if sum_gradients:
        gloo = dist.get_backend() == "gloo"
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                if gloo:  # a divide factor means PREMUL_SUM, which gloo lacks: plain SUM
                    module.set_force_sum_reduction_for_comms(True)
    return model


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global gradient norm (over all shards and ranks), clipping to max_norm if > 0.
    Returns the norm before clipping; may be inf/nan (see step_guard)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], error_if_nonfinite=False)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2: the reduction is pending
        norm = norm.full_tensor()
    return float(norm)
