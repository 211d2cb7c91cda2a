"""The closest a LoRA can get to the exact target when every trajectory starts from N(0, I): the reachable target.

    python benchmarks/reachable_target.py --config examples/configs/tiny-modes-exact-target.toml [--output JSON]

The target p*(τ | c) ∝ p_base(τ | c)·exp(β r(x_T)) tilts the chain's start x_0 too, by h(x_0) = E_base[exp(β r) | x_0],
but the sampler draws x_0 from N(0, I) whatever the LoRA does. The best policy with that start follows the twisted
base kernels from x_0 on, and its terminal marginal over the backgrounds b is

    p_reach(b | c) = E_{x_0}[ p_base(b | x_0, c)·exp(β r(b)) / h(x_0) ]

which is p* only when h(x_0) is constant, i.e. when x_0 decides nothing of the reward. What that costs, with
KL(P_θ ‖ p*) = E_q[Σρ] − β E_q[r] + log Z the objective on-policy RTB minimises:

    min KL(P_θ ‖ p*) = log Z(c) − E_{x_0}[log h(x_0)]          (the KL of the start's marginal, ≥ 0)
    the learned log Z at that optimum = E_{x_0}[log h(x_0)]    (RTB's squared residual is then log Z_ψ − log h(x_0))

For each prompt it draws `--starts` initial noises with the preset's sampler and from each `--continuations` base
continuations to x_T, reads their backgrounds with the reward's pixel judge, and reports p_reach, the target p*
from the same samples, the TV between them, E[r] under each and the two log Z's above. p_base(b | x_0) is a ratio
of counts, so every quantity is also computed on half the continuations: the bias of a ratio estimate falls as
1/K, and 2·est(K) − est(K/2) removes its leading term (the `_corrected` fields). Results go to
benchmarks/results/reachable-target-<model>.json unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def reachable(counts: torch.Tensor, values: torch.Tensor, beta_eff: float) -> dict:
    """From counts [n starts, B backgrounds] of each start's continuations and the reward of each background:
    the base shares, p*, p_reach, their TV, E[r] under each, log Z and E[log h(x_0)] (nats)."""
    counts = counts.double()
    per_start = counts / counts.sum(1, keepdim=True)  # p_base(b | x_0)
    tilt = torch.exp(beta_eff * values.double())  # exp(β r(b))
    h = (per_start * tilt).sum(1)  # h(x_0) = E_base[exp(β r) | x_0]
    base = per_start.mean(0)
    p_star = base * tilt / (base * tilt).sum()
    p_reach = (per_start * tilt / h[:, None]).mean(0)
    return {"base": base.tolist(), "p_star": p_star.tolist(), "p_reach": p_reach.tolist(),
            "tv_reach_to_target": 0.5 * float((p_reach - p_star).abs().sum()),
            "tv_base_to_target": 0.5 * float((base - p_star).abs().sum()),
            "reward_base": float((base * values).sum()), "reward_target": float((p_star * values).sum()),
            "reward_reach": float((p_reach * values).sum()),
            "log_z": math.log(float((base * tilt).sum())), "mean_log_h": float(torch.log(h).mean())}


def debiased(full: dict, half: dict) -> dict:
    """2·full − half for every scalar and list (elementwise): the ratio estimates' 1/K bias removed to first order."""
    out = {}
    for k, v in full.items():
        if isinstance(v, float):
            out[f"{k}_corrected"] = 2 * v - half[k]
        elif isinstance(v, list):
            out[f"{k}_corrected"] = [2 * a - b for a, b in zip(v, half[k], strict=True)]
    return out


def kl_estimate(run: dict, base: dict | None, epochs: int = 4, transitions: int | None = None) -> float | None:
    """The on-policy estimate of KL(P_θ ‖ p*) over a run's last `epochs` training epochs, in nats:
    E_q[Σρ] − β_eff·E_q[r] + log Z, averaged over the prompts (each epoch's logged mean log ratio, per latent
    dimension under the "mean" reduction, times the D dims; `base`: the result file's base-model record); None for a
    run that logs no log ratio to the base. `rtb` logs Σρ of each trajectory, taken before the epoch's updates;
    `dag-rdb` the mean ρ of its trained transitions, taken as it trains, so its Σρ is that mean times
    `transitions`, the trained transitions of a trajectory (`trained_transitions`; None: no estimate for it)."""
    curve = [c for c in run.get("curve", []) if "log_ratio_base" in c][-epochs:]
    per_transition = run.get("algorithm") == "dag-rdb"
    if not curve or base is None or (per_transition and not transitions):
        return None
    scale = (base["latent_dims"] if base["reduction"] == "mean" else 1) * (transitions if per_transition else 1)
    log_z = [p["log_z"] for p in run["evals"][0]["per_prompt_exact"].values()]
    terms = [c["log_ratio_base"] * scale - base["beta_eff"] * c["reward"] for c in curve]
    return sum(terms) / len(terms) + sum(log_z) / len(log_z)


