"""DAG-RDB (relative detailed balance): its residual by hand, its loss on a hand-built chain with a known base
model, the exact zero log ratio at a zero LoRA, training on every family and an exact resume."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dagcli.algorithms import losses
from helpers.cli import run_cli, write_tiny_config
from helpers.flow_models import gaussian_logpdf64, loaded

PROMPTS = ["a red circle", "a blue square"]


def test_rdb_residual_hand_computed_and_the_base_is_data():
    log_f_t = torch.tensor([1.0, -2.0], requires_grad=True)
    log_pf = torch.tensor([0.5, 0.25], requires_grad=True)
    log_p_base = torch.tensor([-0.5, 0.75], requires_grad=True)
    log_f_s = torch.tensor([2.0, -1.0], requires_grad=True)
    delta = losses.rdb_residual(log_f_t, log_pf, log_p_base, log_f_s)
    # 1 + 0.5 - (-0.5) - 2 = 0 ; -2 + 0.25 - 0.75 - (-1) = -1.5
    torch.testing.assert_close(delta, torch.tensor([0.0, -1.5]))
    (delta**2).sum().backward()
    # d δ²/d log F(x_t) = d δ²/d log P_θ = 2δ, d δ²/d log F(x_s) = -2δ; the base model gets none
    torch.testing.assert_close(log_f_t.grad, torch.tensor([0.0, -3.0]))
    torch.testing.assert_close(log_pf.grad, torch.tensor([0.0, -3.0]))
    torch.testing.assert_close(log_f_s.grad, torch.tensor([0.0, 3.0]))
    assert log_p_base.grad is None


@pytest.mark.parametrize(("tail", "flow_init"), [(0, "reference"), (1, "reference"), (0, "zero")])
def test_rdb_loss_of_a_hand_built_two_step_chain_with_a_known_base(tail, flow_init):
    """Two SD3 steps; the policy's and the base model's velocities are chosen, so both log-probs are closed-form
    Gaussians: δ_k = log F(x_k) + log P_θ − log P_base − log F(x_{k+1}), with no P_B anywhere. With
    `dag.tail_steps` 1 the second transition is not trained and x_1 is the terminal, log F(x_1) = β·r(x̂0(x_1)).
    With `dag.flow_init` "zero" F̃ is 0 everywhere, so log F is β·r(x̂0) alone."""
    from dagcli.algorithms.base import Context, MicroBatch, PolicyOutput
    from dagcli.algorithms.dag import Dag
    from dagcli.algorithms.dag_settings import DagConfig
    from dagcli.kernels import flow_sde
    from dagcli.rollout import EpochBatch
    from dagcli.sampling import Trajectory

    family = loaded("sd3").family
    sig = [0.9, 0.5, 0.0]
    schedule = flow_sde.Schedule(sigmas=torch.tensor(sig), timesteps=torch.tensor(sig[:2]) * 1000)
    beta, eta = 2.0, 0.8
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(3)]
    vs = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(2)]  # the policy's velocities
    vb = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(2)]  # the base model's velocities
    i = torch.tensor([0, 1])
    x, x_next, v, v_base = torch.cat(xs[:2]), torch.cat(xs[1:]), torch.cat(vs), torch.cat(vb)
    seen = []

    def reference_step(mb):
        seen.append(mb.step_index.tolist())
        return family.step(schedule, mb.step_index, mb.x, v_base, eta, prev=mb.x_next)

    ctx = Context(family=family, schedule=schedule, device=torch.device("cpu"), height=32, width=32, steps=2,
                  seed=0, reduction="mean", autocast=contextlib.nullcontext, x0_rewards=None,
                  reference_step=reference_step)
    dag = Dag(DagConfig(beta=beta, beta_ramp_epochs=0, proximity=0.0, tail_steps=tail, flow_init=flow_init), ctx,
              kl=False, relative=True)
    cond = family.encode(["a red circle"])
    reward, fl = 0.25, torch.tensor([[0.1, -0.3]])
    traj = Trajectory(latents=torch.stack(xs, 1), log_probs=torch.zeros(1, 2), out_guided=torch.stack(vs, 1),
                      out_cond=torch.stack(vs, 1), cond=cond, prompts=["a red circle"], eta=eta)
    batch = EpochBatch(traj=traj, rewards=torch.tensor([reward]), components={}, fl_rewards=fl,
                       pairs=torch.tensor([[0, 0], [0, 1]]))
    step = family.step(schedule, i, x, v, eta, prev=x_next)
    mb = MicroBatch(traj_index=torch.tensor([0, 0]), step_index=i, x=x, x_next=x_next, cond=cond[[0, 0]],
                    prompts=["a red circle"] * 2, log_pf_old=step.log_prob, out_old=v,
                    terminal=torch.tensor([False, True]))
    loss, logs = dag.loss(mb, PolicyOutput(out=v, step=step), batch, epoch=0)
    assert seen == [[0, 1]] and "log_pb" not in logs  # the base model's step, not the noising kernel

    with torch.no_grad():
        embeds = family.pipe.encode_prompt(["a red circle"], None, None, do_classifier_free_guidance=False)[0]
        flow = dag.modules["flow"](torch.cat(xs[:2]), torch.tensor(sig[:2]) * 1000, torch.cat([embeds] * 2))
    assert (flow == 0).all() if flow_init == "zero" else (flow.abs() > 1e-4).all()
    dims = 4 * 8 * 8

    def log_p(k, vel):  # Flow-GRPO's SDE step k as a float64 Gaussian (σ < 1 on both steps)
        s, sn = sig[k], sig[k + 1]
        dt, s2 = sn - s, eta**2 * s / (1 - s)
        mean = xs[k].double() * (1 + s2 * dt / (2 * s)) + vel.double() * (1 + s2 * (1 - s) / (2 * s)) * dt
        return float(gaussian_logpdf64(xs[k + 1], mean, s2 * -dt).sum() / dims)

    expected, ratios = [], []
    for k in range(2):
        ratio = log_p(k, vs[k]) - log_p(k, vb[k])
        assert abs(ratio) > 1e-3  # the two velocities differ: the base model's term matters
        log_f = float(flow[k]) + beta * float(fl[0, k])
        if tail:  # x_1 ends the trained chain with F̃ = 0; the transition into x_2 carries no loss
            log_f_next = beta * float(fl[0, 1])
        else:
            log_f_next = beta * reward if k == 1 else float(flow[1]) + beta * float(fl[0, 1])
        expected.append((log_f + ratio - log_f_next) ** 2 if k < 2 - tail else 0.0)
        ratios.append(ratio)
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert logs["log_ratio_base"].item() == pytest.approx(sum(ratios[:2 - tail]) / (2 - tail), rel=1e-4, abs=1e-5)


def test_a_zero_flow_head_leaves_the_rest_of_the_seeded_flow_network_as_drawn():
    from dagcli.algorithms.base import Context
    from dagcli.algorithms.flow import seeded_flow_network

    ctx = Context(family=loaded("sd3").family, schedule=None, device=torch.device("cpu"), height=32, width=32,
                  steps=2, seed=3, reduction="mean", autocast=contextlib.nullcontext, x0_rewards=None,
                  reference_step=None)
    (_, drawn), (_, zero) = seeded_flow_network(ctx), seeded_flow_network(ctx, zero_head=True)
    a, b = drawn.state_dict(), zero.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(b[k], torch.zeros_like(a[k])) if k.startswith("head.") else torch.equal(a[k], b[k]), k
    assert a["head.weight"].abs().sum() > 0


@pytest.fixture
def rdb_config(tmp_path, tiny_pipeline_dir):
    return write_tiny_config(tmp_path, tiny_pipeline_dir, PROMPTS, train={"algorithm": "dag-rdb"},
                             dag={"beta": 1.0, "beta_ramp_epochs": 2, "flow_warmup_epochs": 0},
                             output={"checkpoint_every": 1})


def test_log_ratio_is_exactly_zero_at_a_zero_lora_and_not_after_training(rdb_config, tmp_path):
    from dagcli.config import load_config, replace
    from dagcli.trainer import Trainer

    cfg = replace(load_config(rdb_config), "output", dir=str(tmp_path / "z"))
    trainer = Trainer(cfg, PROMPTS)
    batch, _ = trainer.collect(0)
    pairs = torch.tensor([[0, 0], [1, 2], [2, 3], [0, 3]])
    _, logs = trainer.micro_batch_loss(batch, pairs, epoch=0)
    assert logs["log_ratio_base"].item() == 0.0  # bit for bit: P_θ is the base model on every step
    trainer.train_epoch(0, batch)
    assert trainer.micro_batch_loss(batch, pairs, epoch=1)[1]["log_ratio_base"].item() != 0.0


def test_dag_rdb_trains_on_tiny_and_resumes_bit_for_bit(rdb_config, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(["train", "--config", rdb_config, "--epochs", "2", "-o", a], capsys)[0] == 0
    assert run_cli(["train", "--config", rdb_config, "--epochs", "1", "-o", b], capsys)[0] == 0
    code, _, err = run_cli(["train", "--config", rdb_config, "--epochs", "2", "-o", b, "--resume"], capsys)
    assert code == 0, err
    metrics = json.loads((a / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("db_loss", "log_ratio_base", "flow", "grad_norm_lora", "grad_norm_flow"):
        assert math.isfinite(metrics[key]), key
    assert "log_pb" not in metrics
    for name in ("pytorch_lora_weights.safetensors", "flow.safetensors"):
        wa, wb = (load_file(r / "checkpoints" / "step-000002" / name) for r in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.mark.parametrize("model", ["tiny", "tiny-flow", "tiny-random-sd3", "tiny-random-flux", "tiny-random-sdxl"])
def test_dag_rdb_trains_one_epoch_on_every_family(model, tmp_path, capsys):
    cfg = write_tiny_config(tmp_path, model, PROMPTS, train={"epochs": 1, "algorithm": "dag-rdb"},
                            dag={"beta": 1.0, "flow_warmup_epochs": 0}, lora={"rank": 2, "alpha": 2.0})
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", cfg, "-o", run], capsys)
    assert code == 0, err
    metrics = json.loads((run / "metrics.jsonl").read_text())
    for key in ("loss", "db_loss", "log_ratio_base", "grad_norm_lora", "grad_norm_flow"):
        assert np.isfinite(metrics[key]), key
    assert metrics["grad_norm_lora"] > 0
    assert (run / "checkpoints" / "step-000001" / "flow.safetensors").is_file()
