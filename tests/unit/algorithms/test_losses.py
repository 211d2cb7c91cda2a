"""Losses against hand-computed values, and where gradients flow."""

from __future__ import annotations

import math

import pytest
import torch

from dagcli.algorithms import losses
from dagcli.algorithms.flow import FlowConfig, FlowNetwork
from dagcli.errors import DagError


def test_db_loss_hand_computed():
    log_f_t = torch.tensor([1.0, -2.0])
    log_pf = torch.tensor([0.5, 0.25])
    log_f_s = torch.tensor([2.0, -1.0])
    log_pb = torch.tensor([-0.5, 0.75])
    # δ = 1 + 0.5 - 2 + 0.5 = 0 ; δ = -2 + 0.25 + 1 - 0.75 = -1.5
    torch.testing.assert_close(losses.db_loss(log_f_t, log_pf, log_f_s, log_pb), torch.tensor([0.0, 2.25]))


def test_db_residual_hand_computed_and_log_pb_is_data():
    log_f_t = torch.tensor([1.0, -2.0], requires_grad=True)
    log_pf = torch.tensor([0.5, 0.25], requires_grad=True)
    log_f_s = torch.tensor([2.0, -1.0], requires_grad=True)
    log_pb = torch.tensor([-0.5, 0.75], requires_grad=True)
    delta = losses.db_residual(log_f_t, log_pf, log_f_s, log_pb)
    # 1 + 0.5 - 2 - (-0.5) = 0 ; -2 + 0.25 - (-1) - 0.75 = -1.5
    torch.testing.assert_close(delta, torch.tensor([0.0, -1.5]))
    losses.db_loss(log_f_t, log_pf, log_f_s, log_pb).sum().backward()
    # d δ²/d log F(x_t) = d δ²/d log P_F = 2δ, d δ²/d log F(x_s) = -2δ; log P_B gets none
    torch.testing.assert_close(log_f_t.grad, torch.tensor([0.0, -3.0]))
    torch.testing.assert_close(log_pf.grad, torch.tensor([0.0, -3.0]))
    torch.testing.assert_close(log_f_s.grad, torch.tensor([0.0, 3.0]))
    assert log_pb.grad is None


def test_forward_looking_flow_adds_scaled_reward_without_gradient():
    flow = torch.tensor([0.5, 1.0], requires_grad=True)
    reward = torch.tensor([2.0, -1.0], requires_grad=True)
    out = losses.forward_looking_flow(flow, reward, beta=3.0)
    torch.testing.assert_close(out, torch.tensor([6.5, -2.0]))
    out.sum().backward()
    assert reward.grad is None and torch.equal(flow.grad, torch.ones(2))


def test_leave_one_out_matches_direct_loop():
    v = torch.tensor([1.0, 4.0, -2.0, 0.5, 3.0])
    adv = losses.leave_one_out_advantages(v, clip=100.0)
    for i in range(len(v)):
        others = torch.cat([v[:i], v[i + 1 :]])
        base = others.mean()
        # the reference's "std": root mean of squared deviations of the others from *their own* baseline
        sq = torch.stack([(v[j] - torch.cat([v[:j], v[j + 1 :]]).mean()) ** 2 for j in range(len(v)) if j != i])
        expected = (v[i] - base) / (sq.mean().sqrt() + 1e-8)
        torch.testing.assert_close(adv[i], expected)
    assert losses.leave_one_out_advantages(v * 100, clip=1.0).abs().max() <= 1.0


# v = [0, 1, 5]: leave-one-out baselines (1+5)/2 = 3, (0+5)/2 = 2.5, (0+1)/2 = 0.5; deviations d = [-3, -1.5, 4.5],
# squared [9, 2.25, 20.25]; each sample's variance is the mean of the *other* squares: [11.25, 14.625, 5.625].
LOO_D = [-3.0, -1.5, 4.5]
LOO_VAR = [(2.25 + 20.25) / 2, (9 + 20.25) / 2, (9 + 2.25) / 2]


