"""How much of DAG-DB's residual is the P_F/P_B mismatch, for each flow sampler, on the base model.

    python benchmarks/pf_pb_mismatch.py                      # tiny-flow, both samplers, beta 15 and 50, CPU

On trajectories of the base model (LoRA off), each transition's detailed-balance residual splits as

    δ_i = a_i + m_i,   a_i = β (r(x̂0(x_i)) − r(x̂0(x_{i+1})))   (flow part, forward-looking rewards, F̃ = 0)
                       m_i = log P_F(x_{i+1} | x_i) − log P_B(x_i | x_{i+1})   (no reward in it)

(terminal state: r(x_T) itself). DB's gradient on the network's outputs is 2δ_i ∂δ_i; the share of its scale that
the mismatch carries is reported as E[m²] / (E[m²] + E[a²]) over all transitions ("raw"), and again with m less
its mean per step ("centred": a flow network of σ absorbs a constant per step, e.g. the log-ratio of the two
kernels' normalisers), with the reduction of the
training runs ("mean": log-probs divided by the latent's dimensions). A sampler whose P_F is the posterior of P_B
has a small m at every step; DDIM for rectified flow at η = 1 is that sampler. The reward is the modes demo's
(`background-modes`, black and white rewarded), the prompts its prompt file. Results go to
benchmarks/results/pf_pb_mismatch.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# sampler name -> its eta (the training default of the SDE; η = 1, the posterior of P_B, for DDIM)
SAMPLERS = {"sde": 0.7, "ddim": 1.0}


def rollout_terms(model, reward, prompts: list[str], sampler: str, eta: float, steps: int, guidance: float,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m [B, T], Δr [B, T]) of one batch of base-model trajectories with `sampler`."""
    from dagcli.families import set_sampler
    from dagcli.sampling import generators_for, sample_batch

    family = model.family
    set_sampler(family, sampler, eta)
    traj = sample_batch(model, prompts, generators_for(range(seed, seed + len(prompts))), steps=steps,
                        guidance=guidance, eta=eta, decode=False)
    schedule = family.schedule(steps, model.resolution, model.resolution)
    batch, total = traj.batch_size, traj.num_steps
    scores = []
    for j in range(total + 1):
        index = torch.full((batch,), j, dtype=torch.long)
        x = traj.latents[:, j]
        x0 = x if j == total else family.predict_x0(schedule, index, x, traj.out_guided[:, j])
        scores.append(reward(family.decode(x0), traj.prompts).scores)
    r = torch.stack(scores, 1)  # [B, T+1]
    backward = [family.backward_log_prob(schedule, torch.full((batch,), i, dtype=torch.long), traj.latents[:, i],
                                         traj.latents[:, i + 1]) for i in range(total)]
    set_sampler(family, "sde")
    return traj.log_probs - torch.stack(backward, 1), r[:, :-1] - r[:, 1:]


def shares(m: torch.Tensor, dr: torch.Tensor, betas: list[float]) -> dict:
    """E[m²] / (E[m²] + β² E[Δr²]) per β, for m as it is and for m less its mean per step (the part a flow F̃ of σ
    alone cannot absorb), and the per-step RMS of both."""
    m, a2 = m.double(), float((dr.double() ** 2).mean())
    centred = m - m.mean(0, keepdim=True)
    out = {"mean_dr2": a2}
    for name, part in (("raw", m), ("centred", centred)):
        m2 = float((part**2).mean())
        out[name] = {"mean_m2": m2, "rms_m_per_step": [round(v, 4) for v in (part**2).mean(0).sqrt().tolist()],
                     "share": {f"beta {b:g}": round(m2 / (m2 + b**2 * a2), 4) for b in betas}}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-flow")
    p.add_argument("--batches", type=int, default=4, help="batches of one trajectory per prompt")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--betas", default="15,50")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/pf_pb_mismatch.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dagcli.models import load_model
    from dagcli.prompts import load_prompts
    from dagcli.rewards import build_reward

    t0 = time.time()
    model = load_model(args.model, device="cpu")
    reward = build_reward("background-modes", base_model=model.name,
                          options={"background-modes": {"colours": "black,white", "high": 1.0, "low": 0.0}})
    prompts = [item.prompt for item in load_prompts(str(ROOT / "examples/prompts/modes.txt"))]
    betas = [float(b) for b in args.betas.split(",")]
    result = {"command": "python benchmarks/pf_pb_mismatch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "steps": args.steps, "guidance": args.guidance, "reduction": "mean",
              "trajectories": args.batches * len(prompts),
              "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {args.threads} threads"}
    for sampler, eta in SAMPLERS.items():
        parts = [rollout_terms(model, reward, prompts, sampler, eta, args.steps, args.guidance, 1000 * b)
                 for b in range(args.batches)]
        m, dr = torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])
        result[sampler] = {"eta": eta, **shares(m, dr, betas)}
        print(sampler, json.dumps({k: result[sampler][k]["share"] for k in ("raw", "centred")}), flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
