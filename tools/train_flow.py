"""Train the built-in tiny rectified-flow model `tiny-flow` (an SD3-style pipeline) on the shapes data set.

    python tools/train_flow.py --seed 0 [--output DIR] [--quick]

It reuses the `tiny` model's parts, frozen, so the two compare on equal terms: the data set and captions, the
VAE (4x8x8 latents; `shift_factor` / `scaling_factor` are set to the mean / 1 / std of the training latents),
the tokenizer and two text towers (the tiny CLIP's, and `tiny`'s fine-tuned copy of it), each with the CLIP's
text projection for the pooled embedding. Only an `SD3Transformer2DModel` is trained:

1. render the training images, encode them with the VAE (posterior means), normalise;
2. encode every caption once, exactly as `StableDiffusion3Pipeline.encode_prompt` does without T5;
3. rectified flow: x_t = (1 - t) x0 + t ε with t ~ logit-normal(0, 1) (SD3's default time sampling), the
   transformer predicts the velocity ε - x0 (plain MSE), 10% empty prompts for classifier-free guidance, EMA.

Without T5 the pipeline appends 256 identical zero tokens to the prompt; they stay identical through every
block (no positional embedding on the text stream), so training carries one of them and adds log 256 to its
attention logit (`dagcli.families.repeated_tokens`, as dagcli's sampler does): the same function at a fraction
of the cost.

The result is a `StableDiffusion3Pipeline` folder (`tiny-flow`, `text_encoder_3=None`) of safetensors with a
`dagcli.json` of sampling defaults, loadable with the pipeline's own `from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from diffusers.models.attention_processor import JointAttnProcessor2_0
from train import (
    METADATA_FILE,
    Ema,
    _log,
    _optimizer,
    _randn,
    build_caption_table,
    finish,
    num_params,
    optimizer_step,
    render_pool,
    run_record,
    script_parser,
)
from transformers import CLIPModel, CLIPTextModelWithProjection

from dagcli.builtin import TINY_CLIP_DIR, TINY_FLOW_DIR, TINY_SD_DIR
from dagcli.builtin import dataset as ds
from dagcli.families import repeated_tokens
from dagcli.families.sd3 import T5_TOKENS, SD3Family


@dataclass(frozen=True)
class FlowConfig:
    """Size and schedule of the transformer stage; everything else is the `tiny` model's, frozen."""

    seed: int = 0
    pool_size: int = 20000  # rendered training images (the `tiny` recipe's pool)
    patch_size: int = 1  # 8x8 latents -> 64 image tokens (patch 2: 16 tokens, too coarse for the small shapes)
    layers: int = 6
    heads: int = 3
    head_dim: int = 32
    steps: int = 3600
    batch: int = 96
    lr: float = 1e-3
    cfg_dropout: float = 0.1  # fraction of empty prompts
    logit_mean: float = 0.0  # t = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0
    ema_decay: float = 0.999
    shift: float = 2.0  # the scheduler's sigma shift at inference only (training samples t directly)
    # Inference defaults written to dagcli.json
    default_guidance: float = 3.0
    default_steps: int = 10
    default_eta: float = SD3Family.reference.train_eta  # the SDE's noise level while training (Flow-GRPO's 0.7)
    default_sample_eta: float = 0.0  # `dag sample` / `dag eval`: the ODE
    log_every: int = 100


QUICK = FlowConfig(pool_size=256, layers=1, steps=6, batch=16, log_every=2)


# ----------------------------------------------------------------------------------------------------------
# The pipeline's parts


def build_transformer(cfg: FlowConfig, text_width: int) -> SD3Transformer2DModel:
    """MMDiT on 4x8x8 latents; the text stream reads the two CLIPs' concatenated token embeddings."""
    grid = ds.RESOLUTION // 4 // cfg.patch_size
    return SD3Transformer2DModel(
        sample_size=ds.RESOLUTION // 4, patch_size=cfg.patch_size, in_channels=4, out_channels=4,
        num_layers=cfg.layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=text_width, caption_projection_dim=cfg.heads * cfg.head_dim,
        pooled_projection_dim=text_width, pos_embed_max_size=grid, qk_norm="rms_norm",
    )


