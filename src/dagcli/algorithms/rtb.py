"""Relative trajectory balance (RTB): the arithmetic, as pure functions of per-trajectory tensors, and the learned
log Z. The target is the base model tilted by the reward, p_base(τ | c)·exp(β r(x_T)) / Z(c).

For a trajectory τ of prompt c with per-step log ratios ρ_i = log P_θ(x_{i+1} | x_i) − log P_base(x_{i+1} | x_i):
    A(τ) = log Z(c) + Σ_i ρ_i − β r(x_T),      L(τ) = A(τ)²
Memory stays per step: ∇L = 2·A·Σ_i ∇log P_θ(x_{i+1} | x_i) + 2·A·∇log Z, so each transition's loss is
2·A.detach()·log P_θ and each trajectory adds 2·A.detach()·log Z once (`transition_surrogate`, `log_z_surrogate`).
A is computed once per trajectory from the log-probs of the pass that re-scores it, so the surrogate's gradient is
the trajectory loss's exactly when that pass is the one whose log P_θ is differentiated (on-policy).

log Z(c) comes either from a learned per-prompt table (`LogZTable`), or from VarGrad: log Ẑ(c) is the mean over
the prompt's group of β r − Σ ρ, so A is Σ ρ − β r centred in its group (`vargrad_residuals`): KL-regularised
REINFORCE with the path's exact log ratio and no std normalisation.
"""

from __future__ import annotations

import torch

from dagcli.algorithms.settings import lora_steps as tail_lora_steps
from dagcli.errors import DagError


