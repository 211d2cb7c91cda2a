"""The golden runs (tests/golden/runs.py) reproduce their recorded numbers bit for bit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import runs  # noqa: E402

GOLDEN = json.loads(runs.GOLDEN_FILE.read_text())


@pytest.mark.parametrize("name", sorted(runs.RUNS))
def test_golden_run_is_reproduced_bit_for_bit(name, tmp_path):
    got = runs.run_one(name, tmp_path)
    want = GOLDEN[name]
    assert len(got["epochs"]) == len(want["epochs"]) == 2
    for epoch, (g, w) in enumerate(zip(got["epochs"], want["epochs"], strict=True), start=1):
        for key in w:
            assert key in g, f"{name} epoch {epoch}: metric {key} is no longer recorded"
            assert g[key] == w[key], f"{name} epoch {epoch}: {key} = {g[key]!r}, golden {w[key]!r}"
    assert got["weights_sha256"] == want["weights_sha256"], f"{name}: trained weights differ"
