"""What a person sees: config mistakes once and before torch, Ctrl-C in one line, --help with
the choices, the final evaluation as a table, a progress ETA over both phases."""
import os
import signal
import subprocess
import sys
import time

from small_runs import free_port

from mempo.config import LoggingConfig
from mempo.run_log import RunLogger


def test_config_mistake_is_one_line_without_importing_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "mempo.train", "--rollout.group_sise", "3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert lines == ["mempo.train: unknown key of [rollout] 'group_sise'. Did you mean 'group_size'? Valid: "
                     + lines[0].split("Valid: ")[1]]
    assert not any(line.rstrip().endswith((" torch", "| torch")) for line in proc.stderr.splitlines())


def test_config_mistake_prints_once_under_torchrun():
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "mempo.train", "--optimizer.lr", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("mempo.train: optimizer.lr must be > 0, got -1.0") == 1


def test_ctrl_c_prints_one_line_and_points_at_the_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "mempo.train", "--model.hidden_size", "32", "--model.intermediate_size", "64",
           "--model.num_layers", "1", "--sft.steps", "100000", "--sft.batch_size", "2",
           "--trainer.run_dir", str(tmp_path),
           "--logging.progress_bar", "false"]
    # a shell's background job (e.g. CI started with `&`) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the run the default disposition, as a terminal does
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    deadline = time.time() + 300  # generous: on loaded CI cores the start (world, tokenizer, experts) is slow
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    assert metrics.is_file(), "the run logged no step within the deadline"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip() == "[mempo] interrupted: no checkpoint was written yet"
    assert "Traceback" not in out + err


def test_help_lists_the_choices():
    proc = subprocess.run([sys.executable, "-m", "mempo.train", "--help"], capture_output=True, text=True, timeout=60)
    assert "--rollout.engine (default: 'native') one of: native | vllm" in proc.stdout
    assert ("--algorithm.loss_agg (default: 'seq-mean-token-mean') one of: token-mean | seq-mean-token-mean"
            in proc.stdout)


def test_eval_table_and_two_phase_eta(tmp_path, capsys):
    with RunLogger(tmp_path, LoggingConfig(progress_bar=True, log_every=1000)) as log:
        log.progress(5, "train", phases={"sft": 3, "rl": 2})
        log._last_log -= 1.0
        log.log(1, {"nll": 2.0, "grad_norm": 1.0, "lr": 1e-3}, "sft")  # one sft step took ~1 s
        assert log._eta(1).startswith("eta 0:00:02 + rl (not timed yet)")
        log.log(2, {"nll": 1.0}, "sft")
        log.log(3, {"nll": 1.0}, "sft")
        log._last_log -= 100.0
        log.log(4, {"reward/mean": 0.5}, "rl")  # RL steps are far slower: the ETA uses their own time
        assert log._eta(4) == "eta 0:01:40"
        log.eval_table(5, {"1obj/em": 0.7, "1obj/f1": 0.75, "1obj/TT": 100.0, "1obj/PT": 80.0,
                           "2obj/em": 0.25, "2obj/f1": 0.5, "2obj/TT": 210.0, "2obj/PT": 149.0})
    out = capsys.readouterr().out
    assert "held-out evaluation at step 5" in out
    assert "│          2 │ 0.250 │ 0.500 │ 210 │ 149 │" in out


def test_a_run_restarted_from_step_s_leaves_no_records_past_s(tmp_path):
    """A crash before the first checkpoint restarts at step 0; a resume from S re-logs S+1..:
    metrics.jsonl must hold each (phase, step) once."""
    import json

    def steps():
        return [(r["phase"], r["step"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]

    with RunLogger(tmp_path, LoggingConfig(progress_bar=False), resume_step=0) as log:
        for step in (1, 2, 3):
            log.log(step, {"nll": 1.0}, "sft")  # then the run dies before its first checkpoint
    with RunLogger(tmp_path, LoggingConfig(progress_bar=False), resume_step=0) as log:  # restart
        for step in (1, 2):
            log.log(step, {"nll": 1.0}, "sft")
        log.log(3, {"reward/mean": 0.1}, "rl")
    assert steps() == [("sft", 1), ("sft", 2), ("rl", 3)]
    with RunLogger(tmp_path, LoggingConfig(progress_bar=False), resume_step=2) as log:  # resumed from step 2
        log.log(3, {"reward/mean": 0.2}, "rl")
    assert steps() == [("sft", 1), ("sft", 2), ("rl", 3)]
