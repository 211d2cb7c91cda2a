"""The training loop: sample trajectories -> rewards -> shuffled transitions -> optimiser steps -> checkpoint.

One `Trainer` serves DAG-DB, DAG-KL and DDPO; the algorithms differ only in `_transition_loss`. Runs under
accelerate: each process samples its own prompts and noise (seeded by seed, epoch and rank), gradients are
averaged by DDP, and only the main process writes.

Determinism: everything random in an epoch is drawn from generators seeded by (seed, epoch, rank), so a run
resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dagcli.algorithms import losses
from dagcli.algorithms.ddpo import per_prompt_advantages
from dagcli.algorithms.flow import FlowConfig, FlowNetwork, flow_config_for
from dagcli.config import Config, dump_toml, to_dict
from dagcli.diffusion import Schedule, Trajectory, backward_log_prob, ddim_step, pred_x0_from_eps
from dagcli.errors import DagError
from dagcli.faults import fault_point
from dagcli.progress import NullReporter, Reporter
from dagcli.sampling import PromptEncoder, decode_latents, guided_denoiser, sample_batch


def epoch_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """A distinct, reproducible seed for each (run seed, epoch, rank, purpose)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + stream) % (2**63 - 1)


def beta_at(beta: float, ramp_epochs: int, epoch: int) -> float:
    """β for an epoch (0-based): linear ramp reaching β after `ramp_epochs` epochs; the first epoch is > 0."""
    if ramp_epochs <= 0:
        return beta
    return beta * min(1.0, (epoch + 1) / ramp_epochs)


@dataclass
class TrainState:
    """Counters and buffers that a checkpoint must carry besides weights."""

    epoch: int = 0  # epochs completed
    optimizer_steps: int = 0
    trajectories_seen: int = 0  # over all processes
    nonfinite_rewards: int = 0
    ddpo_buffers: dict[str, list[float]] = field(default_factory=dict)  # prompt -> recent rewards

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class EpochBatch:
    """Everything one epoch trains on, concatenated over the sampler calls. N trajectories, T steps."""

    traj: Trajectory  # latents [N,T+1,...], log_probs [N,T], eps [N,T,...], prompt_embeds [N,L,D]
    rewards: torch.Tensor  # [N] terminal rewards r(x_0)
    components: dict[str, torch.Tensor]  # name -> [N]
    fl_rewards: torch.Tensor | None  # [N,T] r(Decode(x̂0(x_i))) of every non-terminal state, or None
    advantages: torch.Tensor | None  # [N] DDPO advantages, or None


def concat_trajectories(parts: list[Trajectory]) -> Trajectory:
    first = parts[0]
    return Trajectory(
        latents=torch.cat([p.latents for p in parts]),
        timesteps=first.timesteps,
        log_probs=torch.cat([p.log_probs for p in parts]),
        eps_guided=torch.cat([p.eps_guided for p in parts]),
        eps_cond=torch.cat([p.eps_cond for p in parts]),
        prompt_embeds=torch.cat([p.prompt_embeds for p in parts]),
        prompts=[q for p in parts for q in p.prompts],
        images=torch.cat([p.images for p in parts]) if first.images is not None else None,
        eta=first.eta,
        reduction=first.reduction,
    )


