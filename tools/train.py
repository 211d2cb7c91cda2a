"""Train the built-in tiny text-to-image model and tiny CLIP from scratch on the shapes data set.

    python tools/train.py --seed 0 [--output DIR]

Stages, all on CPU by default and deterministic for a seed (given the same torch build and thread count):

1. render a pool of captioned 32x32 images (`dagcli.builtin.dataset`);
2. `AutoencoderKL` (32 px -> 8x8x4 latents), reconstruction + small KL loss; its `scaling_factor` is set to
   1 / std of the pool's latents;
3. tiny `CLIPModel` (ViT on 4x4 patches + text transformer), contrastive loss with multi-positive targets (a
   caption that omits the background matches every background), on clean, noisy and VAE-reconstructed images;
4. `UNet2DConditionModel` on the 8x8 latents with cross-attention to a `CLIPTextModel` initialised from the
   CLIP text tower and trained jointly; epsilon prediction, Min-SNR weighting, 10% empty prompts for
   classifier-free guidance, EMA weights.

The result is a `StableDiffusionPipeline` folder (`tiny-sd`) and a `CLIPModel` + `CLIPProcessor` folder
(`tiny-clip`) of safetensors, plus `dagcli.json` metadata next to the pipeline's `model_index.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from dagcli.builtin import TINY_CLIP_DIR, TINY_SD_DIR, WEIGHTS_DIR
from dagcli.builtin import dataset as ds
from dagcli.builtin.tokenizer import build_clip_tokenizer

MAX_TOKENS = 16  # tokenizer model_max_length; the longest caption is 10 tokens with BOS/EOS
METADATA_FILE = "dagcli.json"


@dataclass(frozen=True)
class TrainConfig:
    """Sizes and schedules of all three training stages."""

    seed: int = 0
    pool_size: int = 20000  # rendered training images
    recon_pool: int = 4096  # how many of them get a VAE reconstruction (CLIP augmentation)
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels -> down-sampling factor 4
    vae_steps: int = 800
    vae_batch: int = 24
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # CLIP
    clip_width: int = 64
    clip_layers: int = 3
    clip_steps: int = 2000
    clip_batch: int = 96
    clip_lr: float = 2e-3
    clip_shape_fraction: float = 0.25  # share of each CLIP batch from random-colour, shape-only-caption images
    clip_background_fraction: float = 0.25  # share from palette shapes on random (non-palette) backgrounds
    # UNet + text encoder
    unet_channels: tuple[int, ...] = (48, 96)
    unet_heads: int = 4
    unet_cross_attn: tuple[bool, ...] = (True, True)  # cross-attention in each resolution level
    unet_groups: int = 16  # group-norm groups (must divide every channel count)
    unet_steps: int = 1600
    unet_batch: int = 96
    unet_lr: float = 1e-3
    text_lr: float = 3e-4
    cfg_dropout: float = 0.1  # fraction of empty prompts
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    # Inference defaults written to dagcli.json
    default_guidance: float = 3.0
    default_steps: int = 25
    log_every: int = 100


QUICK = TrainConfig(
    pool_size=512, recon_pool=128, vae_steps=20, vae_batch=16, clip_steps=20, clip_batch=32, unet_steps=20,
    unet_batch=32, log_every=5,
)


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _log(stage: str, msg: str, t0: float) -> None:
    """One progress line with elapsed wall-clock seconds."""
    print(f"[{time.time() - t0:7.1f}s] {stage}: {msg}", flush=True)


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 10% of the peak learning rate."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))

    return f


def _optimizer(groups: list[dict], total: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with warm-up + cosine schedule."""
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup=min(200, max(1, total // 10))))
    return opt, sched


class Ema:
    """Exponential moving average of a set of modules' parameters (with the usual 1+t / 10+t warm-up)."""

    def __init__(self, modules: Iterable[torch.nn.Module], decay: float) -> None:
        self.modules = list(modules)
        self.shadow = [copy.deepcopy(m).requires_grad_(False) for m in self.modules]
        self.decay = decay
        self.step = 0

    @torch.no_grad()
    def update(self) -> None:
        """Move the averages towards the current parameters."""
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for live, avg in zip(self.modules, self.shadow, strict=True):
            for p, q in zip(live.parameters(), avg.parameters(), strict=True):
                q.lerp_(p.detach(), 1.0 - d)


def render_pool(n: int, seed: int) -> tuple[list[ds.ShapeSpec], torch.Tensor]:
    """Training specs and their images as a float tensor (n, 3, 32, 32) in [-1, 1]."""
    specs = ds.sample_specs(n, seed, split="train")
    return specs, _to_tensor(ds.render_array(specs))


@dataclass(frozen=True)
class CaptionTable:
    """All caption variants of the pool, tokenized once.

    ids: (C, MAX_TOKENS) token ids of every distinct caption (index 0 is the empty prompt);
    attrs: (C, 4) colour / shape / size / background index of each caption, -1 where it does not say;
    variants: (N, 4) caption index of each pool image for each (mention size, mention background) template;
    image_attrs: (N, 4) attribute indices of each pool image.
    """

    captions: list[str]
    ids: torch.Tensor
    attrs: torch.Tensor
    variants: torch.Tensor
    image_attrs: torch.Tensor


_ATTR_NAMES = (list(ds.COLOURS), list(ds.SHAPES), list(ds.SIZES), list(ds.BACKGROUNDS))


def _attr_index(values: Iterable[str | None]) -> list[int]:
    """(colour, shape, size, background) names -> indices into _ATTR_NAMES (-1 for None).

    With three values, they are (shape, size, background)."""
    values = list(values)
    names = _ATTR_NAMES[len(_ATTR_NAMES) - len(values):]
    return [-1 if v is None else n.index(v) for v, n in zip(values, names, strict=True)]


def build_caption_table(specs: list[ds.ShapeSpec], tokenizer: CLIPTokenizer) -> CaptionTable:
    """Tokenize every caption variant of every pool image."""
    index: dict[str, int] = {"": 0}
    variants = []
    for s in specs:
        row = []
        for ms in (False, True):
            for mb in (False, True):
                row.append(index.setdefault(ds.caption(s, ms, mb), len(index)))
        variants.append(row)
    for shape in ds.SHAPES:
        index.setdefault(shape_caption(shape), len(index))
    captions = list(index)
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    attrs = []
    for c in captions:
        p = ds.parse_caption(c) if c else ds.ParsedCaption(None, None)
        attrs.append(_attr_index((p.colour, p.shape, p.size, p.background)))
    image_attrs = [_attr_index((s.colour, s.shape, s.size, s.background)) for s in specs]
    return CaptionTable(captions, ids.input_ids, torch.tensor(attrs), torch.tensor(variants),
                        torch.tensor(image_attrs))


# ----------------------------------------------------------------------------------------------------------
# Models


def build_vae(cfg: TrainConfig) -> AutoencoderKL:
    """KL autoencoder: 3 x 32 x 32 -> 4 x 8 x 8 (one down-sampling per level after the first)."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=ds.RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=8,
        mid_block_add_attention=False,
    )


def text_config(cfg: TrainConfig, vocab_size: int) -> CLIPTextConfig:
    """The text transformer shared by the tiny CLIP and the diffusion model's text encoder."""
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.clip_width, intermediate_size=2 * cfg.clip_width,
        num_hidden_layers=cfg.clip_layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        projection_dim=cfg.clip_width, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def build_clip(cfg: TrainConfig, vocab_size: int) -> CLIPModel:
    """Tiny CLIP: ViT-4/32 image tower + text tower, both `clip_width` wide, joint space `clip_width`."""
    vision = CLIPVisionConfig(
        hidden_size=cfg.clip_width, intermediate_size=2 * cfg.clip_width, num_hidden_layers=cfg.clip_layers,
        num_attention_heads=4, image_size=ds.RESOLUTION, patch_size=4, projection_dim=cfg.clip_width,
    )
    config = CLIPConfig(text_config=text_config(cfg, vocab_size).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=cfg.clip_width)
    return CLIPModel(config)


def build_unet(cfg: TrainConfig) -> UNet2DConditionModel:
    """Latent UNet (4 x 8 x 8), cross-attention to text at every level; sample_size 8 -> 32 px images."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_cross_attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_cross_attn))
    return UNet2DConditionModel(
        sample_size=ds.RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=cfg.unet_channels, down_block_types=down, up_block_types=up,
        cross_attention_dim=cfg.clip_width, attention_head_dim=cfg.unet_heads, norm_num_groups=cfg.unet_groups,
    )


def build_scheduler() -> DDIMScheduler:
    """Stable-Diffusion-like DDIM scheduler (scaled-linear betas, epsilon prediction)."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def num_params(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------
# Stages


def train_vae(cfg: TrainConfig, images: torch.Tensor, gen: torch.Generator, t0: float) -> AutoencoderKL:
    """Fit the autoencoder on the pool; sets `scaling_factor` to 1 / std of the pool's latent means."""
    vae = build_vae(cfg).to(images.device)
    opt, sched = _optimizer([{"params": vae.parameters(), "lr": cfg.vae_lr}], cfg.vae_steps)
    for step in range(cfg.vae_steps):
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x = images[idx.to(images.device)]  # (B, 3, 32, 32)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * _randn(post.mean.shape, gen, x.device)  # (B, 4, 8, 8)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = rec + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            psnr = -10 * math.log10(F.mse_loss(recon, x).item() / 4.0)
            _log("vae", f"step {step + 1}/{cfg.vae_steps} loss {loss.item():.4f} psnr {psnr:.1f} dB", t0)
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, images: torch.Tensor, recon_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means (N, 4, 8, 8), unscaled, and decoded reconstructions of the first `recon_count` images."""
    latents, recons = [], []
    for i in range(0, len(images), 256):
        z = vae.encode(images[i:i + 256]).latent_dist.mean
        latents.append(z)
        if i < recon_count:
            recons.append(vae.decode(z[: recon_count - i]).sample.clamp(-1, 1))
    return torch.cat(latents), torch.cat(recons) if recons else images[:0]


@dataclass(frozen=True)
class ShapePool:
    """Images whose shape has a random (non-palette) colour, captioned only by shape ("a triangle").

    They teach the CLIP image tower shape features that do not depend on the colour. images: (M, 3, 32, 32);
    captions: (M,) caption indices into the CaptionTable; attrs: (M, 4) with colour -2 (matches no colour word).
    """

    images: torch.Tensor
    captions: torch.Tensor
    attrs: torch.Tensor


def render_shape_pool(n: int, seed: int, table: CaptionTable) -> ShapePool:
    """`n` training-split shapes with random colours: the shape colour is uniform in RGB (redrawn while near a
    palette colour) and, for half of them, the background is a random colour too (at least 100 away)."""
    specs = ds.sample_specs(n, seed + 1, split="train")
    rng = np.random.default_rng(seed + 2)
    palette = np.asarray([*ds.COLOURS.values(), *ds.BACKGROUNDS.values()], dtype=np.float64)
    fills = rng.integers(0, 256, size=(n, 3))
    for i in range(n):
        while np.sqrt(((palette - fills[i]) ** 2).sum(1)).min() < 60:
            fills[i] = rng.integers(0, 256, size=3)
    arr = ds.render_array(specs, fills)  # (n, 32, 32, 3)
    for i in range(0, n, 2):
        bg = rng.integers(0, 256, size=3)
        while np.sqrt(((bg - fills[i]) ** 2).sum()) < 100:
            bg = rng.integers(0, 256, size=3)
        arr[i] = _on_background(arr[i], specs[i], fills[i], bg)
    images = _to_tensor(arr)
    captions = torch.tensor([table.captions.index(shape_caption(s.shape)) for s in specs])
    attrs = torch.tensor([[-2, *_attr_index((s.shape, s.size, s.background))] for s in specs])
    return ShapePool(images, captions, attrs)


def render_background_pool(n: int, seed: int, table: CaptionTable) -> ShapePool:
    """`n` training-split shapes in their palette colour on a random, non-palette background, captioned by
    colour and shape only ("a red triangle", half the time with the size).

    Without them, every red shape on gray the CLIP sees is a circle or a square (the red triangle on gray is a
    held-out combination), and it learns "red on gray" as a cue against triangles. A background at least 60
    away from every palette background (and 100 from the shape's colour) never forms a held-out combination.
    attrs: (n, 4) with background -2 (matches no background word)."""
    specs = ds.sample_specs(n, seed + 3, split="train")
    rng = np.random.default_rng(seed + 4)
    backgrounds = np.asarray(list(ds.BACKGROUNDS.values()), dtype=np.float64)
    arr = ds.render_array(specs)  # (n, 32, 32, 3) on the palette backgrounds
    captions = []
    for i, s in enumerate(specs):
        fill = np.asarray(ds.COLOURS[s.colour], dtype=np.float64)
        bg = rng.integers(0, 256, size=3)
        while np.sqrt(((backgrounds - bg) ** 2).sum(1)).min() < 60 or np.sqrt(((bg - fill) ** 2).sum()) < 100:
            bg = rng.integers(0, 256, size=3)
        arr[i] = _on_background(arr[i], s, fill, bg)
        captions.append(table.captions.index(ds.caption(s, bool(rng.random() < 0.5), False)))
    images = _to_tensor(arr)
    attrs = torch.tensor([[*_attr_index((s.colour, s.shape, s.size, None))[:3], -2] for s in specs])
    return ShapePool(images, torch.tensor(captions), attrs)


def _on_background(img: np.ndarray, spec: ds.ShapeSpec, fill: np.ndarray, background: np.ndarray) -> np.ndarray:
    """A rendered (32, 32, 3) uint8 image of `spec` in colour `fill`, its palette background replaced by
    `background`, anti-aliased edges kept (blended by the shape's per-pixel coverage)."""
    old = np.asarray(ds.BACKGROUNDS[spec.background], dtype=np.float64)
    alpha = ds.coverage(img, old, fill)[..., None]  # (32, 32, 1) shape coverage in [0, 1]
    return (alpha * fill + (1 - alpha) * background).round().astype(np.uint8)


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, 3, 32, 32) float in [-1, 1]."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def shape_caption(shape: str) -> str:
    """The shape-only caption, e.g. "a circle"."""
    return f"a {shape}"


def _randn(shape: torch.Size | tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn from the (CPU) generator, then moved to `device`."""
    return torch.randn(shape, generator=gen).to(device)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian pixel noise of a random strength per image (std up to 0.1 in [-1, 1] units)."""
    sigma = (torch.rand(x.shape[0], 1, 1, 1, generator=gen) * 0.1).to(x.device)
    return (x + sigma * _randn(x.shape, gen, x.device)).clamp(-1, 1)


def train_clip(
    cfg: TrainConfig, images: torch.Tensor, recons: torch.Tensor, table: CaptionTable, shapes: ShapePool,
    backgrounds: ShapePool, vocab_size: int, t0: float,
) -> CLIPModel:
    """Contrastive training with multi-positive targets: caption j matches image i if every attribute it
    mentions is the image's. Each batch mixes data-set images, random-colour shapes (`shapes`) and palette
    shapes on random backgrounds (`backgrounds`).

    The stage draws from its own seed (`cfg.seed + 1`), so its result does not depend on the VAE stage's use of
    random numbers: the CLIP can be retrained alone and comes out the same."""
    dev = images.device
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        clip = build_clip(cfg, vocab_size).to(dev)
    opt, sched = _optimizer([{"params": clip.parameters(), "lr": cfg.clip_lr}], cfg.clip_steps)
    extra = [(pool, int(round(cfg.clip_batch * frac))) for pool, frac in
             ((shapes, cfg.clip_shape_fraction), (backgrounds, cfg.clip_background_fraction))]
    n_data = cfg.clip_batch - sum(k for _, k in extra)
    for step in range(cfg.clip_steps):
        idx = torch.randint(len(images), (n_data,), generator=gen)
        picks = [(pool, torch.randint(len(pool.images), (k,), generator=gen)) for pool, k in extra]
        x = images[idx.to(dev)]  # (n_data, 3, 32, 32)
        use_recon = (idx < len(recons)) & (torch.rand(len(idx), generator=gen) < 0.5)
        if use_recon.any():
            x = x.clone()
            x[use_recon.to(dev)] = recons[idx[use_recon].to(dev)]
        x = _augment(torch.cat([x, *(pool.images[i.to(dev)] for pool, i in picks)]), gen)  # (B, 3, 32, 32)
        variant = torch.randint(4, (len(idx),), generator=gen)
        cap = torch.cat([table.variants[idx, variant], *(pool.captions[i] for pool, i in picks)])  # (B,)
        img_attrs = torch.cat([table.image_attrs[idx], *(pool.attrs[i] for pool, i in picks)])  # (B, 4)
        out = clip(input_ids=table.ids[cap].to(dev), pixel_values=x)
        # match[i, j]: caption j is true of image i. (B, B)
        cap_attrs = table.attrs[cap]
        match = ((cap_attrs[None] == -1) | (cap_attrs[None] == img_attrs[:, None])).all(-1).float().to(dev)
        logits = out.logits_per_image  # (B, B)
        loss_i = -(match / match.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
        loss_t = -(match.T / match.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
        loss = 0.5 * (loss_i + loss_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        if step % cfg.log_every == 0 or step == cfg.clip_steps - 1:
            acc = match.gather(1, logits.argmax(1, keepdim=True)).mean().item()
            _log("clip", f"step {step + 1}/{cfg.clip_steps} loss {loss.item():.4f} batch top-1 {acc:.3f}", t0)
    clip.eval().requires_grad_(False)
    return clip


def train_unet(
    cfg: TrainConfig, latents: torch.Tensor, table: CaptionTable, clip: CLIPModel, gen: torch.Generator,
    t0: float,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Denoising training of UNet + text encoder on scaled latents; returns the EMA weights."""
    dev = latents.device
    unet = build_unet(cfg).to(dev)
    text = CLIPTextModel(clip.config.text_config).to(dev)
    # transformers >= 5: CLIPModel.text_model is a CLIPTextModel; before, the inner CLIPTextTransformer.
    target = text if isinstance(clip.text_model, CLIPTextModel) else text.text_model
    target.load_state_dict(clip.text_model.state_dict())
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod  # (1000,)
    snr = alphas / (1 - alphas)
    weight = (torch.clamp(snr, max=cfg.min_snr_gamma) / snr).to(dev)  # Min-SNR-gamma weights, epsilon loss
    groups = [{"params": unet.parameters(), "lr": cfg.unet_lr}, {"params": text.parameters(), "lr": cfg.text_lr}]
    opt, sched = _optimizer(groups, cfg.unet_steps)
    ema = Ema([unet, text], cfg.ema_decay)
    unet.train()
    text.train()
    running = 0.0
    for step in range(cfg.unet_steps):
        idx = torch.randint(len(latents), (cfg.unet_batch,), generator=gen)
        z0 = latents[idx.to(dev)]  # (B, 4, 8, 8), already scaled to unit std
        cap = table.variants[idx, torch.randint(4, (len(idx),), generator=gen)]
        cap = torch.where(torch.rand(len(idx), generator=gen) < cfg.cfg_dropout, 0, cap)  # 0 = empty prompt
        t = torch.randint(0, 1000, (len(idx),), generator=gen).to(dev)
        noise = _randn(z0.shape, gen, dev)
        zt = scheduler.add_noise(z0, noise, t)
        hidden = text(table.ids[cap].to(dev)).last_hidden_state  # (B, MAX_TOKENS, width)
        pred = unet(zt, t, hidden).sample  # (B, 4, 8, 8)
        loss = (weight[t] * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer_step(loss, [*unet.parameters(), *text.parameters()], opt, sched, ema)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            _log("unet", f"step {step + 1}/{cfg.unet_steps} loss {running:.4f}", t0)
    ema_unet, ema_text = ema.shadow
    return ema_unet.eval(), ema_text.eval()


# ----------------------------------------------------------------------------------------------------------
# Saving


def save_pipeline(
    out: Path, vae: AutoencoderKL, text: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel,
    cfg: TrainConfig, clip_dir_name: str, extra: dict,
) -> None:
    """Write the `StableDiffusionPipeline` folder (safetensors) and its `dagcli.json` metadata."""
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    meta = {
        "default_guidance": cfg.default_guidance,
        "default_steps": cfg.default_steps,
        "resolution": ds.RESOLUTION,
        "clip_reward_model": clip_dir_name,
        "prompt_set": "shapes-heldout",
        "train_prompt_set": "shapes",
        "train_config": asdict(cfg),
        **extra,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save_clip(out: Path, clip: CLIPModel, tokenizer: CLIPTokenizer) -> None:
    """Write the `CLIPModel` + `CLIPProcessor` folder; pixels are normalised to [-1, 1] like in training."""
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": ds.RESOLUTION}, do_center_crop=True,
        crop_size={"height": ds.RESOLUTION, "width": ds.RESOLUTION}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )
    clip.save_pretrained(out, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


# ----------------------------------------------------------------------------------------------------------
# Entry point


def train_all(cfg: TrainConfig, output: Path, threads: int | None = 1, device: str = "cpu") -> dict:
    """Run all stages and save both folders under `output`; returns timing and size numbers."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    times: dict[str, float] = {}

    def lap(name: str) -> None:
        times[name] = round(time.time() - t0 - sum(times.values()), 1)

    tokenizer = build_clip_tokenizer(ds.VOCABULARY, model_max_length=MAX_TOKENS)
    vocab_size = len(tokenizer)
    specs, images = render_pool(cfg.pool_size, cfg.seed)
    images = images.to(device)
    table = build_caption_table(specs, tokenizer)
    _log("data", f"{len(specs)} images, {len(table.captions)} distinct captions", t0)
    lap("data")

    vae = train_vae(cfg, images, gen, t0)
    latents, recons = encode_pool(vae, images, cfg.recon_pool)
    std = latents.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    latents = latents / std
    _log("vae", f"latent std {std:.4f} -> scaling_factor {1 / std:.4f}", t0)
    lap("vae")

    shapes = render_shape_pool(max(1, cfg.pool_size // 4), cfg.seed, table)
    shapes = replace(shapes, images=shapes.images.to(device))
    backgrounds = render_background_pool(max(1, cfg.pool_size // 4), cfg.seed, table)
    backgrounds = replace(backgrounds, images=backgrounds.images.to(device))
    clip = train_clip(cfg, images, recons, table, shapes, backgrounds, vocab_size, t0)
    lap("clip")
    unet, text = train_unet(cfg, latents, table, clip, gen, t0)
    lap("unet")
    vae, clip, unet, text = (m.to("cpu") for m in (vae, clip, unet, text))

    output = Path(output)
    sd_dir, clip_dir = output / TINY_SD_DIR.name, output / TINY_CLIP_DIR.name
    params = {"vae": num_params(vae), "text_encoder": num_params(text), "unet": num_params(unet),
              "clip": num_params(clip)}
    save_pipeline(sd_dir, vae, text, tokenizer, unet, cfg, clip_dir.name, run_record(times, params))
    save_clip(clip_dir, clip, tokenizer)
    return finish(f"{sd_dir} and {clip_dir}", times, params, t0)


def run_record(times: dict, params: dict) -> dict:
    """What a training script writes about its run into the model's `dagcli.json`."""
    return {"train_seconds": times, "parameters": params, "torch_threads": torch.get_num_threads()}


def finish(saved: str, times: dict, params: dict, t0: float) -> dict:
    """Log the end of a training script's run and return its summary."""
    total = round(time.time() - t0, 1)
    _log("done", f"saved {saved}; stage seconds {times}; total {total}s; params {params}", t0)
    return {"seconds": times, "total_seconds": total, "parameters": params}


def optimizer_step(loss, params, opt, sched, ema: Ema) -> None:
    """One step on `loss`: gradients clipped to norm 1, the schedule advanced, the average updated."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    ema.update()


def script_parser(module: str, description: str, output_help: str, quick_help: str) -> argparse.ArgumentParser:
    """The flags every built-in training script takes: --seed, --output, --threads, --quick."""
    p = argparse.ArgumentParser(prog=f"python {module}", description=description)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=WEIGHTS_DIR, help=output_help)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch default); 1 is fastest when the cores are shared")
    p.add_argument("--quick", action="store_true", help=quick_help)
    return p


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; step counts default to the shipped configuration."""
    p = script_parser("tools/train.py", __doc__.split("\n")[0], "folder that receives tiny-sd/ and tiny-clip/",
                      "a few steps of everything (smoke test)")
    p.add_argument("--device", default="cpu", help="torch device for training (results differ from CPU)")
    for name in ("vae_steps", "clip_steps", "unet_steps", "pool_size", "unet_batch"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--unet-channels", type=str, default=None, help="e.g. 32,64")
    p.add_argument("--vae-channels", type=str, default=None, help="e.g. 16,32,64 (3 levels: factor 4)")
    p.add_argument("--unet-lr", type=float, default=None)
    p.add_argument("--clip-lr", type=float, default=None)
    p.add_argument("--vae-batch", type=int, default=None)
    p.add_argument("--unet-groups", type=int, default=None)
    p.add_argument("--unet-cross-attn", type=str, default=None, help="per level, e.g. 0,1")
    p.add_argument("--default-guidance", type=float, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = _parse_args(argv)
    cfg = replace(QUICK if args.quick else TrainConfig(), seed=args.seed)
    names = ("vae_steps", "clip_steps", "unet_steps", "pool_size", "unet_batch", "unet_lr", "default_guidance",
             "clip_lr", "vae_batch", "unet_groups")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    for name in ("unet_channels", "vae_channels"):
        if getattr(args, name):
            overrides[name] = tuple(int(c) for c in getattr(args, name).split(","))
    if args.unet_cross_attn:
        overrides["unet_cross_attn"] = tuple(bool(int(c)) for c in args.unet_cross_attn.split(","))
    cfg = replace(cfg, **overrides)
    train_all(cfg, args.output, threads=args.threads or None, device=args.device)


if __name__ == "__main__":
    main()
