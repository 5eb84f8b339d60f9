"""benchmarks/gpu_check.py on the CPU: the dry run lists every step with the headline shapes and
fits the time budget; the runner records a failing, a timed-out and a skipped step and keeps
going; the smoke run (tiny CPU shapes) goes through every benchmark, JSON and markdown."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
STEPS = ["environment", "wheels", "install", "build-ext", "loss", "attention", "pytest-gpu", "kv-evict",
         "rollout", "rollout-decode", "loss-agent"]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_every_step_with_headline_shapes(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    lines = [ln for ln in text.splitlines() if ln[:3].strip().rstrip(".").isdigit()]
    assert [ln.split()[1] for ln in lines] == STEPS
    assert all("timeout" in ln for ln in lines)
    assert text.count("--n 16384 --hidden 4096 --vocab 151936 --dtype bf16") == 2  # loss and loss-agent
    assert "--methods naive,naive-ref,liger,liger-eager,mempo" in text
    assert "--mask-frac 0.3" in text
    assert "benchmarks/attention.py --device cuda" in text and "benchmarks/kv_evict.py --device cuda" in text
    assert "--model-shape qwen2-0.5b --dtype bf16" in text
    assert "-m gpu" in text and "budget 465 s" in text
    assert not out.exists()  # a dry run runs and writes nothing


def test_plan_fits_in_eight_minutes():
    gc = _module()
    args = gc._parse(["--out", "/nonexistent"])
    steps = gc.plan(args)
    assert args.budget_s < 8 * 60
    foreground = sum(s.expect_s for s in steps if not s.background)
    assert foreground < args.budget_s, foreground
    assert all(0 < s.timeout_s <= 300 for s in steps)
    with pytest.raises(SystemExit, match="unknown step"):
        gc.plan(gc._parse(["--steps", "loss,nope"]))


def test_runner_records_failures_and_keeps_going(tmp_path):
    gc = _module()
    runner = gc.Runner(str(tmp_path), budget_s=60, reserve_s=0)
    py = sys.executable
    pid_file = tmp_path / "child.pid"
    # the timed-out step starts a child: the whole process group must be stopped
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    steps = [gc.Step("first", "ok", [py, "-c", "print('hello')"], 30),
             gc.Step("broken", "fails", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30),
             gc.Step("hangs", "times out", [py, "-c", hang], 3),
             gc.Step("needs", "missing module", [py, "-c", "print(1)"], 30, needs=("no_such_module_xyz",)),
             gc.Step("last", "still runs", [py, "-c", "print('done')"], 30)]
    t0 = time.monotonic()
    for s in steps:
        runner.run(s)
    assert time.monotonic() - t0 < 30
    status = {r["name"]: r["status"] for r in runner.results}
    assert status == {"first": "ok", "broken": "failed", "hangs": "timeout", "needs": "skipped", "last": "ok"}
    broken = next(r for r in runner.results if r["name"] == "broken")
    assert broken["rc"] == 3 and "boom" in broken["reason"]
    assert "no_such_module_xyz" in next(r for r in runner.results if r["name"] == "needs")["reason"]
    assert (tmp_path / "logs" / "last.log").read_text().strip().endswith("done")
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]

    late = gc.Runner(str(tmp_path), budget_s=1, reserve_s=0)
    time.sleep(1.1)
    assert late.run(gc.Step("late", "no time left", [py, "-c", "print(1)"], 30))["status"] == "skipped"


def test_missing_packages_are_reported_with_what_needs_them(tmp_path, monkeypatch):
    gc = _module()
    monkeypatch.setattr(gc, "PACKAGES", [("no_such_mod_abc", "no-such-mod-abc", "the abc row"),
                                         ("no_such_mod_xyz", "no-such-mod-xyz", "the xyz row"), ("json", "json", "")])
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "no_such_mod_abc-1.0-py3-none-any.whl").write_bytes(b"not a wheel")  # pip must fail on it
    runner = gc.Runner(str(tmp_path), budget_s=120, reserve_s=0)
    r = runner.install_wheels(gc.Step("wheels", "w", [], 60), str(wheels))
    assert r["status"] == "failed"
    assert "no-such-mod-abc: pip install from" in r["reason"] and "the abc row" in r["reason"]
    assert "no-such-mod-xyz missing, no wheel in" in r["reason"] and "json" not in r["reason"]
    r = runner.install_wheels(gc.Step("wheels", "w", [], 60), None)
    assert r["status"] == "ok" and "no-such-mod-abc missing (no --wheels): the abc row" in r["reason"]


@pytest.mark.slow
def test_smoke_run_goes_through_every_benchmark(tmp_path):
    """The whole pipeline at tiny CPU shapes: commands, each benchmark's JSON, the markdown."""
    out = tmp_path / "smoke"
    run = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads((out / "gpu_check.json").read_text())
    status = {r["name"]: r["status"] for r in report["steps"]}
    assert run.returncode == 0, (status, run.stdout[-3000:])
    assert status["install"] == status["build-ext"] == "skipped"
    assert all(status[s] == "ok" for s in STEPS if s not in ("install", "build-ext", "wheels"))
    results = {r["name"]: r["result"] for r in report["steps"]}
    assert {r["method"] for r in results["loss"]["rows"]} >= {"naive", "naive-ref", "mempo/torch"}
    assert results["pytest-gpu"]["skipped"] > 0 and results["pytest-gpu"]["failures"] == 0  # gpu tests skip here
    md = (out / "gpu_check.md").read_text()
    for section in ("loss", "attention", "pytest-gpu", "kv-evict", "rollout", "rollout-decode", "loss-agent"):
        assert f"#### {section}: `python benchmarks/" in md or f"#### {section}: `python -m pytest" in md, section
    assert "| naive (full logits, log_softmax, gather, clipped loss) |" in md
    assert "causal varlen (sdpa per sequence)" in md
