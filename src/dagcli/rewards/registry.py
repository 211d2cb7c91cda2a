"""The reward registry and the spec grammar.

Spec grammar (comma-separated parts, each optionally followed by `:WEIGHT`, a plain decimal number):

    aesthetic                          one built-in (or entry-point) reward
    aesthetic:1.0,clip:0.5             weighted sum; every part is logged as its own component
    my_module:make_reward              a plugin factory, imported only when named
    my_module:make_reward:0.5          the same plugin with a weight
    path/to/file.py:make_reward        a plugin factory defined in a Python file
    http://127.0.0.1:8000              a reward server (`dagcli.rewards.remote`: also pickle+http://, vlm+http://)
    clip:0.5,http://127.0.0.1:8000:1   a server in a weighted sum: the weight follows its port or path

A part `a:b` is a weighted name when `b` is a number and a plugin otherwise, except that a registered
reward name before the last `:`, or text after it that cannot name a factory (not an identifier), makes it
a misspelt weight (`compressibility:abc`, `clip:0.5x`), reported as such.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from dagcli.errors import DagError, unknown_choice
from dagcli.rewards.base import Reward, RewardInfo, RewardOutput, check_images
from dagcli.rewards.plugins import (
    ValidatedReward,
    accepted_options,
    call_factory,
    entry_points,
    load_entry_point,
    load_plugin_factory,
)
from dagcli.rewards.remote import is_url, probe, server_rows, split_weight
from dagcli.rewards.servers import server_factory

F = TypeVar("F", bound=Callable[..., Reward])
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class RewardEntry:
    """A registered reward: its description and the factory that builds it."""

    info: RewardInfo
    factory: Callable[..., Reward]


REWARDS: dict[str, RewardEntry] = {}


def register_reward(
    name: str, *, description: str, unit: str, needs: str, differentiable: bool = False
) -> Callable[[F], F]:
    """Decorator adding a factory `fn(**options) -> Reward` to `REWARDS` under `name`."""

    def decorate(factory: F) -> F:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        if ":" in name or "," in name:
            raise ValueError(f"reward name {name!r} may not contain ':' or ','")
        REWARDS[name] = RewardEntry(RewardInfo(name, description, unit, needs, differentiable), factory)
        return factory

    return decorate


def list_rewards() -> list[RewardInfo]:
    """Built-in rewards (by name), then `dagcli.rewards` entry points (listed by name, not imported)."""
    rows = [REWARDS[name].info for name in sorted(REWARDS)]
    for name, ep in sorted(entry_points().items()):
        if name not in REWARDS:
            dist = ep.dist.name if getattr(ep, "dist", None) else "an installed package"
            rows.append(RewardInfo(name, f"plugin from {dist}", "plugin-defined", ep.value, False))
    return rows + server_rows()


@dataclass(frozen=True)
class SpecPart:
    """One comma-separated part of a reward spec."""

    label: str  # the name, or `module:factory` for a plugin
    weight: float | None  # None when the part gives no weight
    plugin: tuple[str, str] | None  # (module, factory) for a plugin part


def parse_spec(spec: str) -> list[SpecPart]:
    """Split a reward spec into its parts (see the module docstring for the grammar)."""
    if not spec or not spec.strip():
        raise DagError(f"empty reward spec; valid rewards: {', '.join(REWARDS)}")
    parts = []
    for raw in spec.split(","):
        if is_url(raw):
            url, weight = split_weight(raw)
            parts.append(SpecPart(url, weight, None))
            continue
        pieces = [p.strip() for p in raw.strip().split(":")]
        weight = None
        if len(pieces) > 1 and _NUMBER.match(pieces[-1]):
            weight = float(pieces.pop())
        elif _misspelt_weight(pieces):
            form = "NAME:WEIGHT" if len(pieces) == 2 else "MODULE:FACTORY:WEIGHT"
            raise DagError(
                f"reward weight {pieces[-1]!r} in {raw.strip()!r} is not a number; use {form}, "
                f"e.g. {':'.join(pieces[:-1])}:0.5"
            )
        if not all(pieces) or len(pieces) > 2:
            raise DagError(
                f"bad reward spec part {raw.strip()!r} in {spec!r}; "
                "expected NAME, NAME:WEIGHT, MODULE:FACTORY or MODULE:FACTORY:WEIGHT"
            )
        plugin = (pieces[0], pieces[1]) if len(pieces) == 2 else None
        parts.append(SpecPart(":".join(pieces), weight, plugin))
    return parts


def _misspelt_weight(pieces: list[str]) -> bool:
    """`NAME:X` or `MODULE:FACTORY:X` whose X is meant as a weight but is not a number (see the grammar)."""
    if not all(pieces) or len(pieces) not in (2, 3):
        return False
    return len(pieces) == 3 or pieces[0] in REWARDS or not pieces[-1].isidentifier()


def _resolve_factory(part: SpecPart) -> tuple[Callable[..., Reward], bool]:
    """(factory, is_plugin) for a spec part: built-in, else entry point, else a plugin module."""
    if part.plugin is not None:
        return load_plugin_factory(*part.plugin), True
    if is_url(part.label):
        return server_factory(part.label), False
    if part.label in REWARDS:
        return REWARDS[part.label].factory, False
    eps = entry_points()
    if part.label in eps:
        return load_entry_point(part.label, eps[part.label]), True
    raise unknown_choice("reward", part.label, list(REWARDS) + list(eps))


def validate_spec(spec: str) -> list[SpecPart]:
    """Parse a spec and find every factory it names (importing plugins) without building anything.

    For checks before any model is loaded; raises the same DagErrors `build_reward` would for bad names, and
    for a reward server that does not answer.
    """
    parts = parse_spec(spec)
    for part in parts:
        _resolve_factory(part)
        if is_url(part.label):
            probe(part.label)
    return parts


def parse_reward_options(items: list[str]) -> dict[str, dict]:
    """`["clip.scale=2.5", "aesthetic.mlp_path=m.pth"]` -> `{"clip": {"scale": "2.5"}, ...}`.

    The key is split at its last dot, so plugin labels (`my.mod:make.scale=2`) work; values stay strings
    (the built-in factories convert numbers themselves).
    """
    options: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        reward, dot, option = key.strip().rpartition(".")
        if not sep or not dot or not reward or not option:
            raise DagError(f"bad reward option {item!r}; expected REWARD.OPTION=VALUE, e.g. clip.scale=2.5")
        options.setdefault(reward, {})[option] = value.strip()
    return options


def _build_part(
    part: SpecPart, options: dict, device: str | torch.device, base_model: str | None, strict_finite: bool
) -> ValidatedReward:
    """Build and wrap the reward of one spec part."""
    factory, plugin = _resolve_factory(part)
    kwargs = dict(options)
    accepted, _ = accepted_options(factory)
    for key, value in (("device", device), ("base_model", base_model)):
        if key in accepted and key not in kwargs:
            kwargs[key] = value
    reward = call_factory(part.label, factory, kwargs, plugin)
    name = getattr(reward, "name", None) if plugin or is_url(part.label) else part.label
    if not isinstance(name, str) or not name:
        name = part.label
    return ValidatedReward(reward, name=name, label=part.label, plugin=plugin, strict_finite=strict_finite)


class WeightedReward:
    """Weighted sum of rewards; each part's own scores are kept in `components` under its name."""

    def __init__(self, parts: list[tuple[float, Reward]], name: str):
        self.parts = parts
        self.name = name
        self.slow = any(bool(getattr(r, "slow", False)) for _, r in parts)

    @property
    def weights(self) -> dict[str, float]:
        """Component name -> weight."""
        return {r.name: w for w, r in self.parts}

    def __repr__(self) -> str:
        return f"WeightedReward({self.name!r})"

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> RewardOutput:
        check_images(images)
        total = torch.zeros(len(images), dtype=torch.float32)
        components: dict[str, torch.Tensor] = {}
        info: dict = {}
        for weight, reward in self.parts:
            out = reward(images, prompts, metadata)
            components[reward.name] = out.scores
            total = total + weight * out.scores
            info.update({f"{reward.name}/{k}": v for k, v in out.info.items()})
        bad = int((~torch.isfinite(total)).sum())
        if bad:
            info["nonfinite"] = bad  # only reachable with strict_finite=False
        return RewardOutput(scores=total, components=components, info=info)


