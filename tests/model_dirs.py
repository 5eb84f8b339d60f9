"""Local model directories built by the project (nothing downloaded) for the own-data tests."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from mempo.config import ModelConfig
from mempo.envs.tokenizer import CHAT_MARKERS

END_OF_TURN = CHAT_MARKERS[1]
# a 2-layer Qwen2 small enough for any test
TINY_MODEL = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                         max_position=64)


@functools.lru_cache(maxsize=4)
def _chat_tokenizer_dir(root: str) -> str:
    from mempo.envs import build_tiny_world
    from mempo.envs.tokenizer import add_chat_template

    add_chat_template(build_tiny_world(seed=0).tokenizer()).save_pretrained(root)
    return root


def chat_tokenizer(tmp_root: Path):
    """The tiny world's tokenizer with a ChatML template, saved under tmp_root and loaded back
    as a user's would be."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_chat_tokenizer_dir(str(tmp_root / "chat_tokenizer")))


def save_chat_model(path: Path, seed: int = 0) -> Path:
    """A small (hidden 64, 2 layers) random instruct model directory: weights, chat tokenizer,
    generation config with the end-of-turn EOS (`export_tiny_world --model-dir`, smaller)."""
    from mempo.envs import build_tiny_world
    from mempo.envs.export_tiny_world import save_tiny_instruct_model

    return save_tiny_instruct_model(path, build_tiny_world(seed=0), seed=seed, hidden_size=64, num_layers=2)


def write_sparse_safetensors(path: Path, model: torch.nn.Module, dtype: str = "BF16") -> None:
    """A safetensors file with `model`'s parameter names and shapes whose data is a hole (a
    sparse file: no disk used): enough for header checks of a full-size model."""
    header, offset = {}, 0
    for name, p in model.named_parameters():
        size = p.numel() * 2
        header[name] = {"dtype": dtype, "shape": list(p.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
