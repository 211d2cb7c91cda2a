"""The tiny random rectified-flow pipelines (SD3, FLUX) wrapped as `load_model` wraps one, and a float64 Gaussian
log-density written independently of dagcli, for the tests of the flow kernels and the algorithms on them."""

from __future__ import annotations

import math

import torch

from dagcli.builtin.random_flow import build_tiny_random_flux, build_tiny_random_sd3

BUILDERS = {
    "sd3": build_tiny_random_sd3,
    "sd3-t5": lambda seed: build_tiny_random_sd3(seed, t5=True),
    "flux-dev": build_tiny_random_flux,
    "flux-schnell": lambda seed: build_tiny_random_flux(seed, guidance_embeds=False),
}


def loaded(kind: str):
    """A tiny pipeline wrapped as `load_model` wraps one (its family chosen from the pipeline class)."""
    from dagcli.families import family_for
    from dagcli.models import LoadedModel

    pipe = BUILDERS[kind](0)
    pipe.set_progress_bar_config(disable=True)
    dev = torch.device("cpu")
    return LoadedModel(pipe=pipe, family=family_for(pipe, dev), name=kind, device=dev, dtype=torch.float32)


def gaussian_logpdf64(x, mean, var):
    """log N(x; mean, var) per element in float64, written independently of dagcli."""
    x, mean = x.double(), mean.double()
    return -0.5 * (x - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)
