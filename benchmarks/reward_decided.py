"""How much of the reward a state of the base model's chain has already decided: what a base-model tail costs.

    python benchmarks/reward_decided.py --config examples/configs/tiny-modes-exact-target.toml [--output JSON]

With `rtb.tail_steps = k` (or `dag.tail_steps`) the LoRA samples the first T − k steps and the base model the rest,
so RTB's objective is exact over the chain it samples, but the best such policy is the target p* only where the
state x_{T−k} decides the reward: the tail cannot tilt what is still open after x_{T−k} (on-policy RTB then
targets p_base(x_{T−k})·exp(β E_base[r | x_{T−k}]) instead of p_base(x_{T−k})·E_base[exp(β r) | x_{T−k}]).

From the preset's model, sampler, prompts and reward, for each prompt it samples `--per-prompt` base trajectories
and from every state x_m of each draws `--continuations` base continuations to x_T, then reports per state m:

    decided_m = 1 − E[Var(r | x_m)] / Var(r)                    the share of the reward's variance x_m decides
    gap_m = E[log E[exp(β r) | x_m] − β E[r | x_m]]             the tail's bias in nats at the preset's β_eff (≥ 0)

and the longest tail whose first state decides at least `--decided` of the variance. Results go to
benchmarks/results/reward-decided-<model>.json unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def decided_share(rewards: torch.Tensor) -> float:
    """1 − E[Var(r | x_m)] / Var(r) of rewards [n states, k continuations each] (1 when r does not vary)."""
    r = rewards.double()
    total = float(r.var(unbiased=False))
    return 1.0 - float(r.var(1, unbiased=False).mean()) / total if total > 0 else 1.0


def jensen_gap(rewards: torch.Tensor, beta_eff: float) -> float:
    """E over states of log mean_k exp(β r) − β mean_k r, for rewards [n, k]: in nats, ≥ 0, 0 where r is decided."""
    r = beta_eff * rewards.double()
    return float((torch.logsumexp(r, 1) - math.log(r.shape[1]) - r.mean(1)).mean())


def measure(config: Path, per_prompt: int, continuations: int, seed: int) -> dict:
    from preset_chain import base_trajectories, continuation_rewards, preset_trainer

    from dagcli.models import lora_disabled
    from dagcli.modes import effective_beta, target_beta

    cfg, prompts, trainer = preset_trainer(config, f"dagcli-reward-decided-{config.stem}")
    s, steps, dims = cfg.sampling, cfg.sampling.steps, None
    per_state: dict[int, list[torch.Tensor]] = {m: [] for m in range(steps + 1)}
    with torch.no_grad(), lora_disabled(trainer.raw_denoiser):
        for p_index, prompt in enumerate(prompts):
            traj = base_trajectories(trainer, cfg, prompt, [seed + 1000 * p_index + j for j in range(per_prompt)])
            dims = traj.latents[0, 0].numel()
            for m in range(steps + 1):
                g = torch.Generator().manual_seed(seed + 7919 * (p_index + 1) + m)
                per_state[m].append(continuation_rewards(trainer, cfg, traj.latents[:, m], traj.cond,
                                                         [prompt] * per_prompt, m, continuations, g))
    beta_eff = effective_beta(target_beta(cfg), cfg.train.reduction, dims)
    rows = []
    for m in range(steps + 1):
        by_prompt = per_state[m]
        rows.append({"state": m, "decided": sum(decided_share(r) for r in by_prompt) / len(by_prompt),
                     "jensen_gap_nats": sum(jensen_gap(r, beta_eff) for r in by_prompt) / len(by_prompt),
                     "reward_mean": float(torch.cat(by_prompt).mean())})
    return {"config": str(config), "model": cfg.model.name, "sampler": getattr(s, "sampler", None), "eta": s.eta,
            "steps": steps, "prompts": prompts, "per_prompt": per_prompt, "continuations": continuations,
            "beta_eff": beta_eff, "states": rows}


def longest_tail(rows: list[dict], steps: int, level: float) -> int:
    """The largest k < T whose first state x_{T−k} decides at least `level` of the reward's variance."""
    ok = [steps - r["state"] for r in rows if 0 < r["state"] < steps and r["decided"] >= level]
    return max(ok, default=0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "examples/configs/tiny-modes-exact-target.toml",
                    help="a training preset: its model, sampler, prompts, reward and β")
    ap.add_argument("--per-prompt", type=int, default=48, help="base trajectories per prompt")
    ap.add_argument("--continuations", type=int, default=8, help="base continuations from every state")
    ap.add_argument("--decided", type=float, default=0.99, help="the share a tail's first state must decide")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--output", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.per_prompt < 2 or a.continuations < 2:
        sys.exit("--per-prompt and --continuations must be at least 2")
    torch.set_num_threads(a.threads)
    result = measure(a.config, a.per_prompt, a.continuations, a.seed)
    result["longest_tail"] = longest_tail(result["states"], result["steps"], a.decided)
    result["decided_level"] = a.decided
    result["command"] = "python benchmarks/reward_decided.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "torch_threads": a.threads}
    out = a.output or ROOT / "benchmarks" / "results" / f"reward-decided-{result['model']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{'state':>5}  {'decided':>7}  {'gap (nats)':>10}")
    for r in result["states"]:
        print(f"{r['state']:>5}  {r['decided']:7.3f}  {r['jensen_gap_nats']:10.4f}")
    print(f"longest tail whose first state decides >= {a.decided}: {result['longest_tail']} steps; wrote {out}")


if __name__ == "__main__":
    main()
