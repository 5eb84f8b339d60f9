"""One command for one GPU (H100/H200): validate the CUDA paths and measure every benchmark.

    python benchmarks/gpu_check.py --out OUT --wheels wheels/   # on the GPU machine, < 8 min
    python benchmarks/gpu_check.py --dry-run                    # the plan (any machine, no GPU)
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke     # the same pipeline at tiny CPU shapes

Steps, each a process of its own with its own timeout; a step that fails or times out is
recorded and the next one runs (`--steps` picks a subset):
  environment  device, driver, CUDA, torch / triton / transformers versions, date
  wheels       pip-installs, offline from --wheels DIR, what the image lacks (pytest,
               liger-kernel, bm25s; flash-attn and ninja if a wheel is there); a step needing a
               package that is still missing is skipped with the reason
  install      `pip install --no-build-isolation --no-deps -e .` without the extension
               (seconds), unless mempo is importable from this checkout already
  build-ext    mempo._C with its CUDA kernel (`setup.py build_ext --inplace`), in the
               background: the steps marked "waits" wait for it, the others overlap it
  loss         benchmarks/loss.py at the headline shape: lean naive, mempo.reference,
               liger (compiled, its default) and liger eager, mempo triton / torch
  attention    benchmarks/attention.py at the 16k-token headline layout
  pytest-gpu   every `gpu`-marked test (logit epilogue at N=16k, H=4096, V=151936; KV
               eviction kernel; segment attention kernel)
  kv-evict     benchmarks/kv_evict.py (28 layers, 16 x 8k tokens, bf16)
  rollout      benchmarks/rollout.py on a Qwen2-0.5B-shaped random model: native engine, and
               vLLM beside it where vllm is importable (not on the current image)
  rollout-decode  the same with sampled turns (every token a decode step)
  loss-agent   benchmarks/loss.py with an agent-like loss mask (--mask-frac 0.3)
Writes OUT/gpu_check.json (every step: command, status, seconds, output tail, the benchmark's
own JSON), OUT/gpu_check.md (a block for benchmarks/RESULTS.md) and OUT/logs/<step>.log.
The whole run stops within --budget-s: each step's timeout is cut to what is left of it.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# The image's python may be marked externally managed (PEP 668); this machine is disposable.
PIP_ENV = {"PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

# Headline shapes (README, RESULTS.md).
LOSS_SHAPE = ["--n", "16384", "--hidden", "4096", "--vocab", "151936", "--dtype", "bf16"]
LOSS_METHODS = "naive,naive-ref,liger,liger-eager,mempo"

# (module, pip name, what needs it). Installed from --wheels when missing.
PACKAGES = [
    ("pytest", "pytest", "pytest-gpu"),
    ("liger_kernel", "liger-kernel", "the liger rows of loss and loss-agent"),
    ("bm25s", "bm25s", "rollout (the tiny world's search tool)"),
    ("flash_attn", "flash-attn", "attention's causal varlen row (optional: SDPA per sequence without it)"),
    ("ninja", "ninja", "build-ext in parallel (optional: torch compiles the sources one by one without it)"),
]


@dataclass
class Step:
    name: str
    what: str  # one line: what it checks or measures
    cmd: list[str]
    timeout_s: int
    json_out: str | None = None  # the benchmark's own JSON, read back into the report
    needs: tuple[str, ...] = ()  # modules without which the step is skipped
    expect_s: int = 0  # rough guess for one H100 (not measured: no GPU was lent when this was written)
    waits_for_build: bool = False
    background: bool = False
    env: dict = field(default_factory=dict)
    skip_reason: str | None = None  # decided when the plan is made


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"),
                   help="folder for gpu_check.json, gpu_check.md, logs/ and each benchmark's JSON")
    p.add_argument("--wheels", default=None, help="folder of wheels to pip-install offline what the image lacks")
    p.add_argument("--steps", default=None, help="comma list of step names (default: all)")
    p.add_argument("--budget-s", type=float, default=465.0,
                   help="wall-clock budget of the whole run; steps are cut or skipped to stay within it")
    p.add_argument("--dry-run", action="store_true", help="print the plan (commands, shapes, timeouts), run nothing")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU: checks the pipeline (commands, JSON, markdown), measures nothing")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.wheels is not None and not os.path.isdir(args.wheels):
        p.error(f"--wheels {args.wheels!r} is not a folder")
    args.out = os.path.abspath(args.out)
    return args


def plan(args) -> list[Step]:
    """The steps, in run order, with commands for the GPU (or tiny CPU shapes with --smoke)."""
    out = lambda name: os.path.join(args.out, name)  # noqa: E731
    bench = lambda name: os.path.join("benchmarks", name)  # noqa: E731
    smoke = args.smoke
    if smoke:
        loss_args = ["--device", "cpu", "--n", "128", "--hidden", "32", "--vocab", "256", "--repeats", "1"]
        loss_methods = "naive,naive-ref,liger-eager,mempo"
        attention = ["--device", "cpu", "--tokens", "700", "--trajectory-tokens", "700", "--heads", "2",
                     "--dim", "16", "--repeats", "1", "--skip-flex"]
        kv = ["--device", "cpu", "--layers", "1", "--tokens", "128", "--batch", "2", "--repeats", "2"]
        rollout = ["--device", "cpu", "--tasks", "1", "--objectives", "1", "--concurrency-tasks", "0"]
        pytest_files = ["tests/test_chunk_epilogue_kernel.py", "tests/test_kv_evict_cuda.py",
                        "tests/test_paged_attention.py"]
    else:
        loss_args = ["--device", "cuda", *LOSS_SHAPE, "--repeats", "5"]
        loss_methods = LOSS_METHODS
        attention = ["--device", "cuda"]  # defaults: 16384 tokens in 4k-token trajectories, 32 heads, dim 128, bf16
        kv = ["--device", "cuda"]  # defaults: 28 layers, 4 KV heads, dim 128, 16 x 8192 tokens, bf16
        # 4 objectives: ~550-token trajectories, one decode step per token; the CPU table's 10
        # objectives would take ~2.5x longer for the same tokens/s
        rollout = ["--device", "cuda", "--model-shape", "qwen2-0.5b", "--dtype", "bf16", "--tasks", "16",
                   "--objectives", "4", "--concurrency-tasks", "0"]
        pytest_files = ["tests"]
    steps = [
        Step("environment", "device, driver, CUDA, versions, date", [PY, "-c", _ENV_PROBE], 60,
             json_out=out("environment.json"), expect_s=10),
        Step("wheels", "offline pip install of missing packages from --wheels", [], 120, expect_s=15),
        Step("install", "mempo importable from this checkout (editable install, no extension)",
             [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."], 120,
             env={"MEMPO_BUILD_EXT": "0", **PIP_ENV}, expect_s=15),
        Step("build-ext", "mempo._C with the CUDA eviction kernel (csrc/cuda)",
             [PY, "setup.py", "build_ext", "--inplace"], 300, background=True,
             env={"MAX_JOBS": str(os.cpu_count() or 4)}, expect_s=90),
        Step("loss", "LM-head policy loss fwd+bwd: time, extra memory, TFLOP/s",
             [PY, bench("loss.py"), *loss_args, "--methods", loss_methods, "--json", out("loss.json")], 240,
             json_out=out("loss.json"), expect_s=100),
        Step("attention", "segment attention vs FlexAttention vs causal varlen vs dense SDPA"
             + ("" if smoke else " (16k tokens in 4k-token trajectories, 32 heads, dim 128, bf16)"),
             [PY, bench("attention.py"), *attention, "--json", out("attention.json")], 180,
             json_out=out("attention.json"), expect_s=70),
        Step("pytest-gpu", "the gpu-marked tests",
             [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--continue-on-collection-errors",
              "--junitxml", out("pytest_gpu.xml"), *pytest_files], 240,
             json_out=out("pytest_gpu.xml"), needs=("pytest",), waits_for_build=True, expect_s=80),
        Step("kv-evict", "KV-cache eviction kernel vs gather+copy, GB/s"
             + ("" if smoke else " (28 layers x K/V, 16 x 8192 tokens, 4 KV heads, dim 128, bf16: 7.5 GB)"),
             [PY, bench("kv_evict.py"), *kv, "--json", out("kv_evict.json")], 90,
             json_out=out("kv_evict.json"), waits_for_build=True, expect_s=15),
        Step("rollout", "rollout: TT, PT, tokens/s (MemPO vs keep-everything), native engine and vLLM where "
             "vllm is importable (the image has none: then native rows only)"
             + ("" if smoke else ", Qwen2-0.5B-shaped random model, bf16, 16 tasks x 4 objectives"),
             [PY, bench("rollout.py"), *rollout, "--json", out("rollout.json")], 150,
             json_out=out("rollout.json"), needs=("bm25s",), waits_for_build=True, expect_s=50),
        Step("rollout-decode", "rollout with sampled turns: every token a decode step through the paged "
             "KV cache (Triton paged-attention kernel), same engines and model",
             [PY, bench("rollout.py"), *rollout, "--sample", "--json", out("rollout_decode.json")], 150,
             json_out=out("rollout_decode.json"), needs=("bm25s",), waits_for_build=True, expect_s=40),
        Step("loss-agent", "the loss with 30% of the tokens carrying loss (agent rollouts)",
             [PY, bench("loss.py"), *loss_args, "--mask-frac", "0.3",
              "--methods", "naive,liger,mempo" if not smoke else "naive,mempo", "--json", out("loss_agent.json")],
             150, json_out=out("loss_agent.json"), expect_s=50),
    ]
    if smoke:
        for s in steps:
            if s.name == "install":
                s.skip_reason = "smoke: uses the mempo this interpreter imports"
            if s.name == "build-ext":
                s.skip_reason = "smoke: no CUDA build on the CPU"
    if args.steps:
        names = [s.name for s in steps]
        wanted = args.steps.split(",")
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise SystemExit(f"--steps: unknown step(s) {unknown}; expected names from {names}")
        steps = [s for s in steps if s.name in wanted]
    return steps


# Printed as JSON by the environment step (a separate process: a broken CUDA setup fails there).
_ENV_PROBE = r"""
import datetime, json, os, platform, shutil, subprocess, sys
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "host": platform.node(), "cpu_count": os.cpu_count()}
import torch
info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
            torch_threads=torch.get_num_threads())
