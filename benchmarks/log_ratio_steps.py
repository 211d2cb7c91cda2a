"""Where a trained run's log ratio to the base model sits along the trajectory, step by step.

    python benchmarks/log_ratio_steps.py RUN [RUN ...] [--batches 2] [--output JSON]

RUN is a training run folder (its config.toml and checkpoints/, e.g. the runs `compare_algorithms.py` keeps under
its --runs-dir). From each run's last checkpoint it samples fresh trajectories of the trained policy with the run's
own sampler, prompts and seeds of an epoch no run trains on, and scores every stored step again with the LoRA
switched off (the same call `rtb` and `dag-rdb` make for log P_base). Per step i it reports, in nats (a log-prob
under reduction "mean" times the latent's dimensions):

    ρ_i = log P_θ(x_{i+1} | x_i) − log P_base(x_{i+1} | x_i)       mean and std over the trajectories
    share_i = E[ρ_i] / E[Σ_j ρ_j]                                     the step's part of the trajectory's log ratio
    σ_i                                                               the step's noise scale (the same for both)
    shift_i = ‖μ_θ − μ_base‖ / σ_i                                     the two means' distance in units of σ_i

E[Σ ρ] on the policy's own trajectories is KL(P_θ ‖ P_base) over whole paths: what RTB's residual carries beside
β·r, and what DAG-RDB's per-step residuals carry step by step.

`--continuations K` also runs K base-model continuations (LoRA off) from every state x_i and splits the states by
whether the reward is still open there (the K rewards disagree) or decided (they agree), reporting shift_i per
group. The target's twisted kernel moves a state by σ²∇log h(x_i), h(x_i) = E_base[exp(β r) | x_i], which vanishes
where x_i has decided r: a policy that moves decided states as much as open ones pays KL for nothing.

Results go to benchmarks/results/log-ratio-steps.json unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EPOCH = 10_000  # the sampling seeds of an epoch that no run of a few hundred epochs reaches


def decided_split(shift: torch.Tensor, rewards: torch.Tensor) -> dict:
    """The mean shift [n] of states whose continuation rewards [n, K] agree (decided) and of those where they differ
    (open), and how many of each; None for an empty group."""
    open_ = (rewards != rewards[:, :1]).any(1)

    def mean(mask):
        return float(shift[mask].mean()) if mask.any() else None

    return {"shift_open": mean(open_), "shift_decided": mean(~open_), "states_open": int(open_.sum()),
            "states_decided": int((~open_).sum())}


def continuation_rewards(trainer, cfg, traj, step: int, k: int) -> torch.Tensor:
    """[n, k] rewards of k base-model continuations from every trajectory's state x_step (the LoRA off)."""
    from preset_chain import continuation_rewards

    from dagcli.models import lora_disabled

    with torch.no_grad(), lora_disabled(trainer.raw_denoiser):
        return continuation_rewards(trainer, cfg, traj.latents[:, step], traj.cond, traj.prompts, step, k,
                                    torch.Generator().manual_seed(7919 + step))