def trained_transitions(result: dict, run: dict) -> int:
    """The transitions of a trajectory that a `dag-rdb` run of a compare_algorithms.py result trains: its sampler's
    steps less `dag.tail_steps`, from the result's preset with the run's overrides (every step trained: the
    exact-target presets' `train.timestep_fraction` is 1)."""
    from dagcli.config import load_config

    cfg = load_config(ROOT / result["preset"], run["overrides"])
    return cfg.sampling.steps - cfg.dag.tail_steps


def against_runs(reach: dict, compare_files: list[Path]) -> list[dict]:
    """Each run of compare_algorithms.py result files at its last evaluation: TV to p* (as the file has it) and TV
    to the reachable target p_reach (debiased), per prompt averaged over prompts, and for runs that log their log
    ratio to the base the on-policy KL estimate of their last epochs (`kl_estimate`)."""
    names = reach["backgrounds"]

    def row(label: str, run: dict, evaluation: dict) -> dict:
        shares, tvs = evaluation["per_prompt_shares"], []
        for prompt, r in reach["per_prompt"].items():
            target = r["p_reach_corrected"]
            tvs.append(0.5 * sum(abs(shares[prompt].get(b, 0.0) - t) for b, t in zip(names, target, strict=True)))
        return {"file": label, "algorithm": run["algorithm"], "seed": run["seed"], "epoch": evaluation["epoch"],
                "eval_reward": evaluation["eval_reward"], "tv_to_target": evaluation["tv_exact"],
                "tv_to_reachable": sum(tvs) / len(tvs)}

    rows = []
    for path in compare_files:
        result = json.loads(Path(path).read_text())
        for run in result["runs"]:
            if not rows and run["evals"][0]["epoch"] == 0:
                rows.append({**row("base model (the first run's epoch 0)", run, run["evals"][0]), "kl_estimate": None})
            transitions = trained_transitions(result, run) if run["algorithm"] == "dag-rdb" else None
            rows.append({**row(Path(path).name, run, run["evals"][-1]),
                         "kl_estimate": kl_estimate(run, result.get("base"), transitions=transitions)})
    return rows


