"""How much of a training gradient is signal: the per-trajectory spread of an algorithm's LoRA gradient at the base
model (or at a trained run's checkpoint), against its mean.

    python benchmarks/gradient_snr.py --config examples/configs/tiny-modes-exact-target.toml \
        --set train.algorithm=rtb --set rtb.log_z=vargrad --set rtb.tail_steps=5 [--set ...] [--resume CKPT] \
        [--output JSON]

From the preset (with the `--set` overrides), it samples one epoch at the zero-initialised LoRA (with `--resume`:
the checkpoint's LoRA, and its log Z table where it has one), prepares it as
training does (for RTB: A(τ) of every trajectory) and takes the LoRA gradient of each trajectory's own loss, the
sum of its trained steps' losses: g_1 .. g_N. With ḡ their mean and tr Σ the summed variance of their coordinates,
it reports

    signal = ‖ḡ‖² − tr Σ / N          the squared norm of the expected gradient (unbiased)
    trajectories_for_snr_1 = tr Σ / signal   how many trajectories one optimizer step needs before the mean of
                                              their gradients is as large as its noise (≈ tr Σ / N)

and the cosine between the two halves' mean gradients (1 when the direction is resolved, 0 for noise). Results
go to benchmarks/results/gradient-snr.json unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EPOCH = 10_000  # sampling seeds no training run of a few hundred epochs reaches


def per_trajectory_gradients(trainer, batch, epoch: int) -> torch.Tensor:
    """[N, P] the LoRA gradient of each trajectory's summed loss over its trained transitions."""
    params = [p for p in trainer.raw_denoiser.parameters() if p.requires_grad]
    rows = []
    for b in range(batch.traj.batch_size):
        pairs = batch.pairs[batch.pairs[:, 0] == b]
        for p in params:
            p.grad = None
        loss, _ = trainer.micro_batch_loss(batch, pairs, epoch)
        loss.sum().backward()
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]))
    for p in params:
        p.grad = None
    return torch.stack(rows).double()


def snr(grads: torch.Tensor) -> dict:
    """Signal and noise of the per-trajectory gradients [N, P] (see the module's docstring)."""
    n = grads.shape[0]
    mean = grads.mean(0)
    trace = float(grads.var(0, unbiased=True).sum())
    signal = float(mean.pow(2).sum()) - trace / n
    half = n // 2
    a, b = grads[:half].mean(0), grads[half : 2 * half].mean(0)
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return {"trajectories": n, "parameters": grads.shape[1], "mean_norm2": float(mean.pow(2).sum()),
            "variance_trace": trace, "signal": signal,
            "trajectories_for_snr_1": trace / signal if signal > 0 else None, "half_cosine": cosine}


def measure(config: Path, overrides: list[str], resume: Path | None = None) -> dict:
    from preset_chain import preset_trainer

    cfg, _, trainer = preset_trainer(config, f"dagcli-gradient-snr-{config.stem}", overrides)
    if resume is not None:  # a trained run's checkpoint: its LoRA (and log Z table) in place of the base model
        from dagcli.checkpoint import resolve_checkpoint

        trainer.resume(resolve_checkpoint(resume))  # a run directory means its latest checkpoint
    batch, _ = trainer.collect(EPOCH)
    trainer.raw_denoiser.train()
    trainer.unit.before_micro_batches(trainer, batch, EPOCH)
    grads = per_trajectory_gradients(trainer, batch, EPOCH)
    return {"config": str(config), "overrides": overrides, "algorithm": cfg.train.algorithm,
            "resumed_from": str(resume) if resume is not None else None, "epoch": trainer.state.epoch,
            "reward_mean": float(batch.rewards.mean()), **snr(grads)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "examples/configs/tiny-modes-exact-target.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="section.key=value")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--resume", type=Path, default=None, metavar="CHECKPOINT",
                    help="measure at a trained run's checkpoint (a checkpoints/step-N folder, or a run directory: its"
                         " latest; the same --config and --set as its run) instead of at the base model")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "gradient-snr.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from dagcli.errors import DagError

    try:
        result = measure(a.config, a.overrides, a.resume)
    except DagError as e:  # a preset or checkpoint dagcli refuses: its one line
        ap.error(str(e).replace("--resume-from", "--resume"))
    result["command"] = "python benchmarks/gradient_snr.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "torch_threads": a.threads}
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(result, indent=1))
    need = result["trajectories_for_snr_1"]
    print(f"{result['trajectories']} trajectories, {result['parameters']} LoRA parameters: half-cosine "
          f"{result['half_cosine']:.3f}; trajectories per step for SNR 1: {need:.0f}" if need else
          f"{result['trajectories']} trajectories: no signal above the noise (half-cosine {result['half_cosine']:.3f})")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
