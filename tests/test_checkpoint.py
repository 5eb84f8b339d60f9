"""mempo.checkpoint: DCP checkpoints under FSDP2, resume, crash safety, integrity, HF export.

The distributed tests launch tests/dist_scripts/fsdp_train_resume.py under
`torchrun --standalone --nproc_per_node 2` (gloo on the CPU; --standalone picks a free port).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_dirs import TINY_MODEL

from mempo.checkpoint import (
    CRASH_ENV,
    CheckpointError,
    export_hf,
    find_latest,
    load_checkpoint,
    resolve_resume,
    retire_checkpoints,
    save_checkpoint,
)
from mempo.config import OptimizerConfig
from mempo.models.builder import build_model, load_pretrained
from mempo.optim import build_lr_scheduler, build_optimizer

SCRIPT = Path(__file__).parent / "dist_scripts" / "fsdp_train_resume.py"
REPO = Path(__file__).resolve().parents[1]


def launch(args: list[str], *, nproc: int | None = 2, env: dict | None = None,
           timeout: float = 90) -> subprocess.CompletedProcess:
    """Run the script under torchrun with `nproc` ranks (None: as one plain process)."""
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd + [str(SCRIPT)] + args, cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def steps_of(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(path) if "step" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 steps on 2 ranks without interruption, checkpoints at 2 and 4, HF export."""
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(["--run-dir", str(root / "run"), "--steps", "4", "--save-every", "2",
                   "--out", str(root / "steps.jsonl"), "--export", str(root / "hf")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_crash_during_checkpoint_write_then_auto_resume_matches(uninterrupted, tmp_path):
    run, out = tmp_path / "run", tmp_path / "steps.jsonl"
    args = ["--run-dir", str(run), "--steps", "4", "--save-every", "2", "--out", str(out),
            "--activation-checkpointing"]
    # Rank 1 dies inside the step-4 save; torchrun's agent then stops rank 0 (at a barrier).
    crashed = launch(args, env={CRASH_ENV: "4:1"})
    assert crashed.returncode != 0 and "exitcode  : 17" in crashed.stderr, crashed.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert (ckpts / "step_000004.tmp").is_dir() and not (ckpts / "step_000004").exists()
    assert find_latest(run) == ckpts / "step_000002"

    resumed = launch(args)  # trainer.resume=auto: picks step 2 up again
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    expected, got = steps_of(uninterrupted / "steps.jsonl"), steps_of(out)
    assert got[3]["resumed_from"] == str(ckpts / "step_000002")
    for step in (1, 2, 3, 4):  # activation checkpointing changes no number
        for key in ("loss", "grad_norm", "lr", "tokens", "rank0_draw"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert find_latest(run) == ckpts / "step_000004"
    assert not (ckpts / "step_000004.tmp").exists()


def test_one_process_matches_two_ranks(uninterrupted, tmp_path):
    """Loss and gradients are normalised by the global loss-token count: no world-size dependence."""
    out = tmp_path / "steps.jsonl"
    proc = launch(["--run-dir", str(tmp_path / "run"), "--steps", "2", "--out", str(out)], nproc=None)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected, got = steps_of(uninterrupted / "steps.jsonl"), steps_of(out)
    for step in (1, 2):
        assert got[step]["tokens"] == expected[step]["tokens"]
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5)
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5)


def test_export_loads_with_transformers(uninterrupted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = uninterrupted / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf_dir.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    assert len(tokenizer) == model.config.vocab_size
    probe = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        loss = model(input_ids=probe, labels=probe).loss.item()
    trained = next(r["probe_loss"] for r in records(uninterrupted / "steps.jsonl") if "probe_loss" in r)
    assert loss == pytest.approx(trained, rel=1e-5)
    # ... and as model.path
    loaded = load_pretrained(str(hf_dir))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_keeps_last_checkpoints(uninterrupted):
    names = sorted(p.name for p in (uninterrupted / "run" / "checkpoints").iterdir())
    assert names == ["latest", "step_000002", "step_000004"]
    assert (uninterrupted / "run" / "checkpoints" / "step_000004" / "config.yaml").read_text().startswith("model:")


# ----------------------------------------------------------------------------- in process

def _model_and_optimizer(seed: int):
    model = build_model(TINY_MODEL, 64, seed=seed)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2))
    scheduler = build_lr_scheduler(optimizer, 10, warmup_steps=3)
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler):
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_save_load_round_trip_and_rng(tmp_path, seed):
    model, optimizer, scheduler = _model_and_optimizer(seed)
    _train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, data_state={"offset": 8},
                           config_yaml="x: 1\n")
    after_save = torch.rand(3)
    _train_step(model, optimizer, scheduler)  # drift away, then come back

    fresh, fresh_opt, fresh_sched = _model_and_optimizer(seed + 1)
    state = load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert state.step == 1 and state.data_state == {"offset": 8}
    assert torch.equal(torch.rand(3), after_save)  # RNG restored
    assert fresh_sched.last_epoch == 1
    ref, _, _ = _model_and_optimizer(seed)
    reload_model, reload_opt, reload_sched = _model_and_optimizer(seed)
    load_checkpoint(path, reload_model, reload_opt, reload_sched, restore_rng=False)
    for (name, a), b in zip(fresh.state_dict().items(), reload_model.state_dict().values()):
        assert torch.equal(a, b), name
    first_param = next(iter(fresh_opt.state.values()))
    assert int(first_param["step"]) == 1


