"""An example reward plugin: "redness", the mean of the red channel minus the mean of the other two.

Use it without installing anything:

    dag train --reward examples/reward_plugin.py:make_reward ...
    dag train --reward "aesthetic:1.0,examples/reward_plugin.py:make_reward:0.5" ...
    dag rewards --score samples/ --reward examples/reward_plugin.py:make_reward

or, once this file is importable as a module (on PYTHONPATH, or installed), as `reward_plugin:make_reward`.
A package can also register the factory under a short name with an entry point:

    [project.entry-points."dagcli.rewards"]
    redness = "reward_plugin:make_reward"

The plugin protocol:

* A factory `make_reward(**options)` builds the reward once (load models here). Options come from the
  reward options of the command or config, keyed by the spec part (`examples/reward_plugin.py:make_reward`,
  or the entry-point name). A factory that declares a `device` (or `base_model`) parameter receives the
  trainer's device (or base model) automatically.
* The reward is a picklable callable `reward(images, prompts, metadata=None)`: `images` is a float tensor
  `[B, 3, H, W]` in [0, 1] on any device and dtype, `prompts` a list of B strings, `metadata` a list of B
  dicts or None. It returns a `dagcli.rewards.RewardOutput` (or just a `[B]` tensor of scores).
* Optional attributes: `name` (the component name in logs; defaults to the spec text) and `slow` (True if
  scoring is expensive enough to overlap with sampling in a thread; defaults to False).
* Scores must have shape `[B]` and be finite; anything else is reported as an error naming the plugin.
"""

from __future__ import annotations

import torch

from dagcli.rewards import RewardOutput


class Redness:
    """`scale * (mean(R) - (mean(G) + mean(B)) / 2)` per image, in [-scale, scale]."""

    name = "redness"
    slow = False

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardOutput:
        x = images.detach().to(device="cpu", dtype=torch.float32)
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        scores = self.scale * (r - (g + b) / 2).mean(dim=(1, 2))
        return RewardOutput(scores=scores, components={self.name: scores}, info={})


def make_reward(scale: float = 1.0) -> Redness:
    """The factory named in the reward spec; `scale` is an example option."""
    return Redness(float(scale))
