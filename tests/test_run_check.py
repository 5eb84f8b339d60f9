"""`python -m mempo.train --check`: the resolved plan of a run, or its first problem."""
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mempo.config import parse_args
from mempo.training.run_check import check_run, meta_model
from model_dirs import chat_tokenizer, write_sparse_safetensors
from rollout_fixtures import tiny_world

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
             "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
             "bos_token_id": 151643, "eos_token_id": 151645}


def test_default_check_prints_the_plan():
    proc = subprocess.run([sys.executable, "-m", "mempo.train", "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for expected in ("the run is ready", "built from the config: 3.3M parameters", "prompt: plain",
                     "train 1 obj: 240, 2 obj: 256", "350 steps on 496 demonstrations (tiny world experts)",
                     "live query 'Where was", "32 trajectories per rank"):
        assert expected in proc.stdout, (expected, proc.stdout)


@pytest.fixture
def server():
    """The tiny world's corpus behind a real retrieval server on a loopback port (in a thread)."""
    from mempo.envs.retrieval_server import make_retrieval_server

    world, _ = tiny_world()
    srv = make_retrieval_server(world.search_tool, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/retrieve"
    srv.shutdown()
    srv.server_close()


def _qwen7b_dir(tmp_path, drop: str | None = None, reshape: str | None = None) -> Path:
    """config.json of Qwen2.5-7B, the chat tokenizer, and header-only (sparse) bf16 weights."""
    path = tmp_path / "qwen2.5-7b"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(QWEN25_7B))
    chat_tokenizer(tmp_path).save_pretrained(path)
    cfg = parse_args(["--model.path", str(path)])
    model = meta_model(cfg, None)
    if drop:
        model.get_submodule(drop.rsplit(".", 1)[0]).register_parameter(drop.rsplit(".", 1)[1], None)
    if reshape:
        import torch
        owner, name = reshape.rsplit(".", 1)
        setattr(model.get_submodule(owner), name, torch.nn.Parameter(torch.empty(3, 5, device="meta")))
    write_sparse_safetensors(path / "model.safetensors", model)
    return path


def _recipe_args(tmp_path, model_dir, url):
    world, _ = tiny_world()
    world.write_tasks(tmp_path / "train.jsonl", "train")
    world.write_tasks(tmp_path / "test.jsonl", "heldout")
    return ["--config", str(CONFIGS / "qwen2.5-7b.yaml"), "--model.path", str(model_dir), "--env.search_url", url,
            "--env.train_tasks_path", str(tmp_path / "train.jsonl"), "--env.eval_tasks_path", str(tmp_path / "test.jsonl")]


def test_7b_recipe_check_on_the_meta_device(tmp_path, server, capsys):
    args = _recipe_args(tmp_path, _qwen7b_dir(tmp_path), server)
    assert check_run(parse_args(args), ranks=8) == 0
    out = capsys.readouterr().out
    for expected in ("Qwen2ForCausalLM from", "(meta device, no weights loaded): 7.62B parameters, 28 layers",
                     "every parameter present with its shape", "compute bfloat16;", "prompt: chat (chat template)",
                     f"http retrieval server {server}", "live query 'Where was", "-> 3 passages",
                     "128 tasks x G=16 per step over 8 rank(s): 256 trajectories per rank",
                     "weights + grads + AdamW 14.2 GiB", "rollout KV cache 224.0 GiB",
                     "238.2 GiB per rank is more than one 80 GiB GPU holds"):
        assert expected in out, (expected, out)


def test_check_problems_are_one_line_and_exit_1(tmp_path, server, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/retrieve"
    model_dir = _qwen7b_dir(tmp_path)
    assert check_run(parse_args(_recipe_args(tmp_path, model_dir, dead))) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"mempo.train --check: problem: env.search_url '{dead}': the live query failed")
    assert len(out.splitlines()) == 1

    missing = _qwen7b_dir(tmp_path / "a", drop="model.layers.27.mlp.down_proj.weight")
    assert check_run(parse_args(_recipe_args(tmp_path, missing, server))) == 1
    assert "parameter model.layers.27.mlp.down_proj.weight is in none of its safetensors files" in capsys.readouterr().out
    wrong = _qwen7b_dir(tmp_path / "b", reshape="model.norm.weight")
    assert check_run(parse_args(_recipe_args(tmp_path, wrong, server))) == 1
    assert "model.norm.weight has shape [3, 5] in the weights, [3584] in config.json" in capsys.readouterr().out
