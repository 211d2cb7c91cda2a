"""The epoch line's reward statistics, against Python's own arithmetic."""

import statistics

import torch

from dagcli.metrics import _stats


def test_reward_stats_of_finite_rewards_near_float32s_range_stay_finite():
    values = [3e38, 3e38, 1e38, -2e38]
    out = _stats("reward", torch.tensor(values), extremes=True)
    assert out["reward_mean"] == statistics.fmean(torch.tensor(values).double().tolist())
    assert abs(out["reward_std"] / statistics.stdev(torch.tensor(values).double().tolist()) - 1) < 1e-12
    assert out["reward_min"] == float(torch.tensor(-2e38)) and out["reward_max"] == float(torch.tensor(3e38))


def test_reward_stats_of_one_and_of_no_value():
    assert _stats("reward", torch.tensor([0.25])) == {"reward_mean": 0.25, "reward_std": 0.0}
    empty = _stats("reward", torch.tensor([]))
    assert empty["reward_std"] == 0.0 and empty["reward_mean"] != empty["reward_mean"]  # NaN
