"""mempo.optim: the learning-rate schedule."""
import pytest

from mempo.optim import lr_multiplier


def test_lr_schedule():
    assert [lr_multiplier(s, 4, 20) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_multiplier(4, 4, 20, "cosine") == 1.0
    assert lr_multiplier(20, 4, 20, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(12, 4, 20, "cosine") == pytest.approx(0.5)
