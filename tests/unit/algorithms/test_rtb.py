"""RTB's arithmetic: the residual by hand, the per-transition surrogate's gradient against autograd of the whole
trajectory loss on a toy Gaussian chain, VarGrad against its closed form, and the learned log Z table."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dagcli.algorithms import rtb
from dagcli.errors import DagError

STD = 0.5  # the toy chain's step noise


def test_residual_hand_computed():
    a = rtb.residual(torch.tensor([1.0, -0.5]), torch.tensor([0.25, 2.0]), torch.tensor([0.5, 1.0]), beta=3.0)
    # 1 + 0.25 - 3·0.5 = -0.25 ; -0.5 + 2 - 3·1 = -1.5
    torch.testing.assert_close(a, torch.tensor([-0.25, -1.5]))
    torch.testing.assert_close(rtb.trajectory_loss(torch.tensor([1.0, -0.5]), torch.tensor([0.25, 2.0]),
                                                   torch.tensor([0.5, 1.0]), beta=3.0), torch.tensor([0.0625, 2.25]))


def gaussian_log_prob(x_next, mean):
    return (-0.5 * ((x_next - mean) / STD) ** 2 - math.log(STD) - 0.5 * math.log(2 * math.pi)).sum(-1)


def toy_chain(steps: int = 4, n: int = 5, dim: int = 3):
    """A Gaussian chain x_{i+1} ~ N(a_i·x_i + b_i, STD²) sampled from the policy θ = (a, b); the base model is the
    same with its own (a0, b0)."""
    g = torch.Generator().manual_seed(0)
    theta_a = (1 + 0.1 * torch.randn(steps, generator=g)).requires_grad_()
    theta_b = (0.2 * torch.randn(steps, dim, generator=g)).requires_grad_()
    base_a, base_b = 1 + 0.1 * torch.randn(steps, generator=g), 0.2 * torch.randn(steps, dim, generator=g)
    xs = [torch.randn(n, dim, generator=g)]
    with torch.no_grad():
        for i in range(steps):
            xs.append(theta_a[i] * xs[-1] + theta_b[i] + STD * torch.randn(n, dim, generator=g))
    log_pf = torch.stack([gaussian_log_prob(xs[i + 1], theta_a[i] * xs[i] + theta_b[i]) for i in range(steps)], 1)
    log_base = torch.stack([gaussian_log_prob(xs[i + 1], base_a[i] * xs[i] + base_b[i]) for i in range(steps)], 1)
    reward = -(xs[-1] ** 2).sum(-1)  # any function of x_T
    return (theta_a, theta_b), log_pf, log_base, reward


def test_transition_surrogate_gradient_is_the_trajectory_loss_gradient():
    params, log_pf, log_base, reward = toy_chain()
    table = rtb.LogZTable(["a", "b"])
    with torch.no_grad():
        table.log_z.copy_(torch.tensor([0.7, -1.3]))
    prompts = ["a", "b", "a", "a", "b"]
    beta = 0.8
    full = rtb.trajectory_loss(table(prompts), (log_pf - log_base).sum(1), reward, beta).sum()
    expected = torch.autograd.grad(full, [*params, table.log_z], retain_graph=True)

    log_z = table(prompts)
    a = rtb.residual(log_z, (log_pf - log_base).sum(1).detach(), reward, beta)  # once per trajectory, no graph
    per_transition = rtb.transition_surrogate(a[:, None].expand_as(log_pf), log_pf)  # each step on its own
    surrogate = per_transition.sum() + rtb.log_z_surrogate(a, log_z).sum()
    got = torch.autograd.grad(surrogate, [*params, table.log_z])
    for e, g in zip(expected, got, strict=True):
        assert e.abs().max() > 1e-3
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_vargrad_log_z_and_residuals_are_the_closed_form():
    log_ratio = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    reward = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0])
    groups = torch.tensor([3, 3, 7, 7, 7])
    beta = 2.0
    # β r − Σ ρ: [1.5, 1.0, -1.0, 2.0, -1.0]; group 3: mean 1.25; group 7: mean 0
    torch.testing.assert_close(rtb.vargrad_log_z(log_ratio, reward, groups, beta),
                               torch.tensor([1.25, 1.25, 0.0, 0.0, 0.0]))
    # A = log Ẑ + Σ ρ − β r: [-0.25, 0.25, 1.0, -2.0, 1.0]
    torch.testing.assert_close(rtb.vargrad_residuals(log_ratio, reward, groups, beta),
                               torch.tensor([-0.25, 0.25, 1.0, -2.0, 1.0]))
    assert rtb.vargrad_residuals(log_ratio[:1], reward[:1], groups[:1], beta).item() == 0.0  # a group of one


def test_vargrad_surrogate_gradient_is_the_group_variance_gradient():
    """With A centred in its group the surrogate is the gradient of Σ_g Σ_k (s_k − mean_g s)², s = Σ ρ − β r."""
    params, log_pf, log_base, reward = toy_chain(n=6)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    beta = 1.5
    s = (log_pf - log_base).sum(1) - beta * reward
    variance = sum(((s[groups == g] - s[groups == g].mean()) ** 2).sum() for g in (0, 1))
    expected = torch.autograd.grad(variance, params, retain_graph=True)
    a = rtb.vargrad_residuals((log_pf - log_base).sum(1), reward, groups, beta)
    got = torch.autograd.grad(rtb.transition_surrogate(a[:, None].expand_as(log_pf), log_pf).sum(), params)
    for e, g in zip(expected, got, strict=True):
        assert e.abs().max() > 1e-3
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_learned_log_z_converges_to_the_true_log_z():
    """One Gaussian step: base N(0, 1), reward r(x) = x. The target N(β, 1) has log Z = log E_base[e^{βx}] = β²/2;
    training the policy's mean and log Z on RTB's surrogates lands on both."""
    beta = 1.2
    mean = torch.zeros(1, requires_grad=True)
    table = rtb.LogZTable(["p"])
    opt = torch.optim.Adam([mean, table.log_z], lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        x = (mean.detach() + torch.randn(256, generator=g))
        log_pf = -0.5 * (x - mean) ** 2
        log_base = -0.5 * x**2
        log_z = table(["p"] * 256)
        a = rtb.residual(log_z, (log_pf - log_base).detach(), x, beta)
        loss = (rtb.transition_surrogate(a, log_pf) + rtb.log_z_surrogate(a, log_z)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mean.item() == pytest.approx(beta, abs=0.05)
    assert table.log_z.item() == pytest.approx(beta**2 / 2, abs=0.05)


def test_log_z_table_looks_up_saves_and_names_an_unknown_prompt(tmp_path):
    table = rtb.LogZTable(["a red circle", "a blue square", "a red circle"])
    assert table.prompts == ["a red circle", "a blue square"]
    with torch.no_grad():
        table.log_z.copy_(torch.tensor([0.5, -2.0]))
    torch.testing.assert_close(table(["a blue square", "a red circle", "a blue square"]),
                               torch.tensor([-2.0, 0.5, -2.0]))
    import json

    save_file(table.state_dict(), str(tmp_path / "log_z.safetensors"),
              metadata={k: json.dumps(v) for k, v in table.metadata().items()})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "log_z.safetensors"), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    again = rtb.log_z_table_from(meta)
    again.load_state_dict(load_file(tmp_path / "log_z.safetensors"))
    torch.testing.assert_close(again(["a red circle"]), torch.tensor([0.5]))
    with pytest.raises(DagError, match="no learned log Z for the prompt 'a green star'"):
        table(["a green star"])


@pytest.mark.parametrize("log_z", ["learned", "vargrad"])
def test_rtb_trains_two_epochs_on_tiny(log_z, tmp_path, tiny_pipeline_dir, capsys):
    import json

    from helpers.cli import run_cli, write_tiny_config

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle", "a blue square"],
                            train={"algorithm": "rtb", "epochs": 2},
                            sampling={"batch_size": 4}, rtb={"beta": 1.0, "log_z": log_z, "group_size": 2})
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", cfg, "-o", run], capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("loss", "rtb_loss", "log_z", "log_ratio_base", "rtb_residual_abs", "grad_norm_lora"):
            assert math.isfinite(m[key]), key
    assert lines[0]["log_ratio_base"] == 0.0  # a zero LoRA is the base model, bit for bit
    assert lines[1]["log_ratio_base"] != 0.0 and lines[0]["grad_norm_lora"] > 0
    step = run / "checkpoints" / "step-000002"
    assert (step / "log_z.safetensors").exists() == (log_z == "learned")
    if log_z == "learned":  # logged per epoch, per prompt, and it moved from 0 after the first epoch's updates
        assert lines[0]["log_z"] == 0.0 and lines[1]["log_z"] != 0.0
        saved = load_file(step / "log_z.safetensors")["log_z"]
        assert saved.shape == (2,) and saved.abs().max() > 0


def test_tail_steps_leave_the_last_steps_out_of_the_ratio_and_the_gradient():
    """rtb.tail_steps = 1 on a 3-step chain: A sums the first two steps' log ratios only (values by hand), and the
    third step's transitions carry no loss, while the base model is asked for the first two steps only."""
    from types import SimpleNamespace

    from dagcli.algorithms.rtb_settings import RtbConfig

    n, steps, beta = 2, 3, 2.0
    log_pf = torch.tensor([[0.5, 0.25, 9.0], [-0.5, 1.0, -7.0]])
    log_base = torch.tensor([[0.25, 0.25, 1.0], [0.0, 0.5, 1.0]])
    asked = []

    def reference_step(mb):
        asked.extend(mb.step_index.tolist())
        return SimpleNamespace(log_prob=log_base[mb.traj_index, mb.step_index])

    ctx = SimpleNamespace(prompts=["p"], device=torch.device("cpu"), steps=steps, reference_step=reference_step)
    algo = rtb.Rtb(RtbConfig(beta=beta, log_z="vargrad", group_size=2, tail_steps=1), ctx)
    traj = SimpleNamespace(latents=torch.zeros(n, steps + 1, 1), cond=torch.zeros(n, 1), prompts=["p", "p"],
                           log_probs=log_pf, out_guided=torch.zeros(n, steps, 1), num_steps=steps)
    batch = SimpleNamespace(traj=traj, rewards=torch.tensor([1.0, 0.0]), groups=None, advantages=None)
    algo.prepare_trajectories(batch, log_pf, dist=None)
    assert sorted(set(asked)) == [0, 1]
    # Σρ over steps 0, 1: 0.25 and 0.0; β r: 2 and 0; centred in the group of two: ±(0.25 − 2 − 0) / 2
    torch.testing.assert_close(batch.advantages, torch.tensor([-0.875, 0.875]))
    log_prob = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    mb = SimpleNamespace(traj_index=torch.tensor([0, 1, 0, 1]), step_index=torch.tensor([0, 1, 2, 2]),
                         x=torch.zeros(4, 1), prompts=["p"] * 4)
    loss, _ = algo.loss(mb, SimpleNamespace(step=SimpleNamespace(log_prob=log_prob)), batch, epoch=1)
    loss.sum().backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([2 * -0.875, 2 * 0.875, 0.0, 0.0]))


