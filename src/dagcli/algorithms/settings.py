"""What an algorithm declares about its config section, without torch: the settings dataclass, its range and
choice checks (run on every section, whichever algorithm is selected), a cross-field check (run
for the selected algorithm only), and the section's help text.

`dagcli.config` builds `Config` from these sections (one per section, shared by the algorithms that read it),
checks every section's types, ranges and choices always and the selected algorithm's cross-field checks once
it knows which one runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Section:
    name: str  # the TOML section and the `Config` attribute, e.g. "grpo" (keys: grpo.group_size, ...)
    settings: type  # the frozen dataclass of its keys, a comment per field
    help: str  # one line: what the section sets
    positive: tuple[str, ...] = ()  # keys that must be > 0
    non_negative: tuple[str, ...] = ()  # keys that must be >= 0
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key -> its valid values
    # (the whole config, `config.setting`) -> problems between this section and the rest (e.g. group sizes)
    validate: Callable[[object, Callable], list[str]] = lambda config, setting: []


def check_section(section: Section, values, setting: Callable) -> list[str]:
    """The range and choice problems of one section's `values` (an instance of `section.settings`)."""
    problems = []
    for key, options in section.choices.items():
        value = getattr(values, key)
        if value not in options:
            problems.append(f"{setting(f'{section.name}.{key}', value)}: valid options: {', '.join(options)}")
    for key in section.positive:
        if getattr(values, key) <= 0:
            problems.append(f"{setting(f'{section.name}.{key}', getattr(values, key))}: must be positive")
    for key in section.non_negative:
        if getattr(values, key) < 0:
            problems.append(f"{setting(f'{section.name}.{key}', getattr(values, key))}: must not be negative")
    return problems


def check_tail_steps(key: str, tail: int, steps: int | None, setting: Callable, what: str = "step") -> list[str]:
    """A `tail_steps` setting (`key`) that leaves at least one of the sampler's `steps` to train (unset steps, filled
    from the model later, pass)."""
    if steps is None or tail < steps:
        return []
    return [f"{setting(key, tail)}: must be less than {setting('sampling.steps', steps)}, or no {what} is trained"]


def lora_steps(steps: int, tail: int) -> int | None:
    """The leading steps of a `steps`-step chain the LoRA samples when the base model takes the last `tail`
    (`Rollout.lora_steps`); None without a tail: every step."""
    return steps - tail if tail else None
