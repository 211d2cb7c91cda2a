"""Modes of a reward with known modes (`background-modes`): how a model's samples share the backgrounds, the share
a GFlowNet should reach, and how far a trained model is from it.

The reference is the base model tilted by the reward, p(x) ∝ p_base(x)·exp(β_eff·r(x)). When r depends on the
background b only, the share of each background is then
    p_target(b) = p_base(b)·exp(β_eff·r(b)) / Σ_b' p_base(b')·exp(β_eff·r(b'))
with p_base(b) estimated from the base model's own samples (the same pixel judge as the reward). β_eff is β under
`train.reduction = "sum"` and D·β under "mean" (log-probabilities averaged over the latent's D dimensions, see
docs/training.md); with the demo's β = 50 and D = 256 the target is the base model's shares restricted to the
rewarded backgrounds. Strictly, detailed balance with the noising kernel as P_B is solved by ∝ exp(β_eff·r(x)) over
latents, which a reward that is flat within each background does not pin down; a LoRA that starts at the base
model and is held near it (DAG's proximity term) moves the base model's mass between backgrounds, and the tilted
base distribution is that move's target (it is also the optimum of KL-regularised RL). A reward maximiser has
every split among the rewarded backgrounds as an optimum.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch

MODE_FRACTION = 0.5  # a rewarded mode is kept when its share is at least this fraction of its target share


def background_names() -> tuple[str, ...]:
    """Every background the pixel judge can name (black, gray, white, brown)."""
    from dagcli.extensions import judge

    return judge("shapes").backgrounds()


def shares(labels: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """The fraction of `labels` equal to each name (0 for a name never seen)."""
    counts = Counter(labels)
    n = max(len(labels), 1)
    return {name: counts[name] / n for name in names}


def effective_beta(beta: float, reduction: str, latent_dims: int) -> float:
    """The exponent of the reward in the GFlowNet target: β ("sum") or D·β ("mean": log-probs averaged over D)."""
    if reduction == "sum":
        return float(beta)
    if reduction == "mean":
        return float(beta) * latent_dims
    raise ValueError(f"unknown reduction {reduction!r}; valid options: mean, sum")


def target_beta(cfg) -> float:
    """The β of a run's target: rtb reads `rtb.beta`, every other algorithm is set against DAG's `dag.beta`."""
    return cfg.rtb.beta if cfg.train.algorithm == "rtb" else cfg.dag.beta


def target_shares(base: dict[str, float], values: dict[str, float], beta_eff: float) -> dict[str, float]:
    """p_target(b) ∝ p_base(b)·exp(β_eff·r(b)), normalised in log space (β_eff may be in the thousands)."""
    logs = {b: math.log(p) + beta_eff * values[b] if p > 0 else -math.inf for b, p in base.items()}
    top = max(logs.values())
    if top == -math.inf:
        raise ValueError("the base shares are all zero")
    weights = {b: math.exp(v - top) for b, v in logs.items()}
    total = sum(weights.values())
    return {b: w / total for b, w in weights.items()}


def tv_distance(p: dict[str, float], q: dict[str, float]) -> float:
    """Total-variation distance ½·Σ|p(b) − q(b)| over the union of both keys."""
    return 0.5 * sum(abs(p.get(b, 0.0) - q.get(b, 0.0)) for b in set(p) | set(q))


def split_tv(share: dict[str, float], target: dict[str, float], rewarded: Sequence[str]) -> float:
    """TV distance between how the samples and the target split among the rewarded backgrounds only (each
    renormalised over them): how well the modes are balanced, whatever the reward level. 1 when no sample has a
    rewarded background."""
    got, want = sum(share.get(b, 0.0) for b in rewarded), sum(target.get(b, 0.0) for b in rewarded)
    if got <= 0 or want <= 0:
        return 1.0
    return tv_distance({b: share.get(b, 0.0) / got for b in rewarded}, {b: target.get(b, 0.0) / want for b in rewarded})


def modes_kept(share: dict[str, float], target: dict[str, float], rewarded: Sequence[str],
               fraction: float = MODE_FRACTION) -> tuple[int, int]:
    """(kept, possible): rewarded modes whose share is ≥ `fraction` of their target share, among those with a
    positive target share."""
    possible = [b for b in rewarded if target.get(b, 0.0) > 0]
    kept = [b for b in possible if share.get(b, 0.0) >= fraction * target[b]]
    return len(kept), len(possible)


def mode_report(labels: dict[str, list[str]], targets: dict[str, dict[str, float]],
                rewarded: Sequence[str]) -> dict:
    """Per prompt (labels: prompt -> its samples' backgrounds) the shares, TV distance to the target (also among
    the rewarded backgrounds only: `split_tv`) and modes kept; and their means over prompts (`modes_kept` /
    `modes_possible` are summed). With a 0/1 reward, TV ≥ 1 − mean reward: the split TV isolates the balance."""
    names = background_names()
    per_prompt = {}
    for prompt, got in labels.items():
        s = shares(got, names)
        kept, possible = modes_kept(s, targets[prompt], rewarded)
        per_prompt[prompt] = {"shares": s, "tv": tv_distance(s, targets[prompt]),
                              "split_tv": split_tv(s, targets[prompt], rewarded), "modes_kept": kept,
                              "modes_possible": possible}
    n = max(len(per_prompt), 1)
    rows = per_prompt.values()
    return {
        "tv": sum(r["tv"] for r in rows) / n,
        "split_tv": sum(r["split_tv"] for r in rows) / n,
        "modes_kept": sum(r["modes_kept"] for r in rows),
        "modes_possible": sum(r["modes_possible"] for r in rows),
        "shares": {b: sum(r["shares"][b] for r in rows) / n for b in names},
        "per_prompt": per_prompt,
    }


@torch.no_grad()
def sample_backgrounds(model, prompts: Sequence[str], per_prompt: int, *, steps: int, guidance: float, eta: float,
                       seed: int = 0, batch_size: int = 100, denoiser=None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, list[str]]:
    """prompt -> the backgrounds of `per_prompt` samples (seeds seed·10⁶ + k, one generator per image)."""
    from dagcli.rewards.modes import image_backgrounds
    from dagcli.sampling import generators_for, sample_batch

    out: dict[str, list[str]] = {}
    done, total = 0, len(prompts) * per_prompt
    for prompt in prompts:
        out[prompt] = []
        for start in range(0, per_prompt, batch_size):
            n = min(batch_size, per_prompt - start)
            seeds = [seed * 1_000_000 + start + k for k in range(n)]
            traj = sample_batch(model, [prompt] * n, generators_for(seeds), steps=steps, guidance=guidance, eta=eta,
                                denoiser=denoiser)
            out[prompt].extend(image_backgrounds(traj.images))
            done += n
            if progress is not None:
                progress(done, total)
    return out


def targets_for(base_shares: dict[str, dict[str, float]], values: dict[str, float], beta_eff: float
                ) -> dict[str, dict[str, float]]:
    """prompt -> the GFlowNet target shares, from the base model's shares of each background (prompt -> shares)."""
    return {p: target_shares(base, values, beta_eff) for p, base in base_shares.items()}


