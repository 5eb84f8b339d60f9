"""MemPO training: `torchrun --nproc_per_node N -m mempo.train [--config FILE] [--section.key VALUE ...]`.
`python -m mempo.train --check [--ranks N] ...` prints the resolved plan of that run and exits.

The loop itself is `mempo.trainer.run` (warm start, MemPO RL, evaluation, export). This
module is the command line: the config is parsed and checked before torch is imported, so a
mistake costs a second and is printed once (by rank 0), in one line; a file, model, server
or checkpoint the config names that cannot be used is one line too; Ctrl-C prints one line
and leaves the newest checkpoint to resume from (run the same command again).
"""
from __future__ import annotations

import os
import sys

from mempo.config import ConfigError, parse_args


def _check_flags(argv: list[str]) -> tuple[list[str], bool, int]:
    """Strip `--check` and `--ranks N` (the plan's data-parallel size) from argv."""
    argv, check, ranks = list(argv), "--check" in argv, 1
    argv = [a for a in argv if a != "--check"]
    if "--ranks" in argv:
        i = argv.index("--ranks")
        if not check:
            raise ConfigError("--ranks is an option of --check (the ranks the plan is computed for)")
        try:
            ranks = int(argv[i + 1])
        except (IndexError, ValueError):
            raise ConfigError("--ranks needs a number of ranks >= 1") from None
        if ranks < 1:
            raise ConfigError(f"--ranks must be >= 1, got {ranks}")
        del argv[i:i + 2]
    return argv, check, ranks


def _fail(message: str) -> None:
    """Exit 1; only rank 0 (torchrun's RANK, read without torch) prints the line."""
    raise SystemExit(f"mempo.train: {message}" if os.environ.get("RANK", "0") == "0" else 1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        argv, check, ranks = _check_flags(argv)
        cfg = parse_args(argv)
    except ConfigError as err:  # a bad option: one clear line, no traceback, nothing loaded
        _fail(str(err))
    if check:
        from mempo.training.run_check import check_run

        raise SystemExit(check_run(cfg, ranks))
    from mempo.checkpoint import CheckpointError, find_latest
    from mempo.distributed import destroy_distributed, init_distributed
    from mempo.models.builder import ModelLoadError
    from mempo.trainer import run
    from mempo.training.task_side import SetupError

    info = init_distributed(cfg.trainer.device)
    try:
        run(cfg, info)
    except (SetupError, ModelLoadError, CheckpointError) as err:  # a file, model, server or checkpoint
        _fail(str(err))
    except KeyboardInterrupt:
        newest = find_latest(cfg.trainer.output_dir)
        resume = f"the newest checkpoint is {newest}; run the same command to resume" if newest else \
            "no checkpoint was written yet"
        if info.is_rank0:
            print(f"\n[mempo] interrupted: {resume}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
