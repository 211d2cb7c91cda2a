"""benchmarks/compare_algorithms.py: evaluation points during training and the summary arithmetic."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_algorithms", ROOT / "benchmarks" / "compare_algorithms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diversity_at_interpolates_between_evaluation_points(compare) -> None:
    evals = [{"eval_reward": -1.0, "diversity": 0.20}, {"eval_reward": -0.8, "diversity": 0.10},
             {"eval_reward": -0.6, "diversity": 0.05}]
    assert compare.diversity_at(evals, -0.9) == pytest.approx(0.15)
    assert compare.diversity_at(evals, -0.7) == pytest.approx(0.075)
    assert compare.diversity_at(evals, -1.5) == pytest.approx(0.20)  # reached before training
    assert compare.diversity_at(evals, -0.5) is None


def test_summary_level_and_trajectories(compare) -> None:
    def run(algo, rewards, evals):
        curve = [{"trajectories": 10 * (i + 1), "reward": r} for i, r in enumerate(rewards)]
        return {"algorithm": algo, "curve": curve, "evals": evals, "eval_reward": evals[-1]["eval_reward"],
                "diversity": evals[-1]["diversity"], "fidelity": 1.0, "train_seconds": 1.0}

    runs = [run("ddpo", [-1.0, -0.9, -0.8, -0.8, -0.8], [{"eval_reward": -1.0, "diversity": 0.2},
                                                           {"eval_reward": -0.8, "diversity": 0.1}]),
            run("dag-db", [-1.0, -0.7, -0.6, -0.6, -0.6], [{"eval_reward": -1.0, "diversity": 0.2},
                                                             {"eval_reward": -0.6, "diversity": 0.16}])]
    s = compare.summarize(runs)
    assert s["level"] == pytest.approx(-0.8) and s["eval_level"] == pytest.approx(-0.8)
    db = s["algorithms"]["dag-db"]
    assert db["trajectories_to_ddpo_level"]["mean"] == 20  # first epoch at or above -0.8
    assert db["diversity_at_ddpo_eval_level"]["mean"] == pytest.approx(0.18)
    assert s["algorithms"]["ddpo"]["trajectories_to_ddpo_level"]["mean"] == 30
    assert "| dag-db |" in compare.table(s)


def test_run_one_evaluates_along_training(compare, tmp_path) -> None:
    torch.manual_seed(0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    overrides = ["sampling.batch_size=2", "sampling.batches_per_epoch=1", "sampling.steps=2", "train.batch_size=2",
                 f'sampling.prompts="{prompts}"', 'reward.spec="colorfulness"']
    run = compare.run_one(ROOT / compare.PRESETS["compressibility"], "ddpo", 0, 2, tmp_path, 2, overrides,
                          eval_every=1, threads=1)
    assert [p["epoch"] for p in run["evals"]] == [0, 1, 2]
    assert [p["trajectories"] for p in run["evals"]] == [0, 2, 4]
    assert [p["trajectories"] for p in run["curve"]] == [2, 4]
    assert all(math.isfinite(p["eval_reward"]) and p["diversity"] >= 0 for p in run["evals"])
    assert run["eval_reward"] == run["evals"][-1]["eval_reward"]
