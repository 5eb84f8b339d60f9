"""`torchrun --nproc_per_node 2 -m mempo.train` end to end on the CPU: finishes, writes a
checkpoint and metrics, resumes to the same next step, exports a loadable HF model."""
import json
import math
import os
import subprocess
import sys

import pytest
from small_runs import SMALL, free_port

COMPARED = ("reward/mean", "loss", "grad_norm", "memory_reward/mean", "TT", "PT", "kl", "clip_fraction")


def _torchrun(run_dir, name, *extra, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "mempo.train", *SMALL, "--trainer.run_dir", str(run_dir),
           "--trainer.name", name, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _torchrun.stdout = proc.stdout
    return [json.loads(line) for line in open(run_dir / name / "metrics.jsonl")]


def _by_step(records, phase):
    return {r["step"]: r for r in records if r["phase"] == phase}


@pytest.mark.slow
def test_torchrun_train_resume_and_export(tmp_path):
    full = _torchrun(tmp_path, "full", "--trainer.steps", "2")
    assert "held-out evaluation at step 4 (greedy)" in _torchrun.stdout  # the final table
    from mempo.host import cpu_description

    assert f"device: {cpu_description()}; 2 rank(s), 1 torch thread(s) per rank" in _torchrun.stdout
    rl = _by_step(full, "rl")
    assert set(rl) == {3, 4}
    for record in full:
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, record)
    evals = [r for r in full if r["phase"] == "eval"]
    assert evals and {"1obj/em", "2obj/f1", "2obj/PT"} <= set(evals[-1])
    assert (tmp_path / "full" / "checkpoints" / "step_000004").is_dir()

    # the same run, stopped after step 3 and resumed: step 4 must match
    _torchrun(tmp_path, "split", "--trainer.steps", "1")
    resumed = _by_step(_torchrun(tmp_path, "split", "--trainer.steps", "2"), "rl")
    for key in COMPARED:
        assert resumed[4][key] == pytest.approx(rl[4][key], rel=1e-5, abs=1e-7), key

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "full" / "hf")
    assert model.config.vocab_size == len(tokenizer)
    # the export as --model.path is evaluated exactly as the run evaluated it (same ids: the
    # tiny world's tokenizer.json as written, not the Qwen2Tokenizer AutoTokenizer makes of it)
    final = evals[-1]
    again = _torchrun(tmp_path, "from_export", "--model.path", str(tmp_path / "full" / "hf"),
                      "--sft.steps", "0", "--trainer.steps", "0")
    assert {k: v for k, v in again[-1].items() if "/" in k} == {k: v for k, v in final.items() if "/" in k}

    # re-running the finished run says so and changes nothing
    metrics = (tmp_path / "full" / "metrics.jsonl").read_text()
    _torchrun(tmp_path, "full", "--trainer.steps", "2")
    assert "already finished: checkpoint step_000004 is step 4 of 4" in _torchrun.stdout
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == metrics

    # a damaged newest checkpoint (4 KiB flipped in a shard, size unchanged): one notice, resume from step 3
    shard = max((tmp_path / "full" / "checkpoints" / "step_000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(255 - b for b in data[middle:middle + 4096])
    shard.write_bytes(bytes(data))
    longer = _torchrun(tmp_path, "full", "--trainer.steps", "3")
    assert f"step_000004 is damaged ({shard.name} does not match its checksum" in _torchrun.stdout
    assert "resuming from " + str(tmp_path / "full" / "checkpoints" / "step_000003") in _torchrun.stdout
    keys = [(r["phase"], r["step"]) for r in longer]
    assert len(keys) == len(set(keys)) and set(_by_step(longer, "rl")) == {3, 4, 5}  # no duplicate records

    # --trainer.resume never in the same directory starts afresh: the earlier run's checkpoints
    # move aside, so neither pruning nor the next resume=auto picks its step 5
    fresh = _torchrun(tmp_path, "full", "--trainer.steps", "1", "--trainer.resume", "never")
    assert "starting afresh (--trainer.resume never): the earlier run's checkpoints moved to" in _torchrun.stdout
    (earlier,) = (tmp_path / "full").glob("checkpoints.earlier-*")
    assert (earlier / "step_000005").is_dir()
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == \
        ["latest", "step_000002", "step_000003"]
    assert set(_by_step(fresh, "rl")) == {3} and set(_by_step(fresh, "sft")) == {1, 2}
    _torchrun(tmp_path, "full", "--trainer.steps", "1")
    assert "already finished: checkpoint step_000003 is step 3 of 3" in _torchrun.stdout
    # fewer steps than the newest checkpoint: one line, nothing resumed, evaluated or exported
    exported = (tmp_path / "full" / "hf" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(AssertionError, match=r"step_000003 is step 3, past this run's last step 2 "
                                             r"\(sft.steps 2 \+ trainer.steps 0\)"):
        _torchrun(tmp_path, "full", "--trainer.steps", "0")
    assert (tmp_path / "full" / "hf" / "model.safetensors").stat().st_mtime_ns == exported
