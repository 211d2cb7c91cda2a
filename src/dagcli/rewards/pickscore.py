"""PickScore: a CLIP-H model fine-tuned on human preferences (Pick-a-Pic), loaded with transformers.

score = logit_scale.exp() * cos(image embedding, prompt embedding), the quantity the model card ranks by.
"""

from __future__ import annotations

import torch

from dagcli.rewards.base import RewardOutput, batches, check_prompts, positive_int, single_output
from dagcli.rewards.clip import ClipEncoder, load_clip
from dagcli.rewards.loading import reward_option
from dagcli.rewards.registry import register_reward

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_BATCH_SIZE = 16


class PickScore:
    """`exp(logit_scale) * cos` for each (image, prompt) pair."""

    name = "pickscore"
    slow = True

    def __init__(self, encoder: ClipEncoder, batch_size: int):
        self.encoder = encoder
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardOutput:
        prompts = check_prompts(prompts, len(images))
        temperature = self.encoder.model.logit_scale.exp().float().cpu()
        out = []
        for part in batches(len(images), self.batch_size):
            img = torch.nn.functional.normalize(self.encoder.embed_images(images[part]).float(), dim=-1)
            txt = torch.nn.functional.normalize(self.encoder.embed_texts(prompts[part]).float(), dim=-1)
            out.append((img * txt).sum(dim=-1).cpu())
        return single_output(self.name, temperature * torch.cat(out))


@register_reward(
    "pickscore",
    description="PickScore human-preference model (CLIP-H): exp(logit_scale) x image-prompt cosine",
    unit="raw model output: exp(logit_scale) x cos",
    needs=f"{PICKSCORE_MODEL} + processor {PICKSCORE_PROCESSOR} (~4 GB)",
)
def pickscore(
    model_id: str = PICKSCORE_MODEL,
    processor_id: str = PICKSCORE_PROCESSOR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "fp32",
    device: str = "cpu",
) -> PickScore:
    """PickScore; `model_id` / `processor_id` are local folders or hub ids."""
    batch_size = positive_int("batch_size", batch_size)
    encoder = load_clip(
        model_id,
        processor_id=processor_id,
        device=device,
        dtype=dtype,
        what="PickScore model",
        fix=reward_option("pickscore", "model_id"),
        processor_fix=reward_option("pickscore", "processor_id"),
    )
    return PickScore(encoder, batch_size)
