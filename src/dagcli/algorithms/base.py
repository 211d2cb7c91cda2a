"""The algorithm seam: what an epoch's batch teaches.

The trainer owns the loop (sampling, micro-batches, optimiser steps, checkpoints); an algorithm only says what to
prepare from an epoch's rewards and what the loss of a micro-batch is. Its loss unit (`AlgorithmInfo.unit`, see
`dagcli.units`) says what a micro-batch holds. A transition- or trajectory-level algorithm sees a `MicroBatch`
and a `PolicyOutput` (the current policy's log-probability of each stored transition, computed by the trainer with
the one step function that also sampled it, so the on-policy ratio is exactly 1); a trajectory-level one also
gets `prepare_trajectories` before the micro-batches. A sample-level one sees a `units.SampleBatch` and the
current policy as a function of (x, j).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch

from dagcli.families.base import Cond
from dagcli.kernels.gaussian import StepOutput


@dataclass
class MicroBatch:
    """n transitions x_i -> x_{i+1} of stored trajectories, tensors on the training device."""

    traj_index: torch.Tensor  # [n] long (CPU): which trajectory of the epoch
    step_index: torch.Tensor  # [n] long (CPU): i, the transition's step
    x: torch.Tensor  # [n, ...] x_i
    x_next: torch.Tensor  # [n, ...] x_{i+1}
    cond: Cond  # [n]
    prompts: list[str]  # [n]
    log_pf_old: torch.Tensor  # [n] log P_F recorded while sampling
    out_old: torch.Tensor  # [n, ...] the guided model output recorded while sampling
    terminal: torch.Tensor  # [n] bool: x_{i+1} is the final state


def transition_batch(batch, idx: torch.Tensor, device) -> MicroBatch:
    """The stored transitions `idx` [n, 2] of (trajectory, step) pairs, on `device`."""
    traj = batch.traj
    b, i = idx[:, 0], idx[:, 1]
    return MicroBatch(traj_index=b, step_index=i, x=traj.latents[b, i].to(device),
                      x_next=traj.latents[b, i + 1].to(device), cond=traj.cond[b].to(device),
                      prompts=[traj.prompts[j] for j in b.tolist()], log_pf_old=traj.log_probs[b, i].to(device),
                      out_old=traj.out_guided[b, i].to(device), terminal=i.to(device) == traj.num_steps - 1)


@dataclass
class PolicyOutput:
    """The current policy on a micro-batch (differentiable in the LoRA weights)."""

    out: torch.Tensor  # [n, ...] guided model output
    step: StepOutput  # log_prob [n] = log P_F(x_{i+1} | x_i), mean, std of the step


class Algorithm(Protocol):
    """One training objective over the shared loop."""

    name: str
    min_micro_batch: int  # smallest micro-batch the loss is defined for
    modules: dict[str, torch.nn.Module]  # extra trained networks (the flow network), replaced by prepared ones
    stored_x0_rewards: str | None  # "cond" / "guided": rollout scores x̂0 of every state with that output
    x0_decoder: str | None  # an AutoencoderTiny (folder or hub id) for the x̂0 images, None: the model's VAE

    def param_groups(self) -> list[dict]: ...  # optimiser groups of `modules`
    def lora_frozen(self, epoch: int) -> bool: ...  # no LoRA update this epoch (flow warm-up)
    def prepare(self, batch, dist) -> None: ...  # per-epoch statistics (advantages), set on the batch
    def epoch_logs(self, epoch: int) -> dict: ...  # numbers of the epoch to log (β, warm-up)
    def loss(self, mb: MicroBatch, policy: PolicyOutput, batch, epoch: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...  # per-transition loss [n] and logs
    def state_dict(self) -> dict: ...  # what a checkpoint carries besides module weights
    def load_state_dict(self, state: dict) -> None: ...
    def module_metadata(self) -> dict[str, dict]: ...  # per module, what rebuilds it (saved beside its weights)


class PolicyHooks(Protocol):
    """Optional members of an algorithm that samples with a policy of its own (the trainer uses each one an
    algorithm has; `hook` finds them)."""

    def sampling_policy(self, denoiser) -> contextlib.AbstractContextManager: ...  # the LoRA the rollout samples with
    def end_epoch(self, denoiser, optimizer_steps: int) -> None: ...  # after an epoch's steps (refresh that policy)
    def state_tensors(self) -> dict[str, torch.Tensor]: ...  # tensors a checkpoint carries (a safetensors file)
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


def hook(algorithm, name: str):
    """The algorithm's optional member `name` of `PolicyHooks`, or one that does nothing."""
    defaults = {"sampling_policy": lambda denoiser: contextlib.nullcontext(), "end_epoch": lambda denoiser, steps: None,
                "state_tensors": dict, "load_state_tensors": lambda tensors: None}
    return getattr(algorithm, name, defaults[name])


class LoraOnly:
    """The members of an algorithm that trains the LoRA alone and keeps no state of its own (DDPO, GRPO)."""

    min_micro_batch = 1
    stored_x0_rewards = None
    x0_decoder = None

    def __init__(self, settings, ctx: Context):
        self.settings, self.ctx = settings, ctx
        self.modules: dict[str, torch.nn.Module] = {}

    def param_groups(self) -> list[dict]:
        return []

    def lora_frozen(self, epoch: int) -> bool:
        return False

    def epoch_logs(self, epoch: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def module_metadata(self) -> dict[str, dict]:
        return {}


class TrajectoryAlgorithm(Algorithm, Protocol):
    """An algorithm of the `trajectories` unit: per-trajectory quantities first, then per-step terms."""

    # the current policy's log P_F [N, T] of every stored step (no gradients), once per epoch before the
    # micro-batches: set what the per-step losses need on the batch (e.g. a coefficient per trajectory)
    def prepare_trajectories(self, batch, log_pf: torch.Tensor, dist) -> None: ...


class SampleAlgorithm(Protocol):
    """An algorithm of the `samples` unit; the other members are `Algorithm`'s."""

    # per-item loss [n] of re-noised final latents; `policy(x, j)` is the current guided output, differentiable
    def loss(self, sb, policy, batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class Context:
    """What an algorithm may use of the run besides its own config section."""

    family: object  # the model's `Family`
    schedule: object  # the sampler's schedule for this run's steps
    device: torch.device
    height: int
    width: int
    steps: int  # T, transitions per trajectory
    seed: int
    reduction: str  # how log-probabilities reduce over latent dims ("mean" | "sum")
    autocast: object  # () -> context manager for the trainable forward passes (accelerate's autocast)
    # (x [n,...], state index j [n], cond, prompts, guided) -> [n] reward of x̂0 under the current model's guided
    # (or conditional) output, no gradients
    x0_rewards: object
    # (micro-batch) -> StepOutput of the base model (the same network with its LoRA disabled, no second copy) on the
    # micro-batch's stored transitions: its log P_F, step mean and std, no gradients
    reference_step: object
    prompts: tuple[str, ...] = ()  # the run's prompt list (a per-prompt table is sized by it)
    # (x [n,...], state index j [n], cond, lora) -> the guided output of a frozen policy, no gradients: the base
    # model (lora None: the LoRA disabled) or the denoiser with the stored LoRA tensors `lora` swapped in
    frozen_output: object = None
    # (micro-batch) -> StepOutput of the policy that sampled the batch, rebuilt from the guided outputs recorded
    # while sampling (its step mean and std; no forward pass)
    recorded_step: object = None
