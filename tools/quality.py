"""Measure the built-in tiny models and write the numbers to docs and benchmarks.

    python tools/quality.py [--num-per-prompt 64]

1. Tiny CLIP zero-shot: rendered held-out images are classified among all "a {colour} {shape}" captions
   (argmax of cosine similarity); colour and shape accuracy are read from the chosen caption.
2. Tiny diffusion model: `--num-per-prompt` samples for each `shapes-heldout` prompt with the shipped DDIM
   scheduler (eta 0, fixed seeds), judged by the tiny CLIP (same argmax as above) and by the pixels
   (`dataset.judge_pixels`: median foreground colour nearest to the palette, and the rendered shape of the
   same area and centroid nearest to the image's coverage).
   Also: how often the tiny CLIP ranks the sample's own prompt first among the 12 prompts.
3. A guidance sweep with fewer samples, and a labelled grid of samples (rows = prompts).

With `--model tiny-flow`: the same judges on the rectified-flow model's Euler ODE and its SDE at the training noise
level, `tiny` beside it, guidance and shift sweeps, and the SDE beside the ODE at other steps and noise levels
(`--sde-sweep`).

Writes `benchmarks/results/builtin_quality.json`, the quality section of `docs/builtin-model.md` and
`docs/builtin-grid.png` (paths relative to the current directory unless given).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dagcli.builtin import TINY_CLIP_DIR, TINY_FLOW_NAME, TINY_NAME, TINY_SD_DIR
from dagcli.builtin import dataset as ds

DOC_START, DOC_END = "<!-- quality:start -->", "<!-- quality:end -->"
LABELS = [f"a {c} {s}".replace("a orange", "an orange") for c, s in itertools.product(ds.COLOURS, ds.SHAPES)]
SHAPE_LABELS = [f"a {s}" for s in ds.SHAPES]


@dataclass(frozen=True)
class TinyClip:
    """The tiny CLIP model with its processor, in eval mode."""

    model: torch.nn.Module
    processor: object

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray) -> torch.Tensor:
        """(N, 32, 32, 3) uint8 -> L2-normalised embeddings (N, D)."""
        out = []
        for i in range(0, len(images), 512):
            pix = self.processor(images=list(images[i:i + 512]), return_tensors="pt").pixel_values
            out.append(self.model.get_image_features(pixel_values=pix))
        emb = torch.cat([_features(o) for o in out])
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """Captions -> L2-normalised embeddings (T, D)."""
        tok = self.processor(text=texts, return_tensors="pt", padding=True)
        emb = _features(self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask))
        return emb / emb.norm(dim=-1, keepdim=True)


def _features(out: object) -> torch.Tensor:
    """`get_*_features` returns a tensor in older transformers and an output object (pooler_output) in newer."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(path: Path = TINY_CLIP_DIR) -> TinyClip:
    """Load the tiny CLIP folder."""
    from transformers import CLIPModel, CLIPProcessor

    return TinyClip(CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path))


def load_pipeline(path: Path = TINY_SD_DIR):
    """Load the tiny Stable Diffusion pipeline folder (CPU, float32)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_metadata(path: Path = TINY_SD_DIR) -> dict:
    """The `dagcli.json` next to the pipeline's model_index.json."""
    return json.loads((Path(path) / "dagcli.json").read_text())


def classify(clip: TinyClip, images: np.ndarray) -> tuple[list[str], list[str]]:
    """Zero-shot colour and shape of each image: argmax over all "a {colour} {shape}" captions."""
    sims = clip.image_embeds(images) @ clip.text_embeds(LABELS).T  # (N, 21)
    best = sims.argmax(dim=1).tolist()
    parsed = [ds.parse_caption(LABELS[b]) for b in best]
    return [p.colour for p in parsed], [p.shape for p in parsed]