def build_reward(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    base_model: str | None = None,
    options: dict[str, dict] | None = None,
    strict_finite: bool = True,
) -> Reward:
    """Build the reward a spec names, loading every model once.

    `options` maps a spec part (`"clip"`, `"my_module:make_reward"`) to factory keyword arguments;
    `base_model` lets `clip` pick the built-in tiny CLIP for the tiny model; with `strict_finite=False`
    NaN/inf scores are returned (and counted in `info["nonfinite"]`) instead of raising.
    """
    parts = parse_spec(spec)
    options = dict(options or {})
    labels = [p.label for p in parts]
    for key in options:
        if key not in labels:
            raise unknown_choice("reward in options", key, labels)
    rewards = [_build_part(p, dict(options.get(p.label) or {}), device, base_model, strict_finite) for p in parts]
    names = [r.name for r in rewards]
    for name in names:
        if names.count(name) > 1:
            raise DagError(f"reward {name!r} appears twice in spec {spec!r}; give each reward once")
    if len(parts) == 1 and parts[0].weight is None:
        return rewards[0]
    weights = [1.0 if p.weight is None else p.weight for p in parts]
    label = ",".join(f"{r.name}:{w:g}" for r, w in zip(rewards, weights, strict=True))
    return WeightedReward(list(zip(weights, rewards, strict=True)), name=label)
