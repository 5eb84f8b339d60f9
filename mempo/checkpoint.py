"""Sharded, atomic training checkpoints (torch.distributed.checkpoint) and the final HF export.

Layout of a run directory:
    checkpoints/step_000020/      .metadata + *.distcp   model and optimizer shards (DCP)
                                  rank{r}.pt              RNG states (python/numpy/torch) + rank_state of rank r
                                  train_state.pt          step, scheduler, data position, extra
                                  config.yaml             the resolved config of the run
                                  manifest.json           every other file's size and CRC-32, written last
    checkpoints/latest            name of the newest complete checkpoint

Atomicity: everything is written into `step_XXXXXX.tmp/`; only when every rank has
finished does rank 0 rename it to `step_XXXXXX/` and then replace `latest` (os.replace).
A crash at any point leaves either the old checkpoint or the new one, never a half one:
`find_latest` ignores `*.tmp` directories. Multi-node runs need a shared filesystem.

Integrity: the manifest is written last (each rank checksums a share of the files; CRC-32
runs at 1-2.5 GB/s on a 2-core VM: ~0.8 s per GiB). Resuming verifies it (again split over the ranks, all ranks agree
on the verdict); with trainer.resume=auto a damaged checkpoint (a flipped byte, a truncated
or empty shard, a missing file) is reported in one line and the newest intact one is used.

The files other than the DCP shards are our own and are unpickled with weights_only=False.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import random
import re
import shutil
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from mempo.distributed import barrier, get_rank, get_world_size

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
STEP_DIR = re.compile(r"^step_(\d{6,})$")
# Test hook, "STEP" or "STEP:RANK": that rank (every rank if none) dies while writing the
# checkpoint of STEP, after its model/optimizer shards are on disk and before the rename.
CRASH_ENV = "MEMPO_TEST_CRASH_IN_CHECKPOINT_STEP"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable (the message names its path)."""


@dataclass
class TrainState:
    """What a resumed run needs besides the weights. data_state: the data position (e.g.
    tasks consumed); extra: anything else picklable (rank 0's copy is saved); rank_state:
    this rank's own picklable state (e.g. a rollout torch.Generator's get_state())."""
    step: int = 0
    data_state: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    rank_state: dict = field(default_factory=dict)


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(checkpoint: str | os.PathLike) -> int | None:
    """The step of a `step_XXXXXX` checkpoint directory; None for another name."""
    match = STEP_DIR.match(Path(checkpoint).name)
    return int(match.group(1)) if match else None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every `step_XXXXXX` directory under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted((step, p) for p in root.iterdir() if (step := step_of(p)) is not None and p.is_dir())


MANIFEST_FILE = "manifest.json"


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (".metadata", "train_state.pt", MANIFEST_FILE))


def _complete_checkpoint(path: str | os.PathLike) -> Path:
    """`path` as a Path, or CheckpointError if it is missing or incomplete."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not _is_complete(path):
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (no .metadata, train_state.pt or "
                              f"{MANIFEST_FILE})")
    return path


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _my_share(sizes: dict[str, int]) -> list[str]:
    """This rank's files to checksum: largest first, dealt round-robin over the ranks."""
    order = sorted(sizes, key=lambda n: (-sizes[n], n))
    return order[get_rank()::get_world_size()]