def measure(run: Path, batches: int | None, continuations: int = 0) -> dict:
    from dagcli.algorithms.base import transition_batch
    from dagcli.config import load_config, replace
    from dagcli.prompts import load_prompts
    from dagcli.trainer import Trainer

    cfg = load_config(run / "config.toml")
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    if not checkpoints:
        sys.exit(f"{run}: no checkpoints/step-* to measure")
    sampling = {"batches_per_epoch": batches} if batches else {}
    scratch = Path("/tmp") / f"dagcli-log-ratio-steps-{run.name}"
    cfg = replace(replace(cfg, "output", dir=str(scratch), report_to="none"), "sampling", **sampling)
    trainer = Trainer(cfg, [p.prompt for p in load_prompts(cfg.sampling.prompts)])
    trainer.resume(checkpoints[-1])
    batch, _ = trainer.collect(EPOCH)
    traj = batch.traj
    n, steps = traj.log_probs.shape
    dims = traj.latents[0, 0].numel() if cfg.train.reduction == "mean" else 1
    ratio, sigma, shift = torch.empty(n, steps), torch.empty(steps), torch.empty(n, steps)
    with torch.no_grad():
        for i in range(steps):
            mb = transition_batch(batch, torch.stack([torch.arange(n), torch.full((n,), i)], 1), trainer.model.device)
            ref = trainer.reference_step(mb)
            ratio[:, i] = (traj.log_probs[:, i].float() - ref.log_prob.float().cpu()) * dims
            mean = trainer.family.step(trainer.rollout.schedule, mb.step_index, mb.x, mb.out_old,
                                       cfg.sampling.eta, prev=mb.x_next, reduction=cfg.train.reduction).mean
            sigma[i] = ref.std.float().mean().cpu()
            shift[:, i] = ((mean - ref.mean).flatten(1).norm(dim=1) / ref.std.float()).cpu()
    split = [{"step": i, **decided_split(shift[:, i], continuation_rewards(trainer, cfg, traj, i, continuations))}
             for i in range(trainer.rollout.lora_steps or steps) if continuations and sigma[i] > 0]
    total = ratio.sum(1)
    return {"run": str(run), "checkpoint": checkpoints[-1].name, "algorithm": cfg.train.algorithm,
            "trajectories": n, "latent_dims": traj.latents[0, 0].numel(),
            "log_ratio_mean": ratio.mean(0).tolist(), "log_ratio_std": ratio.std(0).tolist(),
            "share": (ratio.mean(0) / total.mean()).tolist(), "sigma": sigma.tolist(),
            "mean_shift_in_sigma": shift.mean(0).tolist(),
            "path_log_ratio_mean": float(total.mean()), "path_log_ratio_std": float(total.std()),
            **({"continuations": continuations, "decided_split": split} if continuations else {})}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batches", type=int, help="sampler calls (default: the run's batches_per_epoch)")
    parser.add_argument("--continuations", type=int, default=0,
                        help="base continuations from every state the LoRA samples, to split the shifts by whether "
                             "the state has decided the reward (default 0: no split)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "log-ratio-steps.json")
    args = parser.parse_args(argv)
    if args.continuations == 1 or args.continuations < 0:
        parser.exit(2, f"usage: --continuations {args.continuations}: 0 (no split) or at least 2\n")
    torch.set_num_threads(1)
    results = [measure(run, args.batches, args.continuations) for run in args.runs]
    for r in results:
        print(f"{r['run']} ({r['algorithm']}, {r['checkpoint']}, {r['trajectories']} trajectories): "
              f"E[Σρ] = {r['path_log_ratio_mean']:.1f} ± {r['path_log_ratio_std']:.1f} nats")
        print("  step   E[ρ] nats   std     share    σ        shift/σ")
        for i, (m, s, sh, sg, d) in enumerate(zip(r["log_ratio_mean"], r["log_ratio_std"], r["share"], r["sigma"],
                                                  r["mean_shift_in_sigma"], strict=True)):
            print(f"  {i:>4} {m:>10.2f} {s:>8.2f} {sh:>8.1%} {sg:>8.4f} {d:>8.2f}")
        if r.get("decided_split"):
            print(f"  shift/σ where {r['continuations']} base continuations disagree (open) or agree (decided):")
            for g in r["decided_split"]:
                def cell(v):
                    return "    —" if v is None else f"{v:5.2f}"
                print(f"  {g['step']:>4}  open {cell(g['shift_open'])} ({g['states_open']:>3})  decided "
                      f"{cell(g['shift_decided'])} ({g['states_decided']:>3})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"command": " ".join(["python", "benchmarks/log_ratio_steps.py",
                                                            *(argv if argv is not None else sys.argv[1:])]),
                                       "torch_threads": 1, "runs": results}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
