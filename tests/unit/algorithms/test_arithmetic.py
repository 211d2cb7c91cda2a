"""Training arithmetic against hand-computed values: DDPO's per-prompt advantages, the β ramp, which
transitions an epoch trains on and how many micro-batches make an optimiser step. Each expected value is worked out in the comments from the inputs."""

from __future__ import annotations

import math

import pytest
import torch

from dagcli.algorithms.dag import beta_at
from dagcli.algorithms.ddpo import per_prompt_advantages
from dagcli.config import accumulation_steps, transitions_per_trajectory
from dagcli.rollout import select_transitions


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DDPO's per-prompt advantages


def test_ddpo_buffer_is_updated_capped_and_used_before_normalising():
    buffers = {"a": [1.0, 2.0, 3.0]}
    adv = per_prompt_advantages(["a", "a", "b"], torch.tensor([4.0, 5.0, 0.0]), buffers,
                                buffer_size=4, min_count=2, clip=10.0)
    # 'a': [1, 2, 3] + [4, 5] capped at 4 -> [2, 3, 4, 5]: mean 3.5, unbiased var (2.25+0.25+0.25+2.25)/3 = 5/3.
    # 'b': [0] has 1 < min(2, 4) rewards -> batch [4, 5, 0]: mean 3, unbiased var (1 + 4 + 9)/2 = 7.
    _close(adv, [0.5 / (math.sqrt(5 / 3) + 1e-6), 1.5 / (math.sqrt(5 / 3) + 1e-6), -3.0 / (math.sqrt(7) + 1e-6)])
    assert buffers == {"a": [2.0, 3.0, 4.0, 5.0], "b": [0.0]}


def test_ddpo_min_count_is_capped_by_buffer_size_and_advantages_are_clipped():
    buffers: dict[str, list[float]] = {}
    adv = per_prompt_advantages(["a", "a", "b"], torch.tensor([1.0, 3.0, 8.0]), buffers,
                                buffer_size=2, min_count=16, clip=1.0)
    # 'a': [1, 3] holds min(16, 2) = 2 rewards -> its own statistics: mean 2, std sqrt(2) -> ∓1/sqrt(2).
    # 'b': [8] -> batch [1, 3, 8]: mean 4, unbiased var (9 + 1 + 16)/2 = 13 -> 4/sqrt(13) = 1.109, clipped to 1.
    _close(adv, [-1 / (math.sqrt(2) + 1e-6), 1 / (math.sqrt(2) + 1e-6), 1.0])


@pytest.mark.parametrize("rewards, expected", [
    # batch mean 2.5, unbiased var (3·6.25 + 56.25)/3 = 25 -> [-0.5, -0.5, -0.5, 1.5]; 1.5 clipped to 1
    ([0.0, 0.0, 0.0, 10.0], [-2.5 / (5 + 1e-6)] * 3 + [1.0]),
    # the mirror image: -1.5 clipped to -1
    ([10.0, 10.0, 10.0, 0.0], [2.5 / (5 + 1e-6)] * 3 + [-1.0]),
])
def test_ddpo_rare_prompts_use_unbiased_batch_statistics_and_clip_both_ways(rewards, expected):
    adv = per_prompt_advantages(["p", "q", "r", "s"], torch.tensor(rewards), {}, buffer_size=16, min_count=2,
                                clip=1.0)
    _close(adv, expected)


@pytest.mark.parametrize("min_count", [2, 3])  # 2: the prompt's own buffer; 3: the batch fallback
def test_ddpo_epsilon_is_one_millionth(min_count):
    # rewards 0 and 2^-19 (exact in float32): mean 2^-20, unbiased std sqrt(2)·2^-20 = 1.35e-6, comparable to
    # the 1e-6 in the denominator, so the advantages are ∓2^-20 / (sqrt(2)·2^-20 + 1e-6) = ∓0.405 (not ∓0.707).
    tiny = 2.0**-20
    adv = per_prompt_advantages(["a", "a"], torch.tensor([0.0, 2 * tiny]), {}, buffer_size=16,
                                min_count=min_count, clip=10.0)
    _close(adv, [-tiny / (math.sqrt(2) * tiny + 1e-6), tiny / (math.sqrt(2) * tiny + 1e-6)])


