"""Peak memory and time of one TRL GRPO loss step (policy forward + loss + backward) per loss.

    python -m mempo.integrations.trl_memory                      # CPU, ~5 min on 2 cores
    python -m mempo.integrations.trl_memory --device cuda --hidden 1024 --layers 4 --seqs 8

Rows (same model, same TRL inputs, same seed; --methods picks them):
  trl     GRPOTrainer's own loss (TRL 1.16: per-token log-probs from its chunked fused LM
          head, `add_fused_lm_head`, then the clipped loss in autograd), the default mode
  liger   liger-kernel's LigerFusedLinearGRPOLoss on the last hidden states (default compiled
          mode), called exactly as TRL <= 1.12 did with `use_liger_kernel=True` (TRL 1.13
          removed that path, so the call is reproduced here in `LigerGRPOTrainer`)
  mempo   MemPOGRPOTrainer (mempo.ops.linear_policy_loss on the last hidden states)
The inputs are what GRPOTrainer's `_prepare_inputs` hands the loss (prompts, ragged
completions, advantages, `num_items_in_batch`), built directly with random token ids so that
the vocabulary can be a real one (151936, Qwen2.5's) while the model stays small; generation
and rewards are the same for every row and are not part of the step. Each row runs in its own
subprocess: CUDA peak allocated, or on the CPU the rise of peak RSS (VmHWM, reset just before
the measured step, after a warm-up step so torch.compile's memory is not counted) over the
memory held before the step. The rise includes the parameter gradients (the same for every row).
The step time comes from another process per row (warm-up, then one timed step) with the
allocator's default settings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from trl import GRPOTrainer

from mempo.host import step_peak_bytes
from mempo.integrations.trl import MemPOGRPOTrainer, last_hidden_states

METHODS = ("trl", "liger", "mempo")


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seqs", type=int, default=4, help="completions per micro-batch (per_device_train_batch_size)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=512, help="max_completion_length (padded width)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--loss-type", default="dapo", help="GRPOConfig.loss_type (TRL's default: dapo)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--worker-time", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; expected a subset of {METHODS}")
    return args


def _trainer(args, method: str):
    """A GRPOTrainer (subclass) around a random Qwen2 of the requested size."""
    import datasets
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig

    from mempo.envs import build_tiny_world
    from mempo.envs.tokenizer import add_chat_template

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    grpo = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.seqs,
                      num_generations=args.seqs, max_completion_length=args.completion_len,
                      loss_type=args.loss_type, report_to=[], use_cpu=args.device == "cpu", bf16=False,
                      save_strategy="no", disable_tqdm=True)
    cls = {"trl": GRPOTrainer, "liger": LigerGRPOTrainer, "mempo": MemPOGRPOTrainer}[method]
    prompts = datasets.Dataset.from_dict({"prompt": ["unused"] * args.seqs})  # no generation in this step
    return cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=grpo,
               train_dataset=prompts, processing_class=add_chat_template(build_tiny_world(seed=0).tokenizer()))


class LigerGRPOTrainer(GRPOTrainer):
    """GRPOTrainer computing its loss with liger-kernel's LigerFusedLinearGRPOLoss, as TRL 1.12's
    `compute_liger_loss` did (TRL >= 1.13 no longer has that path)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        self.liger_loss = LigerFusedLinearGRPOLoss(
            beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            temperature=self.temperature, use_ref_model=self.beta != 0.0, loss_type=self.loss_type,
            max_completion_length=self.max_completion_length)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        hidden = last_hidden_states(model, input_ids, attention_mask, completion_ids.shape[1])
        loss, _ = self.liger_loss(
            _input=hidden, lin_weight=model.lm_head.weight, selected_token_ids=completion_ids,
            attention_mask=inputs["completion_mask"], advantages=inputs["advantages"],
            old_per_token_logps=inputs.get("old_per_token_logps"),
            ref_per_token_logps=inputs.get("ref_per_token_logps"),
            num_items_in_batch=inputs.get("num_items_in_batch"))
        if self.loss_type in ("cispo", "dapo", "vespo"):  # TRL 1.12's rescale after Liger's own
            return loss / (self.current_gradient_accumulation_steps / self.args.steps_per_generation)
        return loss / self.current_gradient_accumulation_steps


