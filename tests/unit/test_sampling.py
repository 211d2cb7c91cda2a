"""The sampler's base-model tail: a LoRA that acts on the first k steps only (`sample_batch(lora_steps=k)`)."""

from __future__ import annotations

import pytest
import torch

from dagcli.sampling import lora_steps_at


@pytest.fixture(scope="module")
def tiny_with_lora():
    """The built-in model with a LoRA of random (non-zero) weights, and a second copy of the model without any."""
    from dagcli.config import LoraConfig
    from dagcli.models import add_lora, load_model

    model, plain = load_model("tiny", device="cpu"), load_model("tiny", device="cpu")
    net = add_lora(model.family.denoiser, LoraConfig(rank=4, alpha=4.0, target_modules=("to_q", "to_k", "to_v", "to_out.0")), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model, net, plain


def _outputs(family, net, traj, steps, guidance):
    """The guided output of `net` at every recorded state of `traj`, computed afresh."""
    schedule = family.schedule(steps, 32, 32)
    denoise = family.denoiser_fn(net, schedule, traj.cond, guidance)
    with torch.no_grad():
        return torch.stack([denoise(traj.latents[:, i], torch.full((traj.batch_size,), i))[0].float()
                            for i in range(steps)], 1)


def test_the_tail_is_sampled_by_the_base_model_and_scored_by_it(tiny_with_lora):
    """With lora_steps = 2 of 4, the first two steps' outputs are the LoRA's (not the base model's) and the last
    two are those of a separately loaded model without a LoRA, as are their recorded log-probs."""
    from dagcli.sampling import generators_for, sample_batch

    model, net, plain = tiny_with_lora
    steps, guidance, k = 4, 3.0, 2
    traj = sample_batch(model, ["a red circle", "a blue square"], generators_for([0, 1]), steps=steps,
                        guidance=guidance, eta=1.0, denoiser=net, lora_steps=k, decode=False)
    lora_out = _outputs(model.family, net, traj, steps, guidance)
    base_out = _outputs(plain.family, plain.family.denoiser, traj, steps, guidance)
    torch.testing.assert_close(traj.out_guided[:, :k], lora_out[:, :k])
    torch.testing.assert_close(traj.out_guided[:, k:], base_out[:, k:])
    assert float((lora_out - base_out).abs().max()) > 1e-2  # the LoRA changes the output: the test can tell
    schedule = plain.family.schedule(steps, 32, 32)
    for i in range(k, steps):
        index = torch.full((2,), i)
        step = plain.family.step(schedule, index, traj.latents[:, i], base_out[:, i], 1.0, prev=traj.latents[:, i + 1])
        torch.testing.assert_close(traj.log_probs[:, i], step.log_prob.float())
    switches = [m.disable_adapters for m in net.modules() if isinstance(getattr(m, "disable_adapters", None), bool)]
    assert switches and not any(switches)  # the LoRA layers are on again after sampling


def test_without_lora_steps_every_step_is_the_loras(tiny_with_lora):
    from dagcli.sampling import generators_for, sample_batch

    model, net, _ = tiny_with_lora
    kw = dict(steps=4, guidance=3.0, eta=1.0, denoiser=net, decode=False)
    full = sample_batch(model, ["a red circle"], generators_for([5]), **kw)
    same = sample_batch(model, ["a red circle"], generators_for([5]), lora_steps=4, **kw)
    torch.testing.assert_close(full.latents, same.latents, rtol=0, atol=0)
    torch.testing.assert_close(full.out_guided[:, :], _outputs(model.family, net, full, 4, 3.0))


@pytest.mark.parametrize("steps, trained, total, expected", [(10, 8, 10, 8), (20, 8, 10, 16), (50, 8, 10, 40),
                                                             (4, 8, 10, 3), (25, 7, 10, 18)])
def test_lora_steps_keep_the_fraction_of_the_chain(steps, trained, total, expected):
    assert lora_steps_at(steps, trained, total) == expected
