"""DDIM for rectified flow (`kernels.flow_ddim`): the step and its log-probability against a float64 closed form,
η = 1 against the noising chain's posterior by Monte Carlo, the last-step
convention, and the `sampling.sampler` setting on the families. η = 0 against diffusers' Euler step, bit for bit:
`test_flow_matching.test_eta0_step_is_the_schedulers_euler_step_bit_for_bit`."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dagcli.errors import DagError
from dagcli.kernels import flow_ddim, flow_sde


def schedule_and_scheduler(steps: int = 10):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = flow_sde.Schedule.from_scheduler(scheduler, steps)
    scheduler.set_timesteps(steps)
    return scheduler, schedule


def closed_form64(x, v, sigma: float, sigma_next: float, eta: float):
    """(mean, s²) of the step in float64 from x̂0 and ε̂, written from the equations, not from the kernel."""
    x, v = x.double(), v.double()
    x0_hat = x - sigma * v
    eps_hat = (x - (1 - sigma) * x0_hat) / sigma
    c = (1 - sigma) / (1 - sigma_next)
    tau2 = sigma**2 - c**2 * sigma_next**2
    s2 = eta**2 * sigma_next**2 * tau2 / sigma**2
    return (1 - sigma_next) * x0_hat + math.sqrt(sigma_next**2 - s2) * eps_hat, s2


def logpdf64(x, mean, var):
    return -0.5 * (x.double() - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)


@pytest.mark.parametrize("step_index", [0, 4, 8])  # σ = 1, a middle step, the last stochastic step
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_step_and_log_prob_are_the_float64_closed_form(step_index, eta):
    _, schedule = schedule_and_scheduler()
    sigma, sigma_next = float(schedule.sigmas[step_index]), float(schedule.sigmas[step_index + 1])
    g = torch.Generator().manual_seed(step_index)
    x, v, x_next = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    i = torch.full((3,), step_index)
    out = flow_ddim.ddim_flow_step(schedule, i, x, v, eta, prev_sample=x_next, reduction="sum")
    mean, s2 = closed_form64(x, v, sigma, sigma_next, eta)
    expected = logpdf64(x_next, mean, s2).flatten(1).sum(1)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std.double(), torch.full((3,), math.sqrt(s2), dtype=torch.float64))
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-3)
    by_mean = flow_ddim.ddim_flow_step(schedule, i, x, v, eta, prev_sample=x_next)
    torch.testing.assert_close(by_mean.log_prob.double(), expected / (4 * 8 * 8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pred_x0, x - sigma * v)


def test_a_sample_is_mean_plus_std_times_the_rows_own_noise_and_rescores_bit_for_bit():
    _, schedule = schedule_and_scheduler()
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    i = torch.tensor([3, 3])
    out = flow_ddim.ddim_flow_step(schedule, i, x, v, 1.0, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    z = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    torch.testing.assert_close(out.prev_sample, out.mean + out.std.reshape(-1, 1, 1, 1) * z)
    again = flow_ddim.ddim_flow_step(schedule, i, x, v, 1.0, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)


def test_eta1_with_the_true_x0_is_the_noising_chains_posterior():
    """x at σ from a known x0, v chosen so that x̂0 = x0: the η = 1 step's draws have the posterior
    q(x' | x, x0) ∝ N(x'; (1 − σ') x0, σ'²) · N(x; c x', τ²) as mean and variance, by Gaussian conditioning
    written here; within 5 standard errors (mean: sqrt(var / n); variance: var·sqrt(2 / n))."""
    _, schedule = schedule_and_scheduler()
    x0 = torch.tensor([-1.5, -0.2, 0.4, 2.0], dtype=torch.float64)
    eps = torch.tensor([0.3, -1.1, 0.8, 0.05], dtype=torch.float64)
    n = 40_000
    g = torch.Generator().manual_seed(0)
    for i in range(schedule.num_steps - 1):  # every stochastic transition, σ = 1 included
        sigma, sigma_next = (float(s) for s in schedule.sigmas[i: i + 2])
        x = (1 - sigma) * x0 + sigma * eps
        v = (x - x0) / sigma
        c = (1 - sigma) / (1 - sigma_next)
        tau2 = sigma**2 - c**2 * sigma_next**2
        precision = 1 / sigma_next**2 + c**2 / tau2
        post_var = 1 / precision
        post_mean = post_var * ((1 - sigma_next) * x0 / sigma_next**2 + c * x / tau2)
        rows = torch.full((n,), i)
        out = flow_ddim.ddim_flow_step(schedule, rows, x.float().expand(n, 4), v.float().expand(n, 4), 1.0,
                                       generator=g)
        draws = out.prev_sample.double()
        se_mean = (post_var / n) ** 0.5
        assert (draws.mean(0) - post_mean).abs().max() < 5 * se_mean + 1e-6, i
        assert (draws.var(0) / post_var - 1).abs().max() < 5 * math.sqrt(2 / n), i


def test_the_last_step_is_x0_hat_with_log_probs_zero_and_a_mixed_batch_stays_finite():
    _, schedule = schedule_and_scheduler()
    g = torch.Generator().manual_seed(2)
    x, v, x_next = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    last = torch.full((2,), schedule.num_steps - 1)
    sigma = float(schedule.sigmas[-2])
    out = flow_ddim.ddim_flow_step(schedule, last, x, v, 1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.prev_sample, x - sigma * v)
    assert torch.equal(out.log_prob, torch.zeros(2)) and torch.equal(out.std, torch.zeros(2))
    assert torch.equal(flow_ddim.matched_backward_log_prob(schedule, last, x, out.prev_sample), torch.zeros(2))
    mixed = torch.tensor([schedule.num_steps - 2, schedule.num_steps - 1])
    scored = flow_ddim.ddim_flow_step(schedule, mixed, x, v, 1.0, prev_sample=x_next, reduction="sum")
    s8, s9 = float(schedule.sigmas[-3]), float(schedule.sigmas[-2])
    mean, s2 = closed_form64(x[:1], v[:1], s8, s9, 1.0)
    torch.testing.assert_close(scored.log_prob[0].double(), logpdf64(x_next[:1], mean, s2).sum(), rtol=1e-5,
                               atol=1e-3)
    assert scored.log_prob[1] == 0
    backward = flow_ddim.matched_backward_log_prob(schedule, mixed, x, x_next)
    assert backward[1] == 0
    torch.testing.assert_close(backward[0], flow_sde.backward_log_prob(schedule, mixed, x, x_next)[0])


# --- the setting on the families -----------------------------------------------------------------------------


def test_the_sampler_setting_reaches_the_flow_familys_step():
    from dagcli.builtin.random_flow import build_tiny_random_sd3
    from dagcli.families import family_for, set_sampler

    family = family_for(build_tiny_random_sd3(0), torch.device("cpu"))
    assert family.schedule(4, 32, 32).sampler == "sde"
    set_sampler(family, "ddim", 1.0)
    schedule = family.schedule(4, 32, 32)
    assert schedule.sampler == "ddim"
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    i = torch.tensor([1, 1])
    got = family.step(schedule, i, x, v, 1.0, generator=torch.Generator().manual_seed(4))
    want = flow_ddim.ddim_flow_step(schedule, i, x, v, 1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(got.prev_sample, want.prev_sample) and torch.equal(got.log_prob, want.log_prob)
    last = torch.tensor([3, 3])
    assert torch.equal(family.backward_log_prob(schedule, last, x, v), torch.zeros(2))
    with pytest.raises(DagError, match=r"must be in \[0, 1\]"):
        set_sampler(family, "ddim", 1.5)
    with pytest.raises(DagError, match="--sampler euler is not a sampler; valid options: sde, ddim"):
        set_sampler(family, "euler", what="--sampler")


def test_sd_families_refuse_the_flow_sampler_with_one_line_naming_the_flow_families():
    from dagcli.builtin.random_models import build_tiny_random_pipeline
    from dagcli.families import family_for, set_sampler

    family = family_for(build_tiny_random_pipeline(0), torch.device("cpu"))
    set_sampler(family, "sde")  # the default: the family's own sampler
    with pytest.raises(DagError, match="flow families only") as e:
        set_sampler(family, "ddim")
    assert "\n" not in str(e.value)


def test_config_rejects_an_unknown_sampler_listing_the_valid_ones():
    from dagcli.config import Config, replace, validate

    problems = validate(replace(Config(), "sampling", sampler="euler"))
    assert any("sampling.sampler" in p and "euler" in p and "sde" in p and "ddim" in p for p in problems), problems


@pytest.fixture
def unloadable_sd_folder(tmp_path, monkeypatch):
    """A Stable Diffusion folder that names its pipeline class and holds no weights; loading any model raises."""
    import json

    from dagcli import models, trainer

    folder = tmp_path / "sd-without-weights"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before --sampler was checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr(trainer, "load_model", no_loading)
    return folder


REFUSED_DDIM = ("error: --sampler ddim applies to the flow families only (sd3, flux: SD3 / SD3.5, FLUX and the "
                "models built on them); the sd family takes 'sde' (its own sampler)")


@pytest.mark.parametrize("command", ["train", "sample"])
def test_ddim_on_an_sd_model_is_refused_before_loading_it(command, unloadable_sd_folder, tmp_path, capsys):
    from helpers.cli import run_cli

    args = {"train": ["train", "--device", "cpu"], "sample": ["sample", "--prompt", "a red circle"]}[command]
    code, _, err = run_cli([*args, "-m", unloadable_sd_folder, "--sampler", "ddim", "-o", tmp_path / "out"], capsys)
    assert (code, err.strip()) == (2, REFUSED_DDIM), err
    assert not (tmp_path / "out").exists()
