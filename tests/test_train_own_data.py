"""The real path end to end on the CPU: a local instruct model directory with a chat template,
JSONL task and demonstration files, a retrieval server in its own process on a loopback port,
`torchrun --nproc_per_node 2 -m mempo.train`: warm start, RL steps, evaluation, export."""
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from model_dirs import END_OF_TURN, save_chat_model
from small_runs import free_port


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url.replace("/retrieve", "/stats"), timeout=10) as reply:
        return json.load(reply)


@pytest.fixture
def retrieval_server(tmp_path):
    """`python -m mempo.envs.retrieval_server` over the exported tiny-world corpus, as a process."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "mempo.envs.export_tiny_world", "--out", str(data), "--objectives", "1"],
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mempo.envs.retrieval_server",
                             "--corpus", str(data / "corpus.jsonl"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/retrieve"
    try:
        assert "serving 140 passages" in proc.stdout.readline()
        yield url, data
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_own_model_tasks_demos_and_http_retriever(tmp_path, retrieval_server):
    url, data = retrieval_server
    model_dir = save_chat_model(tmp_path / "my-instruct-model")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "mempo.train", "--model.path", str(model_dir), "--env.search", "http", "--env.search_url", url,
           "--env.train_tasks_path", str(data / "train.jsonl"), "--env.eval_tasks_path", str(data / "heldout.jsonl"),
           "--env.train_objectives", "1", "--env.eval_objectives", "1,2", "--env.eval_tasks", "4",
           "--sft.data_path", str(data / "demos.jsonl"), "--sft.steps", "30", "--sft.lr", "1e-2",
           "--sft.batch_size", "8",
           "--trainer.steps", "2", "--rollout.batch_size", "2", "--rollout.group_size", "2",
           "--rollout.max_new_tokens", "32", "--trainer.save_every", "0", "--logging.progress_bar", "false",
           "--trainer.run_dir", str(tmp_path / "runs"), "--trainer.name", "own"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"run took {time.time() - start:.0f} s")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the run's tokenizer is the model directory's (its size, chat template), not the tiny world's
    size = len(AutoTokenizer.from_pretrained(model_dir))
    assert f"tokenizer: {model_dir} ({size} tokens, chat prompt)" in proc.stdout
    assert f"http retrieval server {url}" in proc.stdout and "tiny world" not in proc.stdout
    # the server answered the run: one reachability query per rank, then the rollouts' searches
    assert _stats(url)["queries"] > 2
    records = [json.loads(line) for line in open(tmp_path / "runs" / "own" / "metrics.jsonl")]
    phases = [r["phase"] for r in records]
    assert phases.count("sft") == 30 and phases.count("rl") == 2 and phases[-1] == "eval"
    sft = [r["nll"] for r in records if r["phase"] == "sft"]
    assert sft[-1] < sft[0] - 2.0  # the demonstrations were learned from
    assert {"1obj/em", "2obj/PT"} <= set(records[-1])

    exported = tmp_path / "runs" / "own" / "hf"
    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert len(tokenizer) == size and tokenizer.chat_template and END_OF_TURN in tokenizer.get_vocab()
    assert model.config.vocab_size == len(tokenizer)
