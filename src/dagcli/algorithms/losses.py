"""The losses, as small functions of per-sample tensors ([B] unless noted). No model code here.

Detailed balance for a transition x_t -> x_s (s the next, less noisy state):
    δ = log F(x_t) + log P_F(x_s | x_t) − log F(x_s) − log P_B(x_t | x_s)
with the forward-looking flow log F(x_t) = F̃_φ(x_t) + β r(x̂0(x_t)) and log F(x_0) = β r(x_0).
"""

from __future__ import annotations

import torch

from dagcli.errors import DagError


def forward_looking_flow(flow_value: torch.Tensor, fl_reward: torch.Tensor, beta: float) -> torch.Tensor:
    """log F(x_t) = F̃_φ(x_t) + β·r(x̂0(x_t)). The reward is data: never differentiated."""
    return flow_value + beta * fl_reward.detach()


def db_residual(
    log_f_t: torch.Tensor, log_pf: torch.Tensor, log_f_s: torch.Tensor, log_pb: torch.Tensor
) -> torch.Tensor:
    """δ = log F(x_t) + log P_F − log F(x_s) − log P_B (log P_B is a constant of the data)."""
    return log_f_t + log_pf - log_f_s - log_pb.detach()


def db_loss(
    log_f_t: torch.Tensor, log_pf: torch.Tensor, log_f_s: torch.Tensor, log_pb: torch.Tensor
) -> torch.Tensor:
    """DAG-DB: δ² per transition."""
    return db_residual(log_f_t, log_pf, log_f_s, log_pb) ** 2


def rdb_residual(
    log_f_t: torch.Tensor, log_pf: torch.Tensor, log_p_base: torch.Tensor, log_f_s: torch.Tensor
) -> torch.Tensor:
    """Relative DB: δ = log F(x_t) + log P_θ(x_s | x_t) − log P_base(x_s | x_t) − log F(x_s).

    log P_base is the frozen base model's forward step on the same transition (a constant of the data).
    """
    return log_f_t + (log_pf - log_p_base.detach()) - log_f_s


def proximity(eps: torch.Tensor, eps_sampling: torch.Tensor) -> torch.Tensor:
    """mean over latent dims of (ε̃_θ − ε̃_sampling)² per sample: keeps the policy near the one that sampled."""
    return ((eps.float() - eps_sampling.float().detach()) ** 2).flatten(1).mean(1)


def leave_one_out_advantages(values: torch.Tensor, clip: float) -> torch.Tensor:
    """(v_i − mean_{j≠i} v_j) / (std_{j≠i} + 1e-8), clipped to ±clip. Needs at least two samples."""
    n = values.shape[0]
    if n < 2:
        raise DagError("DAG-KL needs a train batch of at least 2 (its leave-one-out baseline); got 1")
    v = values.detach()
    baseline = (v.sum() - v) / (n - 1)
    sq = (v - baseline) ** 2
    var = (sq.sum() - sq) / (n - 1)
    return ((v - baseline) / (var.sqrt() + 1e-8)).clamp(-clip, clip)


def clipped_surrogate(
    advantages: torch.Tensor, log_prob: torch.Tensor, log_prob_old: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """PPO's clipped objective as a loss: max(−A·ρ, −A·clip(ρ, 1±ε)), ρ = exp(log π − log π_old)."""
    ratio = torch.exp(log_prob - log_prob_old.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def dag_kl_losses(
    log_f_t: torch.Tensor,
    log_pf: torch.Tensor,
    log_pf_old: torch.Tensor,
    log_f_s: torch.Tensor,
    log_pb: torch.Tensor,
    clip_range: float,
    adv_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DAG-KL: (flow loss by DB with detached log P_F, REINFORCE loss on the policy), both per transition.

    The per-transition 'reward' b = log F(x_s) + log P_B − log P_F − log F(x_t) (all detached) is turned into a
    leave-one-out advantage and fed to the clipped surrogate.
    """
    flow_loss = db_loss(log_f_t, log_pf.detach(), log_f_s, log_pb)
    b = (log_f_s + log_pb - log_pf - log_f_t).detach()
    adv = leave_one_out_advantages(b, adv_clip)
    return flow_loss, clipped_surrogate(adv, log_pf, log_pf_old, clip_range)
