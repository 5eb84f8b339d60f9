"""mempo.distributed in one process: sharding helpers and activation checkpointing (the
two-rank FSDP2 runs are in test_checkpoint.py)."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from model_dirs import TINY_MODEL

from mempo.distributed import balanced_shard, shard_for_rank, shard_model
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


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_balanced_shard_partitions_by_size(world):
    """Fresh ragged sizes: the ranks' shares are disjoint, cover the items, keep their order,
    and the heaviest share is within one item of the mean (what contiguous shards miss)."""
    rng = random.Random(world)
    for _ in range(50):
        sizes = [rng.randint(1, 500) for _ in range(rng.randint(0, 20))]
        items = [f"t{i}" for i in range(len(sizes))]
        shards = [balanced_shard(items, sizes, r, world) for r in range(world)]
        assert sorted(sum(shards, [])) == sorted(items)
        assert all(s == sorted(s, key=items.index) for s in shards)
        loads = [sum(sizes[items.index(x)] for x in s) for s in shards]
        assert max(loads) <= sum(sizes) / world + max(sizes, default=0)
    # a long item first, then short ones: contiguous halves give [500+1+1, 1+1+1], balanced [500, 1*5]
    sizes = [500, 1, 1, 1, 1, 1]
    assert balanced_shard(list(range(6)), sizes, 0, 2) == [0]
    assert balanced_shard(list(range(6)), sizes, 1, 2) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="rank"):
        balanced_shard([1], [1], 2, 2)
    with pytest.raises(ValueError, match="sizes must match"):
        balanced_shard([1, 2], [1], 0, 2)


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



def test_cpu_ranks_flush_denormals_to_zero():
    """init_distributed on the CPU turns on flush-to-zero (a process-wide mode, so in its own
    process): a product below float32's smallest normal becomes 0, and softmax's sum is unchanged."""
    code = ("import json, torch\n"
            "from mempo.distributed import destroy_distributed, init_distributed\n"
            "x = torch.tensor([1e-20])\n"
            "before = (x * x).item()\n"
            "init_distributed('cpu')\n"
            "print(json.dumps([before, (x * x).item(), torch.softmax(torch.tensor([0.0, -100.0]), 0).tolist()]))\n"
            "destroy_distributed()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after, probs = json.loads(proc.stdout)
    assert before > 0.0 and after == 0.0  # 1e-40 is a float32 denormal: flushed
    assert probs == [1.0, 0.0]  # e^-100 ~ 3.7e-44 is a denormal: 0 now
