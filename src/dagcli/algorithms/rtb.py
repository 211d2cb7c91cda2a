"""Relative trajectory balance (RTB): the arithmetic, as pure functions of per-trajectory tensors, and the learned
log Z. The target is the base model tilted by the reward, p_base(τ | c)·exp(β r(x_T)) / Z(c).

For a trajectory τ of prompt c with per-step log ratios ρ_i = log P_θ(x_{i+1} | x_i) − log P_base(x_{i+1} | x_i):
    A(τ) = log Z(c) + Σ_i ρ_i − β r(x_T),      L(τ) = A(τ)²
Memory stays per step: ∇L = 2·A·Σ_i ∇log P_θ(x_{i+1} | x_i) + 2·A·∇log Z, so each transition's loss is
2·A.detach()·log P_θ and each trajectory adds 2·A.detach()·log Z once (`transition_surrogate`, `log_z_surrogate`).
A is computed once per trajectory from the log-probs of the pass that re-scores it, so the surrogate's gradient is
the trajectory loss's exactly when that pass is the one whose log P_θ is differentiated (on-policy).

log Z(c) comes either from a learned per-prompt table (`LogZTable`), or from VarGrad: log Ẑ(c) is the mean over
the prompt's group of β r − Σ ρ, so A is Σ ρ − β r centred in its group (`vargrad_residuals`): KL-regularised
REINFORCE with the path's exact log ratio and no std normalisation.
"""

from __future__ import annotations

import torch

from dagcli.errors import DagError


def residual(log_z: torch.Tensor, log_ratio_sum: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """[N] A(τ) = log Z(c) + Σ_i [log P_θ − log P_base] − β r(x_T); the reward is data."""
    return log_z + log_ratio_sum - beta * reward.detach()


def trajectory_loss(log_z: torch.Tensor, log_ratio_sum: torch.Tensor, reward: torch.Tensor, beta: float
                    ) -> torch.Tensor:
    """[N] RTB's loss per trajectory, A(τ)²."""
    return residual(log_z, log_ratio_sum, reward, beta) ** 2


def transition_surrogate(traj_residual: torch.Tensor, log_pf: torch.Tensor) -> torch.Tensor:
    """[n] 2·A(τ).detach()·log P_θ(x_{i+1} | x_i) for transitions whose trajectory's residual is `traj_residual`
    [n]: summed over a trajectory's steps, its gradient is A(τ)²'s in the policy."""
    return 2 * traj_residual.detach() * log_pf


def log_z_surrogate(traj_residual: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """[N] 2·A(τ).detach()·log Z(c), once per trajectory: its gradient is A(τ)²'s in log Z."""
    return 2 * traj_residual.detach() * log_z


def _group_means(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[N] each value's group mean (float64)."""
    _, inverse = torch.unique(groups.cpu(), return_inverse=True)
    inverse = inverse.to(values.device)
    n = int(inverse.max()) + 1 if len(inverse) else 0
    v = values.double()
    count = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, inverse, torch.ones_like(v))
    total = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, inverse, v)
    return (total / count)[inverse]


def vargrad_log_z(log_ratio_sum: torch.Tensor, reward: torch.Tensor, groups: torch.Tensor, beta: float
                  ) -> torch.Tensor:
    """[N] VarGrad's log Ẑ(c) of each trajectory's group: the group's mean of β r − Σ ρ (no gradient)."""
    return _group_means((beta * reward - log_ratio_sum).detach(), groups).to(log_ratio_sum.dtype)


def vargrad_residuals(log_ratio_sum: torch.Tensor, reward: torch.Tensor, groups: torch.Tensor, beta: float
                      ) -> torch.Tensor:
    """[N] A with VarGrad's log Ẑ: Σ ρ − β r centred in its prompt group (no gradient; a group of one gets 0)."""
    return residual(vargrad_log_z(log_ratio_sum, reward, groups, beta), log_ratio_sum.detach(), reward, beta)


class LogZTable(torch.nn.Module):
    """A learned log Z per prompt of the run, initialised at 0.

    A table rather than a head on the pooled text embedding: the run's prompts are a fixed, finite list, the
    target's log Z is a per-prompt number, and a table fits each one on its own (no capacity shared between
    prompts, nothing to generalise), for every family alike (SD 1.5 has no pooled embedding).
    """

    def __init__(self, prompts: list[str]):
        super().__init__()
        self.prompts = list(dict.fromkeys(prompts))
        self._index = {p: k for k, p in enumerate(self.prompts)}
        self.log_z = torch.nn.Parameter(torch.zeros(len(self.prompts)))

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """[n] log Z of each prompt."""
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise DagError(f"no learned log Z for the prompt {missing[0]!r}: the table holds the run's "
                           f"{len(self.prompts)} prompts")
        idx = torch.tensor([self._index[p] for p in prompts], dtype=torch.long, device=self.log_z.device)
        return self.log_z[idx]

    def metadata(self) -> dict:
        """What rebuilds the table (saved beside its weights, as the flow network's config is)."""
        return {"prompts": self.prompts}


def log_z_table_from(metadata: dict) -> LogZTable:
    """Rebuild a saved table from the metadata written beside its weights."""
    return LogZTable(metadata["prompts"])
