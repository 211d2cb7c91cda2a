"""Cheap pixel-statistics rewards that need no model (handy for the tiny model and for plumbing checks)."""

from __future__ import annotations

import torch

from dagcli.rewards.base import RewardOutput, check_images, single_output
from dagcli.rewards.registry import register_reward


def colorfulness_scores(images: torch.Tensor) -> torch.Tensor:
    """[B] Hasler-Suesstrunk colourfulness of RGB images in [0, 1], computed on the 0-255 scale.

    With rg = R - G and yb = (R + G) / 2 - B over all pixels of an image:
    M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2).
    """
    x = check_images(images).detach().to(device="cpu", dtype=torch.float32).clamp(0, 1) * 255
    r, g, b = x[:, 0].flatten(1), x[:, 1].flatten(1), x[:, 2].flatten(1)
    rg, yb = r - g, 0.5 * (r + g) - b
    spread = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False)).sqrt()
    offset = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2).sqrt()
    return spread + 0.3 * offset


class Colorfulness:
    """The colourfulness metric as a reward."""

    name = "colorfulness"
    slow = False

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardOutput:
        return single_output(self.name, colorfulness_scores(images))


@register_reward(
    "colorfulness",
    description="Hasler-Suesstrunk colourfulness of the pixels (no model; ignores the prompt)",
    unit="M on 0-255 RGB: 0 grey, ~50 moderately, >100 very colourful",
    needs="-",
)
def colorfulness() -> Colorfulness:
    """Colourfulness, no options."""
    return Colorfulness()
