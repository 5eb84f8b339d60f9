"""mempo.optim: the learning-rate schedule."""
import pytest

from mempo.optim import lr_multiplier


def test_lr_schedule():
    assert [lr_multiplier(s, 4, 20) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_multiplier(4, 4, 20, "cosine") == 1.0
    assert lr_multiplier(20, 4, 20, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(12, 4, 20, "cosine") == pytest.approx(0.5)


def test_warmup_stable_decay():
    """constant with decay_steps: flat, then linear towards 0 over the last decay_steps steps,
    never more of them than follow the warmup."""
    assert [lr_multiplier(s, 0, 10, decay_steps=4) for s in range(10)] == [1.0] * 7 + [0.75, 0.5, 0.25]
    assert [lr_multiplier(s, 2, 5, decay_steps=100) for s in range(5)] == [0.5, 1.0, 1.0, 2 / 3, 1 / 3]
    assert [lr_multiplier(s, 0, 3) for s in range(3)] == [1.0, 1.0, 1.0]


def test_warm_start_lr_decays_over_its_last_fraction():
    """sft.decay_fraction: the trainer's warm-start lr decays over the last fraction of
    sft.steps, then RL starts at optimizer.lr."""
    from mempo.config import parse_args
    from mempo.trainer import learning_rate

    cfg = parse_args(["--sft.steps", "10", "--sft.warmup_steps", "0", "--sft.decay_fraction", "0.5"])
    assert [learning_rate(cfg, s) / cfg.sft.lr for s in range(10)] == pytest.approx([1.0] * 6 + [0.8, 0.6, 0.4, 0.2])
    assert learning_rate(cfg, 10) == cfg.optimizer.lr
    cfg = parse_args(["--sft.steps", "10", "--sft.warmup_steps", "0", "--sft.decay_fraction", "0"])
    assert [learning_rate(cfg, s) for s in range(10)] == [cfg.sft.lr] * 10