def test_tail_steps_must_leave_a_step():
    from dagcli.config import config_from_dict

    with pytest.raises(DagError, match=r"rtb.tail_steps = 10: must be less than sampling.steps = 10"):
        config_from_dict({"train": {"algorithm": "rtb"}, "sampling": {"steps": 10}, "rtb": {"tail_steps": 10}})


def test_to_go_weights_by_hand():
    """Two trajectories of one group, three steps: each step's log ratio from there on minus β r, centred in the
    group per step; with a learned log Z, plus log Z instead."""
    ratio = torch.tensor([[0.5, 0.25, 1.0], [-0.5, 1.0, 0.0]])
    reward, beta = torch.tensor([1.0, 0.0]), 2.0
    # to go: [1.75, 1.25, 1.0] − 2 and [0.5, 1.0, 0.0] − 0: [−0.25, −0.75, −1.0] and [0.5, 1.0, 0.0]
    w = rtb.to_go_weights(ratio, reward, beta, groups=torch.tensor([0, 0]))
    torch.testing.assert_close(w, torch.tensor([[-0.375, -0.875, -0.5], [0.375, 0.875, 0.5]]))
    w = rtb.to_go_weights(ratio, reward, beta, log_z=torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(w, torch.tensor([[0.25, -0.25, -0.5], [-0.5, 0.0, -1.0]]))


def test_to_go_and_trajectory_credit_estimate_the_same_kl_gradient_on_a_gaussian_chain():
    """On-policy, on a two-step chain x1 = x0 + θ1 + ε1, x2 = x1 + θ2 + ε2 (unit noise) against the base θ = 0 and
    r(x2) = x2 at β = 1, KL(P_θ ‖ p*) = (θ1² + θ2²)/2 − θ1 − θ2 + const, so its gradient is (θ1 − 1, θ2 − 1) in
    closed form. Both credits' estimates 2·Σ_i w_i·∂log P_θ(step i)/∂θ, over VarGrad groups of n, average to
    2·(1 − 1/n) times it. At the target θ = (1, 1) the trajectory's residual is 0 on every path, to-go's weights
    are not: the price of dropping the earlier steps."""
    estimates = _credit_estimates(torch.tensor([0.3, -0.2]), n_groups=20_000, n=4)
    expected = 2 * (1 - 1 / 4) * (torch.tensor([0.3, -0.2]).double() - 1)
    for est in estimates:
        mean, sem = est.mean(0), est.std(0) / len(est) ** 0.5
        assert torch.all((mean - expected).abs() < 4 * sem), (mean, expected, sem)
    trajectory, to_go = _credit_estimates(torch.tensor([1.0, 1.0]), n_groups=1000, n=4)
    assert float(trajectory.abs().max()) < 1e-9 and float(to_go[:, 1].std()) > 0.5


def _credit_estimates(theta: torch.Tensor, n_groups: int, n: int, baseline: bool = False, expected: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 2] per-trajectory gradient estimates of both credits on the chain of the test above; with `baseline`,
    to-go's with E[r | x_i] as step i's baseline and with x_2 (step 1's outcome, not a baseline) instead; with
    `expected`, to-go's with sampled log ratios and with `rtb.log_ratio = "expected"`'s: the later steps' KLs
    θ_j²/2 in the weights, step i's own as the KL's gradient θ_i times VarGrad's 1 − 1/n."""
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(n_groups * n, 2, generator=g, dtype=torch.float64)
    x0 = torch.zeros(n_groups * n, dtype=torch.float64)
    x1 = x0 + theta[0] + eps[:, 0]
    x2 = x1 + theta[1] + eps[:, 1]
    # ρ_i = log N(ε_i + θ_i; θ_i, 1) − log N(ε_i + θ_i; 0, 1) = θ_i·ε_i + θ_i²/2; ∂log P_θ(step i)/∂θ_i = ε_i
    ratio = theta.double() * eps + theta.double() ** 2 / 2
    groups = torch.arange(n_groups * n) // n
    reward = x2
    if baseline:
        state = torch.stack([torch.full_like(x1, float(theta[0] + theta[1])), x1 + theta[1]], 1)
        outcome = torch.stack([state[:, 0], x2], 1)
        return (2 * rtb.to_go_weights(ratio, reward, 1.0, groups=groups, baseline=state) * eps,
                2 * rtb.to_go_weights(ratio, reward, 1.0, groups=groups, baseline=outcome) * eps)
    a = rtb.vargrad_residuals(ratio.sum(1), reward, groups, 1.0)
    to_go = 2 * rtb.to_go_weights(ratio, reward, 1.0, groups=groups) * eps
    if expected:
        kl = (theta.double() ** 2 / 2).expand_as(ratio)
        w = rtb.to_go_weights(kl, reward, 1.0, groups=groups, own=False)
        return to_go, 2 * w * eps + 2 * (1 - 1 / rtb.group_counts(groups))[:, None] * theta.double()
    return 2 * a[:, None] * eps, to_go


def test_to_go_weights_with_a_state_baseline_by_hand():
    """The to-go weights of the test above plus β·b_i before the group centring: b = [[1, 0, 1], [0, 0, 0]] at β 2
    moves trajectory 0's raw weights to [1.75, −0.75, 1.0], against [0.5, 1.0, 0.0]."""
    ratio = torch.tensor([[0.5, 0.25, 1.0], [-0.5, 1.0, 0.0]])
    reward, beta = torch.tensor([1.0, 0.0]), 2.0
    baseline = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    w = rtb.to_go_weights(ratio, reward, beta, groups=torch.tensor([0, 0]), baseline=baseline)
    torch.testing.assert_close(w, torch.tensor([[0.625, -0.875, 0.5], [-0.625, 0.875, -0.5]]))
    # with a learned log Z the raw weights themselves: β·b_i stands for log F(x_i), which log Z = log F(x_0) would
    # count a second time (without the baseline log Z is added, as in the test above)
    w = rtb.to_go_weights(ratio, reward, beta, log_z=torch.tensor([0.5, -1.0]), baseline=baseline)
    torch.testing.assert_close(w, torch.tensor([[1.75, -0.75, 1.0], [0.5, 1.0, 0.0]]))


def test_a_state_baseline_keeps_the_kl_gradient_and_lowers_its_noise_on_a_gaussian_chain():
    """On the chain above, E[r | x_1] = x_1 + θ2 as step 1's baseline (step 0's: E[r | x_0] = θ1 + θ2, a constant)
    leaves the estimate's mean at 2·(1 − 1/n)·(θ − 1) and removes step 1's share of r = x_2 that x_1 has decided
    (ε1): its variance falls. A baseline that looked at x_2 (step 1's own outcome) would bias it."""
    theta, n_groups, n = torch.tensor([0.3, -0.2]), 20_000, 4
    expected = 2 * (1 - 1 / n) * (theta.double() - 1)
    _, plain = _credit_estimates(theta, n_groups, n)
    with_baseline, biased = _credit_estimates(theta, n_groups, n, baseline=True)
    mean, sem = with_baseline.mean(0), with_baseline.std(0) / len(with_baseline) ** 0.5
    assert torch.all((mean - expected).abs() < 4 * sem), (mean, expected, sem)
    assert float(with_baseline[:, 1].var()) < 0.8 * float(plain[:, 1].var())  # ε1·ε2: 1 of about 4 parts
    assert float((biased.mean(0) - expected).abs()[1]) > 10 * float(sem[1])


def test_step_kl_by_hand():
    """‖μ − μ_base‖²/(2σ²) per row, reduced as the log-probs are; a deterministic row (σ = 0) is 0."""
    mean = torch.tensor([[1.0, 2.0], [0.5, 0.5], [3.0, 0.0]])
    base = torch.tensor([[0.0, 0.0], [0.0, 1.5], [0.0, 0.0]])
    std = torch.tensor([2.0, 0.5, 0.0])
    # (1 + 4)/8 = 0.625 ; (0.25 + 1)/0.5 = 2.5 ; 0
    torch.testing.assert_close(rtb.step_kl(mean, base, std, "sum"), torch.tensor([0.625, 2.5, 0.0]))
    torch.testing.assert_close(rtb.step_kl(mean, base, std, "mean"), torch.tensor([0.3125, 1.25, 0.0]))


def test_step_kl_is_the_expected_log_ratio_of_the_sampled_step():
    """E over the step's noise of log N(x; μ, σ²) − log N(x; μ_base, σ²) at x ~ N(μ, σ²), by Monte Carlo."""
    from dagcli.kernels.gaussian import gaussian_log_prob

    g = torch.Generator().manual_seed(0)
    mean, base, std = torch.tensor([[0.3, -0.2, 0.1]]), torch.tensor([[0.0, 0.1, 0.4]]), torch.tensor([0.25])
    x = mean + std * torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    rho = gaussian_log_prob(x, mean.double(), std.double().expand(len(x)), "sum") - gaussian_log_prob(
        x, base.double(), std.double().expand(len(x)), "sum")
    assert abs(float(rho.mean()) - float(rtb.step_kl(mean, base, std, "sum"))) < 4 * float(rho.std()) / len(x) ** 0.5


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_own_ratio_surrogate_is_the_own_steps_score_times_its_ratio(reduction):
    """E[∇_μ log P(x)·ρ(x)] over x ~ N(μ, σ²I), both reduced over the D = 3 dims as the engine reduces them, by Monte
    Carlo, against the gradient of `own_ratio_surrogate` through μ: the step's KL under "sum", KL/D² under "mean"."""
    from dagcli.kernels.gaussian import gaussian_log_prob

    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64, requires_grad=True)
    base, std = torch.tensor([[0.0, 0.1, 0.4]], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64)
    x = (mean + std * torch.randn(400_000, 3, generator=g, dtype=torch.float64)).detach().requires_grad_()
    log_p = gaussian_log_prob(x, mean.detach().expand_as(x), std.expand(len(x)), reduction)
    rho = (log_p - gaussian_log_prob(x, base.expand_as(x), std.expand(len(x)), reduction)).detach()
    score = -torch.autograd.grad(log_p.sum(), x)[0]  # ∇_μ log P(x) = −∇_x log P(x), each sample's own
    mc = score * rho[:, None]
    sem = mc.std(0) / len(x) ** 0.5
    want = torch.autograd.grad(rtb.own_ratio_surrogate(mean, base, std, reduction).sum(), mean)[0][0]
    assert torch.all((mc.mean(0) - want).abs() < 4 * sem), (mc.mean(0), want, sem)
    assert torch.all(want.abs() > 10 * sem)  # resolved: a factor D off would fail


def test_to_go_weights_without_the_own_step_by_hand():
    """`own` False sums the log ratios after step i only: [0.25 + 1, 1, 0] − 2 and [1, 0, 0] − 0 before centring."""
    ratio = torch.tensor([[0.5, 0.25, 1.0], [-0.5, 1.0, 0.0]])
    w = rtb.to_go_weights(ratio, torch.tensor([1.0, 0.0]), 2.0, groups=torch.tensor([0, 0]), own=False)
    # raw [−0.75, −1, −2] and [1, 0, 0]
    torch.testing.assert_close(w, torch.tensor([[-0.875, -0.5, -1.0], [0.875, 0.5, 1.0]]))
    torch.testing.assert_close(rtb.group_counts(torch.tensor([3, 1, 3, 3])), torch.tensor([3.0, 1, 3, 3]).double())


def test_expected_log_ratios_keep_the_kl_gradient_and_trade_noise_by_where_the_policy_is():
    """On the two-step chain, `rtb.log_ratio = "expected"` averages to the same 2·(1 − 1/n)·(θ − 1) at θ = (1.5,
    2.5), where the sampled ρ_i = θ_i·ε_i + θ_i²/2 is noisy; without VarGrad's 1 − 1/n on the pathwise term it would
    be biased. The noise it removes is the sampled ρ's, which grows with θ: away from the target θ = (1, 1) in the
    direction the reward does not pay for (θ = (−1.5, −2.5)) its variance is a fraction of the sampled one's on
    both steps; at the target the sampled ρ's noise cancels the reward's (the residual is 0 on every path), and
    there the sampled weights are the quieter ones."""
    n_groups, n = 20_000, 4
    theta = torch.tensor([1.5, 2.5])
    expected = 2 * (1 - 1 / n) * (theta.double() - 1)
    sampled, rb = _credit_estimates(theta, n_groups, n, expected=True)
    for est in (sampled, rb):
        mean, sem = est.mean(0), est.std(0) / len(est) ** 0.5
        assert torch.all((mean - expected).abs() < 4 * sem), (mean, expected, sem)
    unscaled = rb + 2 * (1 / n) * theta.double()  # the pathwise term at weight 1 instead of 1 − 1/n
    sem = rb.std(0) / len(rb) ** 0.5
    assert torch.all((unscaled.mean(0) - expected).abs() > 10 * sem)
    sampled, rb = _credit_estimates(torch.tensor([-1.5, -2.5]), n_groups, n, expected=True)
    assert torch.all(rb.var(0) < 0.3 * sampled.var(0)), (rb.var(0), sampled.var(0))
    sampled, rb = _credit_estimates(torch.tensor([1.0, 1.0]), n_groups, n, expected=True)
    assert torch.all(sampled.var(0) < 0.5 * rb.var(0)), (rb.var(0), sampled.var(0))


def test_expected_log_ratio_needs_a_to_go_credit():
    from dagcli.config import config_from_dict

    with pytest.raises(DagError, match=r"rtb.log_ratio = 'expected' needs rtb.credit = 'to-go', 'to-go-x0' or 'to-go-flow'"):
        config_from_dict({"train": {"algorithm": "rtb"}, "rtb": {"log_ratio": "expected"}})


def test_to_go_credit_weights_each_step_in_the_loss():
    from types import SimpleNamespace

    from dagcli.algorithms.rtb_settings import RtbConfig

    n, steps = 2, 3
    log_pf = torch.tensor([[0.5, 0.25, 1.0], [-0.5, 1.0, 0.0]])
    ctx = SimpleNamespace(prompts=["p"], device=torch.device("cpu"), steps=steps,
                          reference_step=lambda mb: SimpleNamespace(log_prob=torch.zeros(len(mb.traj_index))))
    algo = rtb.Rtb(RtbConfig(beta=2.0, log_z="vargrad", group_size=2, credit="to-go"), ctx)
    traj = SimpleNamespace(latents=torch.zeros(n, steps + 1, 1), cond=torch.zeros(n, 1), prompts=["p", "p"],
                           log_probs=log_pf, out_guided=torch.zeros(n, steps, 1), num_steps=steps)
    batch = SimpleNamespace(traj=traj, rewards=torch.tensor([1.0, 0.0]), groups=None, advantages=None)
    algo.prepare_trajectories(batch, log_pf, dist=None)
    log_prob = torch.ones(6, requires_grad=True)
    mb = SimpleNamespace(traj_index=torch.tensor([0, 1, 0, 1, 0, 1]), step_index=torch.tensor([0, 0, 1, 1, 2, 2]),
                         x=torch.zeros(6, 1), prompts=["p"] * 6)
    loss, _ = algo.loss(mb, SimpleNamespace(step=SimpleNamespace(log_prob=log_prob)), batch, epoch=1)
    loss.sum().backward()
    torch.testing.assert_close(log_prob.grad, 2 * torch.tensor([-0.375, 0.375, -0.875, 0.875, -0.5, 0.5]))
    # "to-go-x0" asks the rollout for the x̂0 rewards and uses them (NaN: no baseline) as the by-hand test's
    x0_algo = rtb.Rtb(RtbConfig(beta=2.0, log_z="vargrad", group_size=2, credit="to-go-x0"), ctx)
    assert (algo.stored_x0_rewards, x0_algo.stored_x0_rewards) == (None, "cond")
    batch.fl_rewards = torch.tensor([[1.0, float("nan"), 1.0], [0.0, 0.0, 0.0]])
    x0_algo.prepare_trajectories(batch, log_pf, dist=None)
    log_prob = torch.ones(6, requires_grad=True)
    loss, _ = x0_algo.loss(mb, SimpleNamespace(step=SimpleNamespace(log_prob=log_prob)), batch, epoch=1)
    loss.sum().backward()
    torch.testing.assert_close(log_prob.grad, 2 * torch.tensor([0.625, -0.625, -0.875, 0.875, 0.5, -0.5]))


def test_expected_log_ratio_weights_and_pathwise_term_in_the_loss():
    """Two trajectories of one group, two steps, a 1-d latent, σ = 0.5: the sampling policy's recorded means
    μ = [[1, 0.5], [0, 1]] against the base's [[0, 0], [0.5, 1]] give KLs (μ − μ_b)²/(2σ²) = [[2, 0.5], [0.5, 0]];
    step 0's weight is step 1's KL minus β r, centred, step 1's is −β r centred; each step adds 2·(1 − 1/2)·KL
    through the policy's current mean."""
    from types import SimpleNamespace

    from dagcli.algorithms.rtb_settings import RtbConfig

    n, steps = 2, 2
    policy_mean = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    base_mean = torch.tensor([[0.0, 0.0], [0.5, 1.0]])
    std = torch.full((n * steps,), 0.5)

    def step_of(means):
        return lambda mb: SimpleNamespace(log_prob=torch.zeros(len(mb.traj_index)), std=std[: len(mb.traj_index)],
                                          mean=means[mb.traj_index, mb.step_index][:, None])

    ctx = SimpleNamespace(prompts=["p"], device=torch.device("cpu"), steps=steps, reduction="sum",
                          reference_step=step_of(base_mean), recorded_step=step_of(policy_mean))
    algo = rtb.Rtb(RtbConfig(beta=2.0, log_z="vargrad", group_size=2, credit="to-go", log_ratio="expected"), ctx)
    log_pf = torch.tensor([[0.3, -0.1], [0.2, 0.4]])  # sampled ratios: not used by the weights
    traj = SimpleNamespace(latents=torch.zeros(n, steps + 1, 1), cond=torch.zeros(n, 1), prompts=["p", "p"],
                           log_probs=log_pf, out_guided=torch.zeros(n, steps, 1), num_steps=steps)
    batch = SimpleNamespace(traj=traj, rewards=torch.tensor([1.0, 0.0]), groups=None, advantages=None)
    algo.prepare_trajectories(batch, log_pf, dist=None)
    # raw weights: step 0: [0.5 − 2, 0 − 0] = [−1.5, 0] -> centred [−0.75, 0.75]; step 1: [−2, 0] -> [−1, 1]
    torch.testing.assert_close(batch.step_weights, torch.tensor([[-0.75, -1.0], [0.75, 1.0]]))
    assert algo.epoch_logs(1)["log_ratio_expected"] == pytest.approx((2.5 + 0.5) / 2)
    log_prob = torch.ones(4, requires_grad=True)
    mean = torch.tensor([[1.0], [0.0], [0.5], [1.0]], requires_grad=True)  # the current policy = the sampling one
    mb = SimpleNamespace(traj_index=torch.tensor([0, 1, 0, 1]), step_index=torch.tensor([0, 0, 1, 1]),
                         x=torch.zeros(4, 1), prompts=["p"] * 4)
    policy = SimpleNamespace(step=SimpleNamespace(log_prob=log_prob, mean=mean, std=std))
    loss, _ = algo.loss(mb, policy, batch, epoch=1)
    loss.sum().backward()
    torch.testing.assert_close(log_prob.grad, 2 * torch.tensor([-0.75, 0.75, -1.0, 1.0]))
    # d/dμ 2·(1/2)·(μ − μ_b)²/(2σ²) = (μ − μ_b)/σ² = 4·(μ − μ_b)
    torch.testing.assert_close(mean.grad, 4 * torch.tensor([[1.0], [-0.5], [0.5], [0.0]]))


def test_to_go_x0_credit_scores_the_trained_states_in_the_rollout_and_trains(tmp_path, tiny_pipeline_dir):
    """With `rtb.credit = "to-go-x0"` the rollout scores x̂0 of every trained state; the scores equal the
    reference procedure's (the model run again on the stored state, its x̂0 decoded and scored), and an epoch
    trains with them."""
    from dagcli.config import load_config, replace
    from dagcli.trainer import Trainer
    from helpers.cli import write_tiny_config

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle"], train={"algorithm": "rtb", "epochs": 1},
                            rtb={"log_z": "vargrad", "group_size": 3, "beta": 1.0, "credit": "to-go-x0",
                                 "tail_steps": 1})
    trainer = Trainer(replace(load_config(cfg), "output", dir=str(tmp_path / "r")), ["a red circle"])
    batch, _ = trainer.collect(0)
    fl, traj = batch.fl_rewards, batch.traj
    assert fl is not None and torch.isfinite(fl[:, :3]).all()  # 4 steps, the last the base model's
    for i in range(3):
        j = torch.full((traj.batch_size,), i, dtype=torch.long)
        again = trainer.rollout.x0_rewards(traj.latents[:, i], j, traj.cond, traj.prompts, trainer.raw_denoiser,
                                           guided=False)
        torch.testing.assert_close(fl[:, i], again.float().cpu(), atol=1e-5, rtol=0)
    trainer.train()
    assert trainer.state.epoch == 1 and math.isfinite(trainer.algorithm.epoch_logs(1)["rtb_residual_abs"])


