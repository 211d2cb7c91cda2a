"""How far a policy that moves every sample alike gets towards the exact target: the shift bound.

    python benchmarks/shift_bound.py [--base benchmarks/results/modes-base-tiny-flow-ddim.json] [--odds 4]

The exact target reweights the base model's backgrounds, p*(b) ∝ p_base(b)·e^{β r(b)}: a rewarded sample keeps its
place and only becomes likelier. A policy whose change is the same for every sample cannot reweight; it can only
move. In one dimension, with the base model N(0, 1), the rewarded region x > c (c chosen so that the base model's
rewarded share is the one measured for the prompt) and the policy N(d, 1), KL(policy ‖ p*) is

    d²/2 − β·Φ(d − c) + log Z,        minimised where d = β·φ(d − c)

and at that d the policy's rewarded share Φ(d − c) stays below p*'s: the shift bound. For each prompt of a base-shares
record (`compare_algorithms.py`'s cache of the base model's backgrounds, with the rewarded backgrounds given) it prints
the base share, p*'s, the best shift's share, its KL to the base and its gap to p*'s reward. A policy on the real chain
can do better than this (each step may move each state differently); a run whose reward gap sits near the bound
behaves as if it only shifted.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NORMAL = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))


def cdf(x: float) -> float:
    return float(NORMAL.cdf(torch.tensor(x, dtype=torch.float64)))


def pdf(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def best_shift(p0: float, beta_eff: float) -> dict:
    """For a base rewarded share `p0` (0 < p0 < 1) and β_eff: the target's share, the best shift d and what it
    reaches. g(d) = β·φ(d − c) − d is positive at 0 and not positive at β/sqrt(2π) (φ ≤ 1/sqrt(2π)), and its slope
    β·φ'(d − c) − 1 is negative while β < 1/max|φ'| = 4.13 (odds below 62), so the KL d²/2 − β·Φ(d − c) is convex
    and its minimum the one root of g in that interval, found by bisection."""
    if not 0.0 < beta_eff < 4.13:
        raise ValueError(f"beta_eff {beta_eff} is outside (0, 4.13), where the best shift is the one root")
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"the base rewarded share must be in (0, 1), not {p0}")
    c = float(NORMAL.icdf(torch.tensor(1.0 - p0, dtype=torch.float64)))
    tilt = math.exp(beta_eff)
    z = p0 * tilt + 1.0 - p0
    lo, hi = 0.0, beta_eff / math.sqrt(2 * math.pi)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if beta_eff * pdf(mid - c) > mid else (lo, mid)
    d = (lo + hi) / 2
    share = cdf(d - c)
    target = p0 * tilt / z
    return {"base": p0, "target": target, "shift": d, "share": share, "kl_to_base": d * d / 2,
            "gap": share - target, "kl_to_target": d * d / 2 - beta_eff * share + math.log(z),
            "target_kl_to_base": beta_eff * target - math.log(z)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=ROOT / "benchmarks/results/modes-base-tiny-flow-ddim.json",
                   help="a base-shares record of compare_algorithms.py (modes-base-<model>[-<sampler>].json)")
    p.add_argument("--rewarded", default="black,white", help="the rewarded backgrounds (the presets': black,white)")
    p.add_argument("--odds", type=float, default=4.0, help="the target's odds factor e^{β_eff} (the presets': 4)")
    a = p.parse_args(argv)
    if not a.base.is_file():
        p.exit(2, f"usage: --base {a.base}: no such file; one of benchmarks/results/modes-base-*.json\n")
    if not 1.0 < a.odds < 62.0:
        p.exit(2, f"usage: --odds {a.odds}: must be in (1, 62): a target that favours the rewarded backgrounds, with "
                  "one best shift\n")
    shares = json.loads(a.base.read_text())["shares"]
    rewarded = [b.strip() for b in a.rewarded.split(",") if b.strip()]
    rows = {prompt: best_shift(sum(s.get(b, 0.0) for b in rewarded), math.log(a.odds)) for prompt, s in shares.items()}
    print(f"{'prompt':<20} {'base':>6} {'p*':>6} {'shift':>6} {'reached':>8} {'KL':>6} {'gap':>7}")
    for prompt, r in rows.items():
        print(f"{prompt:<20} {r['base']:6.3f} {r['target']:6.3f} {r['shift']:6.3f} {r['share']:8.3f} "
              f"{r['kl_to_base']:6.3f} {r['gap']:+7.3f}")
    mean_gap = sum(r["gap"] for r in rows.values()) / len(rows)
    print(f"mean reward gap at the shift bound: {mean_gap:+.3f}")
    return {"per_prompt": rows, "mean_gap": mean_gap}


if __name__ == "__main__":
    main()
