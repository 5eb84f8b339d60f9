"""The tiny-world experiment record: warm start vs GRPO vs MemPO vs keep-all, over seeds.

    python benchmarks/tiny_world.py                      # the record in RESULTS.md (tens of minutes on 2 cores)
    python benchmarks/tiny_world.py --settings lossy,faithful --seeds 0,1,2   # both settings, 3 seeds
    python benchmarks/tiny_world.py --seeds 0 --steps 5  # a quick look
    pip install -e ".[bench]"                            # matplotlib, for the PNG plots

Settings (one world, one model size, the trainer's defaults unless named):
  lossy      the memory-sensitive setting: warm-start experts leave each answer fact out of
             their memory with probability --omit and then answer "unknown" (env.expert_omit);
             with the mempo context policy the answer sees nothing but the last memory, so
             what the memory holds decides the reward
  faithful   the default recipe (env.expert_omit 0): experts memorise every answer they find
Runs per setting: one supervised warm start per context policy (trainer.seed 0; it evaluates
itself), then per seed s (trainer.seed = rollout.seed = s), resumed from that warm start:
  GRPO           algorithm.mem_coef 0, context policy mempo
  MemPO (step)   mem_coef --mem-coef, memory advantages normalised per (group, step)
  MemPO (group)  mem_coef --mem-coef, normalised per group
  keep-all GRPO  rollout.context_policy keep_all from the keep-all warm start (a ReAct agent)
RL seeds share their warm start, so per seed the methods are paired (same start, same tasks).

Every run is `python -m mempo.train` in one process with --threads threads; --jobs runs go at
once (default: the cores / threads). Outputs: the table on stdout and, unless --no-results,
between the markers of RESULTS.md's tiny_world section; PNG plots in --plots-dir: learning
curves (training-rollout EM and final-memory gold recall per RL step), held-out EM and peak
context PT vs the number of objectives. Cells are mean ± std over seeds [min, max].
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- tiny_world.py: begin generated -->", "<!-- tiny_world.py: end generated -->"
SECTION = "## `benchmarks/tiny_world.py`"
METHODS = {  # name -> (label, context policy, overrides)
    "grpo": ("GRPO (mem_coef 0)", "mempo", ["--algorithm.mem_coef", "0.0"]),
    "mempo_step": ("MemPO (step)", "mempo", ["--algorithm.memory_grouping", "step"]),
    "mempo_group": ("MemPO (group)", "mempo", ["--algorithm.memory_grouping", "group"]),
    "keep_all": ("keep-all GRPO", "keep_all", ["--algorithm.mem_coef", "0.0"]),
}
SETTINGS = ("lossy", "faithful")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="lossy", help="comma-separated: lossy, faithful")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated of {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1", help="RL seeds (comma-separated)")
    p.add_argument("--omit", type=float, default=0.5, help="env.expert_omit of the lossy setting")
    p.add_argument("--mem-coef", type=float, default=1.0, help="algorithm.mem_coef of the MemPO runs")
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: the trainer's)")
    p.add_argument("--sft-steps", type=int, default=None, help="warm-start steps (default: the trainer's)")
    p.add_argument("--jobs", type=int, default=None, help="runs at once (default: cores // threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--run-dir", default="runs/tiny_world_experiment")
    p.add_argument("--plots-dir", default="benchmarks/tiny_world", help="where the PNG plots go")
    p.add_argument("--results", default="benchmarks/RESULTS.md", help="RESULTS.md to update")
    p.add_argument("--no-results", action="store_true", help="print the table only")
    p.add_argument("--keep", action="store_true", help="reuse finished runs in --run-dir (default: start over)")
    p.add_argument("extra", nargs="*", help="more overrides for every run, e.g. --rollout.batch_size=16 "
                                            "(after --)")
    args = p.parse_args(argv)
    args.settings = [s for s in args.settings.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    for name, values, valid in (("--settings", args.settings, SETTINGS), ("--methods", args.methods, METHODS)):
        bad = [v for v in values if v not in valid]
        if bad or not values:
            p.error(f"{name} must be a non-empty list of {', '.join(valid)}, got {bad or values}")
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    if not 0.0 <= args.omit < 1.0:
        p.error(f"--omit must be in [0, 1), got {args.omit}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    args.jobs = args.jobs or max(1, (os.cpu_count() or 1) // args.threads)
    return args


# ----------------------------------------------------------------------------- runs

@dataclass
class Run:
    name: str  # directory under run_dir
    overrides: list[str]
    own_steps: int  # the steps this run trains itself (warm start: sft; RL: rl)
    after: str | None = None  # the warm start whose checkpoints it starts from
    proc: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)


def _defaults():
    sys.path.insert(0, str(ROOT))
    from mempo.config import Config

    return Config()


def plan_runs(args) -> list[Run]:
    cfg = _defaults()
    sft = cfg.sft.steps if args.sft_steps is None else args.sft_steps
    rl = cfg.trainer.steps if args.steps is None else args.steps
    common = ["--sft.steps", str(sft), *args.extra]
    runs = []
    for setting in args.settings:
        omit = ["--env.expert_omit", str(args.omit if setting == "lossy" else 0.0)]
        contexts = sorted({METHODS[m][1] for m in args.methods}, key=["mempo", "keep_all"].index)
        for ctx in contexts:
            runs.append(Run(f"{setting}/ws_{ctx}", [*omit, *common, "--rollout.context_policy", ctx,
                                                      "--trainer.steps", "0"], sft))
        for method in args.methods:
            _, ctx, extra = METHODS[method]
            coef = [] if method in ("grpo", "keep_all") else ["--algorithm.mem_coef", str(args.mem_coef)]
            for seed in args.seeds:
                runs.append(Run(f"{setting}/{method}_s{seed}",
                                [*omit, *common, "--rollout.context_policy", ctx, *extra, *coef, "--trainer.steps",
                                 str(rl), "--trainer.seed", str(seed), "--rollout.seed", str(seed)],
                                rl, after=f"{setting}/ws_{ctx}"))
    return runs


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished(records: list[dict]) -> bool:
    return any(r["phase"] == "eval" for r in records)


def _start(run: Run, args) -> None:
    out = Path(args.run_dir) / run.name
    if run.after is not None:  # resume from the warm start's checkpoints (trainer.resume auto)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(Path(args.run_dir) / run.after / "checkpoints", out / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "mempo.train", "--trainer.run_dir", str(Path(args.run_dir) / Path(run.name).parent),
           "--trainer.name", Path(run.name).name, "--logging.progress_bar", "false", "--trainer.export_hf", "false",
           "--trainer.save_every", "0", "--trainer.keep_checkpoints", "1", *run.overrides]
    (out / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
    run.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(out / "stdout.log", "w"), stderr=subprocess.STDOUT)
    run.started = time.time()


def execute(runs: list[Run], args) -> None:
    """Run everything, `args.jobs` at a time, warm starts before the runs that need them."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    done: set[str] = set()
    if args.keep:
        for run in runs:
            run.records = _metrics(Path(args.run_dir) / run.name / "metrics.jsonl")
            if _finished(run.records):
                done.add(run.name)
    else:
        shutil.rmtree(args.run_dir, ignore_errors=True)
    waiting = [r for r in runs if r.name not in done]
    running: list[Run] = []
    total = sum(r.own_steps for r in runs)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task("tiny_world", total=total)
        while waiting or running:
            for run in [r for r in waiting if r.after is None or r.after in done][: args.jobs - len(running)]:
                _start(run, args)
                waiting.remove(run)
                running.append(run)
            time.sleep(2.0)
            for run in list(running):
                if run.proc.poll() is None:
                    continue
                running.remove(run)
                run.seconds = time.time() - run.started
                run.records = _metrics(Path(args.run_dir) / run.name / "metrics.jsonl")
                if run.proc.returncode != 0 or not _finished(run.records):
                    for other in running:
                        other.proc.terminate()
                    log = Path(args.run_dir) / run.name / "stdout.log"
                    raise SystemExit(f"run {run.name} failed (exit {run.proc.returncode}); last lines of {log}:\n"
                                     + "\n".join(log.read_text().splitlines()[-15:]))
                (Path(args.run_dir) / run.name / "seconds.txt").write_text(f"{run.seconds:.0f}\n")
                done.add(run.name)
            steps = 0
            for run in runs:  # steps logged by this invocation (a resumed run starts after its warm start)
                records = run.records if run.name in done else _metrics(Path(args.run_dir) / run.name / "metrics.jsonl")
                own = [r for r in records if r["phase"] == ("sft" if run.after is None else "rl")]
                steps += len(own)
            bar.update(task, completed=steps, description=f"tiny_world: {len(done)}/{len(runs)} runs, "
                                                            f"{len(running)} running")
    for run in runs:
        seconds = Path(args.run_dir) / run.name / "seconds.txt"
        run.seconds = float(seconds.read_text()) if seconds.is_file() else 0.0


