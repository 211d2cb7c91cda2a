"""What the tests share besides fixtures (those are in `tests/conftest.py`): running the CLI in-process, tiny reward
models and run folders built without training, reward servers and their stand-ins, the test-only algorithms, and
the scripts the tests start in other processes (`dist_train.py`, `reward_standins.py`) or that check the tests
themselves (`mutations.py`)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: src/, examples/, benchmarks/, README.md