# --- the exact target of a reward that depends on the background only ------------------------------------------
#
# With r = r(b), p*(b | c) = p_base(b | c)·e^{β_eff r(b)} / Z(c) and log Z(c) = log Σ_b p_base(b | c)·e^{β_eff r(b)}
# are exact given the base model's shares per prompt: the target that relative balance objectives (and
# KL-regularised RL with coefficient 1/β_eff) land on, and against which a run's TV, reward gap and split are read.


def beta_for_odds(odds: float, reduction: str, latent_dims: int) -> float:
    """The `dag.beta` whose β_eff is ln(odds): a 0/1 reward then multiplies the rewarded backgrounds' odds by
    `odds` (ln 4: ×4); the inverse of `effective_beta`."""
    return math.log(odds) / effective_beta(1.0, reduction, latent_dims)


def log_partition(base: dict[str, float], values: dict[str, float], beta_eff: float) -> float:
    """log Z = log Σ_b p_base(b)·exp(β_eff·r(b)), computed in log space."""
    logs = [math.log(p) + beta_eff * values[b] for b, p in base.items() if p > 0]
    if not logs:
        raise ValueError("the base shares are all zero")
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs))


def expected_reward(share: dict[str, float], values: dict[str, float]) -> float:
    """E[r] = Σ_b share(b)·r(b)."""
    return sum(p * values[b] for b, p in share.items())


def rewarded_split(share: dict[str, float], rewarded: Sequence[str]) -> dict[str, float]:
    """How the rewarded backgrounds divide their total share (each over their sum; 0 each when none is seen)."""
    total = sum(share.get(b, 0.0) for b in rewarded)
    return {b: share.get(b, 0.0) / total if total > 0 else 0.0 for b in rewarded}


def exact_target(base: dict[str, float], values: dict[str, float], beta_eff: float) -> dict:
    """p*, log Z and E_{p*}[r] of one prompt from the base model's shares."""
    target = target_shares(base, values, beta_eff)
    return {"p_star": target, "log_z": log_partition(base, values, beta_eff),
            "expected_reward": expected_reward(target, values)}


def target_report(run: dict[str, dict[str, float]], base: dict[str, dict[str, float]], values: dict[str, float],
                  beta_eff: float, rewarded: Sequence[str]) -> dict:
    """A run's shares (prompt -> shares) against the exact target of each prompt: TV to p*, the reward gap
    E_run[r] − E_{p*}[r] (> 0: overshoot, as a reward maximiser does) and the split among rewarded modes, beside
    the target's; per prompt and averaged over prompts."""
    per_prompt = {}
    for prompt, share in run.items():
        exact = exact_target(base[prompt], values, beta_eff)
        per_prompt[prompt] = {**exact, "tv": tv_distance(share, exact["p_star"]),
                              "reward_gap": expected_reward(share, values) - exact["expected_reward"],
                              "split": rewarded_split(share, rewarded),
                              "target_split": rewarded_split(exact["p_star"], rewarded)}
    n = max(len(per_prompt), 1)
    rows = per_prompt.values()
    return {"tv": sum(r["tv"] for r in rows) / n, "reward_gap": sum(r["reward_gap"] for r in rows) / n,
            "split": {b: sum(r["split"][b] for r in rows) / n for b in rewarded},
            "target_split": {b: sum(r["target_split"][b] for r in rows) / n for b in rewarded},
            "per_prompt": per_prompt}
