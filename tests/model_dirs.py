"""A local "instruct model" directory built by the project (nothing downloaded): the tiny
world's BPE tokenizer plus Qwen-style chat markers and a chat template, a random-init Qwen2,
and a generation config whose EOS ids include the end-of-turn token."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
END_OF_TURN = "<|im_end|>"


@functools.lru_cache(maxsize=1)
def _chat_tokenizer_dir(root: str) -> str:
    from mempo.envs import build_tiny_world

    tok = build_tiny_world(seed=0).tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", END_OF_TURN]})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(root)
    return root


def chat_tokenizer(tmp_root: Path):
    """The chat tokenizer, saved under tmp_root/chat_tokenizer and loaded back as a user's would be."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_chat_tokenizer_dir(str(tmp_root / "chat_tokenizer")))


def save_chat_model(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A small random Qwen2 + chat tokenizer + generation config in `path` (a model directory)."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(_chat_tokenizer_dir(str(path.parent / "chat_tokenizer")))
    tok.save_pretrained(path)
    end = tok.convert_tokens_to_ids(END_OF_TURN)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=end, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(path)
    GenerationConfig(eos_token_id=[end, tok.eos_token_id]).save_pretrained(path)
    return path


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