def _gather(items: list) -> list:
    """Concatenate every rank's list (all ranks get the same result)."""
    if not dist.is_initialized():
        return list(items)
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def _write_manifest(path: Path, step: int) -> None:
    """Collective: checksum every file of `path` (split over ranks); rank 0 writes the manifest."""
    sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != MANIFEST_FILE}
    crcs = dict(_gather([(name, _crc32(path / name)) for name in _my_share(sizes)]))
    if get_rank() == 0:
        files = {name: {"size": sizes[name], "crc32": crcs[name]} for name in sorted(sizes)}
        _atomic_write_text(path / MANIFEST_FILE, json.dumps({"format": 1, "step": step, "files": files}, indent=1))


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Collective: None if every file of the manifest is there with its size and CRC-32, else
    the first problem in words (the same on every rank)."""
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_FILE} is missing or unreadable ({type(err).__name__})"
    problems = []
    for name in _my_share(sizes):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != sizes[name]:
            problems.append(f"{name} has {file.stat().st_size} bytes, the manifest says {sizes[name]}")
        elif _crc32(file) != files[name]["crc32"]:
            problems.append(f"{name} does not match its checksum (damaged on disk)")
    problems = sorted(_gather(problems))
    return problems[0] if problems else None


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint of the run, or None. The `latest` pointer is a shortcut;
    if it is missing or names something incomplete, the step directories are scanned."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if STEP_DIR.match(candidate.name) and _is_complete(candidate):
            return candidate
    steps = [p for _, p in _step_dirs(root) if _is_complete(p)]
    return steps[-1] if steps else None


def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Path | None:
    """Collective. trainer.resume -> the verified checkpoint to load: "never" -> None; "auto"
    -> the newest intact one (None for a fresh run; damaged ones are skipped with a one-line
    notice; CheckpointError if every one is damaged); a path -> that checkpoint
    (CheckpointError if incomplete or damaged)."""
    if resume == "never":
        return None
    if resume != "auto":
        path = _complete_checkpoint(resume)
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {problem}")
        return path
    root = checkpoint_root(run_dir)
    candidates = [(step, p) for step, p in reversed(_step_dirs(root)) if _is_complete(p)]
    damaged = []
    for _, path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        damaged.append(path.name)
        if get_rank() == 0:
            print(f"[mempo] checkpoint {path} is damaged ({problem}): trying an older one", flush=True)
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {root} (damaged: {', '.join(damaged)}); "
                              f"--trainer.resume never starts the run afresh")
    return None


def retire_checkpoints(run_dir: str | os.PathLike) -> Path | None:
    """Collective. A run that starts afresh (trainer.resume=never) in a directory with an earlier
    run's checkpoints: rank 0 moves them to checkpoints.earlier-<UTC time>/ (kept, not deleted), so
    that neither pruning nor a later resume=auto can pick a stale step. -> the new place, or None
    when there was nothing to move."""
    root = checkpoint_root(run_dir)
    moved = None
    if get_rank() == 0 and root.is_dir() and any(STEP_DIR.match(p.name.removesuffix(".tmp")) for p in root.iterdir()):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        moved = root.with_name(f"{root.name}.earlier-{stamp}")
        suffix = 1
        while moved.exists():
            suffix += 1
            moved = root.with_name(f"{root.name}.earlier-{stamp}-{suffix}")
        os.rename(root, moved)
    barrier()
    return moved


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_without_process_group():
    """Without a process group DCP warns that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, *,
                    data_state: dict | None = None, extra: dict | None = None,
                    rank_state: dict | None = None, config_yaml: str | None = None,
                    keep_last: int = 0) -> Path:
    """Collective: every rank calls it. Writes checkpoints/step_XXXXXX/ atomically and
    returns its path. keep_last > 0 deletes all but the newest keep_last checkpoints."""
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    rank = get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt that died
        tmp.mkdir(parents=True, exist_ok=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optim_sd
    with _quiet_without_process_group():
        dcp.save(state, checkpoint_id=str(tmp))
    torch.save({"rng": _rng_state(), "rank_state": dict(rank_state or {})}, tmp / f"rank{rank}.pt")
    _maybe_crash_for_test(step, rank)
    if rank == 0:
        torch.save({"step": step, "world_size": get_world_size(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "data_state": dict(data_state or {}), "extra": dict(extra or {})},
                   tmp / "train_state.pt")
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
    barrier()  # every rank's files are in tmp before they are checksummed
    _write_manifest(tmp, step)
    barrier()  # the manifest is written before the checkpoint becomes visible
    if rank == 0:
        if final.exists():  # re-saving a step (e.g. after a resume): swap, then delete
            old = root / (final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _atomic_write_text(root / LATEST_FILE, final.name + "\n")
        if keep_last > 0:
            _prune(root, keep_last)
    barrier()
    return final


def _maybe_crash_for_test(step: int, rank: int) -> None:
    target = os.environ.get(CRASH_ENV)
    if target is None:
        return
    crash_step, _, crash_rank = target.partition(":")
    if int(crash_step) == step and (not crash_rank or int(crash_rank) == rank):
        os._exit(17)


def _prune(root: Path, keep_last: int) -> None:
    for _, path in _step_dirs(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _shape_mismatches(path: Path, model_sd: dict[str, Any]) -> list[str]:
    """'name is [saved shape] there, [model shape] here' for each model tensor whose shape differs
    from the checkpoint's (a changed model config or tokenizer); [] if the metadata cannot be read
    (the load then reports what is wrong)."""
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001 - a damaged checkpoint is reported by the load itself
        return []
    out = []
    for name, tensor in model_sd.items():
        size = getattr(saved.get(f"model.{name}"), "size", None)
        if size is not None and isinstance(tensor, torch.Tensor) and tuple(size) != tuple(tensor.shape):
            out.append(f"{name} is {list(size)} there, {list(tensor.shape)} here")
    return out


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    *, restore_rng: bool = True) -> TrainState:
    """Collective: restore model (and optimizer, scheduler, this rank's RNG) in place from
    a checkpoint written by save_checkpoint; the model must already be sharded the same
    way as (or any way compatible with) the saving run. Returns the TrainState."""
    path = _complete_checkpoint(path)
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    mismatched = _shape_mismatches(path, model_sd)
    if mismatched:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds another model: {'; '.join(mismatched[:3])}"
            f"{f' (and {len(mismatched) - 3} more)' if len(mismatched) > 3 else ''}. A run directory resumes "
            f"its own run (its config: {path / 'config.yaml'}); start another with --trainer.name NAME, or delete "
            f"{path.parent.parent} to start this one afresh")
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optim_sd
    try:
        with _quiet_without_process_group():
            dcp.load(state, checkpoint_id=str(path))
        train = torch.load(path / "train_state.pt", weights_only=False)
    except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or does not match the model: {err}") from err
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}))
    if scheduler is not None and train.get("scheduler") is not None:
        scheduler.load_state_dict(train["scheduler"])
    rank_file = path / f"rank{get_rank()}.pt"
    rank_saved = {}
    if rank_file.is_file():
        rank_saved = torch.load(rank_file, weights_only=False)
        if restore_rng:
            _set_rng_state(rank_saved["rng"])
    else:  # saved with fewer ranks: the weights reshard, per-rank state cannot
        print(f"[mempo] checkpoint {path} has no state for rank {get_rank()} (saved with "
              f"{train.get('world_size')} ranks): RNG and rank_state not restored")
    return TrainState(step=int(train["step"]), data_state=train.get("data_state", {}),
                      extra=train.get("extra", {}), rank_state=rank_saved.get("rank_state", {}))


