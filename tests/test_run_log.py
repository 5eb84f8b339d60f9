"""mempo.run_log: metrics.jsonl, resume truncation, missing optional backends."""
import json
import math
import sys

import torch

from mempo.config import LoggingConfig
from mempo.run_log import METRICS_FILE, RunLogger


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_logger_jsonl_resume_and_missing_backends(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # "not installed"
    cfg = LoggingConfig(progress_bar=True, wandb=True)
    with RunLogger(tmp_path, cfg) as log:
        log.progress(total=3)
        log.log(0, {"loss": 2.0}, phase="sft")
        for step in (1, 2, 3):
            log.log(step, {"reward/mean": 0.1 * step, "grad_norm": torch.tensor(1.5), "kl": float("nan")})
    assert "wandb is not installed" in capsys.readouterr().out
    lines = records(tmp_path / METRICS_FILE)
    assert [(r["phase"], r["step"]) for r in lines] == [("sft", 0), ("rl", 1), ("rl", 2), ("rl", 3)]
    assert lines[1]["grad_norm"] == 1.5 and math.isnan(lines[1]["kl"])
    with RunLogger(tmp_path, LoggingConfig(progress_bar=False), resume_step=1) as log:  # resumed at step 1
        log.log(2, {"reward/mean": 0.5})
    kept = [(r["phase"], r["step"]) for r in records(tmp_path / METRICS_FILE)]
    assert kept == [("sft", 0), ("rl", 1), ("rl", 2)]
    silent = RunLogger(tmp_path / "other_rank", cfg, enabled=False)
    silent.log(1, {"loss": 1.0})
    silent.close()
    assert not (tmp_path / "other_rank").exists()
