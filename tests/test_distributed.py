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


def test_all_reduce_sums_takes_numbers_and_device_tensors_in_one_call(monkeypatch):
    """One collective for the whole dict, numbers and 0-dim tensors mixed, every key back."""
    import torch.distributed as dist

    from mempo import distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: calls.append(t.clone()) or t.mul_(2))  # "2 ranks"
    values = {"b": 3, "a": 1.5, "t": torch.tensor(0.25, dtype=torch.float32), "u": torch.tensor(7, dtype=torch.int64)}
    out = distributed.all_reduce_sums(values)
    assert len(calls) == 1 and calls[0].dtype == torch.float64 and calls[0].numel() == 4
    assert out == {"a": 3.0, "b": 6.0, "t": 0.5, "u": 14.0}
