"""Forward+backward time and peak extra memory of the LM-head policy loss, side by side.

    python benchmarks/loss.py                       # CPU default shape, ~2 min (liger compiles ~30 s)
    python benchmarks/loss.py --device cuda --n 16384 --hidden 4096 --vocab 151936 --dtype bf16

Rows (same inputs, same seed, one run; --methods picks them):
  naive        what a user writes: full logits -> log_softmax (float32) -> gather -> clipped
               loss (GRPO's seq-mean-token-mean); entropy only with --entropy, as a metric
  naive-ref    mempo.reference.linear_policy_loss_reference: the same plus an always computed
               entropy and a /T copy of the logits (the test reference, not a fair baseline)
  liger        liger-kernel's LigerFusedLinearGRPOLoss in its default mode (compiled=True)
  liger-eager  the same with compiled=False
  mempo/<be>   mempo.ops.linear_policy_loss with each available epilogue backend
"vs naive" compares with the lean naive row. Each row runs in its own subprocess so its peak
memory is its own: CUDA peak allocated, or on the CPU the rise of peak RSS (VmHWM, reset
just before the measured step, after the warm-up so torch.compile's own memory is not counted)
over the inputs. Extra memory excludes the inputs and the returned gradients (they exist
whatever the method). TFLOP/s counts 6*N*H*V for every row, also when --mask-frac < 1 lets a
method skip rows without loss. liger-kernel computes no entropy: with --entropy its rows are
marked "(no entropy)".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from mempo.host import describe_device, step_peak_bytes

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
METHODS = ("naive", "naive-ref", "liger", "liger-eager", "mempo")
CLIP = 0.2  # PPO clip range of every row (the ops' and liger's default)


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, default=2048, help="tokens (rows)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seqs", type=int, default=8, help="sequences the tokens are split into")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--mask-frac", type=float, default=1.0,
                   help="fraction of tokens with loss (loss_mask = 1); agent rollouts: often ~0.3")
    p.add_argument("--entropy", action="store_true",
                   help="every method also computes the per-token entropy (a metric, no gradient)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the measured ones (>= 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="naive,naive-ref,liger,liger-eager,mempo",
                   help=f"comma list of {', '.join(METHODS)}; mempo expands to its backends")
    p.add_argument("--weight-grad", default="fp32", choices=["fp32", "native"],
                   help="mempo's dW accumulation over chunks: float32 buffer, or the weight dtype")
    p.add_argument("--json", default=None, help="also write the numbers to this path (rewritten after each row)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.warmup < 1:
        p.error(f"--warmup must be >= 1 (liger's compiled mode compiles on its first call), got {args.warmup}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if not 0.0 < args.mask_frac <= 1.0:
        p.error(f"--mask-frac must be in (0, 1], got {args.mask_frac}")
    for m in args.methods.split(","):
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; expected a comma list of {', '.join(METHODS)}")
    return args


def naive_policy_loss(hidden, weight, targets, old, adv, mask, seq_index, num_seqs: int,
                      with_entropy: bool = False):
    """The baseline a user writes: full logits, log_softmax, gather, clipped loss.

    hidden [N, H], weight [V, H]; targets, old, adv, mask, seq_index [N]. log_softmax runs in
    float32 (float64 for float64 inputs): log-probs of bf16 logits are too coarse for PPO
    ratios. The loss is GRPO's seq-mean-token-mean, like every other row. Returns (loss,
    entropy [N] or None); the entropy is a detached metric, as in mempo and verl.
    """
    import torch

    stat = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp_all = torch.log_softmax(hidden @ weight.T, dim=-1, dtype=stat)  # [N, V], kept for backward
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp((logp - old).clamp(-20.0, 20.0))  # the ops' guard against overflow
    loss_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - CLIP, 1.0 + CLIP))
    m = mask.to(stat)
    seq_sum = torch.zeros(num_seqs, dtype=stat, device=hidden.device).index_add_(0, seq_index, loss_tok * m)
    seq_tokens = torch.zeros(num_seqs, dtype=stat, device=hidden.device).index_add_(0, seq_index, m)
    seqs_with_loss = (seq_tokens > 0).sum().clamp(min=1)
    return (seq_sum / seq_tokens.clamp(min=1)).sum() / seqs_with_loss, entropy


def _inputs(args, torch):
    """Inputs generated on the benchmark's device (a CUDA headline shape would take minutes
    on the host). Old log-probs are the current ones + noise, so some tokens clip."""
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    dtype = getattr(torch, DTYPES[args.dtype])
    n, h, v = args.n, args.hidden, args.vocab
    hidden = (torch.randn(n, h, generator=g, device=dev) * 0.5).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=dev) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device=dev)
    seq_len = -(-n // args.seqs)
    seq_index = torch.arange(n, device=dev) // seq_len
    adv_seq = torch.randn(args.seqs, generator=g, device=dev)
    mask = torch.rand(n, generator=g, device=dev) < args.mask_frac
    with torch.no_grad():
        old = torch.empty(n, device=dev)
        w32 = weight.float()
        rows = 1024 if dev.type == "cuda" else 256
        for s in range(0, n, rows):  # without an N x V buffer
            z = hidden[s:s + rows].float() @ w32.T
            old[s:s + rows] = z.log_softmax(-1).gather(1, targets[s:s + rows, None]).squeeze(1)
        del w32, z
        old += 0.1 * torch.randn(n, generator=g, device=dev)
    return dict(hidden=hidden, weight=weight, targets=targets, seq_index=seq_index,
                adv=adv_seq[seq_index], adv_seq=adv_seq, mask=mask, old=old)


def _make_step(method: str, x: dict, args, torch):
    """A closure running one forward+backward of `method`, grads into .grad."""
    hidden = x["hidden"].requires_grad_()
    weight = x["weight"].requires_grad_()
    if method == "naive":
        def step():
            loss, _ = naive_policy_loss(hidden, weight, x["targets"], x["old"], x["adv"], x["mask"],
                                        x["seq_index"], args.seqs, with_entropy=args.entropy)
            loss.backward()
        return step
    if method == "naive-ref":
        from mempo.reference.logprobs import linear_policy_loss_reference

        return lambda: linear_policy_loss_reference(
            hidden, weight, x["targets"], x["old"], x["adv"], x["mask"], x["seq_index"]).backward()
    if method in ("liger", "liger-eager"):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        n, b = args.n, args.seqs
        # chunk_size=1: one sequence per chunk, liger's default
        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo",
                                           compiled=method == "liger", chunk_size=1,
                                           epsilon_low=CLIP, epsilon_high=CLIP)
        shape = lambda t: t.reshape(b, n // b, *t.shape[1:])  # noqa: E731

        def step():
            out = loss_fn(shape(hidden), weight, shape(x["targets"]), shape(x["mask"]).long(), x["adv_seq"],
                          old_per_token_logps=shape(x["old"]))
            (out[0] if isinstance(out, tuple) else out).backward()
        return step
    backend = method.split("/", 1)[1]
    from mempo.ops import linear_policy_loss

    def step():
        loss, _ = linear_policy_loss(hidden, weight, x["targets"], x["old"], x["adv"], x["mask"],
                                     seq_index=x["seq_index"], backend=backend, compute_entropy=args.entropy,
                                     weight_grad_fp32=args.weight_grad == "fp32")
        loss.backward()
    return step


def _worker(args) -> None:
    import torch

    x = _inputs(args, torch)
    step = _make_step(args.worker, x, args, torch)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    grads_bytes = sum(t.numel() * t.element_size() for t in (x["hidden"], x["weight"]))

    def clear_grads():
        x["hidden"].grad = x["weight"].grad = None

    for _ in range(args.warmup):  # first: liger compiled's torch.compile, Triton's JIT
        clear_grads()
        step()
    clear_grads()
    sync()
    peak = step_peak_bytes(step, cuda)  # the peak-memory measurement
    extra = max(0, peak - grads_bytes)
    times = []
    for _ in range(args.repeats):
        clear_grads()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    with open(args.worker_out, "w") as f:
        json.dump({"time_s": statistics.median(times), "times_s": times, "extra_bytes": extra}, f)


def _liger_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # noqa: BLE001 - not installed
        return None


def _methods(args) -> tuple[list[str], list[dict]]:
    """-> (methods to run, skipped rows with the reason)."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    out, skipped = [], []
    for m in dict.fromkeys(args.methods.split(",")):
        if m == "mempo":
            from mempo.ops.epilogue import available_backends

            out += [f"mempo/{b}" for b in available_backends(torch.device(args.device))
                    if b != "triton" or args.device == "cuda"]  # CPU triton = the interpreter
        elif m.startswith("liger"):
            if _liger_version() is None:
                skipped.append({"method": m, "reason": "liger-kernel not installed (pip install liger-kernel)"})
            elif args.n % args.seqs:
                skipped.append({"method": m, "reason": f"liger needs --n ({args.n}) divisible by --seqs ({args.seqs})"})
            else:
                out.append(m)
        else:
            out.append(m)
    return out, skipped