def residual(log_z: torch.Tensor, log_ratio_sum: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """[N] A(τ) = log Z(c) + Σ_i [log P_θ − log P_base] − β r(x_T); the reward is data."""
    return log_z + log_ratio_sum - beta * reward.detach()


def trajectory_loss(log_z: torch.Tensor, log_ratio_sum: torch.Tensor, reward: torch.Tensor, beta: float
                    ) -> torch.Tensor:
    """[N] RTB's loss per trajectory, A(τ)²."""
    return residual(log_z, log_ratio_sum, reward, beta) ** 2


def transition_surrogate(traj_residual: torch.Tensor, log_pf: torch.Tensor) -> torch.Tensor:
    """[n] 2·A(τ).detach()·log P_θ(x_{i+1} | x_i) for transitions whose trajectory's residual is `traj_residual`
    [n]: summed over a trajectory's steps, its gradient is A(τ)²'s in the policy."""
    return 2 * traj_residual.detach() * log_pf


def log_z_surrogate(traj_residual: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """[N] 2·A(τ).detach()·log Z(c), once per trajectory: its gradient is A(τ)²'s in log Z."""
    return 2 * traj_residual.detach() * log_z


def group_counts(groups: torch.Tensor) -> torch.Tensor:
    """[N] the size of each trajectory's group (float64)."""
    _, inverse, counts = torch.unique(groups.cpu(), return_inverse=True, return_counts=True)
    return counts[inverse].double()


def _group_means(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[N] each value's group mean (float64)."""
    _, inverse = torch.unique(groups.cpu(), return_inverse=True)
    inverse = inverse.to(values.device)
    n = int(inverse.max()) + 1 if len(inverse) else 0
    v = values.double()
    count = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, inverse, torch.ones_like(v))
    total = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, inverse, v)
    return (total / count)[inverse]


def vargrad_log_z(log_ratio_sum: torch.Tensor, reward: torch.Tensor, groups: torch.Tensor, beta: float
                  ) -> torch.Tensor:
    """[N] VarGrad's log Ẑ(c) of each trajectory's group: the group's mean of β r − Σ ρ (no gradient)."""
    return _group_means((beta * reward - log_ratio_sum).detach(), groups).to(log_ratio_sum.dtype)


def vargrad_residuals(log_ratio_sum: torch.Tensor, reward: torch.Tensor, groups: torch.Tensor, beta: float
                      ) -> torch.Tensor:
    """[N] A with VarGrad's log Ẑ: Σ ρ − β r centred in its prompt group (no gradient; a group of one gets 0)."""
    return residual(vargrad_log_z(log_ratio_sum, reward, groups, beta), log_ratio_sum.detach(), reward, beta)


class LogZTable(torch.nn.Module):
    """A learned log Z per prompt of the run, initialised at 0.

    A table rather than a head on the pooled text embedding: the run's prompts are a fixed, finite list, the
    target's log Z is a per-prompt number, and a table fits each one on its own (no capacity shared between
    prompts, nothing to generalise), for every family alike (SD 1.5 has no pooled embedding).
    """

    def __init__(self, prompts: list[str]):
        super().__init__()
        self.prompts = list(dict.fromkeys(prompts))
        self._index = {p: k for k, p in enumerate(self.prompts)}
        self.log_z = torch.nn.Parameter(torch.zeros(len(self.prompts)))

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """[n] log Z of each prompt."""
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise DagError(f"no learned log Z for the prompt {missing[0]!r}: the table holds the run's "
                           f"{len(self.prompts)} prompts")
        idx = torch.tensor([self._index[p] for p in prompts], dtype=torch.long, device=self.log_z.device)
        return self.log_z[idx]

    def metadata(self) -> dict:
        """What rebuilds the table (saved beside its weights, as the flow network's config is)."""
        return {"prompts": self.prompts}


def log_z_table_from(metadata: dict) -> LogZTable:
    """Rebuild a saved table from the metadata written beside its weights."""
    return LogZTable(metadata["prompts"])


def step_kl(mean: torch.Tensor, base_mean: torch.Tensor, std: torch.Tensor, reduction: str) -> torch.Tensor:
    """[n] KL(N(μ_θ, σ²I) ‖ N(μ_base, σ²I)) = ‖μ_θ − μ_base‖²/(2σ²), reduced over latent dims as the log-probs are:
    the expectation of the step's log ratio ρ = log P_θ − log P_base over its noise, from its start state; 0 for a
    deterministic step (σ = 0), whose log-probs are 0. Differentiable in `mean`."""
    from dagcli.algorithms.grpo import kl_to_reference

    return kl_to_reference(mean, base_mean, std, reduction)


def own_ratio_surrogate(mean: torch.Tensor, base_mean: torch.Tensor, std: torch.Tensor, reduction: str
                        ) -> torch.Tensor:
    """[n] the term whose gradient through μ_θ is E[∇log P_θ(x_{i+1} | x_i)·ρ_i | x_i], step i's own log ratio times
    its own score, in the units of the reduced log-probs: the step's KL under "sum"; under "mean", where the score
    and ρ are each divided by the latent's D dims, the mean KL divided by D once more."""
    kl = step_kl(mean, base_mean, std, reduction)
    return kl / mean[0].numel() if reduction == "mean" else kl


def to_go_weights(ratio: torch.Tensor, reward: torch.Tensor, beta: float, groups: torch.Tensor | None = None,
                  log_z: torch.Tensor | None = None, baseline: torch.Tensor | None = None, own: bool = True,
                  critic: torch.Tensor | None = None) -> torch.Tensor:
    """[N, S] each step's weight under `rtb.credit = "to-go"`, from the per-step log ratios `ratio` [N, S]: the log
    ratio from that step on, Σ_{j ≥ i} ρ_j − β r, centred within its prompt group at that step (VarGrad, `groups`)
    or plus the learned log Z (`log_z` [N]).

    On-policy, the steps before i and log Z are baselines of step i's score (E[∇log P_θ(x_{i+1} | x_i) | x_≤i] = 0),
    so 2·Σ_i w_i·∇log P_θ(x_{i+1} | x_i) has the same expectation as the trajectory's 2·A·Σ_i ∇log P_θ, ∇KL(P_θ ‖ p*)
    up to VarGrad's factor (1 − 1/n), without the earlier steps' noise on the later steps (no gradient).

    `baseline` [N, S] (`rtb.credit = "to-go-x0"`: r(x̂0(x_i)), the reward of step i's start state's one-step
    prediction) adds β·baseline_i to step i's weight: it depends on x_i alone, so it is a baseline of step i's score
    too, and it takes out the part of β r that x_i has already decided. It stands in for log F(x_i), of which the
    learned log Z = log F(x_0) is the first, so with a baseline a learned `log_z` is not added: it would count
    the same level twice, a constant on every weight, which on tiny-flow drove a run to "always rewarded"
    (docs/algorithms.md); the learned log Z is still fitted and logged.

    `own` False (`rtb.log_ratio = "expected"`, `ratio` the steps' KLs): the sum starts after step i, Σ_{j > i}; step
    i's own term enters the loss as the pathwise gradient of its KL instead (`Rtb.loss`).

    `critic` [N, S] (`rtb.credit = "to-go-flow"`: F̃_φ(x_i), in the log-probs' units) is added to the weights after
    the baseline, before any centring: fitted to `critic_targets`, it is the rest of the weight's expectation given
    x_i, so what is left is step i's own outcome and what follows it."""
    w = critic_targets(ratio, reward, beta, baseline, own).neg()
    if critic is not None:
        w = w + critic.detach().double()
    if log_z is not None:
        anchored = baseline is not None or critic is not None  # log F(x_i) already in the weight: no log Z on top
        return (w if anchored else w + log_z.detach().double()[:, None]).to(ratio.dtype)
    if groups is None:
        raise ValueError("to_go_weights needs the prompt groups (VarGrad) or a learned log Z")
    centred = torch.stack([w[:, i] - _group_means(w[:, i], groups) for i in range(w.shape[1])], 1)
    return centred.to(ratio.dtype)


def critic_targets(ratio: torch.Tensor, reward: torch.Tensor, beta: float, baseline: torch.Tensor | None = None,
                   own: bool = True) -> torch.Tensor:
    """[N, S] float64, what the critic F̃_φ(x_i) of `rtb.credit = "to-go-flow"` is fitted to: minus step i's to-go
    weight before any critic and centring, β r − β·baseline_i − Σ_{j ≥ i} ρ_j (Σ_{j > i} when `own` is False). Its
    least-squares fit is that quantity's expectation given x_i, so the fitted critic makes each weight's mean
    given x_i zero: with the x̂0 baseline, log F(x_i) = β r(x̂0(x_i)) + F̃_φ(x_i) is the state's soft value under
    the policy, E[β r − Σ_{j ≥ i} ρ_j | x_i] (with `own`), the log of the twist E_base[exp(β r) | x_i] at the
    target."""
    to_go = torch.flip(torch.cumsum(torch.flip(ratio.detach().double(), [1]), 1), [1])
    if not own:
        to_go = to_go - ratio.detach().double()
    y = beta * reward.detach().double()[:, None] - to_go
    if baseline is not None:
        y = y - beta * baseline.detach().double()
    return y


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else 0.0


class Rtb:
    """RTB on the `trajectories` unit with settings from the `[rtb]` section: A(τ) once per trajectory from the
    current policy's and the base model's log-probs of every stored step (on-policy: the pass before the
    micro-batches uses the weights the micro-batches differentiate), then 2·A·log P_θ per step."""

    name = "rtb"
    min_micro_batch = 1
    stored_x0_rewards = None
    x0_decoder = None

    def __init__(self, settings, ctx):
        self.settings, self.ctx = settings, ctx
        self.learned = settings.log_z == "learned"
        self.table = LogZTable(list(ctx.prompts)).to(ctx.device) if self.learned else None  # the unwrapped table
        # "to-go-x0": the rollout scores x̂0 of every trained state with the conditional output recorded while sampling
        self.stored_x0_rewards = "cond" if settings.credit in ("to-go-x0", "to-go-flow") else None
        self.modules = {"log_z": self.table} if self.learned else {}
        self.critic = settings.credit == "to-go-flow"
        if self.critic:  # DAG's flow network as the critic F̃_φ(x_i)
            from dagcli.algorithms.flow import seeded_flow_network

            self.flow_config, flow = seeded_flow_network(ctx, zero_head=True)  # the weights start as "to-go-x0"'s
            self.modules["flow"] = flow
        self._logs: dict[str, float] = {}

    def param_groups(self) -> list[dict]:
        groups = []
        if self.learned:
            groups.append({"params": list(self.modules["log_z"].parameters()), "lr": self.settings.log_z_learning_rate})
        if self.critic:
            groups.append({"params": list(self.modules["flow"].parameters()), "lr": self.settings.flow_learning_rate})
        return groups

    def lora_frozen(self, epoch: int) -> bool:
        """With the critic, its first `flow_warmup_epochs` fit it alone, so the first weights it enters are fitted."""
        return self.critic and epoch < self.settings.flow_warmup_epochs

    def prepare(self, batch, dist) -> None:
        """Nothing before the policy pass: A needs every step's current log-prob."""

    def prepare_trajectories(self, batch, log_pf: torch.Tensor, dist) -> None:
        """A(τ) [N] from log P_θ [N, T] and the base model's log-probs of the same steps, set on the batch."""
        from dagcli.algorithms.base import transition_batch
        from dagcli.algorithms.grpo import groups_of

        n, steps = log_pf.shape[0], self.ratio_steps(log_pf.shape[1])
        every = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(steps), indexing="ij"), -1).reshape(-1, 2)
        log_base = torch.empty(n, steps)
        expected = self.settings.log_ratio == "expected"
        kl, base_means = (torch.empty(n, steps), None) if expected else (None, None)
        critic = torch.empty(n, steps) if self.critic else None
        for start in range(0, len(every), steps):
            idx = every[start : start + steps]
            mb = transition_batch(batch, idx, self.ctx.device)
            if self.critic:
                with torch.no_grad():  # F̃ is in reward units: β·F̃ in the weights' (the log-probs' reduction)
                    critic[idx[:, 0], idx[:, 1]] = self.settings.beta * self._critic(mb).float().cpu()
            base = self.ctx.reference_step(mb)
            log_base[idx[:, 0], idx[:, 1]] = base.log_prob.float().cpu()
            if expected:  # the sampling policy's own step means, rebuilt from its recorded outputs
                if base_means is None:
                    base_means = torch.empty(n, steps, *base.mean.shape[1:])
                base_means[idx[:, 0], idx[:, 1]] = base.mean.float().cpu()
                kl[idx[:, 0], idx[:, 1]] = step_kl(self.ctx.recorded_step(mb).mean, base.mean, base.std,
                                                   self.ctx.reduction).cpu()
        ratio = log_pf[:, :steps] - log_base
        ratio_sum = ratio.sum(1)
        reward, beta = batch.rewards.float(), self.settings.beta
        if self.learned:
            with torch.no_grad():
                log_z = self.modules["log_z"](batch.traj.prompts).float().cpu()
            batch.advantages = residual(log_z, ratio_sum, reward, beta)
        else:
            log_z = vargrad_log_z(ratio_sum, reward, groups_of(batch), beta)
            batch.advantages = vargrad_residuals(ratio_sum, reward, groups_of(batch), beta)
        batch.step_weights, batch.base_means, batch.kl_scale = None, base_means, None
        batch.critic_targets, critic_logs = None, {}
        if self.settings.credit in ("to-go", "to-go-x0", "to-go-flow"):
            baseline = None
            if self.settings.credit != "to-go":  # NaN (a state no trained step starts from): no baseline there
                baseline = torch.nan_to_num(batch.fl_rewards[:, :steps].float(), nan=0.0)
            groups = None if self.learned else groups_of(batch)
            batch.step_weights = to_go_weights(kl if expected else ratio, reward, beta, groups=groups,
                                               log_z=log_z if self.learned else None, baseline=baseline,
                                               own=not expected, critic=critic)
            if self.critic:
                batch.critic_targets = critic_targets(kl if expected else ratio, reward, beta, baseline,
                                                      own=not expected).float()
                target = batch.critic_targets.double() / beta  # in reward units, as F̃
                err = critic.double() / beta - target
                critic_logs = {"critic_loss": float((err**2).mean()),
                               "critic_explained": float(1 - err.var() / target.var().clamp(min=1e-30))}
            if expected:  # VarGrad's centring scales the score terms by 1 − 1/n: the pathwise KL term alike
                batch.kl_scale = torch.ones(n) if self.learned else 1 - 1 / group_counts(groups)
        self._logs = {"log_z": _mean(log_z), "log_ratio_base": _mean(ratio_sum),
                      "rtb_residual_abs": _mean(batch.advantages.abs())}
        if expected:
            self._logs["log_ratio_expected"] = _mean(kl.sum(1))
        self._logs.update(critic_logs)
        if self.learned:
            self._logs.update({f"log_z/{k}": float(v) for k, v in enumerate(self.table.log_z.detach())})

    @property
    def lora_steps(self) -> int | None:
        """The leading steps the LoRA samples: the tail is the base model's (its log ratio exactly 0); None: all."""
        return tail_lora_steps(self.ctx.steps, self.settings.tail_steps)

    def ratio_steps(self, steps: int) -> int:
        """The leading steps whose log ratio A sums and whose log P_θ is trained: all but `tail_steps`."""
        return steps - self.settings.tail_steps

    def epoch_logs(self, epoch: int) -> dict:
        return dict(self._logs)

    def loss(self, mb, policy, batch, epoch: int):
        a = batch.advantages[mb.traj_index].to(mb.x.device)
        step, end = mb.step_index.to(a.device), self.ratio_steps(self.ctx.steps)
        weights = getattr(batch, "step_weights", None)
        t, i = mb.traj_index, step.clamp(max=end - 1).cpu()
        w = a if weights is None else weights[t, i].to(a.device)
        trained = w * (step < end)  # the tail is never trained
        loss = transition_surrogate(trained, policy.step.log_prob)
        if getattr(batch, "kl_scale", None) is not None:  # rtb.log_ratio "expected": step i's own term, pathwise
            own = own_ratio_surrogate(policy.step.mean, batch.base_means[t, i].to(mb.x.device), policy.step.std,
                                      self.ctx.reduction)
            loss = loss + 2 * batch.kl_scale[t].to(a.device) * own * (step < end)
        if self.learned:  # each of the T − k trained steps is trained once: 1/(T − k) of the log Z term on each
            loss = loss + log_z_surrogate(a, self.modules["log_z"](mb.prompts)) / self.ratio_steps(self.ctx.steps)
        logs = {"rtb_loss": loss.detach().mean()}
        if self.critic:  # least squares of F̃_φ(x_i) to its target; the tail's states are not fitted
            target = batch.critic_targets[t, i].to(mb.x.device) / self.settings.beta
            fit = (self._critic(mb) - target) ** 2 * (step < end)
            loss = loss + fit
            logs["critic_fit"] = fit.detach().mean()
        return loss, logs

    def _critic(self, mb) -> torch.Tensor:
        """[n] F̃_φ(x_i) of a micro-batch's start states, in reward units (the weights carry β·F̃)."""
        ctx = self.ctx
        x, time, text = ctx.family.flow_inputs(ctx.schedule, mb.step_index, mb.x, mb.cond)
        with ctx.autocast():
            return self.modules["flow"](x, time, text).float()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def module_metadata(self) -> dict[str, dict]:
        meta = {"log_z": self.table.metadata()} if self.learned else {}
        if self.critic:
            meta["flow"] = {"config": self.flow_config.to_dict()}
        return meta
