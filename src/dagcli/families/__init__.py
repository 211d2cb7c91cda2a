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
    """Make every schedule of `family` use `sampler` (`what`: the setting or flag that gave it); a problem
    (`sampler_problem`) is one DagError line naming the valid values."""
    named = f"{what} {sampler}" if what.startswith("--") else f"{what} = {sampler!r}"  # as `config.setting` does
    problem = sampler_problem(family, named, sampler, eta)
    if problem:
        raise DagError(problem)
    if len(family_samplers(family)) > 1:
        family.sampler = sampler


def family_samplers(family) -> tuple[str, ...]:
    """The `sampling.sampler` values a family (class or instance) takes: the flow families have a choice, the
    others only their own step, "sde"."""
    return tuple(getattr(family, "samplers", ("sde",)))


def sampler_problem(family, named: str, sampler: str, eta: float | None = None) -> str | None:
    """What is wrong with `sampler` (at `eta`) for `family`, a class or an instance, so that it can be said
    before loading; `named` is the setting as the message names it ("--sampler ddim"). None: nothing.
    "ddim" needs eta <= 1 (η = 1: the noising chain's posterior)."""
    samplers = family_samplers(family)
    taking = [c.name for c in FAMILIES.values() if sampler in family_samplers(c)]
    if sampler not in samplers and (len(samplers) > 1 or not taking):
        return f"{named} is not a sampler; valid options: {', '.join(samplers)}"
    if sampler not in samplers:
        return (f"{named} applies to the flow families only ({', '.join(taking)}: SD3 / SD3.5, FLUX and the models "
                f"built on them); the {family.name} family takes 'sde' (its own sampler)")
    if sampler == "ddim" and eta is not None and not 0.0 <= eta <= 1.0:
        return f"eta {eta:g} with {named}: must be in [0, 1] (1: the posterior of P_B)"
    return None


__all__ = ["FAMILIES", "Cond", "Family", "family_class", "family_for", "pipeline_family", "sampler_problem",
           "set_sampler"]
