"""The training loop: set-up, epochs, checkpoints, signals.

    Trainer.train():  for each epoch
        collect       rollout.Rollout.collect → EpochBatch   (sample, score, x̂0 rewards; algorithm.prepare)
        train_epoch   the unit's shuffled items → micro-batches → algorithm.loss → backward → optimiser step
                      (`dagcli.units`: transitions, whole trajectories, or re-noised final samples)
        log / save    metrics.MetricsLog, checkpoint.save_checkpoint (by epochs and by wall time)

One loop serves every model family (`dagcli.families`) and algorithm (`dagcli.algorithms`). Runs under
accelerate: each process samples its own prompts and noise, gradients are averaged by DDP, only the main process
writes. Everything random in an epoch is seeded by (seed, epoch, rank), so a resumed run continues exactly.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

from dagcli.algorithms import ALGORITHMS, build_algorithm
from dagcli.algorithms.base import Context, MicroBatch, PolicyOutput, hook, transition_batch
from dagcli.checkpoint import TrainState
from dagcli.config import Config, dump_toml, epoch_sizes, fill_model_defaults, replace, to_dict, unit_fraction
from dagcli.distributed import Dist
from dagcli.errors import DagError
from dagcli.families import set_sampler
from dagcli.families.base import check_image_size
from dagcli.faults import fault_point
from dagcli.metrics import MetricsLog, epoch_metrics, write_sample_grid
from dagcli.models import add_lora, load_model, load_tiny_decoder, lora_disabled, lora_swapped
from dagcli.optim import lr_factor, make_optimizer
from dagcli.progress import NullReporter, Reporter
from dagcli.prompts import prompt_metadata
from dagcli.rollout import EpochBatch, Rollout
from dagcli.stopping import StopRequest, check_interrupt
from dagcli.units import UNITS


class Trainer:
    """Set up once, then `train()`; `save()` and `resume()` handle checkpoints."""

    def __init__(self, config: Config, prompts: list[str], reporter: Reporter | None = None, model=None,
                 defaults_filled: bool = False):
        """`model`: an already loaded `LoadedModel` to train (default: load `config.model`); `defaults_filled`:
        `config` already holds the model's defaults (a plan of `dagcli.api`), so they are not looked up again."""
        from accelerate import Accelerator

        self.config = c = config if defaults_filled else fill_model_defaults(config)[0]
        self.prompts = prompts
        cpu = c.model.device == "cpu" or (c.model.device == "auto" and not torch.cuda.is_available())
        self.accelerator = Accelerator(mixed_precision=c.train.mixed_precision, cpu=cpu)
        self.dist = Dist(self.accelerator)
        self.is_main = self.accelerator.is_main_process
        self.reporter = reporter if (reporter is not None and self.is_main) else NullReporter()
        self.run_dir = Path(c.output.dir)
        self.state = TrainState()
        self.stop = StopRequest(self.reporter)
        self.stopped = False  # the last `train()` stopped early, on a signal, with a checkpoint
        self._setup(model)

    # --- set-up --------------------------------------------------------------------------------------
    def _setup(self, model) -> None:
        from dagcli.rewards import build_reward

        c, acc = self.config, self.accelerator
        if c.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        device = "cpu" if acc.device.type == "cpu" else str(acc.device)
        self.model = model or load_model(c.model.name or None, device=device, dtype=c.model.dtype)
        self.family = self.model.family
        set_sampler(self.family, c.sampling.sampler, c.sampling.eta)
        denoiser = add_lora(self.family.denoiser, c.lora, c.train.seed)
        if c.train.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.family.warn_truncated(self.prompts, self.reporter.warn)
        self.resolution = c.sampling.resolution or self.model.resolution
        check_image_size(self.family, {"sampling.resolution": self.resolution})  # before anything is written
        self.config = c = replace(c, "sampling", resolution=self.resolution)  # the run records what it used
        try:  # a reward server may answer one process and not another: they agree before sampling
            self.reward, failure = build_reward(c.reward.spec, device=device, base_model=self.model.name,
                                                options=dict(c.reward.options), strict_finite=False), None
        except DagError as e:
            failure = e
        if self.dist.sum_int(int(failure is not None)):
            raise failure or DagError("the reward could not be built on another process")
        self.rollout = Rollout(self.model, self.reward, c.sampling, seed=c.train.seed, prompts=self.prompts,
                               height=self.resolution, width=self.resolution, reduction=c.train.reduction,
                               rank=self.dist.rank, autocast=acc.autocast, reporter=self.reporter,
                               group_size=ALGORITHMS[c.train.algorithm].group_size(c),
                               metadata=prompt_metadata(c.sampling.prompts))
        self.context = self._context()
        self.algorithm = build_algorithm(c.train.algorithm, c, self.context)
        self.rollout.lora_steps = getattr(self.algorithm, "lora_steps", None)
        self.unit_name = ALGORITHMS[c.train.algorithm].unit
        self.unit = UNITS[self.unit_name]
        if self.algorithm.x0_decoder:
            self.rollout.x0_vae = load_tiny_decoder(self.algorithm.x0_decoder, self.model.device, self.model.dtype)
        groups = [{"params": [p for p in denoiser.parameters() if p.requires_grad], "lr": c.train.learning_rate}]
        self.optimizer = make_optimizer(groups + self.algorithm.param_groups(), c.train)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]  # the schedule's multiples apply to these
        names = list(self.algorithm.modules)
        self.denoiser, *modules, self.optimizer = acc.prepare(
            denoiser, *[self.algorithm.modules[n] for n in names], self.optimizer)
        self.algorithm.modules = dict(zip(names, modules, strict=True))
        self.metrics_log = MetricsLog(self.run_dir, c.output.report_to, to_dict(c), self.reporter)

    def _context(self) -> Context:
        c = self.config

        def x0_rewards(x, j, cond, prompts, guided: bool):
            return self.rollout.x0_rewards(x, j, cond, prompts, self.denoiser, guided)

        return Context(family=self.family, schedule=self.rollout.schedule, device=self.model.device,
                       height=self.resolution, width=self.resolution, steps=c.sampling.steps, seed=c.train.seed,
                       reduction=c.train.reduction, autocast=self.accelerator.autocast, x0_rewards=x0_rewards,
                       reference_step=self.reference_step, prompts=tuple(self.prompts),
                       frozen_output=self.frozen_output, recorded_step=self.recorded_step)

    @torch.no_grad()
    def reference_step(self, mb: MicroBatch):
        """The base model's step on a micro-batch's stored transitions: the same network with its LoRA disabled."""
        c, raw = self.config, self.raw_denoiser
        with self.accelerator.autocast(), lora_disabled(raw):
            out, _ = self.family.denoiser_fn(raw, self.rollout.schedule, mb.cond, c.sampling.guidance)(mb.x, mb.step_index)
        return self.family.step(self.rollout.schedule, mb.step_index, mb.x, out, c.sampling.eta, prev=mb.x_next,
                                reduction=c.train.reduction)

    @torch.no_grad()
    def recorded_step(self, mb: MicroBatch):
        """The sampling policy's step on a micro-batch's stored transitions, from the guided outputs recorded while
        sampling (no forward pass): its mean and std as the sampler drew them."""
        c = self.config
        return self.family.step(self.rollout.schedule, mb.step_index, mb.x, mb.out_old, c.sampling.eta,
                                prev=mb.x_next, reduction=c.train.reduction)

    @torch.no_grad()
    def frozen_output(self, x, j, cond, lora: dict | None):
        """The guided output at states j of the base model (`lora` None) or of the stored LoRA tensors `lora`."""
        c, raw = self.config, self.raw_denoiser
        block = lora_disabled(raw) if lora is None else lora_swapped(raw, lora)
        with self.accelerator.autocast(), block:
            return self.family.denoiser_fn(raw, self.rollout.schedule, cond, c.sampling.guidance)(x, j)[0]

    @property
    def raw_denoiser(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.denoiser)

    def raw_modules(self) -> dict[str, torch.nn.Module]:
        return {n: self.accelerator.unwrap_model(m) for n, m in self.algorithm.modules.items()}

    def trainable(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        return params + [p for m in self.algorithm.modules.values() for p in m.parameters()]

    # --- one epoch -------------------------------------------------------------------------------------
    def collect(self, epoch: int) -> tuple[EpochBatch, dict]:
        """Sampling and rewards for one epoch (NaN/inf rewards dropped and counted), prepared for the algorithm."""
        c = self.config
        try:
            with hook(self.algorithm, "sampling_policy")(self.raw_denoiser):
                batch, timing, dropped = self.rollout.collect(
                    epoch, self.raw_denoiser, self.algorithm.stored_x0_rewards,
                    unit_fraction(self.unit_name, c.train.timestep_fraction), c.train.always_last_step)
            failure = None
        except DagError as e:  # e.g. a reward server that stopped answering: every process stops, none waits
            failure = e
        if self.dist.sum_int(int(failure is not None)):
            raise DagError(self._stopping_message(epoch, failure)) from failure
        dropped = self.dist.sum_int(dropped)  # over all processes: they stop together
        if dropped:
            limit = c.reward.max_nonfinite
            self.state.nonfinite_rewards += dropped
            self.reporter.warn(f"dropped {dropped} trajectories with NaN/inf rewards "
                               f"({self.state.nonfinite_rewards} so far, limit {limit})")
            if self.state.nonfinite_rewards > limit:
                self.save()
                raise DagError(f"stopping: {self.state.nonfinite_rewards} NaN/inf rewards exceed "
                               f"reward.max_nonfinite = {limit}; last checkpoint saved in {self.run_dir}")
        self.algorithm.prepare(batch, self.dist)
        return batch, timing

    def micro_batch_loss(self, batch: EpochBatch, idx: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict]:
        """Per-transition loss [n] of the micro-batch `idx` [n, 2] of (trajectory, step) pairs, and its logs."""
        mb = transition_batch(batch, idx, self.model.device)
        out, step = self._policy_step(self.denoiser, mb)
        log_pf = step.log_prob
        logs = {"log_pf": log_pf.detach().mean(), "approx_kl": 0.5 * ((log_pf - mb.log_pf_old) ** 2).detach().mean()}
        loss, more = self.algorithm.loss(mb, PolicyOutput(out=out, step=step), batch, epoch)
        return loss, {**logs, **more}

    @torch.no_grad()
    def current_log_prob(self, batch: EpochBatch, idx: torch.Tensor) -> torch.Tensor:
        """[n] log P_F of the stored transitions `idx` [n, 2] under the current policy, no gradients."""
        return self._policy_step(self.raw_denoiser, transition_batch(batch, idx, self.model.device))[1].log_prob

    def _policy_step(self, denoiser, mb: MicroBatch):
        """The guided output of `denoiser` on a micro-batch's states and the step that scores its stored moves."""
        c, i = self.config, mb.step_index
        with self.accelerator.autocast():
            out, _ = self.family.denoiser_fn(denoiser, self.rollout.schedule, mb.cond, c.sampling.guidance,
                                             getattr(self.algorithm, "detach_uncond", False))(mb.x, i)
        step = self.family.step(self.rollout.schedule, i, mb.x, out, c.sampling.eta, prev=mb.x_next,
                                reduction=c.train.reduction)
        return out, step

    def policy(self, cond):
        """(x [n, ...], state index j [n]) -> the current guided output at those states for `cond`, differentiable
        (what a sample-level algorithm trains)."""
        c = self.config

        def guided(x: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            with self.accelerator.autocast():
                return self.family.denoiser_fn(self.denoiser, self.rollout.schedule, cond, c.sampling.guidance)(x, j)[0]

        return guided

    def train_epoch(self, epoch: int, batch: EpochBatch) -> dict:
        """Optimiser steps over this epoch's shuffled items of the algorithm's unit, with gradient accumulation."""
        c = self.config
        for module in (self.denoiser, *self.algorithm.modules.values()):
            module.train()
        self.unit.before_micro_batches(self, batch, epoch)
        items = self.unit.items(self, batch, epoch)
        items = items[: self.dist.min_int(len(items))]  # equal step counts on every process (DDP all-reduces)
        micro = [items[j : j + c.train.batch_size] for j in range(0, len(items), c.train.batch_size)]
        micro = [m for m in micro if len(m) >= self.algorithm.min_micro_batch]
        accum = epoch_sizes(c).accumulation
        frozen = self.algorithm.lora_frozen(epoch)
        sums, counts, grad_norms = defaultdict(float), defaultdict(int), defaultdict(list)
        skipped = 0
        starts = range(0, len(micro), accum)
        with self.reporter.task(f"epoch {epoch + 1}: training", len(micro)) as advance:
            for step, start in enumerate(starts):
                group = micro[start : start + accum]
                for k, idx in enumerate(group):
                    check_interrupt()
                    skipped += self._accumulate(batch, idx, epoch, len(group), k == len(group) - 1, sums, counts)
                    advance()
                self._set_learning_rates((epoch + (step + 0.5) / len(starts)) / c.train.epochs)
                self._optimizer_step(frozen, grad_norms)
        if skipped:
            self.reporter.warn(f"skipped {skipped} micro-batches with a NaN/inf loss")
        every = self.dist.sum_int(skipped)  # summed on every process alike, so that all stop together
        if every and every == self.dist.sum_int(len(micro)):  # nothing trained: the next epoch would do the same
            raise DagError(self._stopping_message(epoch, DagError(
                f"the loss was NaN/inf in every micro-batch ({every}), so nothing was trained (a reward on a "
                "scale whose β·r overflows, or a learning rate that has diverged: see the run's metrics.jsonl)")))
        out = {name: sums[name] / max(counts[name], 1) for name in sums}
        out.update({f"grad_norm_{k}": sum(v) / len(v) for k, v in grad_norms.items() if v})
        out.update(self.algorithm.epoch_logs(epoch))
        out["skipped_micro_batches"] = skipped
        if c.train.lr_schedule != "constant" or c.train.lr_warmup_epochs > 0:
            out["learning_rate"] = self.optimizer.param_groups[0]["lr"]  # the LoRA's, at the epoch's last step
        return out

    def _accumulate(self, batch, idx, epoch: int, group_size: int, sync: bool, sums: dict, counts: dict) -> int:
        """Backward of one micro-batch's mean loss / group size; returns 1 when its loss was NaN/inf (skipped)."""
        with self.dist.no_sync([self.denoiser, *self.algorithm.modules.values()], sync):
            loss, logs = self.unit.loss(self, batch, idx, epoch)
            loss = loss.mean()
            if not torch.isfinite(loss):
                self.accelerator.backward(self._zero_loss())  # keeps DDP's all-reduce in step across processes
                return 1
            self.accelerator.backward(loss / group_size)
        for name, v in [("loss", loss.detach()), *logs.items()]:
            sums[name] += float(v)
            counts[name] += 1
        return 0

    def _set_learning_rates(self, progress: float) -> None:
        """Each group's learning rate at `progress` (the step's midpoint, a fraction of train.epochs): its own rate
        times `train.lr_schedule`'s multiple there."""
        t = self.config.train
        factor = lr_factor(t.lr_schedule, progress, t.lr_warmup_epochs / t.epochs)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor

    def _optimizer_step(self, lora_frozen: bool, grad_norms: dict) -> None:
        """Clip each group's gradient norm, step, zero; during a flow warm-up the LoRA gets no update."""
        acc, max_norm = self.accelerator, self.config.train.max_grad_norm
        lora = [p for p in self.denoiser.parameters() if p.requires_grad]
        if lora_frozen:  # AdamW skips parameters whose grad is None
            for p in lora:
                p.grad = None
        else:
            grad_norms["lora"].append(float(acc.clip_grad_norm_(lora, max_norm)))
        for name, module in self.algorithm.modules.items():
            grad_norms[name].append(float(acc.clip_grad_norm_(module.parameters(), max_norm)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.optimizer_steps += 1
        fault_point("optimizer-step")

    def _zero_loss(self) -> torch.Tensor:
        """0 · Σ trainable weights: its backward adds exact zeros to every gradient (a skipped micro-batch)."""
        return sum((p * 0.0).sum() for p in self.trainable())

    # --- the loop ----------------------------------------------------------------------------------------
    def train(self, until_epoch: int | None = None) -> TrainState:
        """Train until `until_epoch` epochs are complete (default: `train.epochs`), or a stop is requested."""
        c = self.config
        until = c.train.epochs if until_epoch is None else min(until_epoch, c.train.epochs)
        self._last_save = time.monotonic()
        self.stop.install()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(dump_toml(c))
            self.metrics_log.keep_epochs(self.state.epoch)
        self._saved_epoch = self.state.epoch  # nothing new to save yet
        self.stopped = False
        try:
            while self.state.epoch < until:
                if self._stop_agreed():  # a signal after the last epoch's save: save that epoch, then stop
                    if self._saved_epoch != self.state.epoch:
                        self.save()
                    self.stopped = True
                    break
                self._run_epoch()
        finally:
            self.stop.restore()
        return self.state

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop (a signal may reach one process only): all agree."""
        return self.dist.sum_int(int(self.stop.requested)) > 0

    def _run_epoch(self) -> None:
        c, epoch = self.config, self.state.epoch
        batch, timing = self.collect(epoch)
        t0 = time.perf_counter()
        train_logs = self.train_epoch(epoch, batch)
        hook(self.algorithm, "end_epoch")(self.raw_denoiser, self.state.optimizer_steps)
        timing["time_training"] = time.perf_counter() - t0
        self.state.epoch += 1
        self.state.trajectories_seen += self.dist.sum_int(batch.traj.batch_size)
        metrics = epoch_metrics(batch, train_logs, timing, self.state, self.dist)
        if self.is_main:
            self.metrics_log.log(metrics)
        last = self.state.epoch == c.train.epochs
        # every process saves (and then stops) after the same epoch
        if last or self.state.epoch % c.output.checkpoint_every == 0 or self._stop_agreed() \
                or self._checkpoint_due():
            self.save()
        if c.output.sample_every and (self.state.epoch % c.output.sample_every == 0 or last) and self.is_main:
            write_sample_grid(self.model, self.raw_denoiser, self.prompts, c.sampling, self.resolution,
                              self.resolution, self.run_dir / "samples" / f"epoch-{self.state.epoch:04d}.png")

    def _stopping_message(self, epoch: int, failure: DagError | None) -> str:
        """Why the run stops in `epoch`, and how to continue from what is saved (nothing of the epoch is)."""
        from dagcli.checkpoint import list_checkpoints

        why = str(failure) if failure is not None else "the rewards failed on another process"
        saved = list_checkpoints(self.run_dir)
        hint = (f"the last checkpoint {saved[-1][1]} is intact; resume with "
                f"`dag train --resume --output {self.run_dir}`" if saved else "no checkpoint had been saved yet")
        return f"stopping in epoch {epoch + 1}: {why}; {hint}"

    def _checkpoint_due(self) -> bool:
        """`output.checkpoint_minutes` passed since the last save (or the start); every process agrees."""
        minutes = self.config.output.checkpoint_minutes
        due = minutes > 0 and time.monotonic() - self._last_save >= 60 * minutes
        return self.dist.sum_int(int(due)) > 0

    # --- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        from dagcli.checkpoint import save_checkpoint

        self.accelerator.wait_for_everyone()
        self._last_save = time.monotonic()
        self._saved_epoch = self.state.epoch
        if not self.is_main:
            return None
        c = self.config
        self.state.algorithm = self.algorithm.state_dict()
        folder = save_checkpoint(
            self.run_dir, step=self.state.epoch, family=self.family, denoiser=self.raw_denoiser,
            modules=self.raw_modules(), module_metadata=self.algorithm.module_metadata(), optimizer=self.optimizer,
            state=asdict(self.state), config=to_dict(c), base_model=self.model.name,
            lora=dict(rank=c.lora.rank, alpha=c.lora.alpha, target_modules=list(c.lora.target_modules),
                      **self._lora_steps_meta()),
            keep_last=c.output.keep_last, tensors=hook(self.algorithm, "state_tensors")(),
        )
        self.reporter.info(f"saved checkpoint {folder}")
        return folder

    def _lora_steps_meta(self) -> dict:
        """{"steps": [k, T]} when the LoRA samples only the first k of the T steps (a base-model tail), else {}."""
        k = self.rollout.lora_steps
        return {"steps": [k, self.config.sampling.steps]} if k is not None else {}

    def resume(self, folder: Path) -> None:
        from dagcli.checkpoint import (
            check_compatible,
            check_lora_fits,
            load_checkpoint_into,
            load_tensors,
            read_meta,
        )

        c = self.config
        check_compatible(folder, read_meta(folder), base_model=self.model.name, lora_rank=c.lora.rank,
                         lora_targets=list(c.lora.target_modules), algorithm=c.train.algorithm)
        check_lora_fits(folder, self.model.name, self.family, self.raw_denoiser)
        state = load_checkpoint_into(folder, lora_prefix=self.family.lora_prefix, denoiser=self.raw_denoiser,
                                     modules=self.raw_modules(), optimizer=self.optimizer)
        self.state = TrainState.from_dict(state)
        self.algorithm.load_state_dict(self.state.algorithm)
        hook(self.algorithm, "load_state_tensors")(load_tensors(folder))
        self.reporter.info(f"resumed from {folder} (epoch {self.state.epoch})")

__all__ = ["Trainer", "TrainState"]
