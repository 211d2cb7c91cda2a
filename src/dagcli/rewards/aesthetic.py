"""The LAION improved aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

The MLP is 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout (0.2, 0.2, 0.1) after the first three linear
layers and no activations. Its `nn.Sequential` indices match the published weights file
`sac+logos+ava1-l14-linearMSE.pth` (keys `layers.0.weight`, `layers.2.weight`, ..., `layers.7.bias`), so that
file loads as is; a `.safetensors` copy with the same keys works too. The input width follows the CLIP
model's `projection_dim`, so any CLIP with a matching MLP can be used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dagcli.errors import DagError
from dagcli.rewards.base import RewardOutput, batches, positive_int, single_output
from dagcli.rewards.clip import DEFAULT_CLIP, ClipEncoder, load_clip
from dagcli.rewards.loading import load_state_dict, resolve_file, reward_option
from dagcli.rewards.registry import register_reward

MLP_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"  # the published weights (3,714,759 bytes)
DEFAULT_BATCH_SIZE = 32


class AestheticMLP(nn.Module):
    """The predictor head; `layers` indices 0, 2, 4, 6, 7 are the linear layers."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, D] normalised embeddings -> [B, 1] ratings."""
        return self.layers(embeddings)


def read_mlp_state(mlp_path: str | Path) -> dict[str, torch.Tensor]:
    """The MLP's tensors from a `.pth` state dict, a `.safetensors` file, or `hf://owner/repo/file`."""
    path = resolve_file(mlp_path, "aesthetic MLP", reward_option("aesthetic", "mlp_path"))
    state = load_state_dict(path, "aesthetic MLP")
    if state and not any(k.startswith("layers.") for k in state):
        state = {f"layers.{k}": v for k, v in state.items()}  # a state dict of the bare Sequential
    return state


def build_mlp(state: dict[str, torch.Tensor], embed_dim: int, source: str) -> AestheticMLP:
    """An eval-mode `AestheticMLP` for `embed_dim`-d embeddings holding `state`."""
    first = state.get("layers.0.weight")
    if first is not None and first.ndim == 2 and first.shape[1] != embed_dim:
        raise DagError(
            f"aesthetic MLP {source!r} takes {first.shape[1]}-d embeddings but the CLIP model "
            f"gives {embed_dim}-d ones; use the CLIP model the MLP was trained on"
        )
    mlp = AestheticMLP(embed_dim)
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as e:
        expected = ", ".join(mlp.state_dict())
        raise DagError(f"aesthetic MLP {source!r} does not match the predictor (keys {expected})") from e
    return mlp.eval().requires_grad_(False)


class AestheticScore:
    """Rating = MLP(CLIP image embedding / its L2 norm)."""

    name = "aesthetic"
    slow = True

    def __init__(self, encoder: ClipEncoder, mlp: AestheticMLP, batch_size: int):
        self.encoder = encoder
        self.mlp = mlp.to(encoder.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardOutput:
        out = []
        for part in batches(len(images), self.batch_size):
            embeddings = self.encoder.embed_images(images[part]).float()
            embeddings = embeddings / torch.linalg.vector_norm(embeddings, dim=-1, keepdim=True)
            out.append(self.mlp(embeddings).squeeze(-1).cpu())
        return single_output(self.name, torch.cat(out))


# The same weights as the LAION release, mirrored on the hub next to TRL's DDPO example.
DEFAULT_MLP = "hf://trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"


@register_reward(
    "aesthetic",
    description="LAION improved aesthetic predictor (MLP on normalised CLIP ViT-L/14 image embeddings)",
    unit="rating, about 1-10 (SD 1.5 gives ~5-6)",
    needs=f"{DEFAULT_CLIP} + {MLP_FILENAME} (option mlp_path; default trl-lib/ddpo-aesthetic-predictor)",
)
def aesthetic(
    mlp_path: str | None = DEFAULT_MLP,
    model_id: str = DEFAULT_CLIP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "fp32",
    device: str = "cpu",
) -> AestheticScore:
    """Aesthetic predictor; `mlp_path` is the weights file (local path or hf://owner/repo/file)."""
    if not mlp_path:
        raise DagError(
            f"the aesthetic reward needs the predictor weights {MLP_FILENAME} (from the LAION "
            f"improved-aesthetic-predictor release); pass its path with {reward_option('aesthetic', 'mlp_path')}"
        )
    batch_size = positive_int("batch_size", batch_size)
    state = read_mlp_state(mlp_path)  # before the (slow) CLIP load, so a bad path fails fast
    encoder = load_clip(model_id, device=device, dtype=dtype, text=False, fix=reward_option("aesthetic", "model_id"))
    return AestheticScore(encoder, build_mlp(state, encoder.projection_dim, str(mlp_path)), batch_size)
