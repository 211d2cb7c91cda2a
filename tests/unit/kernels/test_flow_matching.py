"""The rectified-flow families (SD3, FLUX) against independent computations: diffusers' pipelines and scheduler,
float64 closed-form densities, the interpolant's moments, a detailed-balance residual computed by hand."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dagcli.kernels import flow_ddim, flow_sde
from dagcli.sampling import sample_batch, to_pil
from helpers.flow_models import gaussian_logpdf64, loaded

PROMPTS = ["a red circle", "a small blue square on a yellow background"]


def sd3_scheduler_schedule(steps: int = 10):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = flow_sde.Schedule.from_scheduler(scheduler, steps)
    scheduler.set_timesteps(steps)
    return scheduler, schedule


# --- the sampler against diffusers ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind, guidance, size", [("sd3", 3.0, (32, 32)), ("sd3-t5", 4.5, (32, 32)),
                                                   ("flux-dev", 3.5, (32, 32)), ("flux-dev", 3.5, (48, 64)),
                                                   ("flux-schnell", 0.0, (32, 32))])
def test_eta0_images_equal_the_diffusers_pipeline(kind, guidance, size):
    model = loaded(kind)
    height, width = size
    seeds = [3, 4]
    traj = sample_batch(model, PROMPTS, [torch.Generator().manual_seed(s) for s in seeds], steps=5,
                        guidance=guidance, eta=0.0, height=height, width=width)
    ours = np.stack([np.asarray(im) for im in to_pil(traj.images)]).astype(np.int16)
    ref = model.pipe(PROMPTS, num_inference_steps=5, guidance_scale=guidance, height=height, width=width,
                     generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
                     max_sequence_length=model.family.t5_tokens).images
    ref = (ref * 255).round().astype(np.int16)
    assert ours.shape == ref.shape == (2, height, width, 3)
    assert np.abs(ours - ref).max() <= 1
    assert ours.std() > 5  # not a blank image


@pytest.mark.parametrize("step", [flow_sde.sde_step, flow_ddim.ddim_flow_step], ids=["sde", "ddim"])
def test_eta0_step_is_the_schedulers_euler_step_bit_for_bit(step):
    scheduler, schedule = sd3_scheduler_schedule()
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        scheduler._step_index = i
        ref = scheduler.step(v, t, x, return_dict=False)[0]
        out = step(schedule, torch.tensor([i]), x, v, eta=0.0)
        assert torch.equal(out.prev_sample, ref)
        assert torch.equal(out.log_prob, torch.zeros(2))


@pytest.mark.parametrize("step_index", [0, 4, 9])  # σ = 1, a middle step, σ' = 0
@pytest.mark.parametrize("eta", [0.7, 1.3])
def test_sde_logprob_is_the_float64_closed_form_gaussian(step_index, eta):
    _, schedule = sd3_scheduler_schedule()
    sigma, sigma_next = float(schedule.sigmas[step_index]), float(schedule.sigmas[step_index + 1])
    g = torch.Generator().manual_seed(step_index)
    x, v, x_next = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    out = flow_sde.sde_step(schedule, torch.full((3,), step_index), x, v, eta, prev_sample=x_next, reduction="sum")

    dt = sigma_next - sigma
    s2 = eta**2 * sigma / (1 - (sigma_next if sigma == 1.0 else sigma))
    mean = x.double() * (1 + s2 * dt / (2 * sigma)) + v.double() * (1 + s2 * (1 - sigma) / (2 * sigma)) * dt
    expected = gaussian_logpdf64(x_next, mean, s2 * -dt).flatten(1).sum(1)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-3)
    mean_red = flow_sde.sde_step(schedule, torch.full((3,), step_index), x, v, eta, prev_sample=x_next)
    torch.testing.assert_close(mean_red.log_prob.double(), expected / (4 * 8 * 8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pred_x0, x - sigma * v)


def test_sde_sample_is_mean_plus_std_times_the_rows_own_noise():
    _, schedule = sd3_scheduler_schedule()
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    out = flow_sde.sde_step(schedule, torch.tensor([3, 3]), x, v, 0.7,
                            generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    z = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    torch.testing.assert_close(out.prev_sample, out.mean + out.std.reshape(-1, 1, 1, 1) * z)
    dt = float(schedule.sigmas[4] - schedule.sigmas[3])
    sigma = float(schedule.sigmas[3])
    torch.testing.assert_close(out.std.double(), torch.full((2,), 0.7 * math.sqrt(sigma / (1 - sigma) * -dt),
                                                            dtype=torch.float64))


# --- the backward kernel -------------------------------------------------------------------------------------


def test_backward_kernel_reproduces_the_interpolants_marginals():
    """Samples of x_σ' from the interpolant pushed through P_B have the interpolant's law at σ given x0:
    mean (1 − σ) x0 and variance σ², for every transition (σ = 1 and σ' = 0 included)."""
    _, schedule = sd3_scheduler_schedule()
    x0 = torch.tensor([-2.0, -0.5, 0.3, 1.7], dtype=torch.float64)  # one per row; samples along the latent dims
    n = 40_000
    g = torch.Generator().manual_seed(0)
    for i in range(schedule.num_steps):
        sigma, sigma_next = (float(s) for s in schedule.sigmas[i : i + 2])
        x_next = (1 - sigma_next) * x0[:, None] + sigma_next * torch.randn(4, n, generator=g, dtype=torch.float64)
        mean, std = flow_sde.backward_kernel(schedule, torch.full((4,), i), x_next.float())
        x = mean.double() + std.double()[:, None] * torch.randn(4, n, generator=g, dtype=torch.float64)
        torch.testing.assert_close(x.mean(1), (1 - sigma) * x0, rtol=0, atol=5 * sigma / n**0.5 + 1e-6)
        torch.testing.assert_close(x.var(1), torch.full((4,), sigma**2, dtype=torch.float64),
                                   rtol=6 * (2 / n) ** 0.5, atol=1e-6)
        # and log P_B is that Gaussian's density
        c = (1 - sigma) / (1 - sigma_next)
        var = sigma**2 - c**2 * sigma_next**2
        lp = flow_sde.backward_log_prob(schedule, torch.full((4,), i), x.float(), x_next.float(), reduction="sum")
        expected = gaussian_logpdf64(x.float(), c * x_next.float().double(), var).sum(1)
        torch.testing.assert_close(lp.double(), expected, rtol=1e-5, atol=0.5)


# --- re-scoring ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_rescoring_a_stored_trajectory_gives_the_sampling_logprobs_bit_for_bit(kind):
    model = loaded(kind)
    family = model.family
    prompts = ["a red circle", "a blue square", "a green triangle"]
    traj = sample_batch(model, prompts, [torch.Generator().manual_seed(s) for s in range(3)], steps=4,
                        guidance=3.0, eta=0.7, decode=False)
    schedule = family.schedule(4, 32, 32)
    denoise = family.denoiser_fn(family.denoiser, schedule, traj.cond, 3.0)
    for i in range(4):
        index = torch.full((3,), i)
        whole = family.step(schedule, index, traj.latents[:, i], traj.out_guided[:, i], 0.7,
                            prev=traj.latents[:, i + 1])
        assert torch.equal(whole.log_prob, traj.log_probs[:, i])
        for b in range(3):  # batch size 1
            one = family.step(schedule, index[b : b + 1], traj.latents[b : b + 1, i], traj.out_guided[b : b + 1, i],
                              0.7, prev=traj.latents[b : b + 1, i + 1])
            assert torch.equal(one.log_prob, traj.log_probs[b : b + 1, i])
        out, _ = denoise(traj.latents[:, i], index)  # the model output recomputed, same batch
        again = family.step(schedule, index, traj.latents[:, i], out, 0.7, prev=traj.latents[:, i + 1])
        assert torch.equal(again.log_prob, traj.log_probs[:, i])
        # recomputed for one row alone: the network's last bits may depend on the batch shape, the step's do not
        alone, _ = family.denoiser_fn(family.denoiser, schedule, traj.cond[1:2], 3.0)(traj.latents[1:2, i], index[:1])
        one = family.step(schedule, index[:1], traj.latents[1:2, i], alone, 0.7, prev=traj.latents[1:2, i + 1])
        torch.testing.assert_close(one.log_prob, traj.log_probs[1:2, i], rtol=0, atol=1e-6)
    assert (traj.log_probs != 0).all()


# --- DAG's detailed balance on a flow ------------------------------------------------------------------------


def test_db_residual_of_a_hand_built_two_step_chain():
    """δ of both transitions of a 2-step chain through DAG-DB's loss, against the equations computed here."""
    from dagcli.algorithms.base import Context, MicroBatch, PolicyOutput
    from dagcli.algorithms.dag import Dag
    from dagcli.algorithms.dag_settings import DagConfig
    from dagcli.rollout import EpochBatch
    from dagcli.sampling import Trajectory

    family = loaded("sd3").family
    sig = [0.9, 0.5, 0.0]  # starts below 1 so that both P_B coefficients matter
    schedule = flow_sde.Schedule(sigmas=torch.tensor(sig), timesteps=torch.tensor(sig[:2]) * 1000)
    ctx = Context(family=family, schedule=schedule, device=torch.device("cpu"), height=32, width=32, steps=2,
                  seed=0, reduction="mean", autocast=contextlib.nullcontext, x0_rewards=None,
                  reference_step=None)
    beta, eta = 2.0, 0.8
    dag = Dag(DagConfig(beta=beta, beta_ramp_epochs=0, proximity=0.0), ctx, kl=False)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(3)]  # states 0, 1, 2
    vs = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(2)]  # velocities at states 0, 1
    cond = family.encode(["a red circle"])
    reward, fl = 0.25, torch.tensor([[0.1, -0.3]])  # terminal reward; r(x̂0) of states 0 and 1
    traj = Trajectory(latents=torch.stack(xs, 1), log_probs=torch.zeros(1, 2), out_guided=torch.stack(vs, 1),
                      out_cond=torch.stack(vs, 1), cond=cond, prompts=["a red circle"], eta=eta)
    batch = EpochBatch(traj=traj, rewards=torch.tensor([reward]), components={}, fl_rewards=fl,
                       pairs=torch.tensor([[0, 0], [0, 1]]))
    i = torch.tensor([0, 1])
    x, x_next, v = torch.cat(xs[:2]), torch.cat(xs[1:]), torch.cat(vs)
    step = family.step(schedule, i, x, v, eta, prev=x_next)
    mb = MicroBatch(traj_index=torch.tensor([0, 0]), step_index=i, x=x, x_next=x_next, cond=cond[[0, 0]],
                    prompts=["a red circle"] * 2, log_pf_old=step.log_prob, out_old=v,
                    terminal=torch.tensor([False, True]))
    loss, _ = dag.loss(mb, PolicyOutput(out=v, step=step), batch, epoch=0)

    with torch.no_grad():  # the flow network's values F̃(x_0, σ_0·1000) and F̃(x_1, σ_1·1000), read directly
        embeds = family.pipe.encode_prompt(["a red circle"], None, None, do_classifier_free_guidance=False)[0]
        flow = dag.modules["flow"](torch.cat(xs[:2]), torch.tensor(sig[:2]) * 1000, torch.cat([embeds] * 2))
    dims = 4 * 8 * 8
    expected = []
    for k in range(2):
        s, sn = sig[k], sig[k + 1]
        dt = sn - s
        s2 = eta**2 * s / (1 - (sn if s == 1.0 else s))
        mean = xs[k].double() * (1 + s2 * dt / (2 * s)) + vs[k].double() * (1 + s2 * (1 - s) / (2 * s)) * dt
        log_pf = gaussian_logpdf64(xs[k + 1], mean, s2 * -dt).sum() / dims
        c = (1 - s) / (1 - sn)
        log_pb = gaussian_logpdf64(xs[k], c * xs[k + 1].double(), s**2 - c**2 * sn**2).sum() / dims
        log_f = float(flow[k]) + beta * float(fl[0, k])
        log_f_next = beta * reward if k == 1 else float(flow[1]) + beta * float(fl[0, 1])
        expected.append((log_f + float(log_pf) - log_f_next - float(log_pb)) ** 2)
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-4)