def test_ddpo_single_new_reward_has_zero_advantage():
    # one reward, no history: the batch std of one value is taken as 1, so (r - r)/(1 + 1e-6) = 0
    adv = per_prompt_advantages(["a"], torch.tensor([7.0]), {}, buffer_size=16, min_count=2, clip=5.0)
    assert adv.tolist() == [0.0]


# ---------------------------------------------------------------- β ramp


def test_beta_ramp_starts_above_zero_and_reaches_beta():
    # β·min(1, (epoch+1)/ramp): 2·1/4, 2·2/4, 2·3/4, 2·4/4, then 2
    assert [beta_at(2.0, 4, e) for e in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert beta_at(2.0, 0, 0) == 2.0 and beta_at(2.0, 1, 0) == 2.0  # no ramp


# ---------------------------------------------------------------- transitions per epoch


def _chosen(fraction: float, always_last: bool, n: int = 16, epoch: int = 0) -> list[list[int]]:
    """The sorted steps picked for each of n trajectories of 10 steps."""
    pairs = select_transitions(0, epoch, 0, n, 10, fraction, always_last)
    assert pairs.shape == (n * transitions_per_trajectory(10, fraction), 2)
    return [sorted(int(i) for j, i in pairs.tolist() if j == b) for b in range(n)]


@pytest.mark.parametrize("fraction, k", [(1.0, 10), (0.99, 9), (0.26, 2), (0.3, 3), (0.5, 5), (0.01, 1)])
def test_transitions_per_trajectory_floors_the_fraction(fraction, k):
    # ⌊10·fraction⌋, at least 1, as the reference codes' int(): 10, ⌊9.9⌋ = 9 (the last step is not always
    # trained), ⌊2.6⌋ = 2, 3 (0.3·10 = 2.9999… in floats), 5, ⌊0.1⌋ = 0 -> 1
    assert transitions_per_trajectory(10, fraction) == k
    assert all(len(c) == len(set(c)) == k and all(0 <= i < 10 for i in c) for c in _chosen(fraction, False))


@pytest.mark.parametrize("accumulation, steps, fraction, expected", [
    (200, 50, 0.5, 100),  # 200 · 25/50
    (4, 10, 0.26, 1),  # round(4 · 2/10) = round(0.8)
    (10, 10, 0.26, 2),  # 10 · 2/10
    (1, 10, 0.1, 1),  # round(0.1) = 0 -> at least 1
    (8, 10, 1.0, 8),
])
def test_accumulation_scales_with_the_trained_share_of_each_trajectory(accumulation, steps, fraction, expected):
    assert accumulation_steps(accumulation, steps, fraction) == expected


def test_all_transitions_when_every_step_is_picked():
    assert _chosen(1.0, always_last=False) == [list(range(10))] * 16
    assert _chosen(1.0, always_last=True) == [list(range(10))] * 16


def test_always_last_step_adds_the_final_transition():
    without = _chosen(0.3, always_last=False)
    assert sum(9 in c for c in without) < 16  # 3 of 10 steps: most trajectories miss step 9 by chance
    with_last = _chosen(0.3, always_last=True)
    assert all(9 in c and len(set(c)) == 3 for c in with_last)
    # the final step replaces one of the drawn steps; the others are those drawn without the option
    assert all(set(w) - {9} <= set(c) for w, c in zip(with_last, without, strict=True))


def test_transitions_are_shuffled_and_depend_on_seed_epoch_and_rank():
    a = select_transitions(0, 0, 0, 4, 10, 1.0, False)
    assert torch.equal(a, select_transitions(0, 0, 0, 4, 10, 1.0, False))  # reproducible
    for other in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:  # seed, epoch, rank
        assert not torch.equal(a, select_transitions(*other, 4, 10, 1.0, False))
    assert a[:, 0].tolist() != sorted(a[:, 0].tolist())  # trajectories interleaved, not one after another
