"""A small byte-level BPE tokenizer for the tiny world, trained offline with `tokenizers`.

Byte-level, so any string (model garbage, unicode) encodes without unknown tokens. The agent
tags are added tokens (one id each, kept when decoding) so a tiny model sees each tag as one
symbol and a rollout can stop on its id. Training on the same texts gives the same vocab.
Saved as a `PreTrainedTokenizerFast` directory: `PreTrainedTokenizerFast.from_pretrained(dir)` loads
it (so does `AutoTokenizer` while the directory has no qwen2 `config.json`: next to one, transformers 5
rebuilds it as Qwen2Tokenizer with Qwen's splitting; `mempo.training.task_side.load_model_tokenizer`).

Every word is tokenized with a leading space, also right after a tag or a line break, so a name
is one id wherever it appears: in a question (" of Noudris"), at the start of a query
("<search>Noudris born") or of a passage (after a line break: "Noudris was born"). With GPT-2's plain byte-level
rule those were two ids (`Noudris` and `ĠNoudris`), and the tiny model had to learn the pairing
per name before it could copy one. Decoding shows the added spaces ("<search> Noudris born");
the agent grammar ignores them, and re-encoding decoded text gives the same ids.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mempo.envs.agent_format import DEFAULT_TAGS, AgentTags

if TYPE_CHECKING:
    from mempo.envs.tiny_world import TinyWorld

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def tag_tokens(tags: AgentTags = DEFAULT_TAGS) -> list[str]:
    return [s for pair in (tags.mem, tags.think, tags.search, tags.answer, tags.information)
            for s in pair]


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024,
                    tags: AgentTags = DEFAULT_TAGS) -> PreTrainedTokenizerFast:
    """BPE over `texts` with at most `vocab_size` entries (256 bytes + merges + specials + tags);
    training stops early when no pair occurs twice, so small worlds get smaller vocabs."""
    if not texts:
        raise ValueError("texts must not be empty")
    tags_and_specials = [EOS_TOKEN, PAD_TOKEN] + tag_tokens(tags)
    if vocab_size < 256 + len(tags_and_specials):
        raise ValueError(f"vocab_size must be >= {256 + len(tags_and_specials)}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # each line, and each text between added tokens, starts with a space (see the module docstring)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "merged_with_previous"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=True)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(tags_and_specials) + 2,
                                  min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Tags are removed from the training text: they become added tokens, not merges.
    cleaned = list(texts)
    for tag in tag_tokens(tags):
        cleaned = [t.replace(tag, " ") for t in cleaned]
    tokenizer.train_from_iterator(cleaned, trainer=trainer, length=len(cleaned))
    tokenizer.add_tokens(tag_tokens(tags))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN)


CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")
# ChatML, as Qwen's instruct models use it: <|im_start|>role\ncontent<|im_end|>\n per message
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def add_chat_template(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Give a tokenizer ChatML markers (special tokens) and template, like an instruct model's;
    returns it. The end-of-turn id is `tokenizer.convert_tokens_to_ids("<|im_end|>")`."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_MARKERS)})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_world_tokenizer(world: TinyWorld, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """The tokenizer of a `TinyWorld` (same as `world.tokenizer(vocab_size)`)."""
    return world.tokenizer(vocab_size)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | os.PathLike) -> None:
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise ValueError(f"directory {directory} holds no tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