# --- FLUX's token layout -------------------------------------------------------------------------------------


def test_flux_packing_and_image_ids_are_diffusers_own():
    from diffusers import FluxPipeline

    from dagcli.families.flux import image_ids, pack, unpack

    x = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(x, 2, 4, 6, 10)
    assert torch.equal(pack(x), packed)
    assert torch.equal(unpack(packed, 6, 10), FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8))
    assert torch.equal(image_ids(6, 10, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_flow_network_sees_the_image_layout_latent_and_sigma_times_1000(kind):
    family = loaded(kind).family
    schedule = family.schedule(4, 32, 32)
    cond = family.encode(["a red circle", "a blue square"])
    x = family.initial_latents(2, 32, 32, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 8, 8)
    j = torch.tensor([0, 4])
    x_in, time, text = family.flow_inputs(schedule, j, x, cond)
    assert x_in is x
    assert torch.equal(time, torch.stack([schedule.sigmas[0], schedule.sigmas[4]]) * 1000)
    assert time.tolist() == [1000.0, 0.0]
    tokens = cond.tensors["embeds"].shape[1] + (255 if kind == "sd3" else 0)  # SD3 without T5: its 256 zeros
    assert text.shape[:2] == (2, tokens)
    config = family.flow_config(32, 32)
    assert config.in_channels == 4 and config.cross_attention_dim == text.shape[-1]