def test_corrupt_or_missing_checkpoint_errors_name_the_path(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path, 3, model, optimizer, scheduler)
    (path / ".metadata").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path, model, optimizer, scheduler)
    missing = tmp_path / "checkpoints" / "step_000099"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(missing, model)
    with pytest.raises(CheckpointError, match=str(missing)):
        resolve_resume(tmp_path, str(missing))
    (path / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(tmp_path, str(path))


def test_checkpoint_of_another_model_is_named_not_loaded(tmp_path):
    """Resuming a run directory with a changed model or tokenizer: one line naming the tensors."""
    model, optimizer, scheduler = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path, 3, model, optimizer, scheduler, config_yaml="x: 1\n")
    other = build_model(TINY_MODEL, 80, seed=0)  # a larger vocabulary
    with pytest.raises(CheckpointError, match=r"holds another model: .*embed_tokens.weight is \[64, .*\] there, "
                                              r"\[80, .*\] here.*--trainer.name"):
        load_checkpoint(path, other, build_optimizer(other, OptimizerConfig(lr=1e-2)))
    load_checkpoint(path, model, optimizer, scheduler)  # the same model still loads


def test_find_latest_ignores_partial_and_stale_pointer(tmp_path):
    assert find_latest(tmp_path) is None and resolve_resume(tmp_path, "auto") is None
    model, optimizer, scheduler = _model_and_optimizer(0)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    root = tmp_path / "checkpoints"
    (root / "step_000003.tmp").mkdir()  # a write that died
    assert find_latest(tmp_path) == root / "step_000002"
    (root / "latest").write_text("step_000007\n")  # points at nothing: fall back to a scan
    assert find_latest(tmp_path) == root / "step_000002"
    assert resolve_resume(tmp_path, "never") is None
    save_checkpoint(tmp_path, 4, model, optimizer, scheduler, keep_last=2)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_0") and p.is_dir()) == \
        ["step_000002", "step_000003.tmp", "step_000004"]


def test_a_fresh_start_moves_the_earlier_runs_checkpoints_aside(tmp_path):
    """resume=never in a used directory: the earlier run's steps (even a half-written one) are
    kept elsewhere, so pruning and a later resume=auto see only the new run's."""
    assert retire_checkpoints(tmp_path) is None  # nothing there: nothing moved
    model, optimizer, scheduler = _model_and_optimizer(0)
    for step in (5, 6):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler)
    (tmp_path / "checkpoints" / "step_000007.tmp").mkdir()
    moved = retire_checkpoints(tmp_path)
    assert moved.parent == tmp_path and moved.name.startswith("checkpoints.earlier-")
    assert sorted(p.name for p in moved.iterdir()) == ["latest", "step_000005", "step_000006", "step_000007.tmp"]
    assert find_latest(tmp_path) is None and resolve_resume(tmp_path, "auto") is None
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, keep_last=1)
    assert resolve_resume(tmp_path, "auto") == tmp_path / "checkpoints" / "step_000001"
    again = retire_checkpoints(tmp_path)  # a second fresh start in the same second: another name
    assert again != moved and (again / "step_000001").is_dir() and (moved / "step_000006").is_dir()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    assert retire_checkpoints(tmp_path) is None  # no step directory: left where it is


def test_export_of_a_wrapped_model(tmp_path):
    """The trainer's policy wraps the HF model (FusedPolicy.lm): the export strips the prefix."""
    from mempo.training.fused_policy import FusedPolicy

    inner = build_model(TINY_MODEL, 64, seed=0)
    out = export_hf(FusedPolicy(inner), None, tmp_path / "hf", dtype=torch.bfloat16)
    loaded = load_pretrained(str(out))
    assert inner.config.dtype != torch.bfloat16  # the live config is not touched
    for (name, a), b in zip(inner.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a.to(torch.bfloat16).float(), b, msg=name)


def _flip(path, offset_fraction=0.5, size=4096):
    """Invert `size` bytes in the middle of a file (its size unchanged)."""
    data = bytearray(path.read_bytes())
    start = max(0, int(len(data) * offset_fraction) - size // 2)
    data[start:start + size] = bytes(255 - b for b in data[start:start + size])
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, file, problem", [
    (_flip, "__0_0.distcp", "__0_0.distcp does not match its checksum"),
    (_truncate, "__0_0.distcp", "__0_0.distcp has"),
    (lambda p: p.write_bytes(b""), "rank0.pt", "rank0.pt has 0 bytes"),
    (lambda p: p.unlink(), "train_state.pt", "incomplete"),  # not a candidate at all: skipped silently
    (lambda p: p.unlink(), "config.yaml", "config.yaml is missing"),
    (lambda p: p.write_text("{"), "manifest.json", "manifest.json is missing or unreadable"),
])
def test_damaged_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys, damage, file, problem):
    model, optimizer, scheduler = _model_and_optimizer(0)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, config_yaml="x: 1\n")
    newest = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, config_yaml="x: 1\n")
    assert resolve_resume(tmp_path, "auto") == newest
    damage(newest / file)
    older = tmp_path / "checkpoints" / "step_000001"
    assert resolve_resume(tmp_path, "auto") == older
    out = capsys.readouterr().out
    if problem != "incomplete":
        assert out.count("\n") == 1 and f"checkpoint {newest} is damaged ({problem}" in out
        with pytest.raises(CheckpointError, match=f"is damaged: {problem}"):
            resolve_resume(tmp_path, str(newest))
    _flip(older / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*--trainer.resume never"):
        resolve_resume(tmp_path, "auto")


def test_manifest_lists_every_file_with_size_and_crc(tmp_path):
    """The manifest lists every other file of the checkpoint with its size and CRC-32."""
    import json
    import zlib
    model, optimizer, scheduler = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert set(files) == {p.name for p in path.iterdir()} - {"manifest.json"}
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
