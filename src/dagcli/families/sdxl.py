"""Stable Diffusion XL: two CLIP text encoders, pooled embeddings and added time ids, a UNet sampled with DDIM.

The UNet cross-attends to the penultimate hidden states of both text encoders side by side (2048 wide for SDXL)
and adds the second encoder's pooled projection and the time ids (original size, crop corner, target size) to
its timestep embedding. The time ids take the pipeline's defaults: original and target size are the image
size, the crop corner is (0, 0). The unconditional branch of classifier-free guidance is zeros when the pipeline
says `force_zeros_for_empty_prompt` (SDXL base does), else the empty prompt. Whatever scheduler the pipeline
ships (SDXL base ships Euler), sampling uses DDIM with the same β schedule, as for Stable Diffusion 1.x.
"""

from __future__ import annotations

import torch

from dagcli.families.base import Cond, Denoise, FamilyDefaults
from dagcli.families.sd import PromptEncoder, SDFamily, guided_unet, unet_kohya_weights

# kohya's sd-scripts trains SDXL on the original (LDM) UNet: its LoRA names are module paths of that UNet
LDM_LAYERS_PER_BLOCK = 2  # SDXL's; each down block spans 3 input blocks, each up block 3 output blocks
LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
LDM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


class DualPromptEncoder(PromptEncoder):
    """SDXL's conditioning per prompt: `embeds` [L, D1 + D2], the penultimate hidden states of both text
    encoders side by side, and `pooled` [P], the projected final state of the second."""

    def __init__(self, pipe, device: torch.device):
        pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        self.pairs = [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]
        super().__init__(*self.pairs[0], device)

    def truncated(self, prompt: str) -> bool:
        return any(len(t(prompt).input_ids) > t.model_max_length for t, _ in self.pairs)

    def embed(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in self.pairs:
            out = encoder(self.token_ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if pooled is None and out[0].ndim == 2:  # a text encoder with a projection: its pooled output
                pooled = out[0]
        if pooled is None:
            from dagcli.errors import DagError

            raise DagError("this SDXL pipeline has no text encoder with a projection (text_encoder_2); "
                           "it cannot give the UNet its pooled prompt embedding")
        return {"embeds": torch.cat(hidden, dim=-1), "pooled": pooled}


class SDXLFamily(SDFamily):
    """Stable Diffusion XL (`StableDiffusionXLPipeline`)."""

    name = "sdxl"
    load_kwargs: dict = {}
    reference = FamilyDefaults(steps=50, guidance=5.0, train_eta=1.0, sample_eta=1.0, prompts="simple_animals",
                               source="Stable Diffusion XL reference (StableDiffusionXLPipeline's 50 steps and "
                                      "guidance 5; η 1 and prompts of the DDPO and DAG papers)")

    def __init__(self, pipe, device: torch.device):
        super().__init__(pipe, device)
        self.encoder = DualPromptEncoder(pipe, device)
        vae = pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)  # SDXL's VAE overflows in float16 (as diffusers, decode in float32)

    def decode(self, latents: torch.Tensor, vae=None) -> torch.Tensor:
        """With the pipeline's VAE one image at a time: at 1024 px its decoder needs about 1.5 GiB per image (bf16),
        a batch of 8 would need 12 GiB at once (diffusers' VAE slicing). Another decoder (`dag.x0_decoder`, a
        small `AutoencoderTiny`) decodes the batch."""
        if vae is not None:
            return super().decode(latents, vae)
        return torch.cat([super(SDXLFamily, self).decode(z) for z in latents.split(1)])

    def unconditional(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [1, L, D], pooled [B, P]) of classifier-free guidance's unconditional branch."""
        empty = self.encoder.encode([""])
        if self.pipe.config.force_zeros_for_empty_prompt:
            empty = {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty["embeds"], empty["pooled"].expand(batch, -1)

    def time_ids(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, 6] added time ids of latents x [B, C, h, w]: original size, crop corner (0, 0), target size."""
        f = self.resolution_multiple
        height, width = int(x.shape[-2]) * f, int(x.shape[-1]) * f
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=x.device)
        return ids.expand(x.shape[0], -1)

    def denoiser_fn(self, model, schedule, cond: Cond, guidance: float, detach_uncond: bool = False) -> Denoise:
        embeds, pooled = cond.tensors["embeds"], cond.tensors["pooled"]
        uncond, uncond_pooled = self.unconditional(len(cond))
        by_size: dict[tuple, object] = {}  # the time ids follow the latent size, known at the first call

        def denoise(x: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            size = tuple(x.shape[-2:])
            if size not in by_size:
                ids = self.time_ids(x, embeds.dtype)
                by_size[size] = guided_unet(model, embeds, uncond, guidance, detach_uncond,
                                            text_embeds=(uncond_pooled, pooled),
                                            time_ids=(ids, ids))
            return by_size[size](x, self.timestep(schedule, j).to(x.device))

        return denoise

    @staticmethod
    def kohya_weights(weights: dict, alpha: float) -> dict:
        """diffusers-format LoRA (`unet.` keys) -> kohya's SDXL keys, `lora_unet_<LDM module path with _>` such
        as `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` (what sd-scripts writes and ComfyUI,
        A1111 and diffusers' own converter read), with the LoRA's real alpha in every `.alpha`."""
        return unet_kohya_weights(weights, alpha, module_name=ldm_module_name)


def ldm_module_name(path: str) -> str:
    """A diffusers SDXL UNet module path -> the same module's path in the original (LDM) UNet."""
    from dagcli.errors import DagError

    if path in LDM_TOP:
        return LDM_TOP[path]
    parts = path.split(".")
    try:
        if parts[0] in ("down_blocks", "up_blocks", "mid_block"):
            return _ldm_block_path(parts)
    except (IndexError, ValueError, KeyError):
        pass
    raise DagError(f"UNet module {path!r} has no name in kohya's SDXL layout; export it with --format diffusers")


def _ldm_block_path(parts: list[str]) -> str:
    """`down_blocks.i.resnets.j.conv1`, `up_blocks.i.attentions.j...`, `mid_block...` -> their LDM paths."""
    n = LDM_LAYERS_PER_BLOCK
    if parts[0] == "mid_block":  # resnet 0, attention, resnet 1
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        index = 1 if kind == "attentions" else 2 * j
        return _join(f"middle_block.{index}", kind, rest)
    block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # a block of its own after the layers; its conv is `op`
            return ".".join([f"input_blocks.{(block + 1) * (n + 1)}.0.op", *rest[1:]])
        if j >= n:
            raise ValueError(j)
        return _join(f"input_blocks.{1 + block * (n + 1) + j}.{int(kind == 'attentions')}", kind, rest)
    if kind == "upsamplers":  # after the last layer's resnet and attention (SDXL upsamples only in attention blocks)
        return ".".join([f"output_blocks.{block * (n + 1) + n}.2", *rest])
    if j > n:
        raise ValueError(j)
    return _join(f"output_blocks.{block * (n + 1) + j}.{int(kind == 'attentions')}", kind, rest)


def _join(prefix: str, kind: str, rest: list[str]) -> str:
    """The LDM path of a layer's submodule: a resnet's layers are renamed, an attention's keep their names."""
    if kind == "resnets":
        rest = [LDM_RESNET[rest[0]], *rest[1:]]
    elif kind != "attentions":
        raise KeyError(kind)
    return ".".join([prefix, *rest])


# the scheduler config SDXL base 1.0 ships (scheduler/scheduler_config.json)
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