# ----------------------------------------------------------------------------- summary

def _eval(run: Run) -> dict:
    return [r for r in run.records if r["phase"] == "eval"][-1]


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, min(values), max(values))


def _cell(values: list[float], digits: int = 3, spread: bool = True) -> str:
    """mean ± std [min-max] over seeds (spread), or the mean alone."""
    mean, std, lo, hi = _stats(values)
    if len(values) == 1 or not spread:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def rows_by_setting(runs: list[Run], args) -> dict[str, dict[str, list[Run]]]:
    """setting -> row label -> its runs (one per seed; a warm start: one)."""
    out: dict[str, dict[str, list[Run]]] = {}
    for setting in args.settings:
        rows: dict[str, list[Run]] = {}
        for run in runs:
            s, name = run.name.split("/")
            if s != setting:
                continue
            if name.startswith("ws_"):
                rows[f"warm start ({name[3:].replace('_', '-')} context)"] = [run]
            else:
                rows.setdefault(METHODS[name.rsplit("_s", 1)[0]][0], []).append(run)
        out[setting] = rows
    return out


def table(rows: dict[str, list[Run]], objectives: list[int]) -> str:
    head = (["run", "seeds"] + [f"EM@{n}" for n in objectives] + [f"F1@{objectives[-1]}"]
            + [f"PT@{n}" for n in objectives] + [f"TT@{objectives[-1]}", f"mem tokens@{objectives[-1]}",
                                                  f"mem recall@{objectives[-1]}", "wall s"])
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: |" + " ---: |" * (len(head) - 2)]
    top = objectives[-1]
    for label, runs in rows.items():
        evals = [_eval(r) for r in runs]
        col = lambda key, d=3, spread=False, evals=evals: _cell([e[key] for e in evals], d, spread)  # noqa: E731
        cells = ([label, str(len(runs))] + [col(f"{n}obj/em", spread=True) for n in objectives]
                 + [col(f"{top}obj/f1")] + [col(f"{n}obj/PT", 0) for n in objectives]
                 + [col(f"{top}obj/TT", 0), col(f"{top}obj/mem_len", 1), col(f"{top}obj/mem_recall", spread=True),
                    f"{statistics.mean(r.seconds for r in runs):.0f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: dict[str, list[Run]], objectives: list[int]) -> list[str]:
    """MemPO vs GRPO per objective count: the paired per-seed difference against the seed spread."""
    out = []
    grpo = rows.get(METHODS["grpo"][0])
    for key in ("mempo_step", "mempo_group"):
        mempo = rows.get(METHODS[key][0])
        if not grpo or not mempo:
            continue
        by_seed = {r.name.rsplit("_s", 1)[1]: _eval(r) for r in grpo}
        for n in objectives:
            k = f"{n}obj/em"
            pairs = [(_eval(r)[k], by_seed[r.name.rsplit("_s", 1)[1]][k]) for r in mempo
                     if r.name.rsplit("_s", 1)[1] in by_seed]
            if not pairs:
                continue
            diff = [a - b for a, b in pairs]
            spread = max(_stats([a for a, _ in pairs])[1], _stats([b for _, b in pairs])[1])
            mean = statistics.mean(diff)
            word = ("above GRPO by more than the seed spread" if mean > spread and min(diff) > 0 else
                    "below GRPO by more than the seed spread" if -mean > spread and max(diff) < 0 else
                    "not separated from GRPO")
            out.append(f"{METHODS[key][0]} EM@{n}: {mean:+.3f} vs GRPO (paired per seed {min(diff):+.3f} to "
                       f"{max(diff):+.3f}; seed std {spread:.3f}): {word}")
    return out


def pt_ratios(rows: dict[str, list[Run]], objectives: list[int]) -> list[str]:
    lo, hi = objectives[0], objectives[-1]
    out = []
    for label, runs in rows.items():
        ratio = [_eval(r)[f"{hi}obj/PT"] / _eval(r)[f"{lo}obj/PT"] for r in runs]
        out.append(f"{label}: PT@{hi} / PT@{lo} = {statistics.mean(ratio):.2f}")
    return out


# ----------------------------------------------------------------------------- plots

def plots(by_setting: dict[str, dict[str, list[Run]]], objectives: list[int], plots_dir: Path) -> list[Path]:
    """learning curves, EM vs objectives, PT vs objectives per setting -> the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plots were written: pip install -e \".[bench]\" "
              "(or pip install matplotlib), then run again with --keep to redraw without retraining")
        return []
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for setting, rows in by_setting.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label, runs in rows.items():
            curves = [[r for r in run.records if r["phase"] == "rl"] for run in runs]
            if not curves[0]:
                continue
            for ax, key in zip(axes, ("em", "memory/gold_recall")):
                steps = min(len(c) for c in curves)
                values = [[c[i][key] for c in curves] for i in range(steps)]
                window = 5  # moving average over steps: one step is 8 tasks x 4 rollouts
                smooth = lambda xs: [statistics.mean(xs[max(0, i - window + 1): i + 1]) for i in range(len(xs))]  # noqa
                per_seed = [smooth([v[s] for v in values]) for s in range(len(curves))]
                mean = [statistics.mean(p[i] for p in per_seed) for i in range(steps)]
                x = list(range(1, steps + 1))
                ax.plot(x, mean, label=f"{label} ({len(curves)} seeds)")
                if len(curves) > 1:
                    ax.fill_between(x, [min(p[i] for p in per_seed) for i in range(steps)],
                                    [max(p[i] for p in per_seed) for i in range(steps)], alpha=0.15)
        axes[0].set(xlabel="RL step", ylabel=f"training-rollout EM (moving mean of {5})",
                    title=f"{setting}: learning curves")
        axes[1].set(xlabel="RL step", ylabel="memory gold recall (all memories)", title=f"{setting}: memory")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        written.append(plots_dir / f"{setting}_learning_curves.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label, runs in rows.items():
            for ax, key in zip(axes, ("em", "PT")):
                values = [[_eval(r)[f"{n}obj/{key}"] for r in runs] for n in objectives]
                ax.errorbar(objectives, [statistics.mean(v) for v in values],
                            yerr=[[statistics.mean(v) - min(v) for v in values], [max(v) - statistics.mean(v)
                                                                                  for v in values]],
                            marker="o", capsize=3, label=label)
        axes[0].set(xlabel="objectives", ylabel="held-out EM (greedy)", title=f"{setting}: EM vs objectives",
                    xticks=objectives)
        axes[1].set(xlabel="objectives", ylabel="peak context PT (tokens)", title=f"{setting}: PT vs objectives",
                    xticks=objectives)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        written.append(plots_dir / f"{setting}_objectives.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


# ----------------------------------------------------------------------------- record

def record(args, runs: list[Run], by_setting, objectives: list[int], images: list[Path], seconds: float) -> str:
    import torch

    from mempo.host import cpu_description

    argv = " ".join(sys.argv[1:])
    lines = [f"Generated by `python benchmarks/tiny_world.py{' ' + argv if argv else ''}` on "
             f"{datetime.date.today().isoformat()} · CPU ({cpu_description()}), torch {torch.__version__}, "
             f"{args.jobs} runs at once, {args.threads} thread(s) each (OMP_NUM_THREADS); {seconds / 60:.0f} min "
             f"in all. Held-out tasks, greedy; EM/F1 = mean over objectives; PT = peak context, TT = tokens "
             f"through the model, per task; mem tokens = tokens per memory, mem recall = the fraction of "
             f"objectives whose gold answer the last memory holds. EM and recall cells: mean ± std over RL "
             f"seeds {','.join(map(str, args.seeds))} [min-max], other cells the mean; the warm starts are one "
             f"run each (trainer.seed 0); wall s = seconds per run (RL: the RL part).", ""]
    for setting, rows in by_setting.items():
        what = (f"lossy experts (env.expert_omit {args.omit})" if setting == "lossy" else
                "faithful experts (the default recipe)")
        lines += [f"**{setting}**: {what}", "", table(rows, objectives), ""]
        lines += [f"- {v}" for v in verdicts(rows, objectives)]
        lines += [f"- {v}" for v in pt_ratios(rows, objectives)]
        lines.append("")
    for image in images:
        rel = os.path.relpath(image, Path(args.results).parent)
        lines.append(f"![{image.stem}]({rel})")
    return "\n".join(lines).rstrip() + "\n"


def update_results(path: Path, generated: str) -> None:
    """Replace the generated block of the tiny_world section (hand-written notes around it stay)."""
    text = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{generated}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif SECTION in text:  # first time: the block goes right under the section heading
        head, rest = text.split(SECTION, 1)
        title, _, body = rest.partition("\n")
        text = f"{head}{SECTION}{title}\n\n{block}\n{body}"
    else:
        text = text.rstrip() + f"\n\n{SECTION}: the experiment record\n\n{block}\n"
    path.write_text(text)


def main(argv=None) -> None:
    args = _parse(argv)
    runs = plan_runs(args)
    t0 = time.time()
    execute(runs, args)
    seconds = time.time() - t0
    cfg = _defaults()
    objectives = sorted(cfg.env.eval_objectives)
    for flag in ("--env.eval_objectives",):  # an override of the evaluated counts
        for i, a in enumerate(args.extra):
            if a.startswith(flag):
                value = a.split("=", 1)[1] if "=" in a else args.extra[i + 1]
                objectives = sorted(int(v) for v in value.strip("[]").split(",") if v.strip())
    by_setting = rows_by_setting(runs, args)
    images = plots(by_setting, objectives, ROOT / args.plots_dir)
    generated = record(args, runs, by_setting, objectives, images, seconds)
    print(generated)
    if not args.no_results:
        update_results(ROOT / args.results, generated)
        print(f"updated {args.results}")


if __name__ == "__main__":
    main()