def test_expected_log_ratio_trains_from_the_recorded_steps(tmp_path, tiny_pipeline_dir):
    """The sampling policy's step rebuilt from its recorded outputs gives back the log-probs the sampler recorded;
    with a LoRA away from zero the steps' KLs to the base are positive and average to the sampled log ratios'
    mean within their noise; an epoch trains with `rtb.log_ratio = "expected"`."""
    from dagcli.algorithms.base import transition_batch
    from dagcli.config import load_config, replace
    from dagcli.trainer import Trainer
    from helpers.cli import write_tiny_config

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle"], train={"algorithm": "rtb", "epochs": 1},
                            sampling={"batch_size": 6},
                            rtb={"log_z": "vargrad", "group_size": 3, "beta": 1.0, "credit": "to-go",
                                 "log_ratio": "expected", "tail_steps": 1})
    trainer = Trainer(replace(load_config(cfg), "output", dir=str(tmp_path / "r")), ["a red circle"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a LoRA away from zero (both inits start with B = 0)
        for name, p in trainer.raw_denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    batch, _ = trainer.collect(0)
    traj = batch.traj
    idx = torch.stack(torch.meshgrid(torch.arange(traj.batch_size), torch.arange(3), indexing="ij"), -1).reshape(-1, 2)
    mb = transition_batch(batch, idx, trainer.model.device)
    torch.testing.assert_close(trainer.recorded_step(mb).log_prob.float().cpu(), traj.log_probs[idx[:, 0], idx[:, 1]],
                               atol=1e-4, rtol=1e-5)
    trainer.unit.before_micro_batches(trainer, batch, 0)
    logs = trainer.algorithm.epoch_logs(0)
    assert batch.base_means.shape == (traj.batch_size, 3, *traj.latents.shape[2:])
    assert logs["log_ratio_expected"] > 1e-4
    spread = float(batch.advantages.std())  # VarGrad's residuals: the sampled Σρ's spread within the group and more
    assert abs(logs["log_ratio_expected"] - logs["log_ratio_base"]) < 3 * spread + 1e-3
    trainer.train()
    assert trainer.state.epoch == 1 and math.isfinite(trainer.algorithm.epoch_logs(1)["rtb_residual_abs"])


def test_critic_targets_and_weights_by_hand():
    """The by-hand chain above with the x̂0 baseline b: the critic's targets are minus the raw weights
    [[1.75, −0.75, 1.0], [0.5, 1.0, 0.0]]; a critic c is added to them, raw with a learned log Z (which the critic,
    log F(x_i) in part, replaces) and centred per group and step with VarGrad."""
    ratio = torch.tensor([[0.5, 0.25, 1.0], [-0.5, 1.0, 0.0]])
    reward, beta = torch.tensor([1.0, 0.0]), 2.0
    baseline = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    targets = rtb.critic_targets(ratio, reward, beta, baseline)
    torch.testing.assert_close(targets, -torch.tensor([[1.75, -0.75, 1.0], [0.5, 1.0, 0.0]], dtype=torch.float64))
    # without the own step (expected log ratios): each target is larger by that step's ratio
    torch.testing.assert_close(rtb.critic_targets(ratio, reward, beta, baseline, own=False),
                               targets + ratio.double())
    critic = torch.tensor([[-1.0, 0.5, -1.0], [-0.5, -1.0, 0.0]])
    w = rtb.to_go_weights(ratio, reward, beta, log_z=torch.tensor([0.5, -1.0]), baseline=baseline, critic=critic)
    torch.testing.assert_close(w, torch.tensor([[0.75, -0.25, 0.0], [0.0, 0.0, 0.0]]))
    w = rtb.to_go_weights(ratio, reward, beta, log_z=torch.tensor([0.5, -1.0]), critic=critic)  # no x̂0 baseline
    torch.testing.assert_close(w, torch.tensor([[-1.25, -0.25, -2.0], [0.0, 0.0, 0.0]]))
    w = rtb.to_go_weights(ratio, reward, beta, groups=torch.tensor([0, 0]), baseline=baseline, critic=critic)
    torch.testing.assert_close(w, torch.tensor([[0.375, -0.125, 0.0], [-0.375, 0.125, 0.0]]))


def test_a_least_squares_critic_keeps_the_kl_gradient_and_lowers_its_noise_on_a_gaussian_chain():
    """On the chain above, a critic fitted by least squares to `critic_targets` on one sample (features [1] at step
    0, [1, x_1] at step 1, which hold E[target | x_i] exactly) and used on another: the weights' mean given x_i is
    zero, the estimate's mean is the KL gradient 2·(θ − 1) in closed form with no VarGrad factor (nothing is
    centred), and step 1's variance is below VarGrad's with its constant baseline. Fitted on the sample it is used
    on, the critic would see each step's own outcome; on a separate sample it is a baseline."""
    theta, m = torch.tensor([0.3, -0.2]).double(), 40_000

    def chain(seed):
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(m, 2, generator=g, dtype=torch.float64)
        x1 = theta[0] + eps[:, 0]
        return eps, x1, x1 + theta[1] + eps[:, 1], theta * eps + theta**2 / 2

    eps, x1, x2, ratio = chain(1)
    targets = rtb.critic_targets(ratio, x2, 1.0)
    coef0 = targets[:, 0].mean()
    design = torch.stack([torch.ones_like(x1), x1], 1)
    coef1 = torch.linalg.lstsq(design, targets[:, 1:2]).solution[:, 0]
    torch.testing.assert_close(coef1, torch.tensor([theta[1] - theta[1] ** 2 / 2, 1.0], dtype=torch.float64),
                               atol=0.03, rtol=0)  # E[x_2 − ρ_1 | x_1] = x_1 + θ2 − θ2²/2
    eps, x1, x2, ratio = chain(2)
    critic = torch.stack([coef0.expand(m), coef1[0] + coef1[1] * x1], 1)
    w = rtb.to_go_weights(ratio, x2, 1.0, log_z=torch.zeros(m), critic=critic)
    assert abs(float(w[:, 0].mean())) < 0.05
    slope = torch.linalg.lstsq(torch.stack([torch.ones_like(x1), x1], 1), w[:, 1:2]).solution[1, 0]
    assert abs(float(slope)) < 0.03  # nothing of x_1 left in step 1's weight
    est = 2 * w * eps
    mean, sem = est.mean(0), est.std(0) / m**0.5
    assert torch.all((mean - 2 * (theta - 1)).abs() < 4 * sem), (mean, sem)
    plain = 2 * rtb.to_go_weights(ratio, x2, 1.0, groups=torch.arange(m) // 4) * eps
    assert float(est[:, 1].var()) < 0.8 * float((plain[:, 1] / (1 - 1 / 4)).var())
    # a critic that had seen step 1's outcome x_2 is no baseline: the mean moves
    seen = torch.stack([coef0.expand(m), x2 - theta[1] ** 2 / 2], 1)
    biased = 2 * rtb.to_go_weights(ratio, x2, 1.0, log_z=torch.zeros(m), critic=seen) * eps
    assert float((biased[:, 1].mean() - 2 * (theta[1] - 1)).abs()) > 10 * float(sem[1])


@pytest.mark.parametrize("model", ["tiny", "tiny-flow"])
def test_to_go_flow_fits_the_critic_alone_in_its_warm_up_and_resumes_bit_for_bit(model, tmp_path, capsys):
    """`rtb.credit = "to-go-flow"`: the critic starts at zero (the first epoch's weights are "to-go-x0"'s, its
    explained share exactly 0), the warm-up epoch trains it and leaves the LoRA at zero (the second epoch's log
    ratio is then still 0), the next trains both; the critic is checkpointed and a resumed run ends on the same
    weights bit for bit."""
    import json

    from helpers.cli import run_cli, write_tiny_config

    cfg = write_tiny_config(tmp_path, model, ["a red circle", "a blue square"], train={"algorithm": "rtb"},
                            sampling={"batch_size": 4}, lora={"rank": 2, "alpha": 2.0},
                            rtb={"beta": 1.0, "log_z": "vargrad", "group_size": 2, "credit": "to-go-flow",
                                 "log_ratio": "expected", "tail_steps": 1, "flow_warmup_epochs": 1},
                            output={"checkpoint_every": 1})
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(["train", "--config", cfg, "--epochs", "3", "-o", a], capsys)[0] == 0
    assert run_cli(["train", "--config", cfg, "--epochs", "2", "-o", b], capsys)[0] == 0
    code, _, err = run_cli(["train", "--config", cfg, "--epochs", "3", "-o", b, "--resume"], capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert [m["log_ratio_base"] for m in lines[:2]] == [0.0, 0.0] and lines[2]["log_ratio_base"] != 0.0
    assert lines[0]["grad_norm_flow"] > 0 and lines[1]["grad_norm_lora"] > 0
    for m in lines:
        for key in ("critic_loss", "critic_explained", "critic_fit", "rtb_loss"):
            assert math.isfinite(m[key]), key
    assert lines[0]["critic_explained"] == pytest.approx(0.0, abs=1e-9)  # a zero head: nothing taken out yet
    assert lines[0]["critic_loss"] > 0 and lines[1]["critic_explained"] != 0.0
    one, two = (load_file(a / "checkpoints" / f"step-00000{k}" / "flow.safetensors") for k in (1, 2))
    assert any(not torch.equal(one[k], two[k]) for k in one)
    for name in ("pytorch_lora_weights.safetensors", "flow.safetensors"):
        wa, wb = (load_file(r / "checkpoints" / "step-000003" / name) for r in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
