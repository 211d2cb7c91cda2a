"""From prompts to trajectories and images with a loaded pipeline: the engine behind `dag sample` and training.

The pipeline's UNet becomes a `Denoiser` (guided and conditional ε in one batched call); `diffusion.rollout`
runs the chain; the VAE decodes x_0. Prompt embeddings are computed once per distinct prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dagcli.diffusion import Denoiser, Reduction, Schedule, Trajectory, initial_noise, rollout


class PromptEncoder:
    """Text embeddings [L, D] per prompt, cached; the empty prompt gives the unconditional embedding."""

    def __init__(self, tokenizer, text_encoder, device: torch.device):
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, device
        self._cache: dict[str, torch.Tensor] = {}

    def truncated(self, prompt: str) -> bool:
        """True when the prompt is longer than the tokenizer's window (its tail is dropped)."""
        return len(self.tokenizer(prompt).input_ids) > self.tokenizer.model_max_length

    def warn_truncated(self, prompts: Sequence[str], warn: Callable[[str], None]) -> int:
        """Warn once about every prompt that will be cut to the text encoder's window; returns how many."""
        long = sorted({p for p in prompts if self.truncated(p)})
        if long:
            example = long[0] if len(long[0]) <= 60 else long[0][:57] + "..."
            warn(f"{len(long)} prompt(s) exceed the text encoder's {self.tokenizer.model_max_length} tokens and "
                 f"are truncated, e.g. {example!r}")
        return len(long)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, L, D] embeddings, in the text encoder's dtype, on its device."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = (ids != self.tokenizer.pad_token_id).long()
            embeds = self.text_encoder(ids, attention_mask=mask)[0]
            for p, e in zip(missing, embeds, strict=True):
                self._cache[p] = e
        return torch.stack([self._cache[p] for p in prompts])


def guided_denoiser(
    unet: Callable, cond: torch.Tensor, uncond: torch.Tensor, guidance: float
) -> Denoiser:
    """A `Denoiser` for classifier-free guidance: ε̃ = ε(∅) + w (ε(c) − ε(∅)), one UNet call on [∅; c].

    `cond` is [B, L, D], `uncond` [1, L, D] or [B, L, D]. With w <= 1 only the conditional branch runs
    (as diffusers does) and ε̃ = ε(c).
    """
    batch = cond.shape[0]
    uncond = uncond.expand(batch, -1, -1)
    use_cfg = guidance > 1.0
    both = torch.cat([uncond, cond]) if use_cfg else cond
    dtype = cond.dtype

    def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = torch.cat([t, t]) if use_cfg else t
        out = unet(x_in.to(dtype), t_in, encoder_hidden_states=both, return_dict=False)[0].float()
        if not use_cfg:
            return out, out
        eps_u, eps_c = out.chunk(2)
        return eps_u + guidance * (eps_c - eps_u), eps_c

    return denoise


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """x_0 latents [B,C,h,w] -> images [B,3,H,W] float32 in [0, 1] (as diffusers' image processor does)."""
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        scaled = scaled + vae.config.shift_factor
    images = vae.decode(scaled, return_dict=False)[0].float()
    return (images / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list:
    """[B,3,H,W] in [0,1] -> PIL images, rounded to uint8 exactly as diffusers' `numpy_to_pil`."""
    from PIL import Image

    arr = (images.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def generators_for(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image so that an image depends on its seed only, not on the batch it falls in."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def sample_batch(
    model,
    prompts: Sequence[str],
    generator: torch.Generator | list[torch.Generator],
    *,
    encoder: PromptEncoder,
    num_steps: int,
    guidance: float,
    eta: float,
    reduction: Reduction = "mean",
    unet: Callable | None = None,
    decode: bool = True,
    height: int | None = None,
    width: int | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> Trajectory:
    """Roll out one batch of prompts with a `LoadedModel` and return the full `Trajectory`.

    `unet` overrides the pipeline's UNet (e.g. the LoRA-wrapped one during training).
    """
    pipe = model.pipe
    unet = unet if unet is not None else pipe.unet
    schedule = Schedule.from_scheduler(pipe.scheduler, num_steps)
    cond = encoder(list(prompts))
    uncond = encoder([""])
    factor = pipe.vae_scale_factor
    height, width = height or model.resolution, width or model.resolution
    shape = (len(prompts), model.latent_channels, height // factor, width // factor)
    x_T = initial_noise(shape, generator, device=model.device)
    denoise = guided_denoiser(unet, cond, uncond, guidance)
    latents, timesteps, log_probs, eps_g, eps_c = rollout(
        denoise, schedule, x_T, eta, generator=generator, reduction=reduction, callback=callback
    )
    images = decode_latents(pipe.vae, latents[:, -1]) if decode else None
    return Trajectory(
        latents=latents,
        timesteps=timesteps,
        log_probs=log_probs,
        eps_guided=eps_g,
        eps_cond=eps_c,
        prompt_embeds=cond,
        prompts=list(prompts),
        images=images,
        eta=eta,
        reduction=reduction,
    )
