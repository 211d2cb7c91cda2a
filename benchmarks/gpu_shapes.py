"""Sampling and DAG-DB training at real model shapes with random weights: SDXL, SD3.5 Medium and FLUX.1-dev.

    python benchmarks/gpu_shapes.py                      # one GPU, bf16, every model (what gpu.sh runs)
    python benchmarks/gpu_shapes.py --tiny               # CPU dry run on the tiny random models (seconds)
    python benchmarks/gpu_shapes.py --device cpu --dtype fp32 --models sd35-medium,flux-dev \\
        --sd3-layers 2 --flux-layers 1,2 --resolution 128 --threads 1   # CPU, real widths, fewer layers

Per model, as ratios measured in the same process (variants interleaved, medians; see `perf.py`):
  sampling   our `sample_batch` (recording states, log-probs and outputs) vs the diffusers pipeline's call with
             the same model, prompts, steps and guidance, `output_type="pt"`; recording overhead; our time per
             step vs one guided denoiser call (the exact call our sampler makes, replayed).
  training   one trained transition (DAG-DB loss + backward, the forward-looking x̂0 rewards amortised) vs the
             floor: one forward + backward of the LoRA denoiser on the guided micro-batch; transitions/s and peak
             memory at each micro-batch size with and without gradient checkpointing (an out-of-memory size is
             recorded and skipped), and which of them fit on 24 / 48 / 80 GB.

Widths, heads, patching and latent shapes are the published ones; `--sd3-layers` / `--flux-layers` cut depth to
keep CPU time sane. Text encoders keep their output widths but have one layer each (prompts are encoded once and
cached, so they cost nothing per step; the pipelines encode on every call, which a small encoder keeps fair). SD3
runs without T5 (zeros in its place, diffusers' behaviour without `text_encoder_3`: the same 333 text tokens).
Results: JSON (`--out`) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))

import perf  # noqa: E402  (benchmarks/ on the path first)

GIB = 2**30
CARDS_GB = (24, 48, 80)
CONTEXT_GIB = 1.0  # CUDA context and allocator slack added to the measured peak before comparing with a card


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model to build, and the settings the GPU run uses for it (each part of the run is budgeted)."""

    build: str  # a builder below, or "load" for a dagcli model name
    resolution: int  # pixels on a GPU
    steps: int
    batch: int  # images per sampler call; the guided denoiser batch is twice that with classifier-free guidance
    label: str


SHAPES = {
    "sdxl": Shape("sdxl", 1024, 20, 2, "SDXL base (UNet 2.6 B)"),
    "sd35-medium": Shape("sd35_medium", 512, 10, 4, "SD3.5 Medium (MMDiT 2.5 B)"),
    "flux-dev": Shape("flux_dev", 512, 6, 4, "FLUX.1-dev (transformer 11.9 B)"),
}
TINY = ("tiny-random-sdxl", "tiny-random-sd3", "tiny-random-flux")


# --- builders (random weights, published configs) -----------------------------------------------------------

def clip_text(cls, tokenizer, hidden: int, layers: int):
    """A CLIP text tower of `hidden` width (its projection as wide) with `layers` layers."""
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, projection_dim=hidden, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def flow_vae(scaling: float, shift: float):
    """SD3's / FLUX's 16-channel autoencoder."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=scaling,
                         shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)


def clip_tokenizer():
    from sd15 import WORDS

    from dagcli.builtin.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(WORDS, model_max_length=77)


def build_sdxl(layers: int | None = None):
    """SDXL base: its UNet and VAE (fp32-safe VAE scaling), two CLIP towers, DDIM with SDXL's β schedule."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from sd15 import read_config
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, layers or 10), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(**{**read_config("vae"), "scaling_factor": 0.13025, "sample_size": 1024})
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip_text(CLIPTextModel, tok, 768, 1), tokenizer=tok,
        text_encoder_2=clip_text(CLIPTextModelWithProjection, tok, 1280, 1), tokenizer_2=tok, unet=unet,
        scheduler=DDIMScheduler(**read_config("scheduler")))


