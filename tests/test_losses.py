"""Losses against hand-computed values, and where gradients flow."""

from __future__ import annotations

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
