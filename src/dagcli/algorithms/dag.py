"""DAG (Diffusion Alignment with GFlowNets): detailed balance with a forward-looking flow (DAG-DB), and its
KL / REINFORCE variant (DAG-KL). Both train the LoRA and a flow network F̃_φ.

For a transition x_i -> x_{i+1} with the forward-looking flow log F(x) = F̃_φ(x) + β·r(x̂0(x)) and the terminal
log F(x_T) = β·r(x_T):
    δ = log F(x_i) + log P_F(x_{i+1} | x_i) − log F(x_{i+1}) − log P_B(x_i | x_{i+1})
DAG-DB minimises δ²; DAG-KL fits F̃ by δ² with log P_F detached and trains the policy with a clipped REINFORCE
term on the per-transition −δ (see `losses.dag_kl_losses`). Both add λ·proximity to the sampling policy.

DAG-RDB (relative detailed balance) puts the frozen base model's own forward step in the place of P_B:
    δ = log F(x_i) + log P_θ(x_{i+1} | x_i) − log P_base(x_{i+1} | x_i) − log F(x_{i+1})
(`losses.rdb_residual`), solved by the base model tilted by the reward, p_base·exp(β r) / Z, with F the twist
E_base[exp(β r(x_T)) | x_i]. P_base is the same network with its LoRA off (`Context.reference_step`), so at a zero
LoRA the log ratio is exactly 0 on every step.
"""

from __future__ import annotations

import torch

from dagcli.algorithms import losses
from dagcli.algorithms.base import Context, MicroBatch, PolicyOutput
from dagcli.algorithms.flow import FlowConfig, FlowNetwork, seeded_flow_network
from dagcli.algorithms.settings import lora_steps as tail_lora_steps


def _mean(values: torch.Tensor, trained: torch.Tensor | None) -> torch.Tensor:
    """The mean over the trained transitions (all when `trained` is None; 0 when none is)."""
    if trained is None:
        return values.mean()
    return (values * trained).sum() / trained.sum().clamp(min=1)


def beta_at(beta: float, ramp_epochs: int, epoch: int) -> float:
    """β for an epoch (0-based): linear ramp reaching β after `ramp_epochs` epochs; the first epoch is > 0."""
    if ramp_epochs <= 0:
        return beta
    return beta * min(1.0, (epoch + 1) / ramp_epochs)


