"""One epoch's data: sample trajectories with the current LoRA, score them, and (for DAG) score the one-step
prediction x̂0 of every state once; then pick the transitions to train on.

Everything random is drawn from generators seeded by (run seed, epoch, rank, purpose), so a resumed run repeats
exactly and processes never duplicate each other's trajectories. An algorithm that compares trajectories of one
prompt (GRPO) gets them in groups: each sampler call draws one prompt per group and repeats it `group_size` times,
each member with its own noise. Groups never span sampler calls or processes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dagcli.errors import DagError
from dagcli.faults import fault_point
from dagcli.sampling import Trajectory, sample_batch
from dagcli.stopping import check_interrupt

SAMPLING_STREAM, TRANSITION_STREAM, SAMPLE_STREAM = 1, 2, 3


def epoch_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """A distinct, reproducible seed for each (run seed, epoch, rank, purpose)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + stream) % (2**63 - 1)


@dataclass
class EpochBatch:
    """Everything one epoch trains on, concatenated over the sampler calls. N trajectories, T steps."""

    traj: Trajectory  # latents [N,T+1,...], log_probs [N,T], model outputs [N,T,...], cond [N]
    rewards: torch.Tensor  # [N] terminal rewards
    components: dict[str, torch.Tensor]  # name -> [N]
    fl_rewards: torch.Tensor | None  # [N,T] r(Decode(x̂0(x_i))) of the states trained on (NaN elsewhere), or None
    pairs: torch.Tensor  # [M, 2] (trajectory, step) transitions to train on, shuffled
    advantages: torch.Tensor | None = None  # [N] set by an algorithm's `prepare` (DDPO, GRPO)
    groups: torch.Tensor | None = None  # [N] long: the prompt group of each trajectory (unique within the process)
    step_weights: torch.Tensor | None = None  # [N, T'] a per-step weight set by `prepare_trajectories` (rtb "to-go")


