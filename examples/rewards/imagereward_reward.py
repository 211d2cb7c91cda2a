"""ImageReward as a dagcli reward plugin.

    dag train --reward examples/rewards/imagereward_reward.py:make_reward ...

Why a plugin and not a built-in: the `image-reward` package (1.5) pins `timm==0.6.13` and `fairscale`,
imports the undeclared `clip` package, and imports helpers from `transformers.modeling_utils` that
transformers 5 removed, so it does not import next to dagcli's transformers. Use it in an environment with
transformers 4.x (and `pip install image-reward openai-clip`).

Score: the package's standardised reward (BLIP image-text features through an MLP, normalised by the
training set's mean and std; about -2 to 2). The package downloads and loads its own checkpoint
(`ImageReward-v1.0` from the hub repository `THUDM/ImageReward`, cached under `download_root`).
"""

from __future__ import annotations

import torch
from PIL import Image

from dagcli.errors import DagError
from dagcli.rewards import RewardOutput


class ImageRewardScore:
    """ImageReward's score of each (image, prompt) pair."""

    name = "imagereward"
    slow = True

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardOutput:
        arrays = (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        arrays = arrays.permute(0, 2, 3, 1).numpy()
        values = [float(self.model.score(p, Image.fromarray(a))) for a, p in zip(arrays, prompts, strict=True)]
        scores = torch.tensor(values, dtype=torch.float32)
        return RewardOutput(scores=scores, components={self.name: scores}, info={})


def make_reward(model_name: str = "ImageReward-v1.0", download_root: str | None = None, device: str = "cpu"):
    """Build the ImageReward reward; `model_name` is a released name or a local checkpoint path."""
    try:
        import ImageReward
    except ImportError as e:
        raise DagError(
            f"the imagereward reward cannot import the ImageReward package ({e}); "
            "pip install image-reward openai-clip in an environment with transformers<5"
        ) from e
    model = ImageReward.load(model_name, device=device, download_root=download_root)
    return ImageRewardScore(model.eval())
