"""HPSv2 (Human Preference Score v2) as a dagcli reward plugin.

    dag train --reward examples/rewards/hpsv2_reward.py:make_reward ...

Why a plugin and not a built-in: the `hpsv2` package (1.2.0) pins `pytest==7.2.0` and `protobuf<4` and
needs `torchvision` and `timm`, which conflicts with dagcli's development tools and can pull a different
torch. Install it in its own environment (`pip install hpsv2` next to dagcli) when you want this reward.

Score: cosine similarity of the HPSv2-tuned OpenCLIP ViT-H-14 image and prompt embeddings (the package's
raw output, typically about 0.2-0.3). Weights: `HPS_v2.1_compressed.pt` (or v2.0) from the hub repository
`xswu/HPSv2`, or a local file given as the `checkpoint` option; it is read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import torch
from PIL import Image

from dagcli.errors import DagError
from dagcli.rewards import RewardOutput

CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HUB_REPO = "xswu/HPSv2"


class HPSv2:
    """Image-prompt cosine similarity under the HPSv2 model."""

    name = "hpsv2"
    slow = True

    def __init__(self, model, preprocess, tokenizer, device: torch.device, batch_size: int):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardOutput:
        arrays = (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        arrays = arrays.permute(0, 2, 3, 1).numpy()
        out = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = arrays[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(Image.fromarray(a)) for a in chunk]).to(self.device)
            text = self.tokenizer(list(prompts[start : start + self.batch_size])).to(self.device)
            result = self.model(pixels, text)
            out.append((result["image_features"] * result["text_features"]).sum(dim=-1).float().cpu())
        scores = torch.cat(out)
        return RewardOutput(scores=scores, components={self.name: scores}, info={})


def _checkpoint_path(version: str, checkpoint: str | None) -> str:
    """A local checkpoint file, or the version's file from the hub (cache first)."""
    if checkpoint:
        return checkpoint
    if version not in CHECKPOINTS:
        raise DagError(f"unknown HPSv2 version {version!r}; valid options: {', '.join(CHECKPOINTS)}")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(HUB_REPO, CHECKPOINTS[version], local_files_only=True)
    except OSError:
        return hf_hub_download(HUB_REPO, CHECKPOINTS[version])


def make_reward(version: str = "v2.1", checkpoint: str | None = None, batch_size: int = 8, device: str = "cpu"):
    """Build the HPSv2 reward (OpenCLIP ViT-H-14 architecture, HPSv2 weights)."""
    try:
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
    except ImportError as e:
        raise DagError("the hpsv2 reward needs the hpsv2 package: pip install hpsv2 (see this file's notes)") from e
    device = torch.device(device)
    model, _, preprocess = create_model_and_transforms("ViT-H-14", None, precision="fp32", device=device,
                                                       output_dict=True)
    state = torch.load(_checkpoint_path(version, checkpoint), map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    model.eval().requires_grad_(False)
    return HPSv2(model, preprocess, get_tokenizer("ViT-H-14"), device, int(batch_size))
