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


# ---------------------------------------------------------------- one-element latents, by hand in float64
# A four-timestep schedule: ᾱ = [0.95, 0.64, 0.5, 0.36], sampler timesteps 3 -> 1 -> end (ᾱ = 0.9 after the last).
# Step t=3 -> s=1: ᾱ_t = 0.36, ᾱ_s = 0.64, so sqrt(ᾱ_t) = 0.6, sqrt(1-ᾱ_t) = 0.8, sqrt(ᾱ_s) = 0.8, 1-ᾱ_s = 0.36,
# ᾱ_t/ᾱ_s = 0.5625 and the DDIM variance (1-ᾱ_s)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_s) = 0.5625·0.4375.
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def hand_schedule(prediction_type: str = "epsilon", clip_sample: float | None = None) -> Schedule:
    return Schedule(alphas_cumprod=torch.tensor([0.95, 0.64, 0.5, 0.36], dtype=torch.float64),
                    final_alpha_cumprod=0.9, timesteps=torch.tensor([3, 1]), step_ratio=2,
                    prediction_type=prediction_type, clip_sample=clip_sample)


def one(*values: float) -> torch.Tensor:
    """A latent [1, n, 1, 1] holding `values`."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1)


def normal_logpdf(x: float, mean: float, std: float) -> float:
    return -((x - mean) ** 2) / (2 * std**2) - math.log(std) - LOG_SQRT_2PI


def assert_step(out, mean: float, std: float, log_prob: float, pred_x0: float) -> None:
    def check(actual, expected):
        torch.testing.assert_close(actual.double().flatten(), torch.tensor([expected], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)

    check(out.mean, mean)
    check(out.std, std)
    check(out.log_prob, log_prob)
    check(out.pred_x0, pred_x0)


def test_schedule_prev_and_alpha_by_hand():
    s = hand_schedule()
    assert s.prev(torch.tensor([3, 1])).tolist() == [1, -1]
    assert s.alpha(torch.tensor([3, 1, -1])).tolist() == [0.36, 0.64, 0.9]


def test_ddim_step_epsilon_eta_half_by_hand():
    # x_t = 0.5, ε = 0.2, x_s = 0.3, η = 0.5
    x0 = (0.5 - 0.8 * 0.2) / 0.6  # 0.5667
    std = 0.5 * math.sqrt(0.5625 * 0.4375)  # 0.2480
    mean = 0.8 * x0 + math.sqrt(0.36 - std**2) * 0.2  # 0.5626
    out = ddim_step(hand_schedule(), one(0.2), torch.tensor(3), one(0.5), eta=0.5, prev_sample=one(0.3))
    assert_step(out, mean, std, normal_logpdf(0.3, mean, std), x0)
    torch.testing.assert_close(out.prev_sample, one(0.3))


def test_ddim_last_step_uses_the_final_alpha_by_hand():
    # t = 1 -> end: ᾱ_t = 0.64, ᾱ_s = 0.9; x_t = -1, ε = 0.5, x_s = 0, η = 1
    x0 = (-1.0 - 0.6 * 0.5) / 0.8  # -1.625
    std = math.sqrt(0.1 / 0.36 * (1 - 0.64 / 0.9))  # 0.2833
    mean = math.sqrt(0.9) * x0 + math.sqrt(0.1 - std**2) * 0.5
    out = ddim_step(hand_schedule(), one(0.5), torch.tensor(1), one(-1.0), eta=1.0, prev_sample=one(0.0))
    assert_step(out, mean, std, normal_logpdf(0.0, mean, std), x0)


def test_ddim_step_v_prediction_by_hand():
    # v = 0.2 at x_t = 0.5: x̂0 = 0.6·0.5 - 0.8·0.2 = 0.14, ε = 0.6·0.2 + 0.8·0.5 = 0.52; η = 0.5
    std = 0.5 * math.sqrt(0.5625 * 0.4375)
    mean = 0.8 * 0.14 + math.sqrt(0.36 - std**2) * 0.52
    out = ddim_step(hand_schedule("v_prediction"), one(0.2), torch.tensor(3), one(0.5), eta=0.5,
                    prev_sample=one(0.3))
    assert_step(out, mean, std, normal_logpdf(0.3, mean, std), 0.14)


def test_ddim_step_clips_x0_by_hand():
    # x_t = 2, ε = 0: x̂0 = 2/0.6 = 3.33, clipped to 1; μ = 0.8·1 + sqrt(0.36 - σ²)·0 = 0.8
    std = 0.5 * math.sqrt(0.5625 * 0.4375)
    out = ddim_step(hand_schedule(clip_sample=1.0), one(0.0), torch.tensor(3), one(2.0), eta=0.5,
                    prev_sample=one(0.5))
    assert_step(out, 0.8, std, normal_logpdf(0.5, 0.8, std), 1.0)


def test_ddim_step_eta_zero_is_deterministic_by_hand():
    # σ = 0: μ = 0.8·x̂0 + 0.6·ε = 0.8·0.5667 + 0.6·0.2 = 0.5733, returned as x_s, log-prob 0
    x0 = (0.5 - 0.8 * 0.2) / 0.6
    out = ddim_step(hand_schedule(), one(0.2), torch.tensor(3), one(0.5), eta=0.0)
    assert_step(out, 0.8 * x0 + 0.6 * 0.2, 0.0, 0.0, x0)
    torch.testing.assert_close(out.prev_sample, out.mean)


def test_ddim_step_samples_mean_plus_std_times_the_noise_by_hand():
    x0 = (0.5 - 0.8 * 0.2) / 0.6
    std = 0.5 * math.sqrt(0.5625 * 0.4375)
    mean = 0.8 * x0 + math.sqrt(0.36 - std**2) * 0.2
    z = float(torch.randn(1, generator=torch.Generator().manual_seed(7)))
    out = ddim_step(hand_schedule(), one(0.2), torch.tensor(3), one(0.5), eta=0.5,
                    generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.prev_sample.double().flatten(), torch.tensor([mean + std * z], dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    # the density of the drawn point: -z²/2 - log σ - log sqrt(2π)
    assert float(out.log_prob) == pytest.approx(-(z**2) / 2 - math.log(std) - LOG_SQRT_2PI, rel=1e-5)


def test_ddim_log_prob_reductions_by_hand():
    # two latent elements at t = 3, η = 0.5: (x_t, ε, x_s) = (0.5, 0.2, 0.3) and (-1, 0.5, 0)
    std = 0.5 * math.sqrt(0.5625 * 0.4375)
    c = math.sqrt(0.36 - std**2)
    mean1 = 0.8 * (0.5 - 0.8 * 0.2) / 0.6 + c * 0.2
    mean2 = 0.8 * (-1.0 - 0.8 * 0.5) / 0.6 + c * 0.5
    total = normal_logpdf(0.3, mean1, std) + normal_logpdf(0.0, mean2, std)
    for reduction, expected in (("sum", total), ("mean", total / 2)):
        out = ddim_step(hand_schedule(), one(0.2, 0.5), torch.tensor(3), one(0.5, -1.0), eta=0.5,
                        prev_sample=one(0.3, 0.0), reduction=reduction)
        assert float(out.log_prob) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("t, ratio", [(3, 0.5625), (1, 0.64 / 0.9)])  # ᾱ_t/ᾱ_s: 0.36/0.64 and 0.64/0.9 (end)
def test_backward_kernel_by_hand(t, ratio):
    # P_B(x_t | x_s) = N(sqrt(ratio)·x_s, 1 - ratio): at t = 3, N(0.75·0.4, 0.4375) = N(0.3, 0.4375)
    lp = backward_log_prob(hand_schedule(), one(0.5), torch.tensor(t), one(0.4))
    expected = normal_logpdf(0.5, math.sqrt(ratio) * 0.4, math.sqrt(1 - ratio))
    assert float(lp) == pytest.approx(expected, rel=1e-5)
    lp2 = backward_log_prob(hand_schedule(), one(0.5, -0.2), torch.tensor(t), one(0.4, 0.1), reduction="sum")
    expected2 = expected + normal_logpdf(-0.2, math.sqrt(ratio) * 0.1, math.sqrt(1 - ratio))
    assert float(lp2) == pytest.approx(expected2, rel=1e-5)
