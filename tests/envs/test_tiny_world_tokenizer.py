"""Tiny-world tokenizer: deterministic, small, tags as single ids, one id per word wherever it
appears, lossless up to the leading spaces it adds, loads offline."""
import random
import re

import pytest
from transformers import AutoTokenizer

from mempo.envs import build_tiny_world, load_tokenizer, save_tokenizer, tiny_world_tokenizer, train_tokenizer
from mempo.envs.tokenizer import tag_tokens


@pytest.fixture(scope="module")
def tokenizer(world):
    return tiny_world_tokenizer(world)


def test_deterministic(world, tokenizer):
    again = tiny_world_tokenizer(build_tiny_world(seed=world.config.seed))
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert world.tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_small_vocab_and_compact_encoding(world, tokenizer):
    assert 300 <= len(tokenizer) <= 1024
    trajectory = world.expert_trajectories(world.tasks("heldout", 2)[:1])[0]
    text = trajectory.prompt + "".join(t.model + (t.information or "") for t in trajectory.turns)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < len(text) / 3  # names and words are merged, not spelled out
    assert tokenizer.decode(ids) == with_leading_spaces(text)


def with_leading_spaces(text: str) -> str:
    """`text` as the tokenizer decodes it: a space starts the text, each line and the text after each tag,
    where none is there already."""
    tags = "|".join(map(re.escape, tag_tokens()))
    return re.sub(rf"(^|\n|{tags})(?=[^ ])(?!{tags})", lambda m: m.group() + " ", text)


def test_a_name_is_one_id_wherever_it_appears(world, tokenizer):
    """In a question, after <search>, at a passage's start and after a line break: the same id."""
    trajectory = world.expert_trajectories(world.tasks("train", 2)[:1])[0]
    name = world.plan(trajectory.task)[0][0].subject  # the first query's subject
    name_id = tokenizer(" " + name)["input_ids"]
    assert len(name_id) == 1
    for text in (trajectory.prompt, trajectory.turns[0].model, trajectory.turns[0].information):
        assert name in text and name_id[0] in tokenizer(text)["input_ids"], text
    assert trajectory.turns[0].model.count(name) == tokenizer(trajectory.turns[0].model)["input_ids"].count(name_id[0])


def test_tags_are_single_kept_tokens(tokenizer):
    for tag in tag_tokens():
        ids = tokenizer(tag)["input_ids"]
        assert len(ids) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == tag
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None


def test_any_text_roundtrips(tokenizer, seed):
    rng = random.Random(seed)
    text = "".join(chr(rng.randint(1, 0x10FFF)) for _ in range(2000)).replace("\r", "")
    text = "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == with_leading_spaces(text)
    assert tokenizer(tokenizer.decode(ids))["input_ids"] == ids  # decoded text re-encodes to the same ids


def test_save_load_offline(tokenizer, tmp_path, world):
    save_tokenizer(tokenizer, tmp_path / "tok")
    text = world.prompt(world.tasks("train")[0])
    assert load_tokenizer(tmp_path / "tok")(text)["input_ids"] == tokenizer(text)["input_ids"]
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert auto(text)["input_ids"] == tokenizer(text)["input_ids"]
    with pytest.raises(ValueError, match="directory"):
        load_tokenizer(tmp_path / "missing")


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["text"], vocab_size=100)
    with pytest.raises(ValueError, match="texts"):
        train_tokenizer([])