def hf_model_and_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """The Hugging Face PreTrainedModel inside `model` and its name prefix ("" if model)."""
    for name, module in model.named_modules():
        if hasattr(module, "save_pretrained") and hasattr(module, "config"):
            return module, (name + "." if name else "")
    raise ValueError(f"{type(model).__name__} contains no Hugging Face PreTrainedModel to export")


def export_hf(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike,
              dtype: torch.dtype | None = None) -> Path | None:
    """Collective: gather the full weights and, on rank 0, write a Hugging Face model
    directory (model.safetensors + config.json + tokenizer) that `from_pretrained` loads.
    Written to out_dir.tmp then renamed. dtype: cast the weights (default: as trained).
    Returns out_dir on rank 0, None elsewhere."""
    from safetensors.torch import save_file

    hf, prefix = hf_model_and_prefix(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if get_rank() != 0:
        barrier()
        return None
    weights = {}
    for name, tensor in full.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        if name == "lm_head.weight" and getattr(hf.config, "tie_word_embeddings", False):
            continue  # tied to embed_tokens; safetensors refuses shared storage
        tensor = tensor.detach().cpu()
        weights[name] = (tensor.to(dtype) if dtype is not None else tensor).contiguous()
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = copy.deepcopy(hf.config)
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(str(tmp))
    generation_config = getattr(hf, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(tmp))
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    barrier()
    return out