def build_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    """SD3's Euler flow-matching scheduler with a fixed sigma shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def with_projection(text: torch.nn.Module, clip: CLIPModel) -> CLIPTextModelWithProjection:
    """A text transformer (a `CLIPTextModel`'s weights) with the tiny CLIP's text projection: its pooled output is
    the CLIP text embedding."""
    model = CLIPTextModelWithProjection(clip.config.text_config)
    model.text_model.load_state_dict(text.state_dict())
    model.text_projection.load_state_dict(clip.text_projection.state_dict())
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class FrozenParts:
    """The `tiny` model's VAE, tokenizer and text encoders (slot 1: the tiny CLIP's text tower, slot 2: the tiny
    model's fine-tuned text encoder, both with the CLIP's projection)."""

    vae: AutoencoderKL
    tokenizer: object
    text_encoder: CLIPTextModelWithProjection
    text_encoder_2: CLIPTextModelWithProjection


def load_frozen_parts(sd_dir: Path = TINY_SD_DIR, clip_dir: Path = TINY_CLIP_DIR) -> FrozenParts:
    """Read the shipped `tiny` folders."""
    sd = StableDiffusionPipeline.from_pretrained(sd_dir, use_safetensors=True)
    clip = CLIPModel.from_pretrained(clip_dir, use_safetensors=True)
    return FrozenParts(sd.vae.eval().requires_grad_(False), sd.tokenizer, with_projection(clip.text_model, clip),
                       with_projection(sd.text_encoder, clip))


def assemble(parts: FrozenParts, transformer: SD3Transformer2DModel, shift: float) -> StableDiffusion3Pipeline:
    """The SD3 pipeline without T5."""
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=build_scheduler(shift), vae=parts.vae,
        text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, text_encoder_2=parts.text_encoder_2,
        tokenizer_2=parts.tokenizer, text_encoder_3=None, tokenizer_3=None,
    )


# ----------------------------------------------------------------------------------------------------------
# Data


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """VAE posterior means (N, 4, 8, 8) of images in [-1, 1]."""
    return torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])


@torch.no_grad()
def encode_captions(pipe: StableDiffusion3Pipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own prompt encoding of every caption, with one T5 zero token instead of 256:
    token embeddings (C, 16 + 1, width) and pooled embeddings (C, width)."""
    embeds, pooled = [], []
    for i in range(0, len(captions), 256):
        e, _, p, _ = pipe.encode_prompt(captions[i:i + 256], None, None, device="cpu",
                                        do_classifier_free_guidance=False, max_sequence_length=1)
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def sample_t(cfg: FlowConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal times in (0, 1): t = sigmoid(m + s * N(0, 1)) (SD3's rf/lognorm sampling)."""
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=gen))


# ----------------------------------------------------------------------------------------------------------
# Training