def _inputs(args, device):
    """What `_prepare_inputs` gives the loss for one micro-batch (num_iterations=1: no old
    log-probs; beta=0: no reference log-probs)."""
    g = torch.Generator().manual_seed(1)
    B, P, K = args.seqs, args.prompt_len, args.completion_len
    lengths = torch.randint(K // 2, K + 1, (B,), generator=g)
    lengths[0] = K
    completion_mask = (torch.arange(K) < lengths[:, None]).long()
    inputs = {
        "prompt_ids": torch.randint(0, args.vocab, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(0, args.vocab, (B, K), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def _worker(args) -> None:
    trainer = _trainer(args, args.worker)
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    inputs = _inputs(args, trainer.accelerator.device)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return float(loss)

    step()  # warm-up: torch.compile (liger), Triton JIT, allocator caches
    model.zero_grad(set_to_none=True)
    sync()
    if args.worker_time:  # its own process, with the allocator's default settings
        t0 = time.perf_counter()
        loss = step()
        sync()
        result = {"time_s": time.perf_counter() - t0, "loss": loss}
    else:
        peak = step_peak_bytes(step, cuda)
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        result = {"peak_bytes": peak, "param_grad_bytes": grads}
    with open(args.worker_out, "w") as f:
        json.dump(result, f)


def _run_worker(argv, method: str, timing: bool) -> dict | str:
    """One measurement in a fresh process: its results, or the last line of its error."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "mempo.integrations.trl_memory", *(argv if argv is not None else sys.argv[1:]),
               "--worker", method, "--worker-out", out.name, *(["--worker-time"] if timing else [])]
        # memory: big buffers mmapped and returned on free, so a freed buffer cannot hide the
        # step's peak (that costs page faults, hence the separate timing process)
        env = dict(os.environ) if timing else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            print(f"{method}: failed: {tail}\n{proc.stderr[-3000:]}")
            return tail
        with open(out.name) as f:
            return json.load(f)


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "liger-kernel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        _worker(args)
        return 0
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available")
        return 2
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    versions = _versions()
    tokens = args.seqs * args.completion_len
    print(f"device: {device} | torch threads {torch.get_num_threads()} (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}) | " + " ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"Qwen2 hidden={args.hidden} layers={args.layers} vocab={args.vocab} float32 | {args.seqs} completions x "
          f"{args.completion_len} tokens (+{args.prompt_len} prompt), ragged: "
          f"{int(_inputs(args, 'cpu')['completion_mask'].sum())} loss tokens | loss_type={args.loss_type} | "
          f"one step after one warm-up")
    rows, failed = [], []
    for method in args.methods.split(","):
        row = {"method": method}
        for timing in (False, True):
            result = _run_worker(argv, method, timing)
            if isinstance(result, str):
                failed.append({"method": method, "reason": result[:300]})
                break
            row.update(result)
        else:
            rows.append(row)
    logits_mib = tokens * args.vocab * 4 / 2**20
    print(f"(for scale: one float32 [tokens, vocab] logits tensor is {logits_mib:.0f} MiB)")
    print(f"{'loss':<8}{'peak MiB':>10}{'vs trl':>8}{'step s':>9}{'loss value':>14}")
    trl = next((r for r in rows if r["method"] == "trl"), None)
    for r in rows:
        ratio = f"{r['peak_bytes'] / trl['peak_bytes']:.2f}" if trl else "-"
        print(f"{r['method']:<8}{r['peak_bytes'] / 2**20:>10.0f}{ratio:>8}{r['time_s']:>9.2f}{r['loss']:>14.6g}")
    if rows:
        print(f"peak: rise during compute_loss + backward, incl. {rows[0]['param_grad_bytes'] / 2**20:.0f} MiB "
              f"of parameter gradients")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "versions": versions, "threads": torch.get_num_threads(),
                       "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
                       "rows": rows, "failed": failed}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
