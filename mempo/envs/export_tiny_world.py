"""Write the tiny world as the files a real run reads: a corpus, task files, demonstrations.

    python -m mempo.envs.export_tiny_world --out DIR [--seed 0] [--objectives 1,2]

DIR/corpus.jsonl ({id, title, text}: for `env.corpus_path` or `mempo.envs.retrieval_server`),
DIR/train.jsonl and DIR/heldout.jsonl (single-objective tasks: `env.train_tasks_path`,
`env.eval_tasks_path`) and DIR/demos.jsonl (the experts on the training tasks with the given
objective counts, in the `mempo.envs.demonstrations` format: `sft.data_path`). The README's
"Train your own model" commands and the end-to-end test of the file path use these files.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mempo.envs.agent_format import ActionKind, parse_step
from mempo.envs.demonstrations import demonstration_record
from mempo.envs.tiny_world import TinyWorld, build_tiny_world


def write_demonstrations(world: TinyWorld, path: str | Path, objectives: list[int]) -> int:
    """The experts on every training task with each objective count -> JSONL; -> lines written."""
    env = world.env()
    tasks = [t for n in objectives for t in world.tasks("train", n)]
    with open(path, "w", encoding="utf-8") as f:
        for traj in world.expert_trajectories(tasks, env):
            passages = []
            for turn in traj.turns:
                step = parse_step(turn.model, env.config.tags)
                passages.append(world.search_tool.search([step.query], env.config.top_k)[0]
                                if step.kind == ActionKind.SEARCH else None)
            f.write(json.dumps(demonstration_record(traj, passages, env)) + "\n")
    return len(tasks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (env.world_seed)")
    parser.add_argument("--objectives", default="1,2", help="objective counts of the demonstrations, e.g. 1,2")
    args = parser.parse_args(argv)
    try:
        objectives = [int(n) for n in args.objectives.split(",")]
    except ValueError:
        parser.error(f"--objectives must be comma-separated integers, got {args.objectives!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = build_tiny_world(seed=args.seed)
    world.write_corpus(out / "corpus.jsonl")
    world.write_tasks(out / "train.jsonl", "train")
    world.write_tasks(out / "heldout.jsonl", "heldout")
    demos = write_demonstrations(world, out / "demos.jsonl", objectives)
    print(f"wrote {len(world.corpus)} passages, {len(world.tasks('train'))} train and "
          f"{len(world.tasks('heldout'))} held-out tasks, {demos} demonstrations to {out}/")


if __name__ == "__main__":
    main()
