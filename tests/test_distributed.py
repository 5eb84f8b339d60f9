"""mempo.distributed in one process: sharding helpers and activation checkpointing (the
two-rank FSDP2 runs are in test_checkpoint.py)."""
import pytest
import torch
from model_dirs import TINY_MODEL

from mempo.distributed import shard_for_rank, shard_model
from mempo.models.builder import build_model


def test_activation_checkpointing_same_gradients(seed):
    plain, checkpointed = build_model(TINY_MODEL, 64, seed=seed), build_model(TINY_MODEL, 64, seed=seed)
    shard_model(checkpointed, activation_checkpointing=True)  # no process group: no sharding
    ids = torch.randint(0, 64, (2, 10))
    for model in (plain, checkpointed):
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert list(plain.state_dict()) == list(checkpointed.state_dict())


def test_shard_for_rank_partitions():
    items = list(range(10))
    shards = [shard_for_rank(items, r, 4) for r in range(4)]
    assert [len(s) for s in shards] == [3, 3, 2, 2]
    assert sum(shards, []) == items
    assert shard_for_rank(items[:1], 1, 2) == []
    with pytest.raises(ValueError, match="rank"):
        shard_for_rank(items, 2, 2)
