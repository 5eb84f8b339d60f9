"""mempo.step_guard: non-finite steps are skipped, then the run stops."""
import math

import pytest

from mempo.step_guard import NonFiniteError, NonFiniteStepGuard


def test_step_guard_skips_then_stops():
    guard = NonFiniteStepGuard(max_bad_steps=3)
    assert guard.should_step(1, 0.5, 1.0)
    with pytest.warns(RuntimeWarning, match="skipping"):
        assert not guard.should_step(2, math.nan, 1.0)
    with pytest.warns(RuntimeWarning):
        assert not guard.should_step(3, 0.5, math.inf)
    assert guard.should_step(4, 0.5, 1.0)  # a good step resets the count
    with pytest.warns(RuntimeWarning):
        guard.should_step(5, math.nan, 1.0)
        guard.should_step(6, math.nan, 1.0)
    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        guard.should_step(7, math.nan, math.nan)
    assert guard.total_skipped == 5
