"""`python -m mempo.train --check`: the resolved plan of a run, or its first problem."""
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from model_dirs import chat_tokenizer, write_sparse_safetensors
from rollout_fixtures import tiny_world

from mempo.config import parse_args
from mempo.training.run_check import check_run, meta_model

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
                     "train 1 obj: 240, 2 obj: 256, 3 obj: 256, 4 obj: 256",
                     "700 steps on 1008 demonstrations (tiny world experts; 50% shown relabeled (env.relabel_names))",
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
            "--env.train_tasks_path", str(tmp_path / "train.jsonl"),
            "--env.eval_tasks_path", str(tmp_path / "test.jsonl")]


def test_7b_recipe_check_on_the_meta_device(tmp_path, server, capsys):
    args = _recipe_args(tmp_path, _qwen7b_dir(tmp_path), server)
    assert check_run(parse_args(args), ranks=8) == 0
    out = capsys.readouterr().out
    for expected in ("Qwen2ForCausalLM from", "(meta device, no weights loaded): 7.62B parameters, 28 layers",
                     "every parameter present with its shape", "compute bfloat16;", "prompt: chat (chat template)",
                     f"http retrieval server {server}", "live query 'Where was", "-> 3 passages",
                     "128 tasks x G=16 per step over 8 rank(s): 256 trajectories per rank",
                     "weights + grads + AdamW 14.2 GiB", "rollout: full weights 14.2 GiB + KV pool 15.5 GiB",
                     "56 KiB per token): 17 of 256 rows at once even if every row held 16384 tokens",
                     "a dense cache would need 224.0 GiB"):
        assert expected in out, (expected, out)
    assert "warning" not in out


def test_7b_recipe_fits_one_80_gib_gpu_per_rank(tmp_path):
    """The memory plan of configs/qwen2.5-7b.yaml on 8 ranks, from the model built on the meta
    device: the paged KV pool and the update both fit one 80 GiB GPU, where the dense cache
    (rows x max_total_tokens) alone would need 224 GiB."""
    from mempo.training.run_check import GPU_BYTES, GiB, memory_plan

    (tmp_path / "qwen2.5-7b").mkdir()
    (tmp_path / "qwen2.5-7b" / "config.json").write_text(json.dumps(QWEN25_7B))
    cfg = parse_args(["--config", str(CONFIGS / "qwen2.5-7b.yaml"), "--model.path", str(tmp_path / "qwen2.5-7b"),
                      "--env.search_url", "http://127.0.0.1:1/retrieve", "--env.train_tasks_path", __file__,
                      "--env.eval_tasks_path", __file__])  # files are only checked for readability here
    model = meta_model(cfg, None)
    assert next(model.parameters()).device.type == "meta"
    plan = memory_plan(cfg, model.config, sum(p.numel() for p in model.parameters()), ranks=8)
    assert plan.peak < GPU_BYTES and plan.state + plan.activations < GPU_BYTES
    assert plan.dense == 224 * GiB and plan.pool < plan.dense / 10
    assert plan.pool_tokens >= cfg.rollout.max_total_tokens and plan.rows_at_full_length >= 16
    cfg.rollout.kv_cache_memory = 60.0  # GiB: more than the GPU has beside the weights
    assert memory_plan(cfg, model.config, sum(p.numel() for p in model.parameters()), ranks=8).peak > GPU_BYTES


def test_a_kv_budget_below_one_row_is_a_one_line_problem(capsys):
    assert check_run(parse_args(["--rollout.kv_cache_memory", "1e-9"])) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("mempo.train --check: problem: rollout.kv_cache_memory=1e-09: the KV pool")
    assert "one row needs room for rollout.max_total_tokens=2048" in out and len(out.splitlines()) == 1


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
    out = capsys.readouterr().out
    assert "parameter model.layers.27.mlp.down_proj.weight is in none of its safetensors files" in out
    wrong = _qwen7b_dir(tmp_path / "b", reshape="model.norm.weight")
    assert check_run(parse_args(_recipe_args(tmp_path, wrong, server))) == 1
    assert "model.norm.weight has shape [3, 5] in the weights, [3584] in config.json" in capsys.readouterr().out
