"""What a micro-batch holds: the loss unit an algorithm declares (`AlgorithmInfo.unit`), behind one loop.

The trainer asks the epoch's unit for its items (a shuffled [M, k] long tensor, drawn from generators seeded by
(run seed, epoch, rank), so a resumed run repeats them), cuts them into micro-batches and accumulates gradients;
the unit turns a micro-batch of items into the algorithm's per-item loss [n]. The loop, checkpoints, resume and
the processes' agreement on step counts know nothing else of it.

    transitions   items (trajectory, step) of the rollout's chosen steps; `Algorithm.loss(MicroBatch, ...)`
    trajectories  items (trajectory, step) of every step; before the micro-batches the current policy scores every
                  stored step once (no gradients) and `Algorithm.prepare_trajectories` turns those log-probs into
                  per-trajectory quantities; then per-step terms as for transitions (memory stays per step)
    samples       items (trajectory, step j, noise seed): the clean final latent of a trajectory, to be re-noised
                  at state j with fresh noise; `Algorithm.loss(SampleBatch, policy, ...)` with no recorded log-prob
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from dagcli.families.base import Cond
from dagcli.rollout import SAMPLE_STREAM, epoch_seed


@dataclass
class SampleBatch:
    """n (sample, fresh state, fresh noise) items of the epoch's final latents, tensors on the training device."""

    traj_index: torch.Tensor  # [n] long (CPU): which trajectory's final latent
    step_index: torch.Tensor  # [n] long (CPU): j, the sampler state to re-noise to (0: pure noise)
    x0: torch.Tensor  # [n, ...] the clean final latent x_T
    noise: torch.Tensor  # [n, ...] fresh standard normal noise, one seeded generator per item
    cond: Cond  # [n]
    prompts: list[str]  # [n]


class Unit(Protocol):
    def items(self, trainer, batch, epoch: int) -> torch.Tensor: ...  # [M, k] this process's shuffled items
    def before_micro_batches(self, trainer, batch, epoch: int) -> None: ...  # per-epoch work on the whole batch
    def loss(self, trainer, batch, idx: torch.Tensor, epoch: int
             ) -> tuple[torch.Tensor, dict]: ...  # per-item loss [n] of a micro-batch and its logs


class Transitions:
    """The rollout's chosen (trajectory, step) pairs, as they were drawn."""

    def items(self, trainer, batch, epoch: int) -> torch.Tensor:
        return batch.pairs

    def before_micro_batches(self, trainer, batch, epoch: int) -> None:
        """Nothing: every quantity is per transition."""

    def loss(self, trainer, batch, idx: torch.Tensor, epoch: int):
        return trainer.micro_batch_loss(batch, idx, epoch)


class Trajectories(Transitions):
    """Every step of every trajectory; the algorithm first sees the current log-prob of each."""

    def before_micro_batches(self, trainer, batch, epoch: int) -> None:
        """log P_F [N, T] of every stored step under the current policy, then the algorithm's per-trajectory
        quantities (`prepare_trajectories`), set on the batch."""
        traj, size = batch.traj, trainer.config.train.batch_size
        n, steps = traj.log_probs.shape
        log_pf = torch.full((n, steps), float("nan"))  # NaN on a base-model tail (`Rollout.lora_steps`): not scored
        scored = trainer.rollout.lora_steps or steps
        every = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(scored), indexing="ij"), -1).reshape(-1, 2)
        with torch.no_grad():
            for start in range(0, len(every), size):
                idx = every[start : start + size]
                log_pf[idx[:, 0], idx[:, 1]] = trainer.current_log_prob(batch, idx).float().cpu()
        trainer.algorithm.prepare_trajectories(batch, log_pf, trainer.dist)


class Samples:
    """Final latents re-noised at fresh states: `per_trajectory` (state, noise seed) draws of each."""

    def items(self, trainer, batch, epoch: int) -> torch.Tensor:
        c = trainer.config
        from dagcli.config import transitions_per_trajectory

        per = transitions_per_trajectory(c.sampling.steps, c.train.timestep_fraction)
        g = torch.Generator().manual_seed(epoch_seed(c.train.seed, epoch, trainer.dist.rank, stream=SAMPLE_STREAM))
        n = batch.traj.batch_size
        samples = torch.arange(n).repeat_interleave(per)
        states = torch.randint(c.sampling.steps, (n * per,), generator=g)
        seeds = torch.randint(2**31 - 1, (n * per,), generator=g)
        items = torch.stack([samples, states, seeds], 1)
        return items[torch.randperm(len(items), generator=g)]

    def before_micro_batches(self, trainer, batch, epoch: int) -> None:
        """Nothing: a sample's items are independent."""

    def loss(self, trainer, batch, idx: torch.Tensor, epoch: int):
        dev, traj = trainer.model.device, batch.traj
        b, j = idx[:, 0], idx[:, 1]
        x0 = traj.latents[b, -1]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in idx[:, 2].tolist()]).to(x0.dtype)
        sb = SampleBatch(traj_index=b, step_index=j, x0=x0.to(dev), noise=noise.to(dev), cond=traj.cond[b].to(dev),
                         prompts=[traj.prompts[k] for k in b.tolist()])
        return trainer.algorithm.loss(sb, trainer.policy(sb.cond), batch, epoch)


UNITS: dict[str, Unit] = {"transitions": Transitions(), "trajectories": Trajectories(), "samples": Samples()}


