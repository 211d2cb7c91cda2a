"""Checks of user input that several entry points share (the API, the exporter), before any model is loaded."""

from __future__ import annotations

import tempfile
from pathlib import Path

from dagcli.errors import DagError


def check_positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise DagError(f"{name} must be positive, got {value}")


def check_eta(eta: float | None, model: str | None = None) -> None:
    """--eta is >= 0 and at most the bound of the model family's sampler (DDIM: 1; flows: none); the family is
    read without loading weights (a hub model not yet downloaded: only the sign is checked)."""
    from dagcli.models import known_family

    if eta is None:
        return
    family = known_family(model)
    bound = family.reference.max_eta if family is not None else None
    if bound is not None and not 0.0 <= eta <= bound:
        raise DagError(f"--eta must be in [0, {bound:g}] for this model (0: deterministic, {bound:g}: DDIM's "
                       f"DDPM-like noise), got {eta}")
    if eta < 0:
        raise DagError(f"--eta must be >= 0 (0: the deterministic ODE / DDIM sampler), got {eta}")


def check_sampler(named: str, sampler: str, eta: float | None, model: str | None) -> None:
    """`sampler` (`named`: the setting as the message names it) suits the family of `model`
    (`model_sampler_problem`); else one DagError line."""
    problem = model_sampler_problem(named, sampler, eta, model)
    if problem:
        raise DagError(problem)


def model_sampler_problem(named: str, sampler: str, eta: float | None, model: str | None) -> str | None:
    """What is wrong with `sampler` for the family of `model`, read without loading weights
    (`families.sampler_problem`); None when nothing is, or when the family cannot be told yet (a hub model not
    yet downloaded: checked once loaded)."""
    from dagcli.families import sampler_problem
    from dagcli.models import known_family

    family = known_family(model)
    return sampler_problem(family, named, sampler, eta) if family is not None else None


def check_writable_dir(path: Path, flag: str = "--output") -> None:
    """The folder exists or can be created, and files can be written there; nothing is created.

    The nearest existing folder on the way (the folder itself, else an ancestor) must take a file, so a
    command that fails before writing its first file leaves nothing behind; writers create the folder.
    """
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise DagError(f"{flag} {str(path)!r} cannot be written ({str(existing)!r} is a file, not a folder)")
    try:
        with tempfile.TemporaryFile(dir=existing):  # unnamed (or at once removed): leaves nothing behind
            pass
    except OSError as e:
        raise DagError(f"{flag} {str(path)!r} cannot be written ({e.strerror or e})") from e


def sampler_defaults(loaded, steps: int | None, guidance: float | None, eta: float | None) -> dict:
    """Steps, guidance and noise level for sampling `loaded`: the given ones, else the model's defaults."""
    from dagcli.models import model_defaults

    d = model_defaults(loaded.name)
    return {"steps": steps or d.sample_steps or d.steps, "guidance": d.guidance if guidance is None else guidance,
            "eta": d.sample_eta if eta is None else eta}