def classify_shape(clip: TinyClip, images: np.ndarray) -> list[str]:
    """Zero-shot shape of each image: argmax over the shape-only captions "a circle", "a square", "a triangle"."""
    sims = clip.image_embeds(images) @ clip.text_embeds(SHAPE_LABELS).T  # (N, 3)
    return [ds.SHAPES[i] for i in sims.argmax(dim=1).tolist()]


def clip_zero_shot(clip: TinyClip, n: int = 1200, seed: int = 1234, split: str = "heldout") -> dict:
    """Zero-shot colour / shape accuracy of the tiny CLIP on rendered images of a split.

    colour_acc / shape_acc / both_acc: from the argmax over the 21 "a {colour} {shape}" captions;
    shape_acc_shape_captions: argmax over "a {shape}"; both_acc_shape_captions combines the two."""
    specs = ds.sample_specs(n, seed, split=split)
    images = ds.render_array(specs)
    colours, shapes = classify(clip, images)
    c_ok = np.array([c == s.colour for c, s in zip(colours, specs, strict=True)])
    s_ok = np.array([c == s.shape for c, s in zip(shapes, specs, strict=True)])
    t_ok = np.array([c == s.shape for c, s in zip(classify_shape(clip, images), specs, strict=True)])
    return {"images": n, "colour_acc": float(c_ok.mean()), "shape_acc": float(s_ok.mean()),
            "both_acc": float((c_ok & s_ok).mean()), "shape_acc_shape_captions": float(t_ok.mean()),
            "both_acc_shape_captions": float((c_ok & t_ok).mean())}