def draw_prompts(n_prompts: int, batch_size: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """[batch_size] prompt indices of one sampler call: i.i.d. uniform, or with `group_size` > 1 one draw per group,
    each repeated `group_size` times in a row (the batch size is a multiple of it)."""
    if group_size <= 1:
        return torch.randint(n_prompts, (batch_size,), generator=generator)
    return torch.randint(n_prompts, (batch_size // group_size,), generator=generator).repeat_interleave(group_size)


def select_transitions(seed: int, epoch: int, rank: int, n: int, steps: int, fraction: float,
                       always_last: bool) -> torch.Tensor:
    """[M, 2] (trajectory, step) pairs to train on this epoch: a `fraction` of the random steps of each of the n
    trajectories (the final one always among them with `always_last`), shuffled."""
    from dagcli.config import transitions_per_trajectory

    per_trajectory = transitions_per_trajectory(steps, fraction)
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch, rank, stream=TRANSITION_STREAM))
    pairs = []
    for b in range(n):
        chosen = torch.randperm(steps, generator=g)[:per_trajectory]
        if always_last and per_trajectory < steps and (steps - 1) not in chosen.tolist():
            chosen[-1] = steps - 1
        pairs.extend((b, int(i)) for i in chosen)
    pairs_t = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return pairs_t[torch.randperm(len(pairs_t), generator=g)]


def states_needed(pairs: torch.Tensor, n: int, steps: int) -> torch.Tensor:
    """[n, steps] bool: the non-terminal states the transitions `pairs` start or end in (whose x̂0 rewards the
    forward-looking flow reads)."""
    needed = torch.zeros(n, steps + 1, dtype=torch.bool)
    needed[pairs[:, 0], pairs[:, 1]] = True
    needed[pairs[:, 0], pairs[:, 1] + 1] = True
    return needed[:, :steps]


def keep_pairs(pairs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The pairs of the kept trajectories (`keep` [n] bool), renumbered to the kept trajectories' positions."""
    new_index = torch.cumsum(keep.long(), 0) - 1
    kept = pairs[keep[pairs[:, 0]]]
    return torch.stack([new_index[kept[:, 0]], kept[:, 1]], 1)


class Rollout:
    """Samples and scores a process's trajectories for an epoch; `settings` is the `[sampling]` section."""

    def __init__(self, model, reward, settings, *, seed: int, prompts: list[str], height: int, width: int,
                 reduction: str, rank: int, autocast: Callable, reporter, group_size: int = 1,
                 metadata: dict[str, dict] | None = None):
        self.model, self.family, self.reward, self.settings = model, model.family, reward, settings
        self.seed, self.prompts, self.height, self.width = seed, prompts, height, width
        self.reduction, self.rank, self.autocast, self.reporter = reduction, rank, autocast, reporter
        self.group_size = group_size
        self.metadata = metadata or {}  # prompt -> its fields from a .jsonl prompts file, given to every reward call
        if settings.batch_size % group_size:
            raise DagError(f"sampling.batch_size = {settings.batch_size} does not divide into groups of {group_size}; "
                           f"use a multiple of {group_size}")
        self.schedule = self.family.schedule(settings.steps, height, width)
        self.lora_steps: int | None = None  # the leading steps the LoRA samples, the base model the rest; None: all
        self.x0_vae = None  # a smaller decoder for the x̂0 images (`models.load_tiny_decoder`), None: the VAE

    def collect(self, epoch: int, denoiser, stored_x0: str | None, fraction: float = 1.0,
                always_last: bool = False) -> tuple[EpochBatch, dict, int]:
        """The epoch's trajectories, rewards and the transitions to train on (a `fraction` of each trajectory's
        steps); with `stored_x0` = "cond" | "guided", the x̂0 rewards of the states those transitions touch, scored
        from the stored model output (each state once, no others). Also timings, and how many trajectories were
        dropped for a NaN/inf reward (left out of the batch and its transitions)."""
        s = self.settings
        n = s.batch_size * s.batches_per_epoch
        pairs = select_transitions(self.seed, epoch, self.rank, n, s.steps, fraction, always_last)
        if self.lora_steps is not None:  # the base model's tail is not trained
            pairs = pairs[pairs[:, 1] < self.lora_steps]
        needed = states_needed(pairs, n, s.steps)
        traj, rewards, components, fl, timing = self._sample_and_score(epoch, denoiser, stored_x0, needed)
        groups = torch.arange(traj.batch_size) // self.group_size
        keep = torch.isfinite(rewards)
        if fl is not None:
            keep &= (torch.isfinite(fl) | ~needed).all(1)
        dropped = int((~keep).sum())
        if dropped:
            idx = keep.nonzero().flatten()
            traj, rewards, groups = traj.select(idx), rewards[keep], groups[keep]
            components = {k: v[keep] for k, v in components.items()}
            fl = fl[keep] if fl is not None else None
            pairs = keep_pairs(pairs, keep)
        batch = EpochBatch(traj=traj, rewards=rewards, components=components, fl_rewards=fl, pairs=pairs,
                           groups=groups)
        return batch, timing, dropped

    def sample_epoch(self, epoch: int, denoiser, on_batch: Callable[[Trajectory], None] | None = None) -> Trajectory:
        """Sample this process's trajectories for the epoch (no gradients); `on_batch` sees each sampler call's
        trajectories as soon as they exist."""
        s = self.settings
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, self.rank, stream=SAMPLING_STREAM))
        parts = []
        denoiser.eval()
        with torch.no_grad(), self.autocast(), self.reporter.task(f"epoch {epoch + 1}: sampling",
                                                                  s.batches_per_epoch) as advance:
            for _ in range(s.batches_per_epoch):
                idx = draw_prompts(len(self.prompts), s.batch_size, self.group_size, g)
                prompts = [self.prompts[i] for i in idx.tolist()]
                seeds = torch.randint(2**31 - 1, (s.batch_size,), generator=g).tolist()
                gens = [torch.Generator().manual_seed(x) for x in seeds]
                parts.append(sample_batch(self.model, prompts, gens, steps=s.steps, guidance=s.guidance, eta=s.eta,
                                          reduction=self.reduction, denoiser=denoiser, height=self.height,
                                          width=self.width, lora_steps=self.lora_steps))
                if on_batch is not None:
                    on_batch(parts[-1])
                advance()
        return Trajectory.concat(parts)

    def score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards [B] and their components, float32 on the CPU (also in the worker thread: stops on Ctrl-C); each
        prompt's metadata goes to the reward."""
        check_interrupt()
        fault_point("reward")
        metadata = [dict(self.metadata.get(p, {})) for p in prompts] if self.metadata else None
        out = self.reward(images, prompts, metadata)
        return out.scores.float().cpu(), {k: v.float().cpu() for k, v in out.components.items()}

    def forward_looking_rewards(self, traj: Trajectory, stored_x0: str,
                                needed: torch.Tensor | None = None) -> torch.Tensor:
        """r(Decode(x̂0(x_i))) [N, T] of the non-terminal states marked in `needed` [N, T] (default: all; NaN for the
        others), from the model outputs recorded while sampling ("cond": the conditional output, "guided": the
        guided one): each state decoded and scored once."""
        n, steps = traj.log_probs.shape
        flat = torch.arange(n * steps) if needed is None else needed.flatten().nonzero().flatten()
        out = (traj.out_cond if stored_x0 == "cond" else traj.out_guided).flatten(0, 1)[flat]
        x = traj.latents[:, :steps].flatten(0, 1)[flat]  # [K, ...]
        x0 = self.family.predict_x0(self.schedule, torch.arange(steps).repeat(n)[flat], x, out)
        prompts = [traj.prompts[k // steps] for k in flat.tolist()]
        scores = []
        chunk = max(1, self.settings.batch_size)
        for i in range(0, x0.shape[0], chunk):
            images = self.family.decode(x0[i : i + chunk].to(self.model.device), vae=self.x0_vae)
            scores.append(self.score(images, prompts[i : i + chunk])[0])
        result = torch.full((n * steps,), float("nan"))
        if scores:
            result[flat] = torch.cat(scores)
        return result.reshape(n, steps)

    def x0_rewards(self, x: torch.Tensor, j: torch.Tensor, cond, prompts: list[str], denoiser,
                   guided: bool) -> torch.Tensor:
        """The reference procedure: x̂0 of states j with the current model (its guided output, or the conditional
        one), decoded and scored. No gradients."""
        guidance = self.settings.guidance if guided else 1.0
        with torch.no_grad(), self.autocast():
            out = self.family.denoiser_fn(denoiser, self.schedule, cond, guidance)(x, j)[0]
            x0 = self.family.predict_x0(self.schedule, j, x, out.float())
            images = self.family.decode(x0, vae=self.x0_vae)
        return self.score(images, prompts)[0].to(x.device)

    def _score(self, traj: Trajectory, stored_x0: str | None, needed: torch.Tensor):
        with torch.no_grad():
            rewards, components = self.score(traj.images, traj.prompts)
            fl = self.forward_looking_rewards(traj, stored_x0, needed) if stored_x0 else None
        return rewards, components, fl

    def _sample_and_score(self, epoch: int, denoiser, stored_x0: str | None, needed: torch.Tensor):
        """Sample the epoch and score it; with `sampling.overlap_rewards`, each sampler call's images are scored in
        a worker thread (on its own CUDA stream) while the next call samples. Timings: time_reward is the scoring
        time not hidden behind sampling."""
        t0 = time.perf_counter()
        if not self.settings.overlap_rewards:
            traj = self.sample_epoch(epoch, denoiser)
            t1 = time.perf_counter()
            rewards, components, fl = self._score(traj, stored_x0, needed)
            return traj, rewards, components, fl, {"time_sampling": t1 - t0, "time_reward": time.perf_counter() - t1}
        device = self.model.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None

        def work(part: Trajectory, start: int):
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                return self._score(part, stored_x0, needed[start : start + part.batch_size])

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dagcli-reward")
        futures = []

        def submit(part: Trajectory) -> None:
            futures.append(pool.submit(work, part, len(futures) * self.settings.batch_size))

        try:
            traj = self.sample_epoch(epoch, denoiser, on_batch=submit)
            t1 = time.perf_counter()
            results = [f.result() for f in futures]
        finally:  # on an error or Ctrl-C the queued batches are dropped; the running one stops at its next check
            pool.shutdown(wait=True, cancel_futures=True)
        rewards = torch.cat([r for r, _, _ in results])
        components = {k: torch.cat([c[k] for _, c, _ in results]) for k in results[0][1]}
        fl = torch.cat([f for _, _, f in results]) if results[0][2] is not None else None
        return traj, rewards, components, fl, {"time_sampling": t1 - t0, "time_reward": time.perf_counter() - t1}
