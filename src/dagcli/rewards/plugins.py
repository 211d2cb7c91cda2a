"""Rewards from outside the package: `module:factory` specs, reward files, and `dagcli.rewards` entry points.

Every reward `build_reward` returns is wrapped in `ValidatedReward`, which checks what it returns: a
`RewardOutput` (or a bare tensor) with float scores shaped `[B]`, finite unless the caller allows NaN. A
plugin that raises is reported as one line naming the plugin and the exception's message.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from dagcli.errors import DagError
from dagcli.rewards.base import Reward, RewardOutput, check_images

ENTRY_POINT_GROUP = "dagcli.rewards"


def entry_points() -> dict[str, metadata.EntryPoint]:
    """Reward entry points of the installed distributions, by name (nothing is imported)."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_entry_point(name: str, ep: metadata.EntryPoint) -> Callable[..., Reward]:
    """Import the factory an entry point names."""
    try:
        factory = ep.load()
    except Exception as e:  # any import-time failure of third-party code
        raise DagError(f"reward plugin {name!r} (entry point {ep.value}) failed to load: {_describe(e)}") from e
    return _check_callable(name, factory)


def _import_file(path: Path, label: str):
    """Import a `.py` file as a module registered under a stable name (so its rewards pickle in-process)."""
    if not path.is_file():
        raise DagError(f"reward plugin {label!r}: file {str(path)!r} not found")
    module_name = f"dagcli_reward_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise DagError(f"reward plugin {label!r}: {str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # third-party code may raise anything
        del sys.modules[module_name]
        raise DagError(f"reward plugin {label!r} failed to import: {_describe(e)}") from e
    return module


def _import_module(module_name: str, label: str):
    """Import a dotted module, telling a missing plugin apart from a plugin with a missing dependency."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise DagError(
                f"reward plugin {label!r}: module {module_name!r} not found "
                "(install it, or put its folder on PYTHONPATH)"
            ) from e
        raise DagError(f"reward plugin {label!r} failed to import: {_describe(e)}") from e
    except Exception as e:  # third-party code may raise anything
        raise DagError(f"reward plugin {label!r} failed to import: {_describe(e)}") from e


def load_plugin_factory(module_name: str, attr: str) -> Callable[..., Reward]:
    """The factory `attr` of a module (dotted name, or a path to a `.py` file)."""
    label = f"{module_name}:{attr}"
    if module_name.endswith(".py"):
        module = _import_file(Path(module_name).expanduser(), label)
    else:
        module = _import_module(module_name, label)
    if not hasattr(module, attr):
        options = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and not inspect.isclass(v)
        )
        raise DagError(
            f"reward plugin {label!r}: module {module_name!r} has no factory {attr!r}; "
            f"functions in it: {', '.join(options) or '(none)'}"
        )
    return _check_callable(label, getattr(module, attr))


def _check_callable(label: str, factory: object) -> Callable[..., Reward]:
    if not callable(factory):
        raise DagError(f"reward plugin {label!r} is a {type(factory).__name__}, not a factory function")
    return factory


def accepted_options(factory: Callable) -> tuple[set[str], bool]:
    """The keyword arguments a factory takes, and whether it takes **kwargs too."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def call_factory(label: str, factory: Callable[..., Reward], options: dict, plugin: bool) -> Reward:
    """`factory(**options)`, with unknown options and (for plugins) exceptions turned into DagErrors."""
    names, var_kw = accepted_options(factory)
    unknown = sorted(set(options) - names) if not var_kw else []
    if unknown:
        valid = ", ".join(sorted(names - {"device", "base_model"})) or "(none)"
        raise DagError(f"unknown option {unknown[0]!r} for reward {label!r}; valid options: {valid}")
    if not plugin:
        return factory(**options)
    try:
        reward = factory(**options)
    except DagError as e:
        raise DagError(f"reward plugin {label!r}: {e}") from e
    except Exception as e:  # third-party code may raise anything
        raise DagError(f"reward plugin {label!r} raised {_describe(e)}") from e
    if not callable(reward):
        raise DagError(f"reward plugin {label!r} returned a {type(reward).__name__}, not a callable reward")
    return reward


def _describe(error: BaseException) -> str:
    """`ValueError: message` on one line."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def takes_metadata(reward: Callable) -> bool:
    """Whether a reward can be called as `reward(images, prompts, metadata)`: a third positional parameter (or
    *args); a reward written as `reward(images, prompts)` is called without the prompts' metadata."""
    try:
        params = list(inspect.signature(reward).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


class ValidatedReward:
    """A reward whose every output is checked: `[B]` float scores, finite unless `strict_finite` is off.

    With `strict_finite=False` non-finite scores pass through and `info["nonfinite"]` counts them, so the
    trainer can drop those samples with a warning.
    """

    def __init__(self, inner: Callable, name: str, label: str, plugin: bool, strict_finite: bool = True):
        self.inner = inner
        self.name = name  # component name in RewardOutput.components
        self.label = label  # how the user wrote it in the spec (used in messages)
        self.plugin = plugin
        self.strict_finite = strict_finite
        self.slow = bool(getattr(inner, "slow", False))
        self.takes_metadata = takes_metadata(inner)

    def __repr__(self) -> str:
        return f"ValidatedReward({self.label!r})"

    @property
    def _who(self) -> str:
        return f"reward plugin {self.label!r}" if self.plugin else f"reward {self.label!r}"

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> RewardOutput:
        batch = len(check_images(images))
        args = (images, prompts, metadata) if self.takes_metadata else (images, prompts)
        if not self.plugin:
            out = self.inner(*args)
        else:
            try:
                out = self.inner(*args)
            except DagError as e:
                raise DagError(f"{self._who}: {e}") from e
            except Exception as e:  # third-party code may raise anything
                raise DagError(f"{self._who} raised {_describe(e)}") from e
        return self._check(out, batch)

    def _check(self, out: object, batch: int) -> RewardOutput:
        """Convert and validate one output."""
        if isinstance(out, RewardOutput):
            scores = self._scores(out.scores, batch, "scores")
            components = {k: self._scores(v, batch, f"component {k!r}") for k, v in out.components.items()}
            info = dict(out.info)
        elif isinstance(out, (torch.Tensor, np.ndarray)):
            scores, components, info = self._scores(out, batch, "scores"), {}, {}
        else:
            raise DagError(f"{self._who} returned a {type(out).__name__}; expected RewardOutput or a [B] tensor")
        components = components or {self.name: scores}
        bad = int((~torch.isfinite(scores)).sum())
        if bad and self.strict_finite:
            raise DagError(
                f"{self._who} returned {bad} non-finite score(s) (NaN or inf) in a batch of {batch}"
            )
        if bad:
            info["nonfinite"] = bad
        return RewardOutput(scores=scores, components=components, info=info)

    def _scores(self, value: object, batch: int, what: str) -> torch.Tensor:
        """A `[B]` real-valued tensor or array -> float32 CPU tensor, else a DagError."""
        if isinstance(value, np.ndarray):
            if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
                raise DagError(f"{self._who} returned {what} of dtype {value.dtype}; expected floats")
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise DagError(f"{self._who} returned {what} as {type(value).__name__}; expected a [B] tensor")
        if value.dtype == torch.bool or value.is_complex():
            raise DagError(f"{self._who} returned {what} of dtype {value.dtype}; expected floats")
        if tuple(value.shape) != (batch,):
            raise DagError(f"{self._who} returned {what} of shape {list(value.shape)}; expected [B] = [{batch}]")
        return value.detach().to(device="cpu", dtype=torch.float32)
