"""Classifier-free guidance's gradient with the unconditional branch detached (`grpo.detach_uncond`): the guided
output's gradient in the weights is w times the conditional output's, on the SD and SD3 families, and without
the detach it is not."""

from __future__ import annotations

import pytest
import torch

from helpers.flow_models import loaded

GUIDANCE = 3.0


def _family_parts(kind, tiny_model):
    if kind == "sd":
        m = tiny_model
        return m.family, m.pipe.unet, m.family.schedule(4, 32, 32)
    m = loaded("sd3")
    return m.family, m.pipe.transformer, m.family.schedule(4, 32, 32)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_detached_unconditional_branch_leaves_w_times_the_conditional_gradient(kind, tiny_model):
    family, denoiser, schedule = _family_parts(kind, tiny_model)
    cond = family.encode(["a red circle", "a blue square"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, family.latent_channels, 4, 4, generator=g)
    j = torch.tensor([1, 2])
    params = [p for p in denoiser.parameters() if p.dtype.is_floating_point]
    for p in params:
        p.requires_grad_(True)
    try:
        def grads(out):
            weights = torch.linspace(-1, 1, out.numel()).view_as(out)  # a loss that weighs every output unevenly
            return torch.autograd.grad((out * weights).sum(), params, allow_unused=True, retain_graph=True)

        guided_detached, v_c = family.denoiser_fn(denoiser, schedule, cond, GUIDANCE, detach_uncond=True)(x, j)
        guided, _ = family.denoiser_fn(denoiser, schedule, cond, GUIDANCE)(x, j)
        torch.testing.assert_close(guided_detached, guided)  # the value is the same
        got, full, cond_only = grads(guided_detached), grads(guided), grads(v_c)
        moved = False
        for a, b, c in zip(got, full, cond_only, strict=True):
            if c is None:
                continue
            torch.testing.assert_close(a, GUIDANCE * c, rtol=1e-4, atol=1e-5 * float(c.abs().max()))
            moved |= not torch.allclose(b, GUIDANCE * c, rtol=1e-3, atol=1e-5)
        assert moved  # with the unconditional branch in the graph the gradient differs
    finally:
        for p in params:
            p.requires_grad_(False)
