"""A small decoder for the built-in model's latents (`AutoencoderTiny`), distilled from its VAE, for cheap
forward-looking x̂0 rewards (`dag.x0_decoder`), and the check of how far its rewards move from the VAE's.

    python tools/tiny_decoder.py train [--seed 0]      # writes builtin/weights/tiny-sd-taesd
    python tools/tiny_decoder.py check [--trajectories 64]

Training data are what the decoder will see: the one-step predictions x̂0 of every state of trajectories
sampled from the built-in model (DDIM, η = 1, the training prompts), targets their decodes by the full VAE.
Deterministic for a seed on one thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dagcli.builtin import TINY_DECODER_DIR, TINY_NAME

CHANNELS = (32, 32, 32)  # three blocks: 8x8 latents -> 32 px, as the built-in VAE
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "x0-decoder.json"


def build_decoder(seed: int):
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderTiny(encoder_block_out_channels=CHANNELS, decoder_block_out_channels=CHANNELS,
                               num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(2, 2, 1), latent_channels=4)


@torch.no_grad()
def x0_latents(trajectories: int, steps: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """x̂0 [trajectories * steps, 4, 8, 8] of every state of sampled trajectories, and their prompts."""
    from dagcli.models import load_model
    from dagcli.prompts import load_prompts
    from dagcli.sampling import generators_for, sample_batch

    model = load_model(TINY_NAME, device="cpu")
    prompts = [p.prompt for p in load_prompts("shapes")]
    g = torch.Generator().manual_seed(seed)
    rows = [prompts[i] for i in torch.randint(len(prompts), (trajectories,), generator=g).tolist()]
    family, schedule = model.family, model.family.schedule(steps, model.resolution, model.resolution)
    out, out_prompts = [], []
    for start in range(0, trajectories, 32):
        part = rows[start : start + 32]
        traj = sample_batch(model, part, generators_for(range(seed * 10**6 + start, seed * 10**6 + start + len(part))),
                            steps=steps, guidance=3.0, eta=1.0, decode=False)
        j = torch.arange(steps).repeat(len(part))
        out.append(family.predict_x0(schedule, j, traj.latents[:, :steps].flatten(0, 1), traj.out_cond.flatten(0, 1)))
        out_prompts += [p for p in part for _ in range(steps)]
    return torch.cat(out), out_prompts


def train(seed: int = 0, trajectories: int = 384, steps: int = 10, iterations: int = 1500, batch: int = 64) -> dict:
    """Distil the decoder on x̂0 latents: L1 + MSE to the VAE's decodes in [-1, 1]."""
    from dagcli.models import load_model

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    latents, _ = x0_latents(trajectories, steps, seed)
    vae = load_model(TINY_NAME, device="cpu").pipe.vae
    with torch.no_grad():
        targets = torch.cat([vae.decode(latents[i : i + 256] / vae.config.scaling_factor, return_dict=False)[0]
                             for i in range(0, len(latents), 256)]).clamp(-1, 1)
    decoder = build_decoder(seed)
    optimizer = torch.optim.AdamW(decoder.decoder.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    g = torch.Generator().manual_seed(seed + 1)
    for it in range(iterations):
        idx = torch.randint(len(latents), (batch,), generator=g)
        pred = decoder.decode(latents[idx], return_dict=False)[0]
        loss = F.l1_loss(pred, targets[idx]) + F.mse_loss(pred, targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if it % 250 == 0 or it == iterations - 1:
            print(f"iteration {it:5d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    decoder.save_pretrained(TINY_DECODER_DIR, safe_serialization=True)
    info = {"seed": seed, "trajectories": trajectories, "steps": steps, "iterations": iterations, "batch": batch,
            "seconds": round(time.perf_counter() - t0, 1), "final_loss": loss.item(),
            "parameters": sum(p.numel() for p in decoder.decoder.parameters())}
    (TINY_DECODER_DIR / "dagcli.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


@torch.no_grad()
def check(trajectories: int = 64, steps: int = 10, seed: int = 12345, reward: str = "compressibility") -> dict:
    """Forward-looking rewards of fresh trajectories' states with the VAE and with the small decoder: their
    Pearson correlation (all states, and per step) and the decode time of each."""
    from dagcli.families.base import decode_latents
    from dagcli.models import load_model, load_tiny_decoder
    from dagcli.rewards import build_reward

    latents, prompts = x0_latents(trajectories, steps, seed)
    model = load_model(TINY_NAME, device="cpu")
    tiny = load_tiny_decoder(str(TINY_DECODER_DIR), model.device, model.dtype)
    score = build_reward(reward, device="cpu", base_model=TINY_NAME)
    out = {}
    for name, vae in (("vae", model.pipe.vae), ("tiny", tiny)):
        t0 = time.perf_counter()
        images = torch.cat([decode_latents(vae, latents[i : i + 64]) for i in range(0, len(latents), 64)])
        seconds = time.perf_counter() - t0
        out[name] = (score(images, prompts, None).scores.double(), seconds)
    a, b = out["vae"][0], out["tiny"][0]
    per_step = [float(torch.corrcoef(torch.stack([a[k::steps], b[k::steps]]))[0, 1]) for k in range(steps)]
    result = {
        "command": f"python tools/tiny_decoder.py check --trajectories {trajectories}",
        "reward": reward, "trajectories": trajectories, "steps": steps, "states": len(a),
        "pearson_all_states": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
        "pearson_per_step": per_step,
        "mean_abs_difference": float((a - b).abs().mean()), "reward_std_vae": float(a.std()),
        "decode_seconds": {"vae": out["vae"][1], "tiny": out["tiny"][1]},
        "decode_speedup": out["vae"][1] / out["tiny"][1],
        "threads": torch.get_num_threads(),
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["train", "check"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trajectories", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "train":
        print(json.dumps(train(args.seed, **({"trajectories": args.trajectories} if args.trajectories else {}))))
    else:
        print(json.dumps(check(**({"trajectories": args.trajectories} if args.trajectories else {})), indent=1))


if __name__ == "__main__":
    main()