def label(method: str, entropy: bool = False) -> str:
    """The row's description in tables (RESULTS.md)."""
    if method == "naive":
        return "naive (full logits, log_softmax, gather, clipped loss)"
    if method == "naive-ref":
        return "mempo.reference (naive + entropy + /T copy)"
    if method.startswith("liger"):
        mode = "compiled=True, default" if method == "liger" else "compiled=False"
        return f"liger-kernel {_liger_version()} `LigerFusedLinearGRPOLoss` ({mode})" + (
            " (no entropy)" if entropy else "")
    return f"mempo `linear_policy_loss`, {method.split('/', 1)[1]} backend"


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        _worker(args)
        return 0
    import torch

    device_name = describe_device(args.device)
    threads = f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    flops = 6.0 * args.n * args.hidden * args.vocab
    print(f"device: {device_name} | torch {torch.__version__} | {threads}")
    print(f"N={args.n} H={args.hidden} V={args.vocab} seqs={args.seqs} dtype={args.dtype} mask_frac={args.mask_frac} "
          f"entropy={'on' if args.entropy else 'off'} dW accum={args.weight_grad} | median of {args.repeats} "
          f"after {args.warmup} warm-up + 1 memory step")
    methods, skipped = _methods(args)
    for s in skipped:
        print(f"{s['method']}: skipped: {s['reason']}")
    rows, failed = [], []
    report = {"device": device_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "liger": _liger_version(),
              "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
              "flops": flops, "rows": rows, "skipped": skipped, "failed": failed}
    for method in methods:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                   "--worker", method, "--worker-out", out.name]
            # Fixed mmap threshold: big buffers are mmapped and returned on free, so a buffer
            # freed before the step cannot hide the step's own allocations from peak RSS.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
                print(f"{method}: failed: {tail[0]}\n{proc.stderr[-2000:]}")
                failed.append({"method": method, "reason": tail[0][:300]})
            else:
                with open(out.name) as f:
                    r = {"method": method, "label": label(method, args.entropy), **json.load(f)}
                r["tflops"] = flops / r["time_s"] / 1e12
                rows.append(r)
        if args.json:  # after every row: a later timeout keeps what was measured
            _write_json(args.json, report)
    naive = next((r for r in rows if r["method"] == "naive"), None)
    for r in rows:
        r["speed_vs_naive"] = naive["time_s"] / r["time_s"] if naive else None
        r["memory_vs_naive"] = r["extra_bytes"] / max(naive["extra_bytes"], 1) if naive else None
    print(f"{'method':<14}{'fwd+bwd ms':>12}{'vs naive':>10}{'extra MiB':>11}{'vs naive':>10}{'TFLOP/s':>10}")
    for r in rows:
        speed = f"{r['speed_vs_naive']:.2f}x" if naive else "-"
        mem = f"{r['memory_vs_naive']:.2f}" if naive else "-"
        print(f"{r['method']:<14}{r['time_s'] * 1e3:>12.1f}{speed:>10}{r['extra_bytes'] / 2**20:>11.1f}"
              f"{mem:>10}{r['tflops']:>10.3f}")
    print("vs naive: time naive / time (> 1: faster), extra memory / naive's (< 1: less)")
    if args.json:
        _write_json(args.json, report)
    return 1 if failed else 0


def _write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