class Trainer:
    """Set up once, then `train()`; `save()` and `resume()` handle checkpoints."""

    def __init__(self, config: Config, prompts: list[str], reporter: Reporter | None = None):
        from accelerate import Accelerator

        from dagcli.config import fill_model_defaults

        self.config = config = fill_model_defaults(config)[0]  # a no-op for a config that went through preflight
        self.prompts = prompts
        c = config
        cpu = c.model.device == "cpu" or (c.model.device == "auto" and not torch.cuda.is_available())
        self.accelerator = Accelerator(mixed_precision=c.train.mixed_precision, cpu=cpu)
        self.is_main = self.accelerator.is_main_process
        self.reporter = reporter if (reporter is not None and self.is_main) else NullReporter()
        self.run_dir = Path(c.output.dir)
        self.state = TrainState()
        self._stop_requested = False
        self._setup_models()

    # --- set-up --------------------------------------------------------------------------------------
    def _setup_models(self) -> None:
        from peft import LoraConfig

        from dagcli.models import load_model
        from dagcli.rewards import build_reward

        c, acc = self.config, self.accelerator
        if c.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        device = "cpu" if acc.device.type == "cpu" else str(acc.device)
        self.model = load_model(c.model.name or None, device=device, dtype=c.model.dtype)
        pipe = self.model.pipe
        unet = pipe.unet
        with torch.random.fork_rng(devices=[]):  # the LoRA's random init depends on the run seed only
            torch.manual_seed(c.train.seed)
            unet.add_adapter(
                LoraConfig(
                    r=c.lora.rank,
                    lora_alpha=c.lora.alpha,
                    init_lora_weights=c.lora.init == "true" or c.lora.init,
                    target_modules=list(c.lora.target_modules),
                )
            )
        for p in unet.parameters():  # trainable LoRA weights in fp32 whatever the frozen dtype
            if p.requires_grad:
                p.data = p.data.float()
        if c.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, self.model.device)
        self.encoder.warn_truncated(self.prompts, self.reporter.warn)
        self.uncond = self.encoder([""])
        self.schedule = Schedule.from_scheduler(pipe.scheduler, c.sampling.steps)
        self.resolution = c.sampling.resolution or self.model.resolution
        if self.resolution % pipe.vae_scale_factor:
            raise DagError(f"sampling.resolution = {self.resolution} must be a multiple of {pipe.vae_scale_factor} "
                           "for this model")
        self.is_dag = c.train.algorithm in ("dag-db", "dag-kl")
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": c.train.learning_rate}]
        self.flow = None
        if self.is_dag:
            latent = self.resolution // pipe.vae_scale_factor
            self.flow_config = flow_config_for(unet.config, pipe.text_encoder.config.hidden_size, latent)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.train.seed)
                self.flow = FlowNetwork(self.flow_config).to(self.model.device)
            groups.append({"params": list(self.flow.parameters()), "lr": c.train.flow_learning_rate})
        self.optimizer = self._make_optimizer(groups)
        if self.flow is not None:
            self.unet, self.flow, self.optimizer = acc.prepare(unet, self.flow, self.optimizer)
        else:
            self.unet, self.optimizer = acc.prepare(unet, self.optimizer)
        self.reward = build_reward(
            c.reward.spec, device=device, base_model=self.model.name, options=dict(c.reward.options),
            strict_finite=False,
        )

    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        t = self.config.train
        kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_epsilon)
        if t.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as e:
                raise DagError("train.use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
            return bnb.optim.AdamW8bit(groups, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    @property
    def raw_unet(self):
        return self.accelerator.unwrap_model(self.unet)

    @property
    def raw_flow(self) -> FlowNetwork | None:
        return self.accelerator.unwrap_model(self.flow) if self.flow is not None else None

    def sizes(self) -> dict:
        """Derived sizes shown in the start-up banner."""
        c, n_proc = self.config, self.accelerator.num_processes
        per_proc = c.sampling.batch_size * c.sampling.batches_per_epoch
        per_traj = self.transitions_per_trajectory()
        micro = math.ceil(per_proc * per_traj / c.train.batch_size)
        return {
            "processes": n_proc,
            "trajectories_per_epoch": per_proc * n_proc,
            "transitions_per_trajectory": per_traj,
            "micro_batches_per_epoch": micro,
            "optimizer_steps_per_epoch": math.ceil(micro / c.train.gradient_accumulation_steps),
            "lora_parameters": sum(p.numel() for p in self.raw_unet.parameters() if p.requires_grad),
            "flow_parameters": sum(p.numel() for p in self.raw_flow.parameters()) if self.flow is not None else 0,
            "unet_parameters": sum(p.numel() for p in self.raw_unet.parameters()),
        }

    def transitions_per_trajectory(self) -> int:
        t = self.config.train
        return max(1, round(self.config.sampling.steps * t.timestep_fraction))

    # --- one epoch -------------------------------------------------------------------------------------
    def sample_epoch(self, epoch: int, on_batch: Callable[[Trajectory], None] | None = None) -> Trajectory:
        """Sample this process's trajectories for the epoch (no gradients); `on_batch` sees each sampler call's
        trajectories as soon as they exist."""
        c, acc = self.config, self.accelerator
        rank = acc.process_index
        g = torch.Generator().manual_seed(epoch_seed(c.train.seed, epoch, rank, stream=1))
        parts = []
        unet = self.raw_unet
        unet.eval()
        with torch.no_grad(), acc.autocast(), self.reporter.task(f"epoch {epoch + 1}: sampling",
                                                                 c.sampling.batches_per_epoch) as advance:
            for _ in range(c.sampling.batches_per_epoch):
                idx = torch.randint(len(self.prompts), (c.sampling.batch_size,), generator=g)
                prompts = [self.prompts[i] for i in idx.tolist()]
                seeds = torch.randint(2**31 - 1, (c.sampling.batch_size,), generator=g).tolist()
                gens = [torch.Generator().manual_seed(s) for s in seeds]
                parts.append(
                    sample_batch(self.model, prompts, gens, encoder=self.encoder, num_steps=c.sampling.steps,
                                 guidance=c.sampling.guidance, eta=c.sampling.eta, reduction=c.dag.reduction,
                                 unet=unet, height=self.resolution, width=self.resolution)
                )
                if on_batch is not None:
                    on_batch(parts[-1])
                advance()
        return concat_trajectories(parts)

    def _needs_fl(self) -> bool:
        return self.is_dag and self.config.dag.x0_source == "sampling"

    def _score_trajectories(self, traj: Trajectory) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        """Terminal rewards, their components and (DAG with stored x̂0) the forward-looking rewards of `traj`."""
        with torch.no_grad():
            rewards, components = self.score(traj.images, traj.prompts)
            fl = self.forward_looking_rewards(traj) if self._needs_fl() else None
        return rewards, components, fl

    def _sample_and_score(self, epoch: int) -> tuple[Trajectory, torch.Tensor, dict, torch.Tensor | None, dict]:
        """Sample the epoch and score it; with `sampling.overlap_rewards`, each sampler call's images are scored
        in a worker thread (on its own CUDA stream) while the next call samples. Returns the trajectories,
        rewards, components, forward-looking rewards and timings (time_reward: scoring time not hidden behind
        sampling)."""
        t0 = time.perf_counter()
        if not self.config.sampling.overlap_rewards:
            traj = self.sample_epoch(epoch)
            t1 = time.perf_counter()
            rewards, components, fl = self._score_trajectories(traj)
            return traj, rewards, components, fl, {"time_sampling": t1 - t0,
                                                   "time_reward": time.perf_counter() - t1}
        stream = torch.cuda.Stream(self.model.device) if self.model.device.type == "cuda" else None

        def work(part: Trajectory):
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                return self._score_trajectories(part)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dagcli-reward") as pool:
            futures = []
            traj = self.sample_epoch(epoch, on_batch=lambda part: futures.append(pool.submit(work, part)))
            t1 = time.perf_counter()
            results = [f.result() for f in futures]
        rewards = torch.cat([r for r, _, _ in results])
        components = {k: torch.cat([c[k] for _, c, _ in results]) for k in results[0][1]}
        fl = torch.cat([f for _, _, f in results]) if results[0][2] is not None else None
        return traj, rewards, components, fl, {"time_sampling": t1 - t0, "time_reward": time.perf_counter() - t1}

    def score(self, images: torch.Tensor, prompts: list[str]):
        out = self.reward(images, prompts, None)
        return out.scores.float().cpu(), {k: v.float().cpu() for k, v in out.components.items()}

    def forward_looking_rewards(self, traj: Trajectory) -> torch.Tensor:
        """r(Decode(x̂0(x_i))) for every non-terminal state i, from the model outputs recorded while sampling:
        each state is decoded and scored once."""
        n, steps = traj.log_probs.shape
        eps = traj.eps_cond if self.config.dag.x0_guidance == "cond" else traj.eps_guided
        x = traj.latents[:, :steps].flatten(0, 1)  # [N*T, C, h, w]
        t = traj.timesteps.repeat(n)
        x0 = pred_x0_from_eps(self.schedule, x, t, eps.flatten(0, 1))
        prompts = [p for p in traj.prompts for _ in range(steps)]
        scores = []
        chunk = max(1, self.config.sampling.batch_size)
        for i in range(0, x0.shape[0], chunk):
            images = decode_latents(self.model.pipe.vae, x0[i : i + chunk].to(self.model.device))
            scores.append(self.score(images, prompts[i : i + chunk])[0])
        return torch.cat(scores).reshape(n, steps)

    def _current_x0_reward(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, prompts: list[str]):
        """The reference procedure: x̂0 of a state with the current model (conditional ε), decoded and scored."""
        with torch.no_grad(), self.accelerator.autocast():
            if self.config.dag.x0_guidance == "cond":
                eps = self.unet(x.to(self.model.dtype), t, encoder_hidden_states=embeds, return_dict=False)[0]
            else:
                eps = guided_denoiser(self.unet, embeds, self.uncond, self.config.sampling.guidance)(x, t)[0]
            x0 = pred_x0_from_eps(self.schedule, x, t, eps.float())
            images = decode_latents(self.model.pipe.vae, x0)
        return self.score(images, prompts)[0].to(x.device)

    def ddpo_advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Per-prompt normalisation over a buffer of recent rewards; global statistics for rare prompts."""
        d = self.config.ddpo
        return per_prompt_advantages(prompts, rewards, self.state.ddpo_buffers, d.buffer_size, d.min_count,
                                     self.config.dag.adv_clip)

    def collect(self, epoch: int) -> tuple[EpochBatch, dict]:
        """Sampling and rewards for one epoch, with timings."""
        traj, rewards, components, fl, timing = self._sample_and_score(epoch)
        keep = torch.isfinite(rewards)
        if fl is not None:
            keep &= torch.isfinite(fl).all(1)
        dropped = _sum_ints(self.accelerator, int((~keep).sum()))  # over all processes: they stop together
        if dropped:
            self.state.nonfinite_rewards += dropped
            self.reporter.warn(f"dropped {dropped} trajectories with NaN/inf rewards "
                               f"({self.state.nonfinite_rewards} so far, limit {self.config.reward.max_nonfinite})")
            if self.state.nonfinite_rewards > self.config.reward.max_nonfinite:
                raise NonFiniteRewards(self.state.nonfinite_rewards)
        if not bool(keep.all()):
            traj = _select(traj, keep)
            rewards, components = rewards[keep], {k: v[keep] for k, v in components.items()}
            fl = fl[keep] if fl is not None else None
        adv = None
        if self.config.train.algorithm == "ddpo":
            all_r = _gather_floats(self.accelerator, rewards)
            all_p = _gather_strings(self.accelerator, traj.prompts)
            all_adv = self.ddpo_advantages(all_p, all_r)
            start = _rank_offset(self.accelerator, len(traj.prompts))
            adv = all_adv[start : start + len(traj.prompts)]
        batch = EpochBatch(traj=traj, rewards=rewards, components=components, fl_rewards=fl, advantages=adv)
        return batch, timing

    def transitions(self, epoch: int, n: int) -> torch.Tensor:
        """[M, 2] (trajectory, step) pairs to train on this epoch, shuffled."""
        c = self.config
        steps = c.sampling.steps
        g = torch.Generator().manual_seed(epoch_seed(c.train.seed, epoch, self.accelerator.process_index, stream=2))
        k = self.transitions_per_trajectory()
        pairs = []
        for b in range(n):
            chosen = torch.randperm(steps, generator=g)[:k]
            if c.train.always_last_step and k < steps and (steps - 1) not in chosen.tolist():
                chosen[-1] = steps - 1
            pairs.extend((b, int(i)) for i in chosen)
        pairs_t = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
        return pairs_t[torch.randperm(len(pairs_t), generator=g)]

    def _transition_loss(self, batch: EpochBatch, idx: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
        """Per-transition loss of a micro-batch `idx` [n, 2] and its logged terms."""
        c, dev = self.config, self.model.device
        traj = batch.traj
        b, i = idx[:, 0], idx[:, 1]
        x_t = traj.latents[b, i].to(dev)
        x_s = traj.latents[b, i + 1].to(dev)
        t = traj.timesteps[i].to(dev)
        embeds = traj.prompt_embeds[b].to(dev)
        log_pf_old = traj.log_probs[b, i].to(dev)
        with self.accelerator.autocast():
            eps, _ = guided_denoiser(self.unet, embeds, self.uncond, c.sampling.guidance)(x_t, t)
        step = ddim_step(self.schedule, eps, t, x_t, c.sampling.eta, prev_sample=x_s, reduction=c.dag.reduction)
        log_pf = step.log_prob
        logs = {"log_pf": log_pf.detach().mean(), "approx_kl": 0.5 * ((log_pf - log_pf_old) ** 2).detach().mean()}
        if c.train.algorithm == "ddpo":
            adv = batch.advantages[b].to(dev)
            loss = losses.clipped_surrogate(adv, log_pf, log_pf_old, c.dag.clip_range)
            logs["policy_loss"] = loss.detach().mean()
            return loss, logs

        prompts = [traj.prompts[j] for j in b.tolist()]
        log_pb = backward_log_prob(self.schedule, x_t, t, x_s, reduction=c.dag.reduction)
        s = self.schedule.prev(t.cpu()).to(dev)
        terminal = i.to(dev) == (c.sampling.steps - 1)
        if batch.fl_rewards is not None:
            fl_t = batch.fl_rewards[b, i].to(dev)
            fl_s = batch.fl_rewards[b, (i + 1).clamp(max=c.sampling.steps - 1)].to(dev)
        else:
            fl_t = self._current_x0_reward(x_t, t, embeds, prompts)
            fl_s = self._current_x0_reward(x_s, s.clamp(min=0), embeds, prompts)
        with self.accelerator.autocast():  # both states in one call (the network is per-sample)
            flow_t, flow_s = self.flow(torch.cat([x_t, x_s]), torch.cat([t, s.clamp(min=0)]),
                                       torch.cat([embeds, embeds])).chunk(2)
        log_f_t = losses.forward_looking_flow(flow_t.float(), fl_t, beta)
        terminal_value = beta * batch.rewards[b].to(dev)
        log_f_s = torch.where(terminal, terminal_value, losses.forward_looking_flow(flow_s.float(), fl_s, beta))
        if c.train.algorithm == "dag-db":
            loss = losses.db_loss(log_f_t, log_pf, log_f_s, log_pb)
            logs["db_loss"] = loss.detach().mean()
        else:
            flow_loss, policy_loss = losses.dag_kl_losses(log_f_t, log_pf, log_pf_old, log_f_s, log_pb,
                                                          c.dag.clip_range, c.dag.adv_clip)
            loss = flow_loss + c.dag.kl_weight * policy_loss
            logs["db_loss"] = flow_loss.detach().mean()
            logs["policy_loss"] = policy_loss.detach().mean()
        if c.dag.proximity > 0:
            prox = losses.proximity(eps, traj.eps_guided[b, i].to(dev))
            loss = loss + c.dag.proximity * prox
            logs["proximity"] = prox.detach().mean()
        logs["log_pb"] = log_pb.mean()
        logs["flow"] = flow_t.detach().float().mean()
        return loss, logs

    def train_epoch(self, epoch: int, batch: EpochBatch) -> dict:
        """Optimiser steps over this epoch's shuffled transitions, with gradient accumulation."""
        c, acc = self.config, self.accelerator
        beta = beta_at(c.dag.beta, c.dag.beta_ramp_epochs, epoch)
        pairs = self.transitions(epoch, batch.traj.batch_size)
        pairs = pairs[: _min_int(acc, len(pairs))]  # equal step counts on every process (DDP all-reduces)
        micro = [pairs[j : j + c.train.batch_size] for j in range(0, len(pairs), c.train.batch_size)]
        if c.train.algorithm == "dag-kl":
            micro = [m for m in micro if len(m) >= 2]  # the leave-one-out baseline needs two transitions
        accum = c.train.gradient_accumulation_steps
        warmup = self.flow is not None and epoch < c.dag.flow_warmup_epochs
        self.unet.train()
        if self.flow is not None:
            self.flow.train()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        grad_norms: dict[str, list[float]] = defaultdict(list)
        skipped = 0
        with self.reporter.task(f"epoch {epoch + 1}: training", len(micro)) as advance:
            for start in range(0, len(micro), accum):
                group = micro[start : start + accum]
                for k, idx in enumerate(group):
                    sync = k == len(group) - 1
                    with self._maybe_no_sync(sync):
                        loss, logs = self._transition_loss(batch, idx, beta)
                        loss = loss.mean()
                        if not torch.isfinite(loss):
                            skipped += 1
                            acc.backward(self._zero_loss())  # keeps DDP's all-reduce in step across processes
                            advance()
                            continue
                        acc.backward(loss / len(group))
                    sums["loss"] += float(loss.detach())
                    counts["loss"] += 1
                    for name, v in logs.items():
                        sums[name] += float(v)
                        counts[name] += 1
                    advance()
                if warmup:  # the flow network fits first: the LoRA gets no update (AdamW skips grad None)
                    for p in self.unet.parameters():
                        p.grad = None
                else:
                    grad_norms["lora"].append(float(acc.clip_grad_norm_(
                        [p for p in self.unet.parameters() if p.requires_grad], c.train.max_grad_norm)))
                if self.flow is not None:
                    grad_norms["flow"].append(float(acc.clip_grad_norm_(self.flow.parameters(), c.train.max_grad_norm)))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.optimizer_steps += 1
                fault_point("optimizer-step")
        if skipped:
            self.reporter.warn(f"skipped {skipped} micro-batches with a NaN/inf loss")
        out = {name: sums[name] / max(counts[name], 1) for name in sums}
        out.update({f"grad_norm_{k}": sum(v) / len(v) for k, v in grad_norms.items() if v})
        out["beta"] = beta
        out["flow_warmup"] = int(warmup)
        out["skipped_micro_batches"] = skipped
        return out

    def _zero_loss(self) -> torch.Tensor:
        """0 · Σ trainable weights: its backward adds exact zeros to every gradient (a skipped micro-batch)."""
        params = [p for p in self.unet.parameters() if p.requires_grad]
        params += list(self.flow.parameters()) if self.flow is not None else []
        return sum((p * 0.0).sum() for p in params)

    def _maybe_no_sync(self, sync: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation group."""
        stack = contextlib.ExitStack()
        if not sync and self.accelerator.num_processes > 1:
            for module in (self.unet, self.flow):
                if module is not None:
                    stack.enter_context(self.accelerator.no_sync(module))
        return stack

    # --- the loop ----------------------------------------------------------------------------------------
    def train(self) -> TrainState:
        c = self.config
        self._last_save = time.monotonic()
        self._install_signal_handlers()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(dump_toml(c))
        try:
            while self.state.epoch < c.train.epochs:
                epoch = self.state.epoch
                try:
                    batch, timing = self.collect(epoch)
                except NonFiniteRewards as e:
                    self.save()
                    raise DagError(f"stopping: {e.count} NaN/inf rewards exceed reward.max_nonfinite = "
                                   f"{c.reward.max_nonfinite}; last checkpoint saved in {self.run_dir}") from e
                t0 = time.perf_counter()
                train_logs = self.train_epoch(epoch, batch)
                timing["time_training"] = time.perf_counter() - t0
                self.state.epoch += 1
                self.state.trajectories_seen += _sum_ints(self.accelerator, batch.traj.batch_size)
                metrics = self.epoch_metrics(batch, train_logs, timing)
                self.log(metrics)
                # a signal may reach one process only: every process saves and stops after the same epoch
                self._stop_requested = _sum_ints(self.accelerator, int(self._stop_requested)) > 0
                last = self.state.epoch == c.train.epochs
                if last or self.state.epoch % c.output.checkpoint_every == 0 or self._stop_requested \
                        or self._checkpoint_due():
                    self.save()
                if c.output.sample_every and (self.state.epoch % c.output.sample_every == 0 or last):
                    self.sample_grid()
                if self._stop_requested:
                    self.reporter.warn(f"stopped after epoch {self.state.epoch}; resume with --resume")
                    break
        finally:
            self._restore_signal_handlers()
        return self.state

    def _checkpoint_due(self) -> bool:
        """`output.checkpoint_minutes` passed since the last save (or the start); every process agrees."""
        minutes = self.config.output.checkpoint_minutes
        due = minutes > 0 and time.monotonic() - self._last_save >= 60 * minutes
        return _sum_ints(self.accelerator, int(due)) > 0

    def epoch_metrics(self, batch: EpochBatch, train_logs: dict, timing: dict) -> dict:
        acc = self.accelerator
        rewards = _gather_floats(acc, batch.rewards)  # every process's trajectories
        m = {
            "epoch": self.state.epoch,
            "optimizer_steps": self.state.optimizer_steps,
            "trajectories_seen": self.state.trajectories_seen,
            "reward_mean": float(rewards.mean()) if rewards.numel() else float("nan"),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "reward_min": float(rewards.min()) if rewards.numel() else float("nan"),
            "reward_max": float(rewards.max()) if rewards.numel() else float("nan"),
            "nonfinite_rewards": self.state.nonfinite_rewards,
        }
        for name, values in batch.components.items():
            v = _gather_floats(acc, values)
            m[f"reward/{name}_mean"] = float(v.mean()) if v.numel() else float("nan")
            m[f"reward/{name}_std"] = float(v.std()) if v.numel() > 1 else 0.0
        per_prompt: dict[str, list[float]] = defaultdict(list)
        for p, r in zip(_gather_strings(acc, batch.traj.prompts), rewards.tolist(), strict=True):
            per_prompt[p].append(r)
        m["per_prompt_reward"] = {p: sum(v) / len(v) for p, v in sorted(per_prompt.items())}
        if batch.fl_rewards is not None:
            fl = _gather_floats(acc, batch.fl_rewards.flatten())
            m["fl_reward_mean"] = float(fl.mean()) if fl.numel() else float("nan")
        m.update(train_logs)
        m.update(timing)
        return m

    def log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self._tracker_log(metrics)
        self.reporter.info(
            f"epoch {metrics['epoch']:>4}  reward {metrics['reward_mean']:+.4f} ± {metrics['reward_std']:.4f}  "
            f"loss {metrics.get('loss', float('nan')):.4g}  β {metrics['beta']:.3g}  "
            f"trajectories {metrics['trajectories_seen']}  "
            f"({metrics['time_sampling']:.1f}s sample, {metrics['time_reward']:.1f}s reward, "
            f"{metrics['time_training']:.1f}s train)"
        )

    def _tracker_log(self, metrics: dict) -> None:
        """Scalars to TensorBoard or Weights & Biases (`output.report_to`), opened on first use."""
        kind = self.config.output.report_to
        if kind == "none":
            return
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}
        step = int(metrics["epoch"])
        if getattr(self, "_tracker", None) is None:
            self._tracker = _open_tracker(kind, self.run_dir, to_dict(self.config))
        if kind == "tensorboard":
            for name, value in scalars.items():
                self._tracker.add_scalar(name, value, step)
            self._tracker.flush()
        else:
            self._tracker.log(scalars, step=step)

    def sample_grid(self) -> None:
        """A grid of samples from fixed prompts and seeds, so epochs can be compared by eye."""
        if not self.is_main:
            return
        from dagcli.images import make_grid
        from dagcli.sampling import generators_for, to_pil

        prompts = sorted(set(self.prompts))[:4]
        rows = [p for p in prompts for _ in range(4)]
        unet = self.raw_unet
        unet.eval()
        with torch.no_grad():
            traj = sample_batch(self.model, rows, generators_for(range(len(rows))), encoder=self.encoder,
                                num_steps=self.config.sampling.steps, guidance=self.config.sampling.guidance,
                                eta=self.config.sampling.eta, unet=unet, height=self.resolution,
                                width=self.resolution)
        images = to_pil(traj.images)
        out = self.run_dir / "samples"
        out.mkdir(exist_ok=True)
        make_grid(images, cols=4, upscale=max(1, 96 // images[0].width)).save(out / f"epoch-{self.state.epoch:04d}.png")

    # --- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        from dagcli.checkpoint import save_checkpoint

        self.accelerator.wait_for_everyone()
        self._last_save = time.monotonic()
        if not self.is_main:
            return None
        folder = save_checkpoint(
            self.run_dir,
            step=self.state.epoch,
            unet=self.raw_unet,
            flow=self.raw_flow,
            flow_config=self.flow_config.to_dict() if self.flow is not None else None,
            optimizer=self.optimizer,
            state=self.state.to_dict(),
            config=to_dict(self.config),
            base_model=self.model.name,
            lora=dict(rank=self.config.lora.rank, alpha=self.config.lora.alpha,
                      target_modules=list(self.config.lora.target_modules)),
            keep_last=self.config.output.keep_last,
        )
        self.reporter.info(f"saved checkpoint {folder}")
        return folder

    def resume(self, folder: Path) -> None:
        from dagcli.checkpoint import load_checkpoint_into

        state = load_checkpoint_into(folder, unet=self.raw_unet, flow=self.raw_flow, optimizer=self.optimizer,
                                     base_model=self.model.name, lora_rank=self.config.lora.rank,
                                     algorithm=self.config.train.algorithm)
        self.state = TrainState(**state)
        self.reporter.info(f"resumed from {folder} (epoch {self.state.epoch})")

    # --- signals -----------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        self._previous = {}

        def handler(signum, frame):
            if self._stop_requested:  # second signal: stop now, the last checkpoint stays as it is
                raise KeyboardInterrupt
            self._stop_requested = True
            self.reporter.warn("stopping after this epoch and saving a checkpoint (press Ctrl-C again to abort)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, prev in getattr(self, "_previous", {}).items():
            signal.signal(sig, prev)


def _open_tracker(kind: str, run_dir: Path, config: dict):
    """A TensorBoard SummaryWriter or a wandb run; a missing package is a one-line error with the fix."""
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        import wandb

        return wandb.init(project="dagcli", name=run_dir.name, dir=str(run_dir), config=config)
    except ImportError as e:
        raise DagError(f"output.report_to = {kind!r} needs the {kind} package: pip install 'dagcli[{kind}]'") from e


class NonFiniteRewards(Exception):
    def __init__(self, count: int):
        super().__init__(f"{count} non-finite rewards")
        self.count = count


def _select(traj: Trajectory, keep: torch.Tensor) -> Trajectory:
    idx = keep.nonzero().flatten()
    return Trajectory(
        latents=traj.latents[idx], timesteps=traj.timesteps, log_probs=traj.log_probs[idx],
        eps_guided=traj.eps_guided[idx], eps_cond=traj.eps_cond[idx], prompt_embeds=traj.prompt_embeds[idx],
        prompts=[traj.prompts[i] for i in idx.tolist()],
        images=traj.images[idx] if traj.images is not None else None, eta=traj.eta, reduction=traj.reduction,
    )


def _gather_strings(accelerator, items: list[str]) -> list[str]:
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def _gather_floats(accelerator, values: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor concatenated over processes in rank order; lengths may differ (dropped trajectories)."""
    if accelerator.num_processes == 1:
        return values.detach().float().cpu()
    from accelerate.utils import gather_object

    return torch.tensor(gather_object(values.detach().float().cpu().tolist()), dtype=torch.float32)


def _sum_ints(accelerator, value: int) -> int:
    """The sum of an integer over processes (every process gets it)."""
    if accelerator.num_processes == 1:
        return int(value)
    return int(accelerator.gather(torch.tensor([int(value)], device=accelerator.device)).sum().item())


def _min_int(accelerator, value: int) -> int:
    """The minimum of an integer over processes (every process gets it)."""
    if accelerator.num_processes == 1:
        return int(value)
    return int(accelerator.gather(torch.tensor([int(value)], device=accelerator.device)).min().item())


def _rank_offset(accelerator, n_local: int) -> int:
    if accelerator.num_processes == 1:
        return 0
    counts = accelerator.gather(torch.tensor([n_local], device=accelerator.device)).cpu().tolist()
    return int(sum(counts[: accelerator.process_index]))


__all__ = ["Trainer", "TrainState", "beta_at", "epoch_seed", "FlowConfig"]