def test_leave_one_out_hand_computed_and_clipped():
    v = torch.tensor([0.0, 1.0, 5.0])
    expected = [d / (math.sqrt(var) + 1e-8) for d, var in zip(LOO_D, LOO_VAR, strict=True)]  # -0.894, -0.392, 1.897
    torch.testing.assert_close(losses.leave_one_out_advantages(v, clip=100.0), torch.tensor(expected))
    torch.testing.assert_close(losses.leave_one_out_advantages(v, clip=1.5), torch.tensor(expected[:2] + [1.5]))
    torch.testing.assert_close(losses.leave_one_out_advantages(-v, clip=1.5),
                               torch.tensor([-e for e in expected[:2]] + [-1.5]))


def test_leave_one_out_baseline_excludes_the_sample_at_the_scale_of_the_epsilon():
    # Far above 1e-8 the full-batch mean would give the same advantages (deviations and std both scale by
    # n/(n-1)); at values of order 1e-8 the epsilon does not scale, so the baseline shows: [0, 1, 5]·1e-8 gives
    # d/(sqrt(var) + 1) of the unscaled numbers: [-0.689, -0.311, 1.335] (the batch mean would give -0.618, ...).
    v = torch.tensor([0.0, 1e-8, 5e-8])
    expected = [d / (math.sqrt(var) + 1) for d, var in zip(LOO_D, LOO_VAR, strict=True)]
    torch.testing.assert_close(losses.leave_one_out_advantages(v, clip=100.0), torch.tensor(expected),
                               rtol=1e-5, atol=1e-6)


def test_leave_one_out_needs_two():
    with pytest.raises(DagError, match="at least 2"):
        losses.leave_one_out_advantages(torch.tensor([1.0]), clip=5.0)


def test_clipped_surrogate_hand_computed():
    adv = torch.tensor([1.0, -1.0, 2.0])
    logp_old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 1.5, 1.0]))
    out = losses.clipped_surrogate(adv, logp, logp_old, clip_range=0.2)
    # ρ=1.5, A=1: max(-1.5, -1.2) = -1.2 ; A=-1: max(1.5, 1.2) = 1.5 ; ρ=1, A=2: -2
    torch.testing.assert_close(out, torch.tensor([-1.2, 1.5, -2.0]))


def test_clipped_surrogate_below_the_clip_range_and_its_gradient():
    adv = torch.tensor([1.0, -1.0, 2.0])
    logp = torch.log(torch.tensor([0.5, 0.5, 1.1])).requires_grad_()
    out = losses.clipped_surrogate(adv, logp, torch.zeros(3), clip_range=0.2)
    # ρ=0.5, A=1: max(-0.5, -0.8) = -0.5 (unclipped) ; A=-1: max(0.5, 0.8) = 0.8 (clipped) ; ρ=1.1 inside: -2.2
    torch.testing.assert_close(out, torch.tensor([-0.5, 0.8, -2.2]))
    out.sum().backward()
    # d(-Aρ)/d log π = -Aρ where the unclipped term wins, 0 where the clipped (constant) one does
    torch.testing.assert_close(logp.grad, torch.tensor([-0.5, 0.0, -2.2]))


def test_dag_kl_losses_hand_computed():
    log_f_t = torch.tensor([1.0, 0.0, -1.0])
    log_pf = torch.tensor([0.5, -0.5, 1.0], requires_grad=True)
    log_pb = torch.tensor([0.25, 0.5, -0.5])
    log_f_s = torch.tensor([1.25, 0.0, 5.5])
    log_pf_old = torch.tensor([0.5, -0.4, 0.9])  # ratios ρ = 1, e^-0.1 = 0.905, e^0.1 = 1.105
    flow_loss, policy_loss = losses.dag_kl_losses(log_f_t, log_pf, log_pf_old, log_f_s, log_pb,
                                                  clip_range=0.05, adv_clip=1.5)
    # b = log F(x_s) + log P_B - log P_F - log F(x_t) = [1.25+0.25-0.5-1, 0+0.5+0.5-0, 5.5-0.5-1+1] = [0, 1, 5]
    # flow loss: δ = -b -> δ² = [0, 1, 25]
    torch.testing.assert_close(flow_loss, torch.tensor([0.0, 1.0, 25.0]))
    a0, a1 = (d / (math.sqrt(var) + 1e-8) for d, var in zip(LOO_D[:2], LOO_VAR[:2], strict=True))  # A2 = 1.5
    # ρ=1: -A0 ; A1<0, ρ<0.95: max(-A1·0.905, -A1·0.95) = -A1·0.95 ; A2>0, ρ>1.05: max(-1.5·1.105, -1.5·1.05)
    torch.testing.assert_close(policy_loss, torch.tensor([-a0, -a1 * 0.95, -1.5 * 1.05]))
    policy_loss.sum().backward()
    torch.testing.assert_close(log_pf.grad, torch.tensor([-a0, 0.0, 0.0]))  # clipped terms carry no gradient


