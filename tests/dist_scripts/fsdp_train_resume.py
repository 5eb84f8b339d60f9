"""A few FSDP2 training steps of a tiny Qwen2 on random tokens, with checkpoints and resume.

Launched by tests/test_checkpoint.py, under `torchrun --nproc_per_node 2` (gloo, CPU) or as
a plain single process. Each step's global batch is drawn from the global torch RNG (same
on every rank) and sharded by rank, so a resumed run only matches an uninterrupted one if
the weights, optimizer, schedule *and* RNG state all came back. Rank 0 appends one JSON
line per step to --out: {"step", "loss", "grad_norm", "lr", "tokens", "rank0_draw",
"resumed_from"}; with --export, a last line {"probe_loss"} of the trained model.
"""
from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F

from mempo.checkpoint import export_hf, load_checkpoint, resolve_resume, save_checkpoint
from mempo.config import Config, OptimizerConfig
from mempo.distributed import (
    all_reduce_sum,
    clip_grad_norm,
    destroy_distributed,
    init_distributed,
    shard_for_rank,
    shard_model,
)
from mempo.models.builder import build_model
from mempo.optim import build_lr_scheduler, build_optimizer
from mempo.step_guard import NonFiniteStepGuard

SEQS_PER_STEP = 4


def tiny_tokenizer():
    from mempo.envs.tokenizer import train_tokenizer

    texts = ["Where was Ada born? Ada was born in Lyon.", "Lyon is in France.", "Bo works as a baker."] * 4
    return train_tokenizer(texts, vocab_size=300)


def padded_batch(seqs: list[torch.Tensor], prompt_lens: list[int]):
    """-> input_ids, attention_mask [B, T] (right padding), targets [B, T-1] (-100 = no loss)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = torch.full((len(seqs), width - 1), -100, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
        targets[i, p - 1:len(s) - 1] = s[p:]
    return ids, mask, targets


def global_loss_sum(model, seqs, prompt_lens) -> tuple[torch.Tensor, int]:
    """Sum of token NLLs of this rank's sequences (one forward: every rank makes the same
    number of FSDP forwards, as the all-gathers are collective) and its loss-token count."""
    ids, mask, targets = padded_batch(seqs, prompt_lens)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, int((targets != -100).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--export", default=None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--activation-checkpointing", action="store_true")
    args = ap.parse_args()

    info = init_distributed("cpu")
    tokenizer = tiny_tokenizer()
    cfg = Config()
    cfg.model.hidden_size, cfg.model.num_layers, cfg.model.intermediate_size = 64, 2, 128
    cfg.model.max_position = 128
    model = build_model(cfg.model, tokenizer=tokenizer, seed=args.seed)
    vocab = model.config.vocab_size
    shard_model(model, activation_checkpointing=args.activation_checkpointing)
    model.train()
    optimizer = build_optimizer(model, OptimizerConfig(lr=3e-3))
    scheduler = build_lr_scheduler(optimizer, args.steps, warmup_steps=2, scheduler="cosine", min_lr_ratio=0.1)
    guard = NonFiniteStepGuard(max_bad_steps=3)

    start, resumed_from = 0, None
    rank_generator = torch.Generator().manual_seed(1000 + info.rank)  # per-rank state (rank_state)
    checkpoint = resolve_resume(args.run_dir, "auto")
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        start, resumed_from = state.step, str(checkpoint)
        guard.load_state_dict(state.extra["guard"])
        rank_generator.set_state(state.rank_state["generator"])
        assert state.data_state == {"sequences_seen": start * SEQS_PER_STEP}, state.data_state
    else:
        random.seed(args.seed)
        torch.manual_seed(args.seed + 1)  # same on every rank: the global batch is shared

    for step in range(start + 1, args.steps + 1):
        lengths = torch.randint(6, 20, (SEQS_PER_STEP,)).tolist()
        prompt_lens = [random.randint(1, n // 2) for n in lengths]  # ragged loss masks
        seqs = [torch.randint(0, vocab, (n,)) for n in lengths]
        mine = shard_for_rank(list(range(SEQS_PER_STEP)))
        local_sum, local_tokens = global_loss_sum(model, [seqs[i] for i in mine], [prompt_lens[i] for i in mine])
        global_tokens = all_reduce_sum(local_tokens)
        (local_sum / global_tokens).backward()
        grad_norm = clip_grad_norm(model, 1.0)
        loss = all_reduce_sum(local_sum.item()) / global_tokens
        lr = scheduler.get_last_lr()[0]
        rank_draw = torch.rand((), generator=rank_generator).item()
        if guard.should_step(step, loss, grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if info.is_rank0:
            with open(args.out, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                                    "tokens": global_tokens, "rank0_draw": rank_draw,
                                    "resumed_from": resumed_from}) + "\n")
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            save_checkpoint(args.run_dir, step, model, optimizer, scheduler,
                            data_state={"sequences_seen": step * SEQS_PER_STEP},
                            extra={"guard": guard.state_dict()}, rank_state={"generator": rank_generator.get_state()},
                            config_yaml=cfg.to_yaml(), keep_last=2)

    if args.export:
        model.eval()
        gen = torch.Generator().manual_seed(7)
        probe = torch.randint(0, vocab, (2, 12), generator=gen)
        with torch.no_grad():
            probe_loss = model(input_ids=probe, labels=probe, use_cache=False).loss.item()
        export_hf(model, tokenizer, args.export)
        if info.is_rank0:
            with open(args.out, "a") as f:
                f.write(json.dumps({"probe_loss": probe_loss}) + "\n")
    destroy_distributed()


if __name__ == "__main__":
    main()