def build_sd35_medium(layers: int | None = None):
    """SD3.5 Medium: its MMDiT (dual attention in the first 13 of 24 layers), VAE, two CLIPs, no T5, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    depth = layers or 24
    tok = clip_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=depth, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(min(13, -(-depth * 13 // 24)))))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=flow_vae(1.5305, 0.0609),
        text_encoder=clip_text(CLIPTextModelWithProjection, tok, 768, 1), tokenizer=tok,
        text_encoder_2=clip_text(CLIPTextModelWithProjection, tok, 1280, 1), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)


def build_flux_dev(layers: tuple[int, int] | None = None):
    """FLUX.1-dev: its transformer (19 double-stream, 38 single-stream blocks, guidance embedding), VAE, CLIP-L
    pooled, a one-layer T5 of T5-XXL's width over 512 tokens, the resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from sd15 import WORDS
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from dagcli.builtin.random_flow import build_t5_stand_in_tokenizer

    double, single = layers or (19, 38)
    tok, t5_tok = clip_tokenizer(), build_t5_stand_in_tokenizer(tuple(WORDS), model_max_length=512)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=4,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=flow_vae(0.3611, 0.1159), text_encoder=clip_text(CLIPTextModel, tok,
                        768, 1), tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


BUILDERS = {"sdxl": build_sdxl, "sd35_medium": build_sd35_medium, "flux_dev": build_flux_dev}


def load_shape(name: str, device: str, dtype: str, layers=None):
    """A `LoadedModel` of a shape in SHAPES (random weights built directly on `device` in `dtype`), or of a dagcli
    model name."""
    from dagcli.families import family_for
    from dagcli.models import LoadedModel, load_model, resolve_device, resolve_dtype

    if name not in SHAPES:
        return load_model(name, device=device, dtype=dtype)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    with torch.random.fork_rng(devices=[]), torch.device(dev), default_dtype(dt):
        torch.manual_seed(0)
        pipe = BUILDERS[SHAPES[name].build](layers)
    pipe.to(device=dev, dtype=dt)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    return LoadedModel(pipe=pipe, family=family_for(pipe, dev), name=name, device=dev, dtype=dt)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create floating-point weights in `dtype` (a 12 B model never exists in float32 on the GPU)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- measures -------------------------------------------------------------------------------------------------

def pipeline_call(model, prompts: list[str], steps: int, guidance: float, resolution: int):
    """The diffusers pipeline's own call: same prompts, steps, guidance, size and seeds (generators on the model's
    device, as ours); η = 1 where the scheduler has one (DDIM), the flow pipelines' deterministic Euler sampler
    otherwise."""
    from dagcli.sampling import generators_for

    pipe, kw = model.pipe, {}
    if model.family.name == "flux":
        kw["max_sequence_length"] = model.family.t5_tokens
    elif model.family.name in ("sd", "sdxl"):
        kw["eta"] = 1.0
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                generator=generators_for(range(len(prompts)), model.device.type), output_type="pt", **kw).images


def plain_chain(model, prompts: list[str], steps: int, guidance: float, eta: float, resolution: int):
    """Our sampler's chain with nothing recorded (no states, log-probs or outputs kept), then the decode."""
    from dagcli.sampling import generators_for

    family, n = model.family, len(prompts)
    schedule = family.schedule(steps, resolution, resolution)
    gens = generators_for(range(n), model.device.type)
    x = family.initial_latents(n, resolution, resolution, gens)
    denoise = family.denoiser_fn(family.denoiser, schedule, family.encode(prompts), guidance)
    for i in range(family.num_steps(schedule)):
        j = torch.full((n,), i, dtype=torch.long)
        x = family.step(schedule, j, x, denoise(x, j)[0], eta, generator=gens).prev_sample
    return family.decode(x)


