"""Where metrics go: <run>/metrics.jsonl always, the console, TensorBoard and W&B if asked.

Only rank 0 writes; other ranks get a logger whose calls do nothing, so the training loop
calls it unconditionally. TensorBoard and W&B are optional: if not installed, one notice
and the run goes on. One JSON object per line: {"step", "phase", "time", **metrics}.
A run started at step S (a resume, or 0) first drops the records after S, so each step appears once.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from mempo.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"
# (metric key, label) shown in the progress bar and summary line when present.
# The first five present in a step's metrics also go in the progress bar.
SUMMARY_KEYS = (("reward/mean", "reward"), ("memory_reward/mean", "mem"), ("kl", "kl"),
                ("clip_fraction", "clip"), ("tokens_per_s", "tok/s"), ("grad_norm", "gnorm"),
                ("lr", "lr"), ("loss", "loss"), ("nll", "nll"), ("memory/gold_recall", "gold in mem"),
                ("rollout/kl", "rollout kl"))


def _format(value: Any) -> str:
    if isinstance(value, float):
        if value != 0.0 and (abs(value) < 1e-3 or abs(value) >= 1e5) and math.isfinite(value):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def summary_line(step: int, metrics: dict[str, Any], phase: str = "rl") -> str:
    parts = [f"{phase} step {step}"]
    parts += [f"{label} {_format(metrics[key])}" for key, label in SUMMARY_KEYS if key in metrics]
    return " | ".join(parts)


def truncate_after(path: Path, step: int, phases: tuple[str, ...] = ("sft", "rl", "eval")) -> None:
    """Drop records of `phases` with a step > `step`: a run resumed from step `step` (0: started
    afresh, e.g. after a crash before its first checkpoint) logs them again. Atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("step", 0) <= step or record.get("phase") not in phases:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunLogger:
    """log(step, metrics) after each step; progress(total, description) opens the bar;
    close() at the end. `enabled=False` (non-zero ranks) makes every call a no-op."""

    def __init__(self, run_dir: str | os.PathLike, cfg: LoggingConfig, *, enabled: bool = True,
                 config_dict: dict | None = None, resume_step: int | None = None, run_name: str | None = None):
        self.cfg = cfg
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._progress = None
        self._task = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            truncate_after(self.metrics_path, resume_step)
        self._jsonl = open(self.metrics_path, "a", buffering=1)
        from rich.console import Console
        self.console = Console()
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self.notice("tensorboard is not installed: TensorBoard logging off (pip install tensorboard)")
        if cfg.wandb:
            try:
                import wandb
                self._wandb = wandb.init(project=cfg.project, name=run_name or self.run_dir.name,
                                         dir=str(self.run_dir), mode=cfg.wandb_mode, config=config_dict,
                                         resume="allow")
            except ImportError:
                self.notice("wandb is not installed: W&B logging off (pip install wandb)")
            except Exception as err:  # a broken W&B setup must not kill a training run
                self.notice(f"W&B could not start ({err}): W&B logging off")

    def notice(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[mempo] {message}", markup=False, highlight=False, soft_wrap=True)

    def progress(self, total: int, description: str = "rl", completed: int = 0,
                 phases: dict[str, int] | None = None) -> None:
        """Open (or replace) the progress bar: steps done / total, the ETA and the summary fields.
        phases: steps of each phase in order (e.g. {"sft": 350, "rl": 30}); the ETA then adds
        each phase's remaining steps at that phase's own mean step time (a warm-start step is far
        cheaper than an RL step), and says so while a phase has no timed step yet."""
        if not (self.enabled and self.cfg.progress_bar):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        self._stop_progress()
        self._phases = dict(phases or {description: total})
        self._step_times = {name: [] for name in self._phases}
        self._last_log = time.perf_counter()
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[summary]}"),
                                  console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=completed, summary="", eta="")

    def _eta(self, step: int) -> str:
        left, unknown, first = 0.0, [], 0
        for name, steps in self._phases.items():
            remaining = max(0, min(steps, first + steps - step))
            times = self._step_times.get(name) or []
            if remaining and not times:
                unknown.append(name)
            elif remaining:
                left += remaining * sum(times) / len(times)
            first += steps
        text = f"eta {int(left) // 3600}:{int(left) % 3600 // 60:02d}:{int(left) % 60:02d}"
        return text + (f" + {', '.join(unknown)} (not timed yet)" if unknown else "")

    def log(self, step: int, metrics: dict[str, Any], phase: str = "rl") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}
        record = {"step": step, "phase": phase, "time": round(time.time(), 3), **clean}
        # allow_nan: a skipped non-finite step is logged as such (NaN), not lost
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        numbers = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(f"{phase}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{phase}/{k}": v for k, v in numbers.items()}, step=step)
        line = summary_line(step, clean, phase)
        if self._progress is not None:  # the phase's first five summary numbers (sft: nll, gnorm, lr)
            now = time.perf_counter()
            if phase in self._step_times:
                self._step_times[phase].append(now - self._last_log)
            self._last_log = now
            shown = [(key, label) for key, label in SUMMARY_KEYS if key in clean][:5]
            short = " ".join(f"{label} {_format(clean[key])}" for key, label in shown)
            self._progress.update(self._task, completed=step, summary=short, eta=self._eta(step))
        if step % self.cfg.log_every == 0:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def eval_table(self, step: int, metrics: dict[str, Any]) -> None:
        """Print evaluation metrics ("{n}obj/{em,f1,TT,PT}") as one row per objective count."""
        if not self.enabled:
            return
        from rich.table import Table

        counts = sorted({int(k.split("obj/")[0]) for k in metrics if "obj/" in k})
        table = Table(title=f"held-out evaluation at step {step} (greedy)")
        for column in ("objectives", "EM", "F1", "TT", "PT"):
            table.add_column(column, justify="right")
        for n in counts:
            table.add_row(str(n), *(f"{float(metrics[f'{n}obj/{k}']):.{p}f}" for k, p in
                                    (("em", 3), ("f1", 3), ("TT", 0), ("PT", 0))))
        self._stop_progress()
        self.console.print(table)
        self.console.print("per task: TT = tokens through the model, PT = peak context (live KV)")

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        if not self.enabled:
            return
        self._stop_progress()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