def test_dag_kl_flow_loss_has_no_policy_gradient_and_policy_loss_no_flow_gradient():
    log_pf = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    log_f_t = torch.tensor([0.5, -0.5, 1.0], requires_grad=True)
    log_f_s = torch.tensor([0.0, 0.4, 0.2], requires_grad=True)
    log_pb = torch.tensor([0.0, 0.1, -0.1])
    flow_loss, policy_loss = losses.dag_kl_losses(log_f_t, log_pf, log_pf.detach(), log_f_s, log_pb, 1e-4, 5.0)
    flow_loss.sum().backward(retain_graph=True)
    assert log_pf.grad is None and log_f_t.grad is not None
    log_f_t.grad = None
    policy_loss.sum().backward()
    assert log_pf.grad is not None and log_f_t.grad is None
    # at ratio 1 the surrogate's gradient is -A
    b = (log_f_s + log_pb - log_pf - log_f_t).detach()
    torch.testing.assert_close(log_pf.grad, -losses.leave_one_out_advantages(b, 5.0))


def test_proximity_is_mean_squared_difference():
    a, b = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    b[1] = 3.0
    torch.testing.assert_close(losses.proximity(a, b), torch.tensor([1.0, 4.0]))


def test_proximity_gradient_reaches_the_current_output_only():
    eps = torch.tensor([[1.0, 2.0, 0.0, -1.0]], requires_grad=True)
    eps_sampling = torch.tensor([[0.0, 0.0, 0.0, 1.0]], requires_grad=True)
    out = losses.proximity(eps, eps_sampling)
    torch.testing.assert_close(out, torch.tensor([(1 + 4 + 0 + 4) / 4]))
    out.sum().backward()
    torch.testing.assert_close(eps.grad, torch.tensor([[0.5, 1.0, 0.0, -1.0]]))  # 2(ε - ε_s)/4
    assert eps_sampling.grad is None


def test_flow_network_batch_of_one_and_shapes():
    net = FlowNetwork(FlowConfig(block_out_channels=(16, 32), cross_attention_dim=24, norm_num_groups=8))
    out = net(torch.randn(1, 4, 8, 8), torch.tensor([999]), torch.randn(1, 5, 24))
    assert out.shape == (1,) and out.dtype == torch.float32
    out3 = net(torch.randn(3, 4, 16, 16), torch.tensor([1, 500, 999]), torch.randn(3, 5, 24))
    assert out3.shape == (3,)


def test_flow_network_has_eight_heads_in_every_attention_block():
    """As the reference DAG code: 8 heads whatever the block's width (same parameter count as fixed-width heads)."""
    from diffusers.models.attention_processor import Attention

    config = FlowConfig(block_out_channels=(16, 32, 64, 64), cross_attention_dim=24, norm_num_groups=8)
    net = FlowNetwork(config)
    attentions = [m for m in net.modules() if isinstance(m, Attention)]
    assert attentions and all(a.heads == 8 for a in attentions)
    widths = sorted({a.inner_dim for a in attentions})
    assert widths == [16, 32, 64]  # heads x head width = the block's channels
    legacy = FlowNetwork(FlowConfig(**{**config.to_dict(), "attention_head_dim": 8}))  # networks saved before
    assert sorted({a.heads for a in legacy.modules() if isinstance(a, Attention)}) == [2, 4, 8]
    assert sum(p.numel() for p in legacy.parameters()) == sum(p.numel() for p in net.parameters())
