"""The sampler's numerics against independent computations: diffusers' scheduler and pipeline, float64 densities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dagcli.kernels.ddim import Schedule, backward_log_prob, ddim_step
from dagcli.kernels.gaussian import reduce_latent
from dagcli.sampling import sample_batch, to_pil


def sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def gaussian_logpdf64(x, mean, var):
    """Closed-form log N(x; mean, var) per element, float64, written independently of dagcli."""
    x, mean = x.double(), mean.double()
    return -0.5 * (x - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)


def test_eta0_images_match_diffusers_pipeline(tiny_model):
    pipe = tiny_model.pipe
    prompts = ["a red circle", "a small blue square on a yellow background"]
    traj = sample_batch(tiny_model, prompts, torch.Generator().manual_seed(3), steps=12, guidance=5.0, eta=0.0)
    ours = np.stack([np.asarray(im) for im in to_pil(traj.images)]).astype(np.int16)
    ref = pipe(prompts, num_inference_steps=12, guidance_scale=5.0, eta=0.0,
               generator=torch.Generator().manual_seed(3), output_type="np").images
    ref = (ref * 255).round().astype(np.int16)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1


@pytest.mark.parametrize("step_index", [0, 5, 9])
def test_eta1_step_mean_matches_scheduler_and_logprob_is_gaussian(step_index):
    scheduler = sd_scheduler()
    schedule = Schedule.from_scheduler(scheduler, 10)
    t = scheduler.timesteps[step_index]
    g = torch.Generator().manual_seed(step_index)
    x_t = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    x_s = torch.randn(3, 4, 8, 8, generator=g)

    out = ddim_step(schedule, eps, t, x_t, eta=1.0, prev_sample=x_s, reduction="sum")
    ref_mean = scheduler.step(eps, t, x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample
    torch.testing.assert_close(out.mean, ref_mean, rtol=1e-5, atol=1e-5)

    # Variance from ᾱ in float64, straight from the β schedule.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    s = int(t) - 100
    a_t, a_s = abar[int(t)], (abar[s] if s >= 0 else abar[0])
    var = float((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    expected = gaussian_logpdf64(x_s, ref_mean, var).flatten(1).sum(1)
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-3)
    # mean reduction is the sum divided by the latent size
    out_mean = ddim_step(schedule, eps, t, x_t, eta=1.0, prev_sample=x_s, reduction="mean")
    torch.testing.assert_close(out_mean.log_prob.double(), expected / (4 * 8 * 8), rtol=1e-5, atol=1e-5)


def test_backward_logprob_is_noising_kernel_density():
    scheduler = sd_scheduler()
    schedule = Schedule.from_scheduler(scheduler, 10)
    g = torch.Generator().manual_seed(0)
    x_s, x_t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in scheduler.timesteps:
        lp = backward_log_prob(schedule, x_t, t, x_s, reduction="sum")
        a = scheduler.alphas_cumprod.double()
        a_t = a[int(t)]
        a_s = a[int(t) - 100] if int(t) - 100 >= 0 else scheduler.final_alpha_cumprod.double()
        expected = gaussian_logpdf64(x_t, (a_t / a_s).sqrt() * x_s.double(), float(1 - a_t / a_s)).flatten(1).sum(1)
        torch.testing.assert_close(lp.double(), expected, rtol=1e-5, atol=1e-2)


def test_scoring_a_recorded_step_reproduces_its_logprob_exactly(tiny_model):
    pipe, family = tiny_model.pipe, tiny_model.family
    prompts = ["a red circle", "a blue square", "a green triangle"]
    traj = sample_batch(tiny_model, prompts, torch.Generator().manual_seed(0), steps=6, guidance=4.0, eta=1.0,
                        decode=False)
    schedule = Schedule.from_scheduler(pipe.scheduler, 6)
    for i, t in enumerate(schedule.timesteps):
        out = ddim_step(schedule, traj.out_guided[:, i], t, traj.latents[:, i], eta=1.0,
                        prev_sample=traj.latents[:, i + 1])
        assert torch.equal(out.log_prob, traj.log_probs[:, i])
    # Recomputing the model output for one row alone (another batch layout) gives the same log-prob.
    i = 3
    t = schedule.timesteps[i].reshape(1)
    denoise = family.denoiser_fn(pipe.unet, schedule, traj.cond[1:2], 4.0)
    eps_g, _ = denoise(traj.latents[1:2, i], torch.tensor([i]))
    out = ddim_step(schedule, eps_g, t, traj.latents[1:2, i], eta=1.0, prev_sample=traj.latents[1:2, i + 1])
    torch.testing.assert_close(out.log_prob, traj.log_probs[1:2, i], rtol=1e-5, atol=1e-5)


def test_reduce_latent_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="valid options: mean, sum"):
        reduce_latent(torch.zeros(2, 3), "max")


def test_alpha_one_schedule_keeps_every_step_stochastic():
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    schedule = Schedule.from_scheduler(scheduler, 10)
    t = schedule.timesteps[-1]
    g = torch.Generator().manual_seed(0)
    x_t, eps, x_s = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    out = ddim_step(schedule, eps, t, x_t, eta=1.0, prev_sample=x_s)
    assert torch.isfinite(out.log_prob).all() and (out.std > 0).all()
    assert torch.isfinite(backward_log_prob(schedule, x_t, t, x_s)).all()


def test_pipelines_with_another_scheduler_sample_with_ddim(tmp_path):
    from diffusers import DDIMScheduler as DDIM
    from diffusers import PNDMScheduler

    from dagcli.builtin.random_models import build_tiny_random_pipeline
    from dagcli.models import load_model

    pipe = build_tiny_random_pipeline()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert isinstance(loaded.pipe.scheduler, DDIM)
    assert loaded.pipe.scheduler.config.beta_schedule == "scaled_linear"