def bench_sampling(b, model, o) -> dict:
    """Images/s of ours vs the pipeline and vs the unrecorded chain; per step vs the guided denoiser call."""
    from dagcli.sampling import generators_for, sample_batch

    prompts = (perf.PROMPTS * o.batch)[: o.batch]
    eta = model.family.reference.train_eta
    kw = dict(steps=o.steps, guidance=o.guidance, eta=eta, height=o.resolution, width=o.resolution)

    def ours(decode=True):
        return sample_batch(model, prompts, generators_for(range(o.batch), model.device.type), decode=decode, **kw)

    args, kwargs = perf.first_call(model.family.denoiser, lambda: ours(decode=False))
    with torch.no_grad():
        m = b.compare({"ours": ours, "ours_no_recording": lambda: plain_chain(model, prompts, o.steps, o.guidance,
                                                                              eta, o.resolution),
                       "pipeline": lambda: pipeline_call(model, prompts, o.steps, o.guidance, o.resolution),
                       "ours_no_decode": lambda: ours(decode=False),
                       "guided_denoiser_call": lambda: model.family.denoiser(*args, **kwargs)})
    per_step = m["ours_no_decode"] / o.steps
    return {"batch": o.batch, "steps": o.steps, "guidance": o.guidance, "eta_ours": eta, "resolution": o.resolution,
            "guided_batch": int(args[0].shape[0] if args else next(iter(kwargs.values())).shape[0]),
            "seconds": m, "images_per_s": {k: o.batch / m[k] for k in ("ours", "ours_no_recording", "pipeline")},
            "ratio_ours_vs_pipeline_images_per_s": perf.ratio(m["pipeline"], m["ours"]),
            "ratio_recording_overhead": perf.ratio(m["ours"], m["ours_no_recording"]),
            "ratio_per_step_vs_guided_call": perf.ratio(per_step, m["guided_denoiser_call"]),
            "targets": {"ratio_ours_vs_pipeline_images_per_s": ">= 1.0", "ratio_per_step_vs_guided_call": "<= 1.10"}}


