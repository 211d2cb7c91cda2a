"""Two algorithms that exist for the tests only: the smallest real users of the `trajectories` and `samples` loss
units. They read the `[ddpo]` section (any registered section would do) and train the LoRA only.

    trajectory balance (relative, log Z = 0, the sampling policy as the prior): per trajectory b
        δ_b = Σ_i (log π_θ(x_{i+1}|x_i) − log π_old(x_{i+1}|x_i)) − β·r_b,   loss = δ_b²
    trained per step: ∇ δ_b² = 2 δ_b Σ_i ∇ log π_θ(step i), so each step's term is 2·δ_b·log π_θ(step i) with δ_b
    computed once per epoch from every step's current log-prob (`prepare_trajectories`).

    reward-weighted denoising: a final latent x_T re-noised to state j, x = √ᾱ_j x_T + √(1 − ᾱ_j) ε, and
        loss = (r_b − mean r) · mean((ε̂_θ(x, j) − ε)²)
"""

from __future__ import annotations

import torch

from dagcli.algorithms import ALGORITHMS, AlgorithmInfo, ddpo_settings
from dagcli.algorithms.base import LoraOnly

TRAJECTORY, SAMPLES = "test-trajectory-balance", "test-reward-weighted-denoising"
BETA = 0.5


class TrajectoryBalance(LoraOnly):
    name = TRAJECTORY

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.trained: list[tuple[int, ...]] = []  # every (trajectory, step) a loss was computed for, in order
        self.prepared: list[dict] = []  # per call of prepare_trajectories: what it saw and what it set

    def prepare(self, batch, dist) -> None:
        """Nothing per epoch before the policy pass."""

    def prepare_trajectories(self, batch, log_pf: torch.Tensor, dist) -> None:
        delta = (log_pf - batch.traj.log_probs).sum(1) - BETA * batch.rewards
        batch.advantages = delta
        self.prepared.append({"log_pf": log_pf.clone(), "rewards": batch.rewards.clone(), "delta": delta.clone()})

    def loss(self, mb, policy, batch, epoch: int):
        self.trained.extend(zip(mb.traj_index.tolist(), mb.step_index.tolist(), strict=True))
        delta = batch.advantages[mb.traj_index].to(mb.x.device)
        loss = 2 * delta * policy.step.log_prob
        return loss, {"delta": delta.abs().mean()}


class RewardWeightedDenoising(LoraOnly):
    name = SAMPLES

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.trained: list[tuple[int, ...]] = []  # every (trajectory, state) a loss was computed for, in order

    def prepare(self, batch, dist) -> None:
        rewards = dist.gather_floats(batch.rewards)
        batch.advantages = batch.rewards - rewards.mean()

    def loss(self, sb, policy, batch, epoch: int):
        schedule = self.ctx.schedule
        self.trained.extend(zip(sb.traj_index.tolist(), sb.step_index.tolist(), strict=True))
        x = self.ctx.family.noised(schedule, sb.step_index, sb.x0, sb.noise)
        err = ((policy(x, sb.step_index).float() - sb.noise) ** 2).flatten(1).mean(1)
        weight = batch.advantages[sb.traj_index].to(err.device)
        return weight * err, {"denoising_error": err.detach().mean()}


BUILT: dict[str, list] = {TRAJECTORY: [], SAMPLES: []}  # every instance built, per name (the tests read them)


def _build(cls):
    def build(settings, ctx):
        algo = cls(settings, ctx)
        BUILT[cls.name].append(algo)
        return algo

    return build


INFOS = {
    TRAJECTORY: AlgorithmInfo(TRAJECTORY, ddpo_settings.SECTION, "relative trajectory balance (tests only)", 1,
                              _build(TrajectoryBalance), unit="trajectories"),
    SAMPLES: AlgorithmInfo(SAMPLES, ddpo_settings.SECTION, "reward-weighted denoising (tests only)", 1,
                           _build(RewardWeightedDenoising), unit="samples"),
}


def register(monkeypatch) -> None:
    """Both test algorithms in `ALGORITHMS` for one test, and forget what earlier tests built."""
    for name, info in INFOS.items():
        monkeypatch.setitem(ALGORITHMS, name, info)
        BUILT[name].clear()