def measure(config: Path, starts: int, continuations: int, seed: int, chunk: int) -> dict:
    from preset_chain import base_trajectories, continue_chain, preset_trainer

    from dagcli.models import lora_disabled
    from dagcli.modes import background_names, effective_beta, target_beta
    from dagcli.rewards.modes import background_modes, image_backgrounds

    cfg, prompts, trainer = preset_trainer(config, f"dagcli-reachable-{config.stem}")
    if cfg.reward.spec != "background-modes":
        raise ValueError(f"{config} rewards {cfg.reward.spec!r}; the reachable target needs background-modes "
                         "(e.g. examples/configs/tiny-modes-exact-target.toml)")
    s, names = cfg.sampling, list(background_names())
    reward = background_modes(**dict(cfg.reward.options).get("background-modes", {}))
    values = torch.tensor([reward.value_of(b) for b in names], dtype=torch.float64)
    per_prompt, dims = {}, None
    with torch.no_grad(), lora_disabled(trainer.raw_denoiser):
        for p_index, prompt in enumerate(prompts):
            traj = base_trajectories(trainer, cfg, prompt, [seed + 1000 * p_index + j for j in range(starts)])
            dims = traj.latents[0, 0].numel()
            counts = torch.zeros(starts, 2, len(names))  # [start, half, background]
            for lo in range(0, starts, chunk):
                idx = torch.arange(lo, min(lo + chunk, starts))
                cond = traj.cond[idx.repeat_interleave(continuations)]
                x = traj.latents[idx, 0].repeat_interleave(continuations, 0)
                g = torch.Generator().manual_seed(seed + 7919 * (p_index + 1) + lo)
                labels = image_backgrounds(trainer.family.decode(continue_chain(trainer, cfg, x, cond, 0, g)))
                for j, label in enumerate(labels):
                    start, k = divmod(j, continuations)
                    counts[lo + start, int(k >= continuations // 2), names.index(label)] += 1
            per_prompt[prompt] = counts
    beta_eff = effective_beta(target_beta(cfg), cfg.train.reduction, dims)
    rows = {}
    for prompt, counts in per_prompt.items():
        full, half = reachable(counts.sum(1), values, beta_eff), reachable(counts[:, 0], values, beta_eff)
        rows[prompt] = {**full, **debiased(full, half), "counts": counts.int().tolist()}  # [start][half][b]
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k, v in next(iter(rows.values())).items()
            if isinstance(v, float)}
    return {"config": str(config), "model": cfg.model.name, "sampler": getattr(s, "sampler", None), "eta": s.eta,
            "steps": s.steps, "prompts": prompts, "backgrounds": names, "rewards": values.tolist(),
            "starts": starts, "continuations": continuations, "beta_eff": beta_eff, "per_prompt": rows,
            "mean": mean}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "examples/configs/tiny-modes-exact-target.toml",
                    help="an exact-target preset (background-modes): its model, sampler, prompts, reward and β")
    ap.add_argument("--starts", type=int, default=128, help="initial noises per prompt")
    ap.add_argument("--continuations", type=int, default=16, help="base continuations from each initial noise")
    ap.add_argument("--chunk", type=int, default=32, help="initial noises per sampler call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--against", type=Path, nargs="+", default=None, metavar="COMPARE_JSON",
                    help="measure nothing: print each run's last TV to p* and to the reachable target of --reach")
    ap.add_argument("--reach", type=Path, default=None,
                    help="with --against: a measured file (default: reachable-target-<the runs' model>.json)")
    a = ap.parse_args(argv)
    if a.against:
        try:
            model = json.loads(a.against[0].read_text())["model"]
            reach_file = a.reach or ROOT / "benchmarks" / "results" / f"reachable-target-{model}.json"
            reach = json.loads(reach_file.read_text())
            rows = against_runs(reach, a.against)
        except (OSError, ValueError, KeyError, IndexError) as e:  # missing, not JSON, or not the files expected
            ap.error(f"--against/--reach: {e.__class__.__name__}: {e} (a compare_algorithms.py result with the "
                     f"modes-exact metrics, and a file this script wrote)")
        print(f"{'run (compare-modes-exact-*.json)':<40} {'reward':>6} {'TV to p*':>8} {'TV to p_reach':>13} "
              f"{'KL est.':>7}")
        for row in rows:
            name = row["file"].removeprefix("compare-modes-exact-").removesuffix(".json")
            name = name if len(name) <= 40 else "…" + name[-39:]
            kl = "—" if row["kl_estimate"] is None else f"{row['kl_estimate']:.2f}"
            print(f"{name:<40} {row['eval_reward']:6.3f} {row['tv_to_target']:8.3f} {row['tv_to_reachable']:13.3f} "
                  f"{kl:>7}")
        return
    if a.starts < 2 or a.continuations < 4 or a.continuations % 2:
        ap.error(f"--starts {a.starts} --continuations {a.continuations}: --starts must be at least 2 and "
                 "--continuations an even number of at least 4")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    from dagcli.errors import DagError

    try:
        result = measure(a.config, a.starts, a.continuations, a.seed, a.chunk)
    except (ValueError, DagError) as e:  # not a background-modes preset, or a preset dagcli refuses
        ap.error(str(e))
    result["seconds"] = time.perf_counter() - t0
    result["command"] = "python benchmarks/reachable_target.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "torch_threads": a.threads}
    out = a.output or ROOT / "benchmarks" / "results" / f"reachable-target-{result['model']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{'prompt':<18} {'TV(reach, p*)':>13} {'E_base r':>8} {'E_reach r':>9} {'E_p* r':>6} "
          f"{'log Z':>6} {'E log h':>7}")
    for prompt, r in [*result["per_prompt"].items(), ("mean", result["mean"])]:
        print(f"{prompt:<18} {r['tv_reach_to_target']:13.3f} {r['reward_base']:8.3f} {r['reward_reach']:9.3f} "
              f"{r['reward_target']:6.3f} {r['log_z']:6.3f} {r['mean_log_h']:7.3f}")
    m = result["mean"]
    print(f"debiased (2·K − K/2): TV {m['tv_reach_to_target_corrected']:.3f}, E_reach r "
          f"{m['reward_reach_corrected']:.3f}, E log h {m['mean_log_h_corrected']:.3f}; wrote {out}")


if __name__ == "__main__":
    main()