from importlib.metadata import PackageNotFoundError, version
for key, dist in (("triton", "triton"), ("transformers", "transformers"), ("liger_kernel", "liger-kernel"),
                  ("flash_attn", "flash-attn"), ("bm25s", "bm25s"), ("pytest", "pytest")):
    try:
        info[key] = version(dist)
    except PackageNotFoundError:
        info[key] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                device_count=torch.cuda.device_count())
else:
    from mempo.host import cpu_description
    info["device"] = f"CPU ({cpu_description()})"
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                       capture_output=True, text=True)
    if q.returncode == 0 and q.stdout.strip():
        driver, clock, power = [x.strip() for x in q.stdout.splitlines()[0].split(",")]
        info.update(driver=driver, max_sm_clock=clock, power_limit=power)
if shutil.which("nvcc"):
    v = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    info["nvcc"] = v[-1] if v else None
print(json.dumps(info))
"""


class Runner:
    """Runs steps one after another within a wall-clock budget, recording each outcome."""

    def __init__(self, out_dir: str, budget_s: float, reserve_s: float = 5.0):
        self.out_dir = out_dir
        self.start = time.monotonic()
        self.deadline = self.start + budget_s - reserve_s  # time kept for writing the report
        self.results: list[dict] = []
        self.background: dict[str, tuple[subprocess.Popen, float, dict, object]] = {}
        os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _record(self, step: Step, status: str, seconds: float = 0.0, rc: int | None = None,
                reason: str | None = None, output: str = "") -> dict:
        r = {"name": step.name, "what": step.what, "cmd": " ".join(step.cmd), "status": status,
             "seconds": round(seconds, 1), "rc": rc, "reason": reason, "output_tail": output[-3000:],
             "result": None}
        if status in ("ok", "failed", "timeout") and step.json_out and os.path.exists(step.json_out):
            r["result"] = _read_result(step.json_out)
        self.results.append(r)
        tag = status.upper() if status != "ok" else "ok"
        print(f"[{time.monotonic() - self.start:6.1f} s] {step.name}: {tag} ({r['seconds']} s)"
              + (f": {reason}" if reason else ""), flush=True)
        return r

    def _popen(self, step: Step):
        log = open(os.path.join(self.out_dir, "logs", f"{step.name}.log"), "w")
        log.write("$ " + " ".join(step.cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env={**os.environ, **step.env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # own group: killable whole
        return proc, log

    def run(self, step: Step) -> dict | None:
        if step.skip_reason:
            return self._record(step, "skipped", reason=step.skip_reason)
        missing = [m for m in step.needs if importlib.util.find_spec(m) is None]
        if missing:
            return self._record(step, "skipped", reason=f"missing {', '.join(missing)} (put its wheel in --wheels DIR)")
        if step.waits_for_build:
            self.join_background()
        if self.left() < min(5.0, step.timeout_s):
            return self._record(step, "skipped", reason=f"time budget spent ({max(0.0, self.left()):.0f} s left)")
        timeout = min(step.timeout_s, self.left())
        print(f"[{time.monotonic() - self.start:6.1f} s] {step.name}: {' '.join(step.cmd)[:200]} "
              f"(timeout {timeout:.0f} s)", flush=True)
        if step.json_out and os.path.exists(step.json_out):
            os.remove(step.json_out)  # a result from an earlier run must not pass for this one
        proc, log = self._popen(step)
        t0 = time.monotonic()
        if step.background:
            self.background[step.name] = (proc, t0, {"timeout": timeout}, (step, log))
            return None
        return self._wait(step, proc, log, t0, timeout)

    def _wait(self, step: Step, proc, log, t0: float, timeout: float) -> dict:
        try:
            rc = proc.wait(timeout=max(0.0, t0 + timeout - time.monotonic()))
            status, reason = ("ok", None) if rc == 0 else ("failed", f"exit code {rc}")
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status, reason = None, "timeout", f"stopped after {timeout:.0f} s"
        log.close()
        with open(log.name) as f:
            output = f.read()
        if status == "failed":
            last = [ln for ln in output.strip().splitlines() if ln.strip()][-1:]
            reason = f"exit code {rc}: {last[0][:300]}" if last else reason
        return self._record(step, status, time.monotonic() - t0, rc, reason, output)

    def join_background(self) -> None:
        for name in list(self.background):
            proc, t0, opts, (step, log) = self.background.pop(name)
            if proc.poll() is None:
                print(f"[{time.monotonic() - self.start:6.1f} s] waiting for {name}", flush=True)
            timeout = min(opts["timeout"], max(0.0, self.left() + (time.monotonic() - t0)))
            self._wait(step, proc, log, t0, timeout)

    def install_wheels(self, step: Step, wheels: str | None) -> dict:
        """pip install --no-index --find-links wheels, one missing package at a time."""
        t0, notes, failed, output = time.monotonic(), [], [], ""
        for module, dist, why in PACKAGES:
            if importlib.util.find_spec(module) is not None:
                continue
            if not wheels:
                notes.append(f"{dist} missing (no --wheels): {why}")
                continue
            norm = dist.replace("-", "_").lower()  # wheel file names spell the name with "_"
            if not any(f.endswith(".whl") and f.split("-")[0].lower() == norm for f in os.listdir(wheels)):
                notes.append(f"{dist} missing, no wheel in {wheels}: {why}")
                continue
            timeout = min(60.0, self.left(), step.timeout_s - (time.monotonic() - t0))
            if timeout < 1:
                failed.append(dist)
                notes.append(f"{dist}: not installed, the wheels step ran out of time: {why}")
                continue
            cmd = [PY, "-m", "pip", "install", "--no-index", "--find-links", wheels, dist]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                      env={**os.environ, **PIP_ENV})
                output += f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
                ok = proc.returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            importlib.invalidate_caches()
            if ok and importlib.util.find_spec(module) is not None:
                notes.append(f"{dist} installed from {wheels}")
            else:
                failed.append(dist)
                notes.append(f"{dist}: pip install from {wheels} failed: {why}")
        with open(os.path.join(self.out_dir, "logs", "wheels.log"), "w") as f:
            f.write(output)
        step.cmd = [f"pip install --no-index --find-links {wheels or '-'} <missing>"]
        return self._record(step, "failed" if failed else "ok", time.monotonic() - t0,
                            reason="; ".join(notes) or "nothing missing", output=output)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group (its workers too), SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_result(path: str):
    """A benchmark's JSON, or a pytest junit XML as counts and failing test ids."""
    try:
        if path.endswith(".xml"):
            return _junit_summary(path)
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, ET.ParseError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}"}


