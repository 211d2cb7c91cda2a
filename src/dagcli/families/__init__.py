"""Model families, chosen from the pipeline's class: one interface (`base.Family`), one module per kind of
pipeline. Adding a family means adding its class here; nothing else in the engine names a family."""

from __future__ import annotations

import torch

from dagcli.errors import DagError
from dagcli.families.base import Cond, Family
from dagcli.families.flux import FluxFamily
from dagcli.families.sd import SDFamily
from dagcli.families.sd3 import SD3Family
from dagcli.families.sdxl import SDXLFamily

# diffusers pipeline class name -> family
FAMILIES: dict[str, type] = {
    "StableDiffusionPipeline": SDFamily,
    "StableDiffusion3Pipeline": SD3Family,
    "FluxPipeline": FluxFamily,
    "StableDiffusionXLPipeline": SDXLFamily,
}


def family_class(name: str) -> type:
    """The family class called `name` ("sd", ...), for work that needs no loaded pipeline (export)."""
    for cls in FAMILIES.values():
        if cls.name == name:
            return cls
    raise DagError(f"unknown model family {name!r}; valid options: {', '.join(sorted(c.name for c in FAMILIES.values()))}")


def pipeline_family(class_name: str) -> type | None:
    """The family class of a diffusers pipeline class name (from a model_index.json), or None."""
    return FAMILIES.get(class_name)


def family_for(pipe, device: torch.device) -> Family:
    """The family of a loaded pipeline; an unsupported pipeline class is a one-line error listing the supported."""
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise DagError(f"pipeline class {name} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name](pipe, device)


def set_sampler(family: Family, sampler: str, eta: float | None = None, what: str = "sampling.sampler") -> None:
    """Make every schedule of `family` use `sampler` (`what`: the setting or flag that gave it); only flow families
    have a choice, and "ddim" needs eta <= 1 (η = 1: the noising chain's posterior). Else one DagError line naming
    the valid values."""
    samplers = getattr(family, "samplers", ("sde",))
    if sampler not in samplers and len(samplers) > 1:
        raise DagError(f"{what} {sampler!r} is not a sampler; valid options: {', '.join(samplers)}")
    if sampler not in samplers:
        raise DagError(f"{what} {sampler!r} applies to the flow families only (sd3, flux: SD3 / SD3.5, "
                       f"FLUX and the models built on them); the {family.name} family takes 'sde' (its own sampler)")
    if sampler == "ddim" and eta is not None and not 0.0 <= eta <= 1.0:
        raise DagError(f"eta {eta:g} with {what} 'ddim': must be in [0, 1] (1: the posterior of P_B)")
    if len(samplers) > 1:
        family.sampler = sampler


__all__ = ["FAMILIES", "Cond", "Family", "family_class", "family_for", "pipeline_family", "set_sampler"]