class Dag:
    """DAG-DB (`kl=False`), DAG-KL (`kl=True`) or DAG-RDB (`relative=True`) with settings from the `[dag]`
    section."""

    def __init__(self, settings, ctx: Context, kl: bool, relative: bool = False):
        self.settings, self.ctx, self.kl, self.relative = settings, ctx, kl, relative
        self.name = "dag-rdb" if relative else "dag-kl" if kl else "dag-db"
        self.min_micro_batch = 2 if kl else 1  # DAG-KL's leave-one-out baseline needs two transitions
        self.stored_x0_rewards = settings.x0_guidance if settings.x0_source == "sampling" else None
        self.x0_decoder = settings.x0_decoder or None
        self.flow_config, flow = seeded_flow_network(ctx, zero_head=settings.flow_init == "zero")
        self.modules = {"flow": flow}

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.modules["flow"].parameters()), "lr": self.settings.flow_learning_rate}]

    def lora_frozen(self, epoch: int) -> bool:
        return epoch < self.settings.flow_warmup_epochs

    def prepare(self, batch, dist) -> None:
        """Nothing to prepare: DAG needs no batch statistics."""

    @property
    def lora_steps(self) -> int | None:
        """The leading steps the LoRA samples (the tail's are the base model's); None: all."""
        return tail_lora_steps(self.ctx.steps, self.settings.tail_steps)

    def epoch_logs(self, epoch: int) -> dict:
        return {"beta": beta_at(self.settings.beta, self.settings.beta_ramp_epochs, epoch),
                "flow_warmup": int(self.lora_frozen(epoch))}

    def loss(self, mb: MicroBatch, policy: PolicyOutput, batch, epoch: int):
        s, ctx = self.settings, self.ctx
        beta = beta_at(s.beta, s.beta_ramp_epochs, epoch)
        log_pf = policy.step.log_prob
        if self.relative:
            log_pb = None
            log_p_base = ctx.reference_step(mb).log_prob
        else:
            log_pb = ctx.family.backward_log_prob(ctx.schedule, mb.step_index, mb.x, mb.x_next,
                                                  reduction=ctx.reduction)
        fl_now, fl_next = self._x0_rewards(mb, batch)
        flow_now, flow_next = self._flow_values(mb)
        log_f_now = losses.forward_looking_flow(flow_now.float(), fl_now, beta)
        if s.tail_steps:  # x_{T−k} is the terminal: its log F is β·r(x̂0(x_{T−k})); the tail is not trained
            i, end = mb.step_index.to(mb.x.device), ctx.steps - s.tail_steps
            trained, terminal, terminal_value = i < end, i == end - 1, beta * fl_next
        else:
            trained, terminal = None, mb.terminal
            terminal_value = beta * batch.rewards[mb.traj_index].to(mb.x.device)
        log_f_next = torch.where(terminal, terminal_value,
                                 losses.forward_looking_flow(flow_next.float(), fl_next, beta))
        logs = {}
        if self.relative:
            loss = losses.rdb_residual(log_f_now, log_pf, log_p_base, log_f_next) ** 2
            logs["db_loss"] = _mean(loss.detach(), trained)
            logs["log_ratio_base"] = _mean(log_pf.detach() - log_p_base, trained)
        elif self.kl:
            flow_loss, policy_loss = losses.dag_kl_losses(log_f_now, log_pf, mb.log_pf_old, log_f_next, log_pb,
                                                          s.clip_range, s.adv_clip)
            loss = flow_loss + s.kl_weight * policy_loss
            logs["db_loss"] = flow_loss.detach().mean()
            logs["policy_loss"] = policy_loss.detach().mean()
        else:
            loss = losses.db_loss(log_f_now, log_pf, log_f_next, log_pb)
            logs["db_loss"] = _mean(loss.detach(), trained)
        if s.proximity > 0:
            prox = losses.proximity(policy.out, mb.out_old)
            loss = loss + s.proximity * prox
            logs["proximity"] = prox.detach().mean()
        if log_pb is not None:
            logs["log_pb"] = log_pb.mean()
        logs["flow"] = flow_now.detach().float().mean()
        if trained is not None:
            loss = loss * trained
        return loss, logs

    def _x0_rewards(self, mb: MicroBatch, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """r(Decode(x̂0)) of both states: stored by the rollout, or from the current model (the reference way)."""
        dev, i = mb.x.device, mb.step_index
        if batch.fl_rewards is not None:
            last = batch.fl_rewards.shape[1] - 1
            return batch.fl_rewards[mb.traj_index, i].to(dev), batch.fl_rewards[mb.traj_index, (i + 1).clamp(max=last)].to(dev)
        guided = self.settings.x0_guidance == "guided"
        return (self.ctx.x0_rewards(mb.x, i, mb.cond, mb.prompts, guided),
                self.ctx.x0_rewards(mb.x_next, i + 1, mb.cond, mb.prompts, guided))

    def _flow_values(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """F̃_φ of both states in one call (the network works per sample)."""
        ctx = self.ctx
        x_now, time_now, text = ctx.family.flow_inputs(ctx.schedule, mb.step_index, mb.x, mb.cond)
        x_next, time_next, _ = ctx.family.flow_inputs(ctx.schedule, mb.step_index + 1, mb.x_next, mb.cond)
        with ctx.autocast():
            both = self.modules["flow"](torch.cat([x_now, x_next]), torch.cat([time_now, time_next]),
                                        torch.cat([text, text]))
        return both.chunk(2)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def module_metadata(self) -> dict[str, dict]:
        return {"flow": {"config": self.flow_config.to_dict()}}


def flow_network_from(metadata: dict) -> FlowNetwork:
    """Rebuild a saved flow network's architecture from the metadata written beside its weights."""
    return FlowNetwork(FlowConfig.from_dict(metadata["config"]))
