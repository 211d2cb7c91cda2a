"""Performance of dagcli's sampling and DAG-DB training, as ratios against baselines measured in the same process.

    python benchmarks/perf.py --quick                 # CPU, tiny-random model, a few minutes
    python benchmarks/perf.py --device cuda --model sd15-random --dtype bf16 --steps 20 --batch 8

Every comparison alternates its variants (A B, B A, ...) and reports medians, so a noisy shared machine
shifts both sides alike. Results go to JSON (default benchmarks/results/perf-<device>.json), written after
each section so a run stopped early keeps what it measured, and a text table goes to stdout.

Sections:
  sampling  our `sample_batch` (recording states, log-probs and ε) vs diffusers' `StableDiffusionPipeline`
            call with the same model, batch, steps, guidance and η = 1; our per-step time vs one guided UNet
            forward ([uncond; cond] in one call on the same batch).
  levers    prompt-embedding cache, guided batch in one call vs two, SDPA vs classic attention, channels-last,
            bf16 vs fp32 weights (GPU), torch.compile (GPU, optional).
  training  DAG-DB with x0_source = "sampling" (forward-looking rewards once per state, from the ε recorded
            while sampling) vs "current" (x̂0 of both states recomputed with the current UNet, decoded and
            scored per trained transition): loss agreement, full epochs, per-transition cost vs one guided
            UNet forward+backward, gradient checkpointing, micro-batch sizes, peak memory, MFU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))

PROMPTS = ["a photo of a cat", "a painting of a red house", "a blue bird on a tree", "a small white dog",
           "a landscape with a river", "a yellow flower", "a black horse in a city", "a green mountain"]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense


# --- helpers ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.t_start = time.perf_counter()
        self.results: dict = {"machine": machine(self.device), "args": vars(args), "sections": {}}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def over_budget(self) -> bool:
        return self.args.time_budget > 0 and time.perf_counter() - self.t_start > self.args.time_budget

    def time(self, fn: Callable[[], object]) -> float:
        process = getattr(self.args, "clock", "wall") == "process" and not self.cuda
        clock = time.process_time if process else time.perf_counter
        self.sync()
        t0 = clock()
        fn()
        self.sync()
        return clock() - t0

    def compare(self, variants: dict[str, Callable[[], object]], repeats: int | None = None,
                warmup: int = 1) -> dict[str, float]:
        """Median seconds of each variant, run interleaved (order rotated every repeat) after warm-up."""
        repeats = repeats or self.args.repeats
        names = list(variants)
        for _ in range(warmup):
            for n in names:
                variants[n]()
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            if r % 2:
                order = order[::-1]
            for n in order:
                times[n].append(self.time(variants[n]))
        return {n: statistics.median(v) for n, v in times.items()}

    def peak_memory(self) -> dict:
        out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.cuda:
            out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def section(self, name: str, fn: Callable[[], dict]) -> None:
        if self.over_budget():
            self.results["sections"][name] = {"skipped": "time budget"}
            print(f"[{name}] skipped: time budget", flush=True)
            return
        t0 = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            res = fn()
        except Exception as e:  # one failing section must not lose the others
            import traceback

            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        res["section_seconds"] = round(time.perf_counter() - t0, 2)
        res["memory_after"] = self.peak_memory()
        self.results["sections"][name] = res
        self.write()
        print(json.dumps(res, indent=1, default=str), flush=True)

    def write(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.results, indent=1, default=str))


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "transformers", "peft", "accelerate"):
        with contextlib.suppress(Exception):
            info[mod] = __import__(mod).__version__
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    sm_count=p.multi_processor_count)
    return info


def load(args):
    return load_model_at(args.model, args.device, args.dtype, args.resolution)


def load_model_at(name: str, device: str, dtype: str, resolution: int | None):
    """dagcli's `load_model`, or the SD 1.5-shaped random pipeline for "sd15-random", at `resolution` pixels
    (None: the model's own)."""
    if name == "sd15-random":
        from sd15 import load_sd15_random

        model = load_sd15_random(device.split(":")[0], dtype)
    else:
        from dagcli.models import load_model

        model = load_model(name, device=device, dtype=dtype)
    return at_resolution(model, resolution)


def at_resolution(model, resolution: int | None):
    """Make `resolution` (pixels) the model's native size: the UNet's `sample_size` is what every caller reads."""
    if resolution:
        model.pipe.unet.register_to_config(sample_size=resolution // model.pipe.vae_scale_factor)
    return model


def first_call(module: torch.nn.Module, run: Callable[[], object]) -> tuple[tuple, dict]:
    """The (args, kwargs) of the first call that `run()` makes to `module`: the exact guided call to replay."""
    seen: list = []
    handle = module.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((args, kwargs)) or None,
                                              with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")


# --- sampling and levers ---------------------------------------------------------------------------------

def guided_inputs(model, encoder, batch: int):
    pipe = model.pipe
    cond = encoder(PROMPTS[:batch] * (batch // len(PROMPTS) + 1))[:batch]
    uncond = encoder([""]).expand(batch, -1, -1)
    side = model.resolution // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.family.latent_channels, side, side, generator=g).to(model.device, model.dtype)
    t = torch.full((batch,), 500, dtype=torch.long, device=model.device)
    return x, t, cond, uncond


def bench_sampling(b: Bench, model) -> dict:
    from dagcli.families.base import decode_latents
    from dagcli.families.sd import PromptEncoder, guided_unet
    from dagcli.kernels.ddim import Schedule, ddim_step
    from dagcli.kernels.gaussian import initial_noise
    from dagcli.sampling import generators_for, sample_batch

    a, pipe = b.args, model.pipe
    prompts = (PROMPTS * (a.batch // len(PROMPTS) + 1))[: a.batch]
    enc = model.family.encoder  # the family's cached prompt encoder
    gen = model.device.type == "cuda" and "cuda" or "cpu"
    kw = dict(steps=a.steps, guidance=a.guidance, eta=1.0)

    def ours(fresh_cache=False, decode=True):
        if fresh_cache:  # a new encoder: every prompt is encoded again
            model.family.encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, model.device)
        try:
            return sample_batch(model, prompts, generators_for(range(a.batch), gen), decode=decode, **kw)
        finally:
            model.family.encoder = enc

    def plain():  # the same chain with nothing recorded: how much the recording costs
        schedule = Schedule.from_scheduler(pipe.scheduler, a.steps)
        gens = generators_for(range(a.batch), gen)
        side = model.resolution // pipe.vae_scale_factor
        x = initial_noise((a.batch, model.family.latent_channels, side, side), gens, device=model.device)
        denoise = guided_unet(pipe.unet, enc(prompts), enc([""]), a.guidance)
        for t in schedule.timesteps:
            t_b = t.reshape(1).expand(a.batch).to(x.device)
            x = ddim_step(schedule, denoise(x, t_b)[0], t_b, x, 1.0, generator=gens).prev_sample
        return decode_latents(pipe.vae, x)

    def diffusers_call():
        return pipe(prompts, num_inference_steps=a.steps, guidance_scale=a.guidance, eta=1.0,
                    generator=generators_for(range(a.batch), gen), output_type="pt").images

    x, t, cond, uncond = guided_inputs(model, enc, a.batch)
    both, x2, t2 = torch.cat([uncond, cond]), torch.cat([x, x]), torch.cat([t, t])

    def unet_guided():
        return pipe.unet(x2, t2, encoder_hidden_states=both, return_dict=False)[0]

    with torch.no_grad():
        m = b.compare({"ours": ours, "ours_no_recording": plain, "diffusers": diffusers_call,
                       "ours_no_decode": lambda: ours(decode=False), "unet_guided_forward": unet_guided})
        m_cache = b.compare({"cache_on": ours, "cache_off": lambda: ours(fresh_cache=True)})
    per_step = m["ours_no_decode"] / a.steps
    return {
        "batch": a.batch, "steps": a.steps, "guidance": a.guidance, "eta": 1.0,
        "resolution": model.resolution, "seconds": m,
        "images_per_s": {"ours": a.batch / m["ours"], "ours_no_recording": a.batch / m["ours_no_recording"],
                         "diffusers": a.batch / m["diffusers"]},
        "ratio_ours_vs_diffusers_images_per_s": ratio(m["diffusers"], m["ours"]),
        "ratio_recording_overhead": ratio(m["ours"], m["ours_no_recording"]),
        "per_step_seconds": per_step,
        "ratio_per_step_vs_guided_unet_forward": ratio(per_step, m["unet_guided_forward"]),
        "prompt_cache": {"seconds": m_cache, "speedup_cache_on": ratio(m_cache["cache_off"], m_cache["cache_on"])},
    }


def bench_levers(b: Bench, model) -> dict:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    a, unet = b.args, model.pipe.unet
    enc = model.family.encoder
    x, t, cond, uncond = guided_inputs(model, enc, a.batch)
    both, x2, t2 = torch.cat([uncond, cond]), torch.cat([x, x]), torch.cat([t, t])
    out: dict = {}

    def fwd(xx=x2, tt=t2, hh=both):
        return unet(xx, tt, encoder_hidden_states=hh, return_dict=False)[0]

    def two_calls():
        return torch.cat([fwd(x, t, uncond), fwd(x, t, cond)])

    with torch.no_grad():
        m = b.compare({"one_call": fwd, "two_calls": two_calls})
        out["guided_one_call_vs_two"] = {"seconds": m, "speedup_one_call": ratio(m["two_calls"], m["one_call"])}

        unet.set_attn_processor(AttnProcessor())
        classic = b.compare({"classic": fwd})["classic"]
        unet.set_attn_processor(AttnProcessor2_0())
        sdpa = b.compare({"sdpa": fwd})["sdpa"]
        classic2 = None
        if not b.over_budget():  # second classic run after SDPA: an A B A order
            unet.set_attn_processor(AttnProcessor())
            classic2 = b.compare({"classic": fwd})["classic"]
            unet.set_attn_processor(AttnProcessor2_0())
        c = statistics.median([classic, classic2]) if classic2 else classic
        out["attention_sdpa_vs_classic"] = {"seconds": {"sdpa": sdpa, "classic": c},
                                            "speedup_sdpa": ratio(c, sdpa)}

        unet.to(memory_format=torch.channels_last)
        cl = b.compare({"channels_last": fwd})["channels_last"]
        unet.to(memory_format=torch.contiguous_format)
        cf = b.compare({"contiguous": fwd})["contiguous"]
        out["channels_last"] = {"seconds": {"channels_last": cl, "contiguous": cf},
                                "speedup_channels_last": ratio(cf, cl)}

        if b.cuda and model.dtype != torch.float32:
            low = b.compare({"low": fwd})["low"]
            dt = model.dtype
            unet.to(torch.float32)
            f32 = b.compare({"fp32": lambda: fwd(x2.float(), t2, both.float())})["fp32"]
            unet.to(dt)
            out["bf16_vs_fp32_weights"] = {"seconds": {"bf16": low, "fp32_tf32": f32},
                                           "speedup_bf16": ratio(f32, low)}
        else:
            out["bf16_vs_fp32_weights"] = "n/a (CPU, or the model is already fp32 on GPU)"

    out["batch_guided"] = 2 * a.batch
    return out


def bench_compile(b: Bench, model) -> dict:
    """torch.compile of the UNet (GPU only): compile time and the guided forward's speed-up."""
    a = b.args
    if not b.cuda or not a.compile:
        return {"torch_compile": "n/a (GPU only)" if not b.cuda else "skipped (--compile not given)"}
    unet = model.pipe.unet
    enc = model.family.encoder
    x, t, cond, uncond = guided_inputs(model, enc, a.batch)
    both, x2, t2 = torch.cat([uncond, cond]), torch.cat([x, x]), torch.cat([t, t])
    with torch.no_grad():
        try:
            base = b.compare({"eager": lambda: unet(x2, t2, encoder_hidden_states=both, return_dict=False)})
            t0 = time.perf_counter()
            compiled = torch.compile(unet)
            compiled(x2, t2, encoder_hidden_states=both, return_dict=False)
            b.sync()
            compile_s = time.perf_counter() - t0
            comp = b.compare({"compiled": lambda: compiled(x2, t2, encoder_hidden_states=both, return_dict=False)})
            return {"torch_compile": {"seconds": {"eager": base["eager"], "compiled": comp["compiled"]},
                                      "compile_seconds": compile_s,
                                      "speedup_compile": ratio(base["eager"], comp["compiled"])}}
        except Exception as e:
            return {"torch_compile": f"failed: {type(e).__name__}: {str(e)[:200]}"}


# --- training ---------------------------------------------------------------------------------------------

def random_tiny_decoder(latent_channels: int) -> str:
    """A folder holding a randomly initialised `AutoencoderTiny` (TAESD's architecture) for `latent_channels`-channel
    latents, so the trainer loads it through `dag.x0_decoder` exactly as it would a downloaded one."""
    from diffusers import AutoencoderTiny

    folder = tempfile.mkdtemp(prefix="dagcli-perf-taesd-")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderTiny(latent_channels=latent_channels).save_pretrained(folder, safe_serialization=True)
    return folder


def x0_decoder_folder(a, latent_channels: int) -> str:
    """`--x0-decoder`: "" (none), "random" (built here) or a folder / hub id."""
    return random_tiny_decoder(latent_channels) if a.x0_decoder == "random" else a.x0_decoder


def make_trainer(b: Bench, micro_batch: int, algorithm: str = "dag-db"):
    """A one-epoch trainer at the benchmark's shapes; `algorithm` an algorithm's name or an `ALGORITHM_VARIANTS` row."""
    from dagcli.config import Config, replace
    from dagcli.trainer import Trainer

    algorithm, settings = ALGORITHM_VARIANTS.get(algorithm, (algorithm, {}))
    a = b.args
    cfg = Config()
    cfg = replace(cfg, "model", name=a.model, device=a.device, dtype=a.dtype)
    cfg = replace(cfg, "sampling", steps=a.steps, guidance=a.guidance, eta=1.0, batch_size=a.batch,
                  batches_per_epoch=1, prompts="simple_animals")
    cfg = replace(cfg, "reward", spec=a.reward)
    n_micro = -(-a.batch * a.steps // micro_batch)
    cfg = replace(cfg, "train", batch_size=micro_batch, gradient_accumulation_steps=n_micro,
                  mixed_precision="bf16" if b.cuda and a.dtype == "bf16" else "no", epochs=1, algorithm=algorithm)
    cfg = replace(cfg, "grpo", group_size=2)  # groups of 2 for the group-normalised algorithms (even batches)
    cfg = replace(cfg, "nft", group_size=2)
    cfg = replace(cfg, "rtb", group_size=2)
    cfg = replace(cfg, "dag", beta=1.0, beta_ramp_epochs=0, x0_source="sampling", x0_guidance="cond")
    cfg = replace(cfg, "output", dir=tempfile.mkdtemp(prefix="dagcli-perf-"), checkpoint_minutes=0.0)
    for section, values in settings.items():
        cfg = replace(cfg, section, **values)
    model = load_model_at(a.model, a.device, a.dtype, a.resolution)
    if a.x0_decoder:
        cfg = replace(cfg, "dag", x0_decoder=x0_decoder_folder(a, model.family.latent_channels))
    trainer = Trainer(cfg, PROMPTS, model=model)
    return trainer, cfg, trainer.rollout.x0_vae


@contextlib.contextmanager
def x0_decoder(trainer, decoder):
    """Decode the x̂0 images with `decoder` (None: the model's VAE) inside the block."""
    before, trainer.rollout.x0_vae = trainer.rollout.x0_vae, decoder
    try:
        yield
    finally:
        trainer.rollout.x0_vae = before


@contextlib.contextmanager
def timestep_fraction(trainer, fraction: float, every_state: bool = False):
    """Train a `fraction` of each trajectory's transitions inside the block; with `every_state`, the x̂0 of every
    state is decoded and scored anyway (what the rollout did before it decoded only the trained transitions')."""
    import dagcli.rollout as rollout_module
    from dagcli.config import replace

    config, needed = trainer.config, rollout_module.states_needed
    trainer.config = replace(config, "train", timestep_fraction=fraction)
    if every_state:
        rollout_module.states_needed = lambda pairs, n, steps: torch.ones(n, steps, dtype=torch.bool)
    try:
        yield
    finally:
        trainer.config, rollout_module.states_needed = config, needed


class AlgorithmVariants:
    """The run's DAG algorithm (x̂0 rewards stored while sampling) and the reference variant (x̂0 of both states
    from the current model), sharing one flow network; `use(name, fn)` runs fn with one of them."""

    def __init__(self, trainer, cfg):
        from dagcli.algorithms import build_algorithm
        from dagcli.config import replace

        self.trainer = trainer
        current = build_algorithm(cfg.train.algorithm, replace(cfg, "dag", x0_source="current"), trainer.context)
        current.modules = trainer.algorithm.modules
        self.variants = {"sampling": trainer.algorithm, "current": current}

    def use(self, name: str, fn):
        def run():
            self.trainer.algorithm = self.variants[name]
            try:
                return fn()
            finally:
                self.trainer.algorithm = self.variants["sampling"]
        return run


# each ratio: (algorithm, its baseline) on the same samples budget
ALGORITHM_RATIOS = (("dag-rdb", "dag-db"), ("rtb", "grpo"), ("rtb-x0-expected", "grpo"), ("rtb-flow-expected", "grpo"),
                    ("nft", "grpo"))
# a row's name -> its algorithm and settings over `make_trainer`'s: rtb as the exact-target runs train it (each
# trained state's x̂0 scored by the reward for its baseline, the later steps' log ratios by their Gaussian KL)
ALGORITHM_VARIANTS = {"rtb-x0-expected": ("rtb", {"rtb": {"credit": "to-go-x0", "log_ratio": "expected"}}),
                      # and with the learned critic (its warm-up off: the LoRA trains in every timed epoch)
                      "rtb-flow-expected": ("rtb", {"rtb": {"credit": "to-go-flow", "log_ratio": "expected",
                                                            "flow_warmup_epochs": 0}})}


def bench_algorithms(b: Bench) -> dict:
    """Each algorithm's epoch against its baseline's on the same samples budget (the same trajectories, sampler and
    micro-batches): dag-rdb against DAG-DB (the same transitions; one more forward of the base model each),
    rtb and NFT against GRPO (rtb: the same stored transitions after a no-grad pass of the policy and the base
    model over every step; NFT: steps · timestep_fraction re-noised copies of each final sample). Sampling +
    rewards, training and their sum are timed per epoch, each algorithm's epochs interleaved with its baseline's
    (one pair in memory at a time, each ratio of the pair's own medians), `epoch_repeats` times after one warm-up
    epoch each; with the trajectories per epoch equal, the ratio of training times is
    the ratio per trained transition and the ratio of epochs the ratio per trajectory."""
    import gc

    from dagcli.algorithms.base import hook

    a, mb = b.args, b.args.train_batches[0]
    out: dict = {"micro_batch": mb, "trajectories_per_epoch": a.batch, "steps": a.steps, "items_per_epoch":
                 a.batch * a.steps}
    for name, base in ALGORITHM_RATIOS:  # two trainers at a time: SD 1.5's shapes hold 4-5 GB each
        if name not in a.pairs:
            continue
        trainers = {}
        for n in (base, name):
            trainer, _, _ = make_trainer(b, mb, algorithm=n)
            trainer.rollout.x0_vae = None
            trainers[n] = trainer
        times = {n: {"collect": [], "train": []} for n in trainers}
        for epoch in range(a.epoch_repeats + 1):  # the first epoch warms up
            for n, trainer in trainers.items():
                t0 = time.perf_counter()
                batch, _ = trainer.collect(epoch)
                b.sync()
                t1 = time.perf_counter()
                trainer.train_epoch(epoch, batch)
                hook(trainer.algorithm, "end_epoch")(trainer.raw_denoiser, trainer.state.optimizer_steps)
                b.sync()
                if epoch:
                    times[n]["collect"].append(t1 - t0)
                    times[n]["train"].append(time.perf_counter() - t1)
        del trainers
        gc.collect()
        pair = {n: {k: statistics.median(v) for k, v in times[n].items()} for n in (base, name)}
        for n, medians in pair.items():  # a baseline measured beside two algorithms keeps its first measurement
            medians["epoch"] = medians["collect"] + medians["train"]
            out.setdefault(n, {k: round(v, 4) for k, v in medians.items()})
        out[f"{name.replace('-', '_')}_over_{base.replace('-', '_')}"] = {
            k: ratio(pair[name][k], pair[base][k]) for k in ("collect", "train", "epoch")}
    return out


def bench_training(b: Bench) -> dict:
    a = b.args
    mb = a.train_batches[0]
    trainer, cfg, small = make_trainer(b, mb)
    trainer.rollout.x0_vae = None  # the model's VAE unless a measure asks for the small decoder
    variants = AlgorithmVariants(trainer, cfg)
    out: dict = {"micro_batch": mb, "trajectories_per_epoch": a.batch, "steps": a.steps,
                 "transitions_per_epoch": a.batch * a.steps, "reward": a.reward,
                 "mixed_precision": cfg.train.mixed_precision}
    b.reset_peak()
    batch, _ = trainer.collect(0)
    pairs = batch.pairs
    idx = pairs[:mb]
    batch_c = dataclasses.replace(batch, fl_rewards=None)

    # 1. agreement before any optimiser step: both x̂0 sources give the same per-transition losses
    with torch.no_grad():
        loss_s, _ = trainer.micro_batch_loss(batch, idx, 0)
        loss_c, _ = variants.use("current", lambda: trainer.micro_batch_loss(batch_c, idx, 0))()
    diff, scale = float((loss_s.float() - loss_c.float()).abs().max()), float(loss_s.float().abs().max())
    out["loss_agreement"] = {"max_abs_diff": diff, "max_abs_loss": scale, "max_rel_diff": diff / max(scale, 1e-30),
                             "transitions": len(idx), "target": 1e-5}
    out["per_transition"] = per_transition(b, trainer, variants, batch, batch_c, idx, len(pairs), small)
    if b.over_budget():
        return out

    # 3. full epochs (collect + train), alternating the two sources, at each timestep fraction (and with the
    # small x̂0 decoder at the first fraction)
    out["epochs_by_fraction"] = {}
    for fraction in a.fractions:
        if b.over_budget():
            break
        out["epochs_by_fraction"][str(fraction)] = epoch_ratios(b, trainer, variants, fraction)
    if str(1.0) in out["epochs_by_fraction"]:
        out["epochs"] = out["epochs_by_fraction"][str(1.0)]
    if small is not None and not b.over_budget():
        with x0_decoder(trainer, small):
            out["epochs_small_decoder"] = epoch_ratios(b, trainer, variants, a.fractions[0], compare_all=False)
    out["memory"] = b.peak_memory()
    if "overlap" in a.sections.split(",") and not b.over_budget():
        out["overlap_rewards"] = (overlap_rewards(b, trainer, cfg) if a.clock == "wall" or b.cuda else
                                  {"speedup_overlap": "n/a (--clock process counts both threads' CPU time)"})
    # 5. micro-batch sizes x gradient checkpointing: transitions/s (loss + backward + optimiser step), memory
    if a.train_sweep:
        out["sweep"] = train_sweep(b, trainer, batch, pairs)
    return out


def epoch_ratios(b: Bench, trainer, variants, fraction: float, compare_all: bool = True) -> dict:
    """Trained transitions/s of full epochs (collect + train) with x̂0 from sampling vs recomputed (the reference
    procedure) at a timestep fraction; below 1 also ours decoding every state's x̂0, not only the trained ones'."""
    from dagcli.config import transitions_per_trajectory

    a = b.args
    n = a.batch * transitions_per_trajectory(a.steps, fraction)

    def epoch():
        trainer.train_epoch(0, trainer.collect(0)[0])

    def every_state():
        with timestep_fraction(trainer, fraction, every_state=True):
            epoch()

    runs = {"sampling": epoch, "current": variants.use("current", epoch)}
    if compare_all and fraction < 1:
        runs["sampling_every_state"] = every_state
    with timestep_fraction(trainer, fraction):
        e = b.compare(runs, repeats=a.epoch_repeats, warmup=0)
    res = {"timestep_fraction": fraction, "transitions_trained": n, "seconds": e,
           "transitions_per_s": {k: n / v for k, v in e.items()},
           "ratio_sampling_vs_current": ratio(e["current"], e["sampling"]), "target": 2.0}
    if "sampling_every_state" in e:
        res["ratio_every_state_vs_current"] = ratio(e["current"], e["sampling_every_state"])
        res["speedup_trained_states_only"] = ratio(e["sampling_every_state"], e["sampling"])
    return res


def per_transition(b: Bench, trainer, variants, batch, batch_c, idx, n_trained: int, small=None) -> dict:
    """2. One trained transition (loss + backward) against one forward + backward of the LoRA denoiser on the
    guided micro-batch (the call the loss makes), with the forward-looking decode of every state amortised over the
    transitions trained (by the model's VAE, and by the small x̂0 decoder `small` when given); the reference
    procedure's transition too when `variants` is given."""
    a, traj = b.args, batch.traj
    params = trainer.trainable()

    def zero():
        for p in params:
            p.grad = None

    def step(bt):
        def run():
            loss, _ = trainer.micro_batch_loss(bt, idx, 0)
            loss.mean().backward()
            zero()
        return run

    args, kwargs = first_call(trainer.denoiser, step(batch))  # the guided call the loss makes, replayed

    def ref():
        with trainer.accelerator.autocast():
            y = trainer.denoiser(*args, **kwargs)[0]
        y.float().mean().backward()
        zero()

    def fl_with(decoder):
        def run():
            with x0_decoder(trainer, decoder):
                return trainer.rollout.forward_looking_rewards(traj, "cond")
        return run

    for module in (trainer.denoiser, *trainer.algorithm.modules.values()):
        module.train()
    runs = {"guided_unet_fwd_bwd": ref, "ours_transition": step(batch)}
    if variants is not None:
        runs["current_transition"] = variants.use("current", step(batch_c))
    m = b.compare(runs)
    decoders = {"vae": None} if small is None else {"vae": None, "small_decoder": small}
    with torch.no_grad():
        fl = b.compare({k: fl_with(d) for k, d in decoders.items()}, repeats=max(1, a.repeats // 2))
    per_mb = {k: v * len(idx) / n_trained for k, v in fl.items()}
    out = {
        "seconds": m, "forward_looking_rewards_all_states_seconds": fl["vae"],
        "fl_amortised_per_micro_batch_seconds": per_mb["vae"],
        "ratio_ours_vs_guided_fwd_bwd": ratio(m["ours_transition"] + per_mb["vae"], m["guided_unet_fwd_bwd"]),
        "ratio_ours_vs_guided_fwd_bwd_without_fl": ratio(m["ours_transition"], m["guided_unet_fwd_bwd"]),
        "accounting": "ours = (loss+backward of the micro-batch) + (time of forward_looking_rewards over all "
                      f"{traj.batch_size}x{traj.num_steps} states) x micro_batch / transitions trained per epoch "
                      f"({n_trained})",
    }
    if "current_transition" in m:
        out["ratio_current_vs_guided_fwd_bwd"] = ratio(m["current_transition"], m["guided_unet_fwd_bwd"])
    if small is not None:
        out["small_decoder"] = {
            "forward_looking_rewards_all_states_seconds": fl["small_decoder"],
            "fl_amortised_per_micro_batch_seconds": per_mb["small_decoder"],
            "speedup_fl_vs_vae": ratio(fl["vae"], fl["small_decoder"]),
            "ratio_ours_vs_guided_fwd_bwd": ratio(m["ours_transition"] + per_mb["small_decoder"],
                                                  m["guided_unet_fwd_bwd"]),
            "target": 1.15,
        }
    return out


def overlap_rewards(b: Bench, trainer, cfg) -> dict:
    """4. Rewards overlapped with sampling: the epoch's trajectories in two sampler calls, the first one scored
    (terminal and forward-looking rewards) while the second samples."""
    from dagcli.config import replace
    from dagcli.progress import NullReporter
    from dagcli.rollout import Rollout

    a = b.args
    half = max(1, a.batch // 2)

    def rollout(overlap: bool) -> Rollout:
        settings = replace(cfg, "sampling", batch_size=half, batches_per_epoch=2, overlap_rewards=overlap).sampling
        return Rollout(trainer.model, trainer.reward, settings, seed=cfg.train.seed, prompts=PROMPTS,
                       height=trainer.resolution, width=trainer.resolution, reduction=cfg.train.reduction, rank=0,
                       autocast=trainer.accelerator.autocast, reporter=NullReporter())

    seq, ovl = rollout(False), rollout(True)
    o = b.compare({"sequential": lambda: seq.collect(0, trainer.raw_denoiser, "cond"),
                   "overlapped": lambda: ovl.collect(0, trainer.raw_denoiser, "cond")}, repeats=a.epoch_repeats)
    return {"seconds": o, "speedup_overlap": ratio(o["sequential"], o["overlapped"]), "sampler_calls": 2,
            "batch_per_call": half}


def train_sweep(b: Bench, trainer, batch, pairs) -> list[dict]:
    """Transitions/s (loss + backward + optimiser step) and peak memory at each micro-batch size in
    `--train-batches`, without and with gradient checkpointing; a size that runs out of GPU memory is recorded."""
    a, raw = b.args, trainer.raw_denoiser
    rows = []
    for mb in a.train_batches:
        for gc in (False, True):
            if b.over_budget():
                rows.append({"micro_batch": mb, "gradient_checkpointing": gc, "skipped": "time budget"})
                continue
            raw.enable_gradient_checkpointing() if gc else raw.disable_gradient_checkpointing()
            trainer.denoiser.train()
            try:
                row = sweep_row(b, trainer, batch, pairs, mb)
            except torch.OutOfMemoryError as e:
                trainer.optimizer.zero_grad(set_to_none=True)
                row = {"skipped": f"out of memory: {str(e).splitlines()[0][:160]}"}
                if b.cuda:
                    torch.cuda.empty_cache()
            rows.append({"micro_batch": mb, "gradient_checkpointing": gc, **row})
            print(rows[-1], flush=True)
    raw.disable_gradient_checkpointing()
    return rows


def sweep_row(b: Bench, trainer, batch, pairs, mb: int) -> dict:
    """One micro-batch size: a warm-up step, then `--sweep-micro-batches` timed steps; peak memory of those."""
    micro = [pairs[j: j + mb] for j in range(0, len(pairs) - mb + 1, mb)]
    micro = (micro * (b.args.sweep_micro_batches + 2))[: b.args.sweep_micro_batches + 1]

    def one(idx):
        loss, _ = trainer.micro_batch_loss(batch, idx, 0)
        loss.mean().backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    one(micro[0])  # warm-up
    b.reset_peak()
    secs = b.time(lambda rest=micro[1:]: [one(i) for i in rest])
    out = {"transitions_per_s": mb * (len(micro) - 1) / secs, "seconds_per_micro_batch": secs / (len(micro) - 1),
           **b.peak_memory()}
    if b.cuda:
        out["peak_cuda_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


# --- FLOPs and MFU --------------------------------------------------------------------------------------

def bench_flops(b: Bench, results: dict, model=None) -> dict:
    """UNet FLOPs of one forward (batch 1, counted), and MFU of sampling and training from the measured rates."""
    from torch.utils.flop_counter import FlopCounterMode

    a = b.args
    model = model or load(a)
    enc = model.family.encoder
    x, t, cond, _ = guided_inputs(model, enc, 1)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.pipe.unet(x, t, encoder_hidden_states=cond, return_dict=False)
    f1 = fc.get_total_flops()
    out = {"unet_forward_flops_batch1": f1, "unet_forward_gflops_batch1": f1 / 1e9}
    gpu = results["machine"].get("gpu", "")
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    out["peak_tflops"] = peak
    samp = results["sections"].get("sampling", {})
    if peak and "images_per_s" in samp:
        for k, ips in samp["images_per_s"].items():  # 2 UNet evaluations (uncond, cond) per image and step
            out[f"mfu_sampling_{k}"] = ips * a.steps * 2 * f1 / (peak * 1e12)
    for row in results["sections"].get("training", {}).get("sweep", []) or []:
        if peak and "transitions_per_s" in row:  # forward + backward ≈ 3 forwards, on [uncond; cond]
            row["mfu_approx"] = row["transitions_per_s"] * 2 * 3 * f1 / (peak * 1e12)
    out["mfu_note"] = ("sampling: images/s x steps x 2 x F1 / peak; training: transitions/s x 2 x 3 x F1 / peak "
                       "(UNet only; VAE, text encoder, flow network and rewards not counted)")
    return out


# --- table ------------------------------------------------------------------------------------------------

def table(results: dict) -> str:
    s = results["sections"]
    rows = [("machine", f"{results['machine'].get('gpu') or results['machine']['cpu']}, "
                        f"torch {results['machine']['torch']}")]

    def add(name, value, fmt="{:.3f}"):
        if value is not None:
            rows.append((name, fmt.format(value) if isinstance(value, (int, float)) else str(value)))

    sp = s.get("sampling", {})
    if "images_per_s" in sp:
        for k, v in sp["images_per_s"].items():
            add(f"sampling images/s: {k}", v)
        add("ratio ours / diffusers images/s (target >= 1.0)", sp["ratio_ours_vs_diffusers_images_per_s"])
        add("ratio recording overhead (ours / no recording)", sp["ratio_recording_overhead"])
        add("ratio per step / guided UNet forward (target <= 1.10)", sp["ratio_per_step_vs_guided_unet_forward"])
        add("speedup prompt cache on", sp["prompt_cache"]["speedup_cache_on"])
    lv = {**s.get("levers", {}), **s.get("compile", {})}
    for key, sub in (("guided_one_call_vs_two", "speedup_one_call"), ("attention_sdpa_vs_classic", "speedup_sdpa"),
                     ("channels_last", "speedup_channels_last"), ("bf16_vs_fp32_weights", "speedup_bf16"),
                     ("torch_compile", "speedup_compile")):
        v = lv.get(key)
        if v is not None:
            add(f"lever {key}: {sub}", v[sub] if isinstance(v, dict) else v)
    tr = s.get("training", {})
    if "loss_agreement" in tr:
        add("training: max |loss(sampling) - loss(current)| (target <= 1e-5)",
            tr["loss_agreement"]["max_abs_diff"], "{:.3g}")
        if "max_rel_diff" in tr["loss_agreement"]:
            add("training: same, relative to max |loss|", tr["loss_agreement"]["max_rel_diff"], "{:.3g}")
    if "per_transition" in tr:
        p = tr["per_transition"]
        add("ratio ours transition (+FL amortised) / guided fwd+bwd (target <= 1.25)",
            p["ratio_ours_vs_guided_fwd_bwd"])
        add("ratio ours transition without FL / guided fwd+bwd", p["ratio_ours_vs_guided_fwd_bwd_without_fl"])
        add("ratio current transition / guided fwd+bwd", p.get("ratio_current_vs_guided_fwd_bwd"))
    if "small_decoder" in tr.get("per_transition", {}):
        p = tr["per_transition"]["small_decoder"]
        add("small x̂0 decoder: FL speed-up over the VAE", p["speedup_fl_vs_vae"])
        add("small x̂0 decoder: ratio ours transition (+FL) / guided fwd+bwd (target <= 1.15)",
            p["ratio_ours_vs_guided_fwd_bwd"])
    for f, ep in tr.get("epochs_by_fraction", {}).items():
        for k, v in ep["transitions_per_s"].items():
            add(f"fraction {f}: epoch transitions/s, {k}", v)
        add(f"fraction {f}: ratio epoch sampling / current (target >= 2.0)", ep["ratio_sampling_vs_current"])
        if "speedup_trained_states_only" in ep:
            add(f"fraction {f}: ratio epoch sampling decoding every state / current",
                ep["ratio_every_state_vs_current"])
            add(f"fraction {f}: speed-up of decoding only the trained states", ep["speedup_trained_states_only"])
    if "epochs" in tr and "epochs_by_fraction" not in tr:  # results written before the fractions existed
        for k, v in tr["epochs"]["transitions_per_s"].items():
            add(f"epoch transitions/s: x0_source={k}", v)
        add("ratio epoch sampling / current (target >= 2.0)", tr["epochs"]["ratio_sampling_vs_current"])
    if "epochs_small_decoder" in tr:
        ep = tr["epochs_small_decoder"]
        add(f"small x̂0 decoder, fraction {ep['timestep_fraction']}: ratio epoch sampling / current",
            ep["ratio_sampling_vs_current"])
    if "overlap_rewards" in tr:
        add("lever overlap_rewards: speedup of an epoch's sampling + scoring", tr["overlap_rewards"]["speedup_overlap"])
    for row in tr.get("sweep", []) or []:
        if "transitions_per_s" in row:
            mem = row.get("peak_cuda_mib", row.get("peak_rss_mib"))
            mfu = f", MFU {row['mfu_approx']:.3f}" if "mfu_approx" in row else ""
            add(f"train mb={row['micro_batch']} checkpointing={row['gradient_checkpointing']}",
                f"{row['transitions_per_s']:.2f} transitions/s, peak {mem:.0f} MiB{mfu}", "{}")
    fl = s.get("flops", {})
    if "unet_forward_gflops_batch1" in fl:
        add("UNet forward GFLOP (batch 1)", fl["unet_forward_gflops_batch1"], "{:.1f}")
        for k, v in fl.items():
            if k.startswith("mfu_sampling"):
                add(k, v)
    al = s.get("algorithms")
    if al:
        for name, base in ALGORITHM_RATIOS:
            key = f"{name.replace('-', '_')}_over_{base.replace('-', '_')}"
            if key in al:
                add(f"{name} / {base}: training (per transition)", al[key]["train"], "{:.2f}x")
                add(f"{name} / {base}: epoch (per trajectory)", al[key]["epoch"], "{:.2f}x")
    mem = [v.get("memory_after", {}) for v in s.values() if isinstance(v, dict)]
    if mem:
        add("peak RSS MiB (process)", max(m.get("peak_rss_mib", 0) for m in mem), "{:.0f}")
        if any("peak_cuda_mib" in m for m in mem):
            add("peak CUDA MiB (process)", max(m.get("peak_cuda_mib", 0) for m in mem), "{:.0f}")
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'measure'.ljust(width)} | value |", f"| {'-' * width} | --- |"]
    lines += [f"| {n.ljust(width)} | {v} |" for n, v in rows]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (CPU: a few minutes)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny-random", help="dagcli model name/folder, or sd15-random")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--resolution", type=int, default=None,
                   help="image size in pixels (default: the model's own; e.g. 128 runs SD 1.5's shapes on a CPU)")
    p.add_argument("--batch", type=int, default=None, help="images per sampler call / trajectories per epoch")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--reward", default="colorfulness", help="a reward spec (a cheap, continuous one by default)")
    p.add_argument("--train-batches", default=None, help="comma-separated micro-batch sizes, the first is the main")
    p.add_argument("--fractions", default="1.0,0.5",
                   help="comma-separated train.timestep_fraction values for the epoch ratios; the first is also used "
                        "with the small x̂0 decoder")
    p.add_argument("--x0-decoder", default="random",
                   help='dag.x0_decoder for the small-decoder measures: "random" (a random AutoencoderTiny of the '
                        'model\'s latent shape, saved and loaded like a real one), a folder or hub id, "" for none')
    p.add_argument("--train-sweep", action="store_true", help="micro-batch x gradient-checkpointing sweep")
    p.add_argument("--sweep-micro-batches", type=int, default=3)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--epoch-repeats", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (GPU)")
    p.add_argument("--flops", action="store_true", help="count UNet FLOPs and report MFU")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--sections", default="sampling,levers,training,overlap,flops,compile",
                   help="overlap: rewards overlapped with sampling, measured inside training; algorithms (not "
                        "by default): dag-rdb against DAG-DB, rtb and NFT against GRPO, epoch by epoch")
    p.add_argument("--time-budget", type=float, default=0, help="skip remaining sections after this many s")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--pairs", default="", help="the algorithms section's rows, comma-separated (default: all), e.g. "
                   "rtb-x0-expected,rtb-flow-expected")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="process: CPU time of this process (CPU runs with --threads 1 on a shared machine, where "
                        "wall time also counts the other processes' turns)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.batch = a.batch or (4 if a.quick else 8)
    a.steps = a.steps or (8 if a.quick else 20)
    a.repeats = a.repeats or (3 if a.quick else 7)
    a.epoch_repeats = a.epoch_repeats or (2 if a.quick else 5)
    a.train_batches = [int(v) for v in (a.train_batches or ("4" if a.quick else "4,8")).split(",")]
    a.fractions = [float(v) for v in a.fractions.split(",")]
    names = [name for name, _ in ALGORITHM_RATIOS]
    a.pairs = a.pairs.split(",") if a.pairs else names
    unknown = sorted(set(a.pairs) - set(names))
    if unknown:  # before any model is built
        p.error(f"--pairs {unknown[0]!r}: valid: {', '.join(names)}")
    a.out = a.out or str(HERE / "results" / f"perf-{a.device}.json")
    return a


def set_up_torch(threads: int | None, device: str) -> None:
    """Thread count on CPU (one thread on a shared machine), TF32 matmuls on GPU."""
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def main(argv=None) -> dict:
    a = parse_args(argv)
    set_up_torch(a.threads, a.device)
    b = Bench(a)
    sections = a.sections.split(",")
    loaded = {"model": load(a) if {"sampling", "levers", "compile"} & set(sections) else None}
    if "sampling" in sections:
        b.section("sampling", lambda: bench_sampling(b, loaded["model"]))
    if "levers" in sections:
        b.section("levers", lambda: bench_levers(b, loaded["model"]))
    if "training" in sections:
        if b.cuda and "compile" not in sections:
            loaded["model"] = None
            torch.cuda.empty_cache()
        b.section("training", lambda: bench_training(b))
    if "algorithms" in sections:
        b.section("algorithms", lambda: bench_algorithms(b))
    if "flops" in sections and (a.flops or b.cuda):
        b.section("flops", lambda: bench_flops(b, b.results, loaded["model"]))
    if "compile" in sections:
        b.section("compile", lambda: bench_compile(b, loaded["model"]))
    b.results["total_seconds"] = round(time.perf_counter() - b.t_start, 1)
    b.results["table"] = table(b.results)
    b.write()
    print(b.results["table"], flush=True)
    return b.results


if __name__ == "__main__":
    main()