def train_transformer(cfg: FlowConfig, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                      variants: torch.Tensor, t0: float) -> SD3Transformer2DModel:
    """Rectified-flow training on normalised latents; returns the EMA weights.

    variants: (N, 4) caption index of each latent per caption template; caption 0 is the empty prompt."""
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_transformer(cfg, embeds.shape[-1])
    repeated_tokens.install(model)
    short = {repeated_tokens.KWARG: T5_TOKENS}
    opt, sched = _optimizer([{"params": model.parameters(), "lr": cfg.lr}], cfg.steps)
    ema = Ema([model], cfg.ema_decay)
    model.train()
    running = 0.0
    for step in range(cfg.steps):
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        x0 = latents[idx]  # (B, 4, 8, 8)
        cap = variants[idx, torch.randint(variants.shape[1], (cfg.batch,), generator=gen)]
        cap = torch.where(torch.rand(cfg.batch, generator=gen) < cfg.cfg_dropout, 0, cap)
        t = sample_t(cfg, cfg.batch, gen)
        noise = _randn(x0.shape, gen, x0.device)
        tb = t[:, None, None, None]
        xt = (1 - tb) * x0 + tb * noise
        pred = model(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=embeds[cap],
                     pooled_projections=pooled[cap], joint_attention_kwargs=short, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        optimizer_step(loss, model.parameters(), opt, sched, ema)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            _log("flow", f"step {step + 1}/{cfg.steps} loss {running:.4f}", t0)
    (avg,) = ema.shadow
    avg.set_attn_processor(JointAttnProcessor2_0())  # the pipeline's own attention, 256 zero tokens
    return avg.eval()


def save_pipeline(out: Path, pipe: StableDiffusion3Pipeline, cfg: FlowConfig, extra: dict) -> None:
    """Write the pipeline folder (safetensors) and its `dagcli.json` of sampling defaults."""
    pipe.save_pretrained(out, safe_serialization=True)
    for config in out.glob("*/config.json"):  # the frozen parts remember the folder they were read from
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    meta = {
        "default_guidance": cfg.default_guidance,
        "default_steps": cfg.default_steps,
        "default_eta": cfg.default_eta,
        "default_sample_eta": cfg.default_sample_eta,
        "resolution": ds.RESOLUTION,
        "clip_reward_model": TINY_CLIP_DIR.name,
        "prompt_set": "shapes-heldout",
        "train_prompt_set": "shapes",
        "train_config": asdict(cfg),
        **extra,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def train_all(cfg: FlowConfig, output: Path, threads: int | None = 1) -> dict:
    """Encode the data with the frozen parts, train the transformer, save `output/tiny-flow`."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    times: dict[str, float] = {}

    def lap(name: str) -> None:
        times[name] = round(time.time() - t0 - sum(times.values()), 1)

    parts = load_frozen_parts()
    specs, images = render_pool(cfg.pool_size, cfg.seed)
    table = build_caption_table(specs, parts.tokenizer)
    z = encode_latents(parts.vae, images)
    mean, std = z.mean().item(), (z - z.mean()).std().item()
    parts.vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    latents = (z - mean) / std
    pipe = assemble(parts, build_transformer(cfg, 2 * parts.text_encoder.config.projection_dim), cfg.shift)
    embeds, pooled = encode_captions(pipe, table.captions)
    _log("data", f"{len(specs)} latents (mean {mean:.4f}, std {std:.4f}), {len(table.captions)} captions", t0)
    lap("data")
    transformer = train_transformer(cfg, latents, embeds, pooled, table.variants, t0)
    lap("transformer")
    pipe = assemble(parts, transformer, cfg.shift)
    out = Path(output) / TINY_FLOW_DIR.name
    params = {"transformer": num_params(transformer), "vae": num_params(parts.vae),
              "text_encoder": num_params(parts.text_encoder), "text_encoder_2": num_params(parts.text_encoder_2)}
    save_pipeline(out, pipe, cfg, run_record(times, params))
    return finish(str(out), times, params, t0)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; the defaults are the shipped configuration."""
    p = script_parser("tools/train_flow.py", __doc__.split("\n")[0], "folder that receives tiny-flow/",
                      "a few steps on a small pool (smoke test)")
    for name in ("steps", "batch", "layers", "heads", "head_dim", "patch_size", "pool_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("lr", "ema_decay", "shift"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = _parse_args(argv)
    cfg = replace(QUICK if args.quick else FlowConfig(), seed=args.seed)
    names = ("steps", "batch", "layers", "heads", "head_dim", "patch_size", "pool_size", "lr", "ema_decay", "shift")
    cfg = replace(cfg, **{k: getattr(args, k) for k in names if getattr(args, k) is not None})
    train_all(cfg, args.output, threads=args.threads or None)


if __name__ == "__main__":
    main()