def _junit_summary(path: str) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    bad, skips = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                bad.append({"test": name, "kind": kind, "message": (el.get("message") or "")[:300]})
        el = case.find("skipped")
        if el is not None:
            msg = (el.get("message") or "")[:120]
            skips[msg] = skips.get(msg, 0) + 1
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {**total, "not_passed": bad, "skip_reasons": skips}


# ---- markdown -------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[str]], right_from: int = 1, right_to: int | None = None) -> list[str]:
    """Markdown table; columns right_from..right_to-1 (numbers) right-aligned."""
    right_to = len(header) if right_to is None else right_to
    align = ["---:" if right_from <= i < right_to else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _f(x, fmt: str) -> str:
    return "n/a" if x is None or x != x else format(x, fmt)  # x != x: NaN


def _md_loss(res: dict) -> list[str]:
    a = res["args"]
    lines = [f"N={a['n']}, H={a['hidden']}, V={a['vocab']}, {a['seqs']} sequences, {a['dtype']}, "
             f"mask_frac={a['mask_frac']}, entropy {'on' if a.get('entropy') else 'off'}, "
             f"median of {a['repeats']} after {a['warmup']} warm-up + 1 memory step; each method in its own "
             "process", ""]
    rows = [[r.get("label", r["method"]), _f(r["time_s"] * 1e3, ".1f"), _f(r.get("speed_vs_naive"), ".2f") + "x",
             _f(r["extra_bytes"] / 2**20, ".1f"), _f(r.get("memory_vs_naive"), ".2f"),
             _f(r.get("tflops"), ".1f" if (r.get("tflops") or 0) >= 10 else ".3f")]
            for r in res["rows"]]
    lines += _table(["method", "fwd+bwd ms", "vs naive", "extra MiB", "vs naive", "TFLOP/s (6NHV)"], rows)
    lines += [f"- {s['method']}: skipped: {s['reason']}" for s in res.get("skipped", [])]
    lines += [f"- {s['method']}: failed: {s['reason']}" for s in res.get("failed", [])]
    return lines


def _md_attention(res: dict) -> list[str]:
    lines = [f"{res['tokens']} packed tokens in {res['trajectories']} MemPO-like trajectories, heads "
             f"{res['heads']}/{res['kv_heads']}, dim {res['dim']}, {res['dtype']}; mask density {res['density']:.3f} "
             f"(tiles {res['tile_density']:.3f}); layout build {res['layout_build_ms']:.2f} ms, tile tables "
             f"{res['block_table_ms']:.2f} ms", ""]
    rows = [[r["method"], _f(r["pairs"] / 1e6, ".1f"), _f(r.get("pairs_ratio"), ".2f"), _f(r["mask_build_ms"], ".1f"),
             _f(r["fwd_ms"], ".2f"), _f(r["fwd_bwd_ms"], ".2f"), _f(r.get("fwd_ratio"), ".2f") + "x",
             _f(r.get("fwd_bwd_ratio"), ".2f") + "x"] for r in res["rows"]]
    lines += _table(["method", "(q,k) pairs M", "pairs vs mempo", "mask build ms", "fwd ms", "fwd+bwd ms",
                     "fwd vs mempo", "fwd+bwd vs mempo"], rows)
    lines += ["", "(x > 1: slower than mempo; causal varlen is plain per-sequence causal attention, not MemPO's mask; "
              "dense SDPA evaluates all L^2 pairs)"]
    lines += [f"- {s['method']}: failed: {s['reason']}" for s in res.get("failed", [])]
    return lines


def _md_kv(res: dict) -> list[str]:
    p, b, h, t, d = res["shape"]
    lines = [f"cache [planes={p}, B={b}, H_kv={h}, T={t}, D={d}] {res['dtype']} = {res.get('cache_gib', 0):.2f} GiB; "
             "keep 1/2 of each sequence, 7/16 of the tokens move", ""]
    base = res["results"][-1]["time_s"]
    rows = [[r["method"], _f(r["time_s"] * 1e3, ".2f"), _f(base / r["time_s"], ".2f") + "x", _f(r["gb_per_s"], ".0f"),
             "n/a" if r.get("peak_fraction") is None else f"{100 * r['peak_fraction']:.0f}%"]
            for r in res["results"]]
    return lines + _table(["method", "ms", "vs torch", "GB/s", f"of {res.get('peak_gbs', 0):.0f} GB/s"], rows)


def _md_rollout(res: dict) -> list[str]:
    a = res["args"]
    engines = sorted({r["engine"] for r in res["rows"]})
    lines = [f"{a['tasks']} tasks x {a['objectives']} objectives, "
             f"{'sampled turns' if a.get('sample') else 'expert turns forced'}, model "
             f"{a.get('model') or a.get('model_shape')} ({a.get('dtype') or 'default dtype'}), "
             f"engines: {', '.join(engines)}", ""]
    base = next((r for r in res["rows"] if r["policy"] == "keep_all"), None)
    rows = [[r["engine"], r["policy"], _f(r["TT"], ".0f"), _f(r["PT"], ".0f"),
             (f"{r['PT'] / base['PT'] - 1:+.0%}" if base else "n/a"), _f(r["wall_s"], ".2f"),
             _f(r["tokens_per_s"], ".0f"), _f(r["traj_tokens_per_s"], ".0f")] for r in res["rows"]]
    return lines + _table(["engine", "policy", "TT", "PT", "PT vs keep_all", "wall s", "tok/s (TT/wall)",
                           "trajectory tok/s"], rows, right_from=2)


def _md_pytest(res: dict) -> list[str]:
    lines = [f"{res['passed']} passed, {res['failures']} failed, {res['errors']} errors, {res['skipped']} skipped "
             f"in {res['time_s']} s"]
    lines += [f"- {b['kind']}: `{b['test']}`: {b['message']}" for b in res["not_passed"]]
    lines += [f"- skipped x{n}: {msg}" for msg, n in res["skip_reasons"].items()]
    return lines


RENDER = {"loss": _md_loss, "loss-agent": _md_loss, "attention": _md_attention, "kv-evict": _md_kv,
          "rollout": _md_rollout, "rollout-decode": _md_rollout, "pytest-gpu": _md_pytest}


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    date = (env.get("date") or report["started"])[:10]
    dev = env.get("device", "unknown device")
    extras = ", ".join(f.format(env[k]) for k, f in (("driver", "driver {}"), ("torch_cuda", "CUDA {}"),
                                                      ("memory_gib", "{} GiB")) if env.get(k))
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers", "liger_kernel") if env.get(k))
    smoke = "; --smoke: tiny CPU shapes, not a measurement" if report["smoke"] else ""
    lines = [f"### {date} · {dev}" + (f" ({extras})" if extras else "") + f" · {versions}", "",
             f"`{report['command']}` ({report['seconds']:.0f} s in all{smoke})", ""]
    lines += _table(["step", "status", "s", "note"],
                    [[r["name"], r["status"], _f(r["seconds"], ".0f"), (r["reason"] or "").replace("|", "/")[:200]]
                     for r in report["steps"]], right_from=2, right_to=3)
    for r in report["steps"]:
        render = RENDER.get(r["name"])
        res = r.get("result")
        if render is None or not res or "unreadable" in res:
            continue
        lines += ["", f"#### {r['name']}: `{r['cmd'].replace(PY, 'python')}`", ""]
        try:
            lines += render(res)
        except (KeyError, TypeError, ZeroDivisionError) as e:  # a partial JSON (step cut short)
            lines.append(f"(result not renderable: {type(e).__name__}: {e})")
    return "\n".join(lines) + "\n"


def print_plan(steps: list[Step], args) -> None:
    print(f"gpu_check plan ({'smoke: tiny CPU shapes' if args.smoke else 'one CUDA GPU'}); budget "
          f"{args.budget_s:.0f} s for the whole run, each step cut to what is left; output in {args.out}")
    total = 0
    for i, s in enumerate(steps, 1):
        flags = [f"timeout {s.timeout_s} s"] + ([f"guess ~{s.expect_s} s"] if s.expect_s and not args.smoke else [])
        if s.background:
            flags.append("background")
        if s.waits_for_build:
            flags.append("waits for build-ext")
        if s.needs:
            flags.append("needs " + ", ".join(s.needs))
        if s.skip_reason:
            flags.append("skipped: " + s.skip_reason)
        print(f"{i:>2}. {s.name:<12} {s.what} [{'; '.join(flags)}]")
        if s.name == "environment":
            cmd = "python -c <probe: torch.cuda.get_device_properties, nvidia-smi driver, nvcc, package versions>"
        elif s.name == "wheels":
            cmd = (f"python -m pip install --no-index --find-links {args.wheels or 'DIR'} <each missing of: "
                   + ", ".join(d for _, d, _ in PACKAGES) + ">")
        else:
            cmd = " ".join(s.cmd).replace(PY, "python")
        print(f"    $ {cmd}")
        if not s.background:
            total += s.expect_s
    if not args.smoke:
        print(f"sum of the foreground guesses ~{total} s (build-ext overlaps loss and attention); the budget "
              f"({args.budget_s:.0f} s) caps the run: a step still running when it is spent is stopped and recorded")


def main(argv=None) -> int:
    args = _parse(argv)
    steps = plan(args)
    if args.dry_run:
        print_plan(steps, args)
        return 0
    if not args.smoke:
        try:
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device visible: run with --dry-run or --smoke on a CPU machine")
        except ImportError as e:
            raise SystemExit(f"torch is not importable ({e})") from e
    os.makedirs(args.out, exist_ok=True)
    runner = Runner(args.out, args.budget_s)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    environment = None
    for step in steps:
        if step.name == "wheels":
            runner.install_wheels(step, args.wheels)
            continue
        if step.name == "install" and not step.skip_reason:
            where = _mempo_location()
            if where:
                step.skip_reason = f"mempo already importable from {where}"
        if step.name == "build-ext" and not step.skip_reason:
            step.skip_reason = _cuda_ext_ready()
        if step.name == "environment":
            step.cmd = [PY, "-c", _ENV_PROBE]
            r = runner.run(step)
            line = next((ln for ln in reversed(r["output_tail"].splitlines()) if ln.startswith("{")), None)
            try:
                environment = json.loads(line) if line else None
            except ValueError:
                environment = None
            if environment:
                with open(step.json_out, "w") as f:
                    json.dump(environment, f, indent=2)
                r["result"] = environment
            r["cmd"] = "python -c <environment probe>"
            continue
        runner.run(step)
    runner.join_background()
    report = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": started, "seconds": time.monotonic() - runner.start, "smoke": args.smoke,
              "budget_s": args.budget_s, "environment": environment, "steps": runner.results}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = markdown(report)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    bad = [r["name"] for r in runner.results if r["status"] in ("failed", "timeout")]
    print(f"wrote {args.out}/gpu_check.json and gpu_check.md" + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def _mempo_location() -> str | None:
    """Where `import mempo.kernels` resolves from, when it is this checkout (else None)."""
    code = "import mempo, mempo.kernels, os; print(os.path.dirname(os.path.dirname(mempo.__file__)))"
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd="/")
    where = proc.stdout.strip()
    return where if proc.returncode == 0 and os.path.realpath(where) == os.path.realpath(ROOT) else None


def _cuda_ext_ready() -> str | None:
    """A skip reason when mempo._C with CUDA already loads, else None (build it)."""
    code = "from mempo._native import native_ops; ops = native_ops(); print(bool(ops and ops.has_cuda))"
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return "mempo._C with CUDA already loads" if proc.stdout.strip() == "True" else None


if __name__ == "__main__":
    sys.exit(main())
