"""Write the tiny world as the files a real run reads: a corpus, task files, demonstrations.

    python -m mempo.envs.export_tiny_world --out DIR [--seed 0] [--objectives 1,2] [--model-dir MODEL_DIR]

DIR/corpus.jsonl ({id, title, text}: for `env.corpus_path` or `mempo.envs.retrieval_server`),
DIR/train.jsonl and DIR/heldout.jsonl (single-objective tasks: `env.train_tasks_path`,
`env.eval_tasks_path`) and DIR/demos.jsonl (the experts on the training tasks with the given
objective counts, in the `mempo.envs.demonstrations` format: `sft.data_path`). The README's
"Train your own model" commands and the end-to-end test of the file path use these files;
`--model-dir` adds a small random-init model directory with a chat template to run them with.
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


def save_tiny_instruct_model(path: str | Path, world: TinyWorld, seed: int = 0, hidden_size: int = 256,
                             num_layers: int = 4) -> Path:
    """A stand-in for a user's instruct model: a random-init Qwen2 (the default run's sizes),
    the world's tokenizer with a ChatML chat template, and a generation config whose EOS ids
    include the end-of-turn token, saved as a Hugging Face directory."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from mempo.envs.tokenizer import CHAT_MARKERS, add_chat_template

    path = Path(path)
    tokenizer = add_chat_template(world.tokenizer())
    end_of_turn = tokenizer.convert_tokens_to_ids(CHAT_MARKERS[1])
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=end_of_turn,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(eos_token_id=[end_of_turn, tokenizer.eos_token_id]).save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (env.world_seed)")
    parser.add_argument("--objectives", default="1,2", help="objective counts of the demonstrations, e.g. 1,2")
    parser.add_argument("--model-dir", help="also save a random-init small instruct model (ChatML chat template) "
                                            "here, a stand-in for your own model.path")
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
    if args.model_dir:
        save_tiny_instruct_model(args.model_dir, world, seed=args.seed)
        print(f"wrote a random-init instruct model (ChatML template) to {args.model_dir}/")


if __name__ == "__main__":
    main()
