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


__all__ = ["FAMILIES", "Cond", "Family", "family_class", "family_for", "pipeline_family"]
