"""The code passes the repository's ruff configuration (ruff.toml): imports sorted, no unused
names, lines within 120 columns, the bugbear and pyupgrade rules."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (it is in the test extra)")
def test_ruff_passes():
    run = subprocess.run(["ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