def generate(pipe, prompt: str, n: int, guidance: float, steps: int, seed: int, batch: int = 64) -> np.ndarray:
    """`n` samples of one prompt as uint8 (n, 32, 32, 3); DDIM with eta 0, seeds seed, seed+1, ... per batch."""
    out = []
    for b, start in enumerate(range(0, n, batch)):
        k = min(batch, n - start)
        gen = torch.Generator().manual_seed(seed + b)
        imgs = pipe(prompt, num_images_per_prompt=k, num_inference_steps=steps, guidance_scale=guidance,
                    eta=0.0, generator=gen, output_type="np").images  # (k, 32, 32, 3) float in [0, 1]
        out.append((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def judge_samples(clip: TinyClip, prompt: str, images: np.ndarray, prompt_embeds: torch.Tensor,
                  prompt_index: int) -> dict:
    """Fractions of samples of one prompt whose colour / shape / background match it, per judge."""
    want = ds.parse_caption(prompt)
    colours, shapes = classify(clip, images)
    clip_c = np.array([c == want.colour for c in colours])
    clip_s = np.array([s == want.shape for s in shapes])
    clip_t = np.array([s == want.shape for s in classify_shape(clip, images)])
    pix = [ds.judge_pixels(im) for im in images]
    pix_c = np.array([p.colour == want.colour for p in pix])
    pix_s = np.array([p.shape == want.shape for p in pix])
    pix_b = np.array([p.background == want.background for p in pix])
    retrieval = (clip.image_embeds(images) @ prompt_embeds.T).argmax(1).numpy() == prompt_index
    return {
        "prompt": prompt,
        "clip_colour": float(clip_c.mean()), "clip_shape": float(clip_s.mean()),
        "clip_both": float((clip_c & clip_s).mean()),
        "clip_shape_tmpl": float(clip_t.mean()), "clip_both_tmpl": float((clip_c & clip_t).mean()),
        "pixel_colour": float(pix_c.mean()), "pixel_shape": float(pix_s.mean()),
        "pixel_background": float(pix_b.mean()),
        "clip_both_and_pixel_colour": float((clip_c & clip_s & pix_c).mean()),
        "prompt_retrieval": float(retrieval.mean()),
    }


METRICS = ("clip_colour", "clip_shape", "clip_both", "clip_shape_tmpl", "clip_both_tmpl", "pixel_colour", "pixel_shape", "pixel_background",
           "clip_both_and_pixel_colour", "prompt_retrieval")


Sampler = Callable[[str, int, int], np.ndarray]  # (prompt, n, seed) -> uint8 images (n, 32, 32, 3)


def evaluate_with(sample: Sampler, clip: TinyClip, prompts: list[str], n: int, seed: int
                  ) -> tuple[dict, dict[str, np.ndarray]]:
    """Per-prompt judgements of `n` samples per prompt (seed `seed + 1000 * i` for prompt i) and their means;
    also returns the samples by prompt."""
    prompt_embeds = clip.text_embeds(prompts)
    rows, samples = [], {}
    for i, prompt in enumerate(prompts):
        imgs = sample(prompt, n, seed + 1000 * i)
        samples[prompt] = imgs
        rows.append(judge_samples(clip, prompt, imgs, prompt_embeds, i))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
    return {"num_per_prompt": n, "mean": mean, "per_prompt": rows}, samples


def evaluate_model(pipe, clip: TinyClip, prompts: list[str], n: int, guidance: float, steps: int, seed: int
                   ) -> tuple[dict, dict[str, np.ndarray]]:
    """The tiny model's samples (plain DDIM pipeline, eta 0) judged per prompt; also returns the samples."""
    result, samples = evaluate_with(lambda p, k, s: generate(pipe, p, k, guidance, steps, s), clip, prompts, n, seed)
    return {"guidance": guidance, "steps": steps, **result}, samples


def make_grid(samples: dict[str, np.ndarray], path: Path, per_row: int = 8, scale: int = 3) -> None:
    """Labelled grid: one row per prompt, `per_row` samples, each upscaled `scale`x (nearest)."""
    cell = ds.RESOLUTION * scale
    label_w, pad = 300, 2
    rows = list(samples.items())
    grid = Image.new("RGB", (label_w + per_row * (cell + pad), len(rows) * (cell + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, (prompt, imgs) in enumerate(rows):
        y = r * (cell + pad)
        draw.text((6, y + cell // 2 - 6), prompt, fill=(0, 0, 0), font=font)
        for c, im in enumerate(imgs[:per_row]):
            tile = Image.fromarray(im).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + c * (cell + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def make_pair_grid(left: dict[str, np.ndarray], right: dict[str, np.ndarray], path: Path, titles: tuple[str, str],
                   per_side: int = 6, scale: int = 3) -> None:
    """Two models side by side: one row per prompt, `per_side` samples of each, a title over each half."""
    cell, pad, label_w, top, gap = ds.RESOLUTION * scale, 2, 300, 16, 16
    half = per_side * (cell + pad)
    grid = Image.new("RGB", (label_w + 2 * half + gap, top + len(left) * (cell + pad)), (255, 255, 255))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for side, title in enumerate(titles):
        draw.text((label_w + side * (half + gap) + 4, 2), title, fill=(0, 0, 0), font=font)
    for r, prompt in enumerate(left):
        y = top + r * (cell + pad)
        draw.text((6, y + cell // 2 - 6), prompt, fill=(0, 0, 0), font=font)
        for side, images in enumerate((left[prompt], right[prompt])):
            for c, im in enumerate(images[:per_side]):
                tile = Image.fromarray(im).resize((cell, cell), Image.Resampling.NEAREST)
                grid.paste(tile, (label_w + side * (half + gap) + c * (cell + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_section(result: dict, command: str) -> str:
    """The quality part of docs/builtin-model.md, between the markers."""
    zs, main = result["clip_zero_shot"], result["diffusion"]
    lines = [
        DOC_START,
        f"Measured with `{command}` ({result['seconds']:.0f} s on {result['machine']}).",
        "",
        "**Tiny CLIP, zero-shot on rendered images.** Joint: argmax over the 21 captions "
        "\"a {colour} {shape}\", colour and shape read from the winner. Shape captions: argmax over "
        "\"a circle\" / \"a square\" / \"a triangle\".",
        "",
        "| images | colour acc (joint) | shape acc (joint) | both (joint) | shape acc (shape captions) "
        "| joint colour + shape-caption shape |",
        "|---|---|---|---|---|---|",
    ]
    for split in ("heldout", "train"):
        z = zs[split]
        lines.append(f"| {z['images']} {split} | {_pct(z['colour_acc'])} | {_pct(z['shape_acc'])} | "
                     f"{_pct(z['both_acc'])} | {_pct(z['shape_acc_shape_captions'])} | "
                     f"{_pct(z['both_acc_shape_captions'])} |")
    lines += [
        "",
        f"**Tiny diffusion model**, {main['num_per_prompt']} samples per held-out prompt, guidance "
        f"{main['guidance']}, {main['steps']} DDIM steps (eta 0, seeds fixed). Columns are the fraction of "
        "samples showing the prompt's attribute, by judge: CLIP = tiny CLIP joint argmax; CLIP tmpl = shape "
        "from the shape captions (colour still joint); pixel = median foreground colour nearest to the palette / "
        "nearest rendered shape of the same area and centroid / border colour; retrieval = the tiny CLIP ranks "
        "the sample's own prompt first among the 12 prompts.",
        "",
        "| prompt | CLIP colour | CLIP shape | CLIP colour+shape | CLIP tmpl shape | CLIP tmpl colour+shape "
        "| pixel colour | pixel shape | pixel background | CLIP colour+shape and pixel colour | retrieval |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in [*main["per_prompt"], {"prompt": "**mean**", **main["mean"]}]:
        lines.append(f"| {row['prompt']} | " + " | ".join(_pct(row[k]) for k in METRICS) + " |")
    lines += ["", "**Guidance sweep** (same prompts and seeds, "
              f"{result['sweep'][0]['num_per_prompt'] if result['sweep'] else 0} samples per prompt):", "",
              "| guidance | CLIP colour+shape | CLIP tmpl colour+shape | pixel colour | pixel shape "
              "| pixel background | retrieval |",
              "|---|---|---|---|---|---|---|"]
    for s in result["sweep"]:
        m = s["mean"]
        lines.append(f"| {s['guidance']} | {_pct(m['clip_both'])} | {_pct(m['clip_both_tmpl'])} | "
                     f"{_pct(m['pixel_colour'])} | "
                     f"{_pct(m['pixel_shape'])} | {_pct(m['pixel_background'])} | {_pct(m['prompt_retrieval'])} |")
    lines += ["", "![samples](builtin-grid.png)", "", DOC_END]
    return "\n".join(lines)


def write_doc(path: Path, section: str, markers: tuple[str, str] = (DOC_START, DOC_END)) -> None:
    """Replace the section between `markers` in the doc (or append it)."""
    start, end = markers
    text = path.read_text() if path.exists() else "# The built-in tiny model\n\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


MODELS = (TINY_NAME, TINY_FLOW_NAME)


def _parser() -> argparse.ArgumentParser:
    """Flags of both measurements; the model's dagcli.json gives guidance and steps unless stated."""
    p = argparse.ArgumentParser(prog="python tools/quality.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default=TINY_NAME,
                   help="tiny: the DDIM model and the tiny CLIP; tiny-flow: the rectified-flow model, with tiny beside")
    p.add_argument("--num-per-prompt", type=int, default=64)
    p.add_argument("--guidance", type=float, default=None, help="default: the model's dagcli.json")
    p.add_argument("--steps", type=int, default=None, help="default: the model's dagcli.json")
    p.add_argument("--sweep", type=str, default=None,
                   help="guidance values for the sweep ('' for none; default 1,3,6,9, for tiny-flow 1,3,4.5,6)")
    p.add_argument("--shift-sweep", type=str, default="0.5,1,2,3",
                   help="tiny-flow: scheduler shifts tried at the default guidance ('' for none)")
    p.add_argument("--sde-sweep", type=_step_eta_pairs, default="10:0.35,10:0.5,20:0.7",
                   help="tiny-flow: steps:eta pairs of the SDE set beside the ODE at the same steps, with all "
                        "samples per prompt ('' for none)")
    p.add_argument("--sampler", choices=("sde", "ddim"), default="sde",
                   help="tiny-flow: the stochastic sampler set beside the ODE (ddim: DDIM for rectified flow)")
    p.add_argument("--eta", type=float, default=None,
                   help="tiny-flow: its noise level (default: the model's training eta for sde, 1 for ddim)")
    p.add_argument("--sweep-num", type=int, default=16, help="samples per prompt in the guidance and shift sweeps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sd-dir", type=Path, default=TINY_SD_DIR)
    p.add_argument("--clip-dir", type=Path, default=TINY_CLIP_DIR)
    p.add_argument("--json", type=Path, default=None,
                   help="default benchmarks/results/builtin_quality.json (tiny-flow: builtin_flow_quality.json)")
    p.add_argument("--doc", type=Path, default=Path("docs/builtin-model.md"))
    p.add_argument("--grid", type=Path, default=None,
                   help="default docs/builtin-grid.png (tiny-flow: docs/builtin-flow-grid.png)")
    p.add_argument("--no-write", action="store_true", help="print the JSON only")
    return p


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point."""
    args = _parser().parse_args(argv)
    command = ("python tools/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == TINY_FLOW_NAME:
        return flow_main(args, command)
    return tiny_main(args, command)


def tiny_main(args: argparse.Namespace, command: str) -> dict:
    """Measure the tiny DDIM model and the tiny CLIP; write the JSON, the doc section and the grid."""
    args.sweep = "1,3,6,9" if args.sweep is None else args.sweep
    args.json = args.json or Path("benchmarks/results/builtin_quality.json")
    args.grid = args.grid or Path("docs/builtin-grid.png")
    t0 = time.time()
    meta = load_metadata(args.sd_dir)
    guidance = meta["default_guidance"] if args.guidance is None else args.guidance
    steps = meta["default_steps"] if args.steps is None else args.steps
    pipe, clip = load_pipeline(args.sd_dir), load_clip(args.clip_dir)
    prompts = ds.heldout_captions()
    zero_shot = {"heldout": clip_zero_shot(clip, split="heldout"), "train": clip_zero_shot(clip, split="train")}
    print("clip zero-shot", json.dumps(zero_shot), flush=True)
    main_result, samples = evaluate_model(pipe, clip, prompts, args.num_per_prompt, guidance, steps, args.seed)
    print("diffusion", json.dumps(main_result["mean"]), flush=True)
    sweep = []
    for g in [float(v) for v in args.sweep.split(",") if v.strip()]:
        res, _ = evaluate_model(pipe, clip, prompts, args.sweep_num, g, steps, args.seed)
        res.pop("per_prompt")
        sweep.append(res)
        print(f"sweep guidance {g}", json.dumps(res["mean"]), flush=True)
    result = {
        "command": command, "scheduler": "DDIMScheduler (shipped config), eta 0",
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "clip_zero_shot": zero_shot, "diffusion": main_result, "sweep": sweep,
        "seconds": round(time.time() - t0, 1),
    }
    if not args.no_write:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        write_doc(args.doc, markdown_section(result, result["command"]))
        make_grid(samples, args.grid)
    print(json.dumps({"seconds": result["seconds"], "zero_shot": zero_shot, "mean": main_result["mean"]}))
    return result


# ----------------------------------------------------------------------------------------------------------
# tiny-flow: sampled through dagcli's own family and sampler (Euler ODE at eta 0, the exact SDE above), with the
# tiny model measured beside it on the same prompts, seeds and judges

FLOW_DOC = ("<!-- quality-flow:start -->", "<!-- quality-flow:end -->")
SUMMARY = ("clip_colour", "clip_both", "clip_both_tmpl", "pixel_colour", "pixel_shape", "pixel_background",
           "prompt_retrieval")
TARGETS = {"clip_colour": ("CLIP colour", 0.97), "clip_both": ("CLIP colour+shape", 0.85),
           "pixel_background": ("pixel background", 0.95)}  # metric -> (name, lower bound) for the ODE


def generate_flow(model, prompt: str, n: int, guidance: float, steps: int, eta: float, seed: int,
                  batch: int = 64) -> np.ndarray:
    """`n` samples of one prompt through dagcli's sampler, uint8 (n, 32, 32, 3); image k uses seed `seed + k`."""
    from dagcli.sampling import generators_for, sample_batch

    out = []
    for start in range(0, n, batch):
        k = min(batch, n - start)
        traj = sample_batch(model, [prompt] * k, generators_for(range(seed + start, seed + start + k)),
                            steps=steps, guidance=guidance, eta=eta)
        out.append((traj.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    return np.concatenate(out)


def set_shift(model, shift: float) -> float:
    """Give the loaded flow model's scheduler another sigma shift; returns the previous one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    before = float(model.pipe.scheduler.config.shift)
    model.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.pipe.scheduler.config, shift=shift)
    return before


@dataclass(frozen=True)
class FlowRun:
    """One sampler setting of tiny-flow: Euler ODE (eta 0) or the SDE (eta > 0)."""

    guidance: float
    steps: int
    eta: float
    shift: float
    sampler: str = "sde"  # the stochastic step: "sde" or "ddim" (`sampling.sampler`)

    def label(self) -> str:
        kind = "Euler ODE" if self.eta == 0 else f"{self.sampler.upper()} eta {self.eta}"
        return f"tiny-flow, {kind}, {self.steps} steps, guidance {self.guidance}, shift {self.shift}"


def evaluate_flow(model, clip: TinyClip, prompts: list[str], n: int, run: FlowRun, seed: int
                  ) -> tuple[dict, dict[str, np.ndarray]]:
    """tiny-flow's samples for one setting, judged per prompt."""
    from dagcli.families import set_sampler

    before = set_shift(model, run.shift)
    set_sampler(model.family, run.sampler, run.eta)
    try:
        result, samples = evaluate_with(
            lambda p, k, s: generate_flow(model, p, k, run.guidance, run.steps, run.eta, s), clip, prompts, n, seed)
    finally:
        set_shift(model, before)
        set_sampler(model.family, "sde")
    return {"label": run.label(), "guidance": run.guidance, "steps": run.steps, "eta": run.eta,
            "shift": run.shift, "sampler": run.sampler, **result}, samples


def _values(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _step_eta_pairs(text: str) -> list[tuple[int, float]]:
    """'10:0.35,20:0.7' -> [(10, 0.35), (20, 0.7)]; a malformed item is a usage error naming it."""
    pairs = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        steps, _, eta = item.partition(":")
        try:
            pair = (int(steps), float(eta))
            ok = pair[0] >= 1 and 0 < pair[1] < 10
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"{item!r}: want steps:eta, e.g. 10:0.35 (steps >= 1, 0 < eta < 10)")
        pairs.append(pair)
    return pairs


def sde_gaps(model, clip: TinyClip, prompts: list[str], n: int, main: tuple[dict, dict], pairs: list[tuple[int, float]],
             guidance: float, shift: float, seed: int) -> list[dict]:
    """The SDE's colour+shape against the ODE's at the same number of steps, for the main setting and each
    (steps, eta) pair; an ODE at other step counts is sampled once per count."""
    ode, sde = main
    odes = {ode["steps"]: ode}
    rows = [(ode["steps"], sde)]
    for steps, eta in pairs:
        if steps not in odes:
            odes[steps] = evaluate_flow(model, clip, prompts, n, FlowRun(guidance, steps, 0.0, shift), seed)[0]
        rows.append((steps, evaluate_flow(model, clip, prompts, n, FlowRun(guidance, steps, eta, shift), seed)[0]))
    return [{"steps": k, "eta": r["eta"], "num_per_prompt": n, "ode": odes[k]["mean"], "sde": r["mean"]}
            for k, r in rows]


def flow_main(args: argparse.Namespace, command: str) -> dict:
    """Measure tiny-flow (ODE and SDE) with tiny beside it; write the JSON, the doc section and the grid."""
    from dagcli.models import load_model, model_defaults

    t0 = time.time()
    defaults = model_defaults(TINY_FLOW_NAME)
    guidance = defaults.guidance if args.guidance is None else args.guidance
    steps = defaults.sample_steps if args.steps is None else args.steps
    model, clip = load_model(TINY_FLOW_NAME, device="cpu"), load_clip(args.clip_dir)
    shift = float(model.pipe.scheduler.config.shift)
    prompts, n = ds.heldout_captions(), args.num_per_prompt
    ode, samples = evaluate_flow(model, clip, prompts, n, FlowRun(guidance, steps, 0.0, shift), args.seed)
    eta = args.eta if args.eta is not None else (1.0 if args.sampler == "ddim" else defaults.eta)
    sde, _ = evaluate_flow(model, clip, prompts, n, FlowRun(guidance, steps, eta, shift, args.sampler), args.seed)
    tiny_pipe, tiny_meta = load_pipeline(args.sd_dir), load_metadata(args.sd_dir)
    tiny_runs = [evaluate_model(tiny_pipe, clip, prompts, n, tiny_meta["default_guidance"], k, args.seed)
                 for k in sorted({steps, tiny_meta["default_steps"]})]
    tiny, tiny_samples = [r for r, _ in tiny_runs], tiny_runs[-1][1]  # samples at tiny's default steps
    for r in (ode, sde, *tiny):
        print(r.get("label", f"tiny {r['steps']} steps"), json.dumps(r["mean"]), flush=True)
    sweeps = {"guidance": [FlowRun(g, steps, 0.0, shift) for g in _values(args.sweep or "1,3,4.5,6")],
              "shift": [FlowRun(guidance, steps, 0.0, s) for s in _values(args.shift_sweep)]}
    swept = {name: [_summary(evaluate_flow(model, clip, prompts, args.sweep_num, r, args.seed)[0]) for r in runs]
             for name, runs in sweeps.items()}
    gaps = sde_gaps(model, clip, prompts, n, (ode, sde), args.sde_sweep, guidance, shift, args.seed)
    result = {
        "command": command, "prompt_seeds": "seed + 1000 * prompt index + sample index",
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "ode": ode, "sde": sde, "tiny": tiny, "sweeps": swept, "sde_gaps": gaps, "seconds": round(time.time() - t0, 1),
    }
    if not args.no_write:
        out = args.json or Path("benchmarks/results/builtin_flow_quality.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        grid = args.grid or Path("docs/builtin-flow-grid.png")
        write_doc(args.doc, flow_markdown(result, grid.name), FLOW_DOC)
        make_pair_grid(tiny_samples, samples, grid, (f"tiny: DDIM, {tiny[-1]['steps']} steps",
                                                     f"tiny-flow: Euler ODE, {steps} steps"))
    print(json.dumps({"seconds": result["seconds"], "ode": ode["mean"], "sde": sde["mean"]}))
    return result


def _summary(result: dict) -> dict:
    """A run without its per-prompt rows."""
    return {k: v for k, v in result.items() if k != "per_prompt"}


def _summary_row(label: str, mean: dict) -> str:
    return f"| {label} | " + " | ".join(_pct(mean[k]) for k in SUMMARY) + " |"


def flow_markdown(result: dict, grid_name: str) -> str:
    """The tiny-flow quality part of docs/builtin-model.md, between the FLOW_DOC markers."""
    ode, sde, n = result["ode"], result["sde"], result["ode"]["num_per_prompt"]
    head = ("| model, sampler | CLIP colour | CLIP colour+shape | CLIP tmpl colour+shape | pixel colour | pixel shape "
            "| pixel background | retrieval |\n|---|---|---|---|---|---|---|---|")
    lines = [FLOW_DOC[0], f"Measured with `{result['command']}` ({result['seconds']:.0f} s on {result['machine']}).",
             "", f"{n} samples per held-out prompt, the same seeds for every row (`{result['prompt_seeds']}`), "
             "judged as above. tiny-flow is sampled through dagcli's own family and sampler.", "", head,
             _summary_row(ode["label"], ode["mean"]), _summary_row(sde["label"], sde["mean"])]
    lines += [_summary_row(f"tiny, DDIM eta 0, {t['steps']} steps, guidance {t['guidance']}", t["mean"])
              for t in result["tiny"]]
    lines += ["", "**Per prompt** (CLIP colour+shape / pixel background):", "",
              "| prompt | tiny-flow ODE | tiny-flow SDE | " + " | ".join(f"tiny {t['steps']} steps" for t in result["tiny"])
              + " |", "|---|---|---|" + "---|" * len(result["tiny"])]
    rows = zip(ode["per_prompt"], sde["per_prompt"], *(t["per_prompt"] for t in result["tiny"]), strict=True)
    for cells in rows:
        lines.append(f"| {cells[0]['prompt']} | " + " | ".join(
            f"{_pct(c['clip_both'])} / {_pct(c['pixel_background'])}" for c in cells) + " |")
    lines += _flow_targets(ode, sde) + _flow_sde_gaps(result["sde_gaps"]) + _flow_sweeps(result["sweeps"])
    lines += ["", f"![tiny-flow samples]({grid_name})", "", FLOW_DOC[1]]
    return "\n".join(lines)


def _flow_targets(ode: dict, sde: dict) -> list[str]:
    """The targets, checked against the numbers above."""
    lines = ["", f"**Against the targets** ({ode['steps']} steps, guidance {ode['guidance']}):", "",
             "| target | measured | met? |", "|---|---|---|"]
    for key, (name, bound) in TARGETS.items():
        value = ode["mean"][key]
        lines.append(f"| ODE {name} >= {_pct(bound)} | {_pct(value)} | {'yes' if value >= bound else 'no'} |")
    for key in ("clip_colour", "clip_both"):
        gap = sde["mean"][key] - ode["mean"][key]
        lines.append(f"| SDE (eta {sde['eta']}) {TARGETS[key][0]} within 5 points of the ODE | "
                     f"{100 * gap:+.1f} points | {'yes' if abs(gap) <= 0.05 else 'no'} |")
    return lines


def _flow_sde_gaps(gaps: list[dict]) -> list[str]:
    """The SDE beside the ODE at the same number of steps, for several steps and noise levels."""
    if len(gaps) < 2:
        return []
    lines = ["", f"**The SDE beside the ODE by steps and noise level** (same prompts and seeds, "
             f"{gaps[0]['num_per_prompt']} samples per prompt; the first row is the one above):", "",
             "| steps | eta | ODE colour | SDE colour | ODE colour+shape | SDE colour+shape | gap (points) |",
             "|---|---|---|---|---|---|---|"]
    for g in gaps:
        ode, sde = g["ode"], g["sde"]
        lines.append(f"| {g['steps']} | {g['eta']} | {_pct(ode['clip_colour'])} | {_pct(sde['clip_colour'])} | "
                     f"{_pct(ode['clip_both'])} | {_pct(sde['clip_both'])} | "
                     f"{100 * (sde['clip_both'] - ode['clip_both']):+.1f} |")
    return lines


def _flow_sweeps(sweeps: dict) -> list[str]:
    """The guidance and shift sweeps (Euler ODE)."""
    lines = []
    for name, runs in sweeps.items():
        if not runs:
            continue
        lines += ["", f"**{name.capitalize()} sweep** (Euler ODE, {runs[0]['num_per_prompt']} samples per prompt):",
                  "", f"| {name} | CLIP colour | CLIP colour+shape | CLIP tmpl colour+shape | pixel colour "
                  "| pixel shape | pixel background | retrieval |", "|---|---|---|---|---|---|---|---|"]
        lines += [_summary_row(str(r[name]), r["mean"]) for r in runs]
    return lines


if __name__ == "__main__":
    main()