def make_trainer(model, o, micro_batch: int):
    """A DAG-DB `Trainer` on the loaded model: colorfulness reward, x̂0 rewards from sampling, the family's
    LoRA targets and reference η, one optimiser step per epoch."""
    import tempfile

    from dagcli.config import Config, replace
    from dagcli.trainer import Trainer

    cfg = replace(Config(), "model", name="tiny-random", device=model.device.type,
                  dtype={torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[model.dtype])
    cfg = replace(cfg, "sampling", steps=o.steps, guidance=o.guidance, eta=model.family.reference.train_eta,
                  batch_size=o.batch, batches_per_epoch=1, prompts="simple_animals", resolution=o.resolution)
    cfg = replace(cfg, "lora", target_modules=tuple(model.family.default_lora_targets))
    cfg = replace(cfg, "reward", spec="colorfulness")
    cfg = replace(cfg, "train", batch_size=micro_batch, gradient_accumulation_steps=-(-o.batch * o.steps // micro_batch),
                  mixed_precision="bf16" if model.device.type == "cuda" and model.dtype == torch.bfloat16 else "no",
                  epochs=1)
    cfg = replace(cfg, "dag", beta=1.0, beta_ramp_epochs=0, x0_source="sampling", x0_guidance="cond")
    cfg = replace(cfg, "output", dir=tempfile.mkdtemp(prefix="dagcli-shapes-"), checkpoint_minutes=0.0)
    return Trainer(cfg, perf.PROMPTS, model=model)


def bench_training(b, model, o) -> dict:
    """Per trained transition against the LoRA denoiser's guided forward + backward; the micro-batch sweep."""
    trainer = make_trainer(model, o, o.micro_batch)
    try:
        batch, _ = trainer.collect(0)
        pairs = batch.pairs
        out = {"micro_batch": o.micro_batch, "transitions_per_epoch": len(pairs),
               "lora_targets": list(model.family.default_lora_targets),
               "lora_parameters": sum(p.numel() for p in trainer.raw_denoiser.parameters() if p.requires_grad),
               "mixed_precision": trainer.config.train.mixed_precision}
        out["per_transition"] = perf.per_transition(b, trainer, None, batch, None, pairs[: o.micro_batch], len(pairs))
        out["sweep"] = perf.train_sweep(b, trainer, batch, pairs) if o.sweep else []
        return out
    finally:
        del trainer
        free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part(b, fn, model, s) -> dict:
    """One budgeted part of a model's run: skipped past the time budget, recorded when memory runs out."""
    if b.over_budget():
        return {"skipped": "time budget"}
    t0 = time.perf_counter()
    b.reset_peak()
    try:
        out = fn(b, model, s)
    except torch.OutOfMemoryError as e:
        free_memory()
        out = {"skipped": f"out of memory: {str(e).splitlines()[0][:160]}"}
    out["part_seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_memory"] = b.peak_memory()
    return out


@dataclasses.dataclass(frozen=True)
class Settings:
    resolution: int
    steps: int
    batch: int
    guidance: float
    micro_batch: int
    micro_batches: tuple[int, ...]
    sweep: bool


def settings_for(name: str, model, o) -> Settings:
    """The run's settings for a model: the command line's, else the shape's (GPU) or small ones (tiny models)."""
    shape = SHAPES.get(name)
    return Settings(resolution=o.resolution or (shape.resolution if shape else model.resolution),
                    steps=o.steps or (shape.steps if shape else 2), batch=o.batch or (shape.batch if shape else 2),
                    guidance=model.family.reference.guidance, micro_batch=2 if 2 in o.micro_batches else o.micro_batches[0],
                    micro_batches=tuple(o.micro_batches), sweep=o.sweep)


def layers_for(name: str, o):
    return {"sdxl": o.sdxl_layers, "sd35-medium": o.sd3_layers,
            "flux-dev": tuple(o.flux_layers) if o.flux_layers else None}.get(name)


def bench_model(b, name: str, o) -> dict:
    """Build one model, measure its sampling and training, free it."""
    t0 = time.perf_counter()
    b.reset_peak()
    try:
        model = load_shape(name, o.device, o.dtype, layers_for(name, o))
    except torch.OutOfMemoryError:
        free_memory()
        return {"skipped": "out of memory while building the model"}
    s = settings_for(name, model, o)
    out = {"label": SHAPES[name].label if name in SHAPES else name, "family": model.family.name,
           "layers": layers_for(name, o) or "all", "denoiser_parameters": parameters(model.family.denoiser),
           "settings": dataclasses.asdict(s), "build_seconds": round(time.perf_counter() - t0, 1),
           "memory_after_build": b.peak_memory()}
    out["sampling"] = part(b, bench_sampling, model, s)
    out["training"] = part(b, bench_training, model, s)
    del model
    free_memory()
    return out


# --- tables ---------------------------------------------------------------------------------------------------

CARD_USABLE_GIB = {24: 23.5, 48: 44.5, 80: 79.0}  # what a 24 GB (RTX 4090), 48 GB (L40S) and 80 GB (H100) card offers


def peak_gib(row: dict) -> float | None:
    mib = row.get("peak_cuda_reserved_mib", row.get("peak_cuda_mib"))
    return None if mib is None else mib / 1024


def fits(row: dict) -> list[str]:
    """yes / no per card for one sweep row: the peak reserved memory plus the CUDA context within the card."""
    gib = peak_gib(row)
    if "skipped" in row:
        return ["no (out of memory here)" if "memory" in row["skipped"] else "?"] * len(CARDS_GB)
    if gib is None:
        return ["n/a (CPU)"] * len(CARDS_GB)
    return ["yes" if gib + CONTEXT_GIB <= CARD_USABLE_GIB[c] else "no" for c in CARDS_GB]


def fmt(v, spec: str = "{:.3f}") -> str:
    return spec.format(v) if isinstance(v, (int, float)) else "—"


def table(results: dict) -> str:
    """Markdown: one row per model for the ratios, one per (model, micro-batch, checkpointing) for memory."""
    lines = ["| model | layers | px | steps | batch | ours / pipeline images/s (≥ 1.0) | recording overhead | "
             "per step / guided call (≤ 1.10) | transition (+FL) / LoRA fwd+bwd | transition without FL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    mem = [f"| model | micro-batch | checkpointing | transitions/s | peak GiB | {' | '.join(f'{c} GB' for c in CARDS_GB)} |",
           "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in CARDS_GB) + " |"]
    for name, r in results["sections"].items():
        if "settings" not in r:
            lines.append(f"| {name} | {r.get('skipped', r.get('error', '?'))} |" + " |" * 8)
            continue
        s, sp, tr = r["settings"], r["sampling"], r["training"]
        pt = tr.get("per_transition", {})
        lines.append(f"| {r['label']} | {r['layers']} | {s['resolution']} | {s['steps']} | {s['batch']} | "
                     f"{fmt(sp.get('ratio_ours_vs_pipeline_images_per_s'))} | {fmt(sp.get('ratio_recording_overhead'))} | "
                     f"{fmt(sp.get('ratio_per_step_vs_guided_call'))} | {fmt(pt.get('ratio_ours_vs_guided_fwd_bwd'))} | "
                     f"{fmt(pt.get('ratio_ours_vs_guided_fwd_bwd_without_fl'))} |")
        for row in tr.get("sweep", []):
            gib = peak_gib(row)
            mem.append(f"| {r['label']} | {row['micro_batch']} | {row['gradient_checkpointing']} | "
                       f"{fmt(row.get('transitions_per_s'), '{:.2f}')} | {fmt(gib, '{:.1f}')} | {' | '.join(fits(row))} |")
    return "\n".join(lines + [""] + mem)


# --- main -----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny random models")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--models", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)} or dagcli model names")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: each shape's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="images per sampler call")
    p.add_argument("--micro-batches", default=None, help="training sweep (default 1,2,4; --tiny: 1,2); per transition uses 2 when listed")
    p.add_argument("--sweep-micro-batches", type=int, default=2, help="timed optimiser steps per sweep row")
    p.add_argument("--no-sweep", action="store_true", help="per-transition ratio only, no micro-batch sweep")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sdxl-layers", type=int, default=None, help="transformer layers of SDXL's last block (10)")
    p.add_argument("--sd3-layers", type=int, default=None, help="SD3.5 Medium's MMDiT layers (24)")
    p.add_argument("--flux-layers", default=None, help="FLUX.1-dev's double,single blocks (19,38)")
    p.add_argument("--model-budget", type=float, default=150, help="seconds per model before its parts are skipped")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="wall", choices=["wall", "process"], help="as perf.py's")
    p.add_argument("--out", default=str(HERE / "results" / "gpu-shapes.json"))
    o = p.parse_args(argv)
    if o.tiny:
        o.device, o.dtype, o.models = "cpu", "fp32", ",".join(TINY)
        o.repeats, o.sweep_micro_batches, o.micro_batches = 1, 1, o.micro_batches or "1,2"
    o.models = [m for m in o.models.split(",") if m]
    o.micro_batches = [int(v) for v in (o.micro_batches or "1,2,4").split(",") if v]
    o.sweep = not o.no_sweep
    o.flux_layers = [int(v) for v in o.flux_layers.split(",")] if o.flux_layers else None
    # what perf.Bench and its measures read
    o.time_budget, o.train_batches, o.epoch_repeats = o.model_budget, o.micro_batches, 1
    return o


def main(argv=None) -> dict:
    o = parse_args(argv)
    perf.set_up_torch(o.threads, o.device)
    b = perf.Bench(o)
    for name in o.models:
        b.t_start = time.perf_counter()  # each model has its own budget
        b.section(name, lambda n=name: bench_model(b, n, o))
    b.results["table"] = table(b.results)
    b.write()
    Path(o.out).with_suffix(".md").write_text(b.results["table"] + "\n")
    print(b.results["table"], flush=True)
    return b.results


if __name__ == "__main__":
    main()
