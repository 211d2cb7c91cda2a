"""A reward with known modes: high when an image's background is one of a few chosen colours, low otherwise.

The background is read from the pixels by the built-in data set's judge (`builtin.dataset.judge_pixels`: the
median border colour, named by the nearest of black, gray, white, brown). With prompts that do not name the
background, the base model spreads its samples over the backgrounds, so the reward has several equally good
modes whose shares after training can be counted (`dagcli.modes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dagcli.errors import DagError
from dagcli.rewards.base import RewardOutput, as_float, single_output, to_hwc_arrays
from dagcli.rewards.registry import register_reward

DEFAULT_COLOURS = ("black", "white")


def image_backgrounds(images: torch.Tensor) -> list[str]:
    """The background name of each image [B, 3, H, W] in [0, 1], as the built-in data set's pixel judge reads it."""
    read = _judge().read
    return [read(array).background for array in to_hwc_arrays(images)]


def _judge():
    """The pixel judge of the shapes data set (`dagcli.extensions.judge`)."""
    from dagcli.extensions import judge

    return judge("shapes")


def parse_colours(colours: str | Sequence[str]) -> tuple[str, ...]:
    """`"black,white"` or `["black", "white"]` -> ("black", "white"); unknown or repeated names are an error."""
    backgrounds = _judge().backgrounds()
    names = [c.strip() for c in (colours.split(",") if isinstance(colours, str) else colours)]
    names = [c for c in names if c]
    bad = [c for c in names if c not in backgrounds]
    if bad or not names or len(set(names)) != len(names):
        raise DagError(f"option colours = {colours!r}: give distinct background names separated by commas, "
                       f"valid options: {', '.join(backgrounds)}")
    return tuple(names)


class BackgroundModes:
    """`high` for an image whose background is one of `colours`, `low` for any other."""

    name = "background-modes"
    slow = False

    def __init__(self, colours: tuple[str, ...], high: float, low: float):
        self.colours, self.high, self.low = colours, high, low

    def value_of(self, background: str) -> float:
        """The reward of an image with this background."""
        return self.high if background in self.colours else self.low

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardOutput:
        scores = torch.tensor([self.value_of(b) for b in image_backgrounds(images)], dtype=torch.float32)
        return single_output(self.name, scores)


@register_reward(
    "background-modes",
    description="high when the image's background (pixel judge of the built-in shapes) is one of the chosen "
                "colours: a reward with known modes",
    unit="high (1) for a rewarded background, low (0) for the others",
    needs="- (meant for the built-in shapes models)",
)
def background_modes(colours: str | Sequence[str] = ",".join(DEFAULT_COLOURS), high: float = 1.0,
                     low: float = 0.0) -> BackgroundModes:
    """Options: `colours` (rewarded backgrounds, default black,white), `high` (1.0), `low` (0.0)."""
    return BackgroundModes(parse_colours(colours), as_float("high", high), as_float("low", low))
