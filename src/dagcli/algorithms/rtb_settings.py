"""The `[rtb]` section, read by rtb (relative trajectory balance)."""

from __future__ import annotations

from dataclasses import dataclass

from dagcli.algorithms.settings import Section, check_tail_steps

LOG_Z = ("learned", "vargrad")
CREDIT = ("trajectory", "to-go", "to-go-x0", "to-go-flow")
LOG_RATIO = ("sampled", "expected")


@dataclass(frozen=True)
class RtbConfig:
    """Read by rtb."""

    beta: float = 100.0  # β of the target p_base·exp(β r) / Z (with "mean" reduction, β per latent dim as DAG's)
    log_z: str = "learned"  # "learned": a per-prompt log Z table | "vargrad": each prompt group's mean (no table)
    log_z_learning_rate: float = 1e-2  # the learned log Z table's learning rate
    group_size: int = 4  # trajectories per prompt group (VarGrad's groups; 1 is allowed with "learned")
    # the last k steps are the base model's (0: none, the exact objective): sampled with the LoRA switched off in
    # training, `dag sample` and `dag eval`, so their log ratio is exactly 0 and they are neither scored nor
    # trained. Near-deterministic steps whose tiny σ turns a small change of the mean into hundreds of nats
    # (docs/algorithms.md) leave the objective; the LoRA is trained on the steps before them, against the reward
    # of the x_T the base model's tail leads to
    tail_steps: int = 0
    # the weight of each step's log P_θ: "trajectory": A(τ) on every step (the trajectory loss's gradient) |
    # "to-go": the log ratio from that step on minus β r, centred per group and step (or plus the learned log Z):
    # the same expected gradient on-policy, without the earlier steps' noise (docs/algorithms.md) | "to-go-x0":
    # "to-go" plus β·r(Decode(x̂0(x_i))), the reward of the state's one-step prediction, as a baseline of step i
    # (a function of x_i alone, so the expected gradient is unchanged; one decode and score per trained state) |
    # "to-go-flow": "to-go-x0" plus a learned critic F̃_φ(x_i) (DAG's flow network), fitted by least squares to what
    # the rest of step i's weight averages to from x_i, so the baseline is the state's expected weight rather than
    # its x̂0's reward: still a function of x_i alone, fitted on earlier epochs (docs/algorithms.md)
    credit: str = "trajectory"
    # the log ratios in the to-go weights: "sampled": ρ_j = log P_θ − log P_base of the sampled step | "expected":
    # their expectation over each step's noise, the Gaussian KL ‖μ_θ − μ_base‖²/(2σ²) of the step from its start
    # state, and step i's own ρ_i replaced by that KL's gradient through μ_θ: the same expected gradient without the
    # noise of ρ, which grows with the log ratio (docs/algorithms.md); needs credit "to-go" or "to-go-x0"
    log_ratio: str = "sampled"
    flow_learning_rate: float = 1e-3  # "to-go-flow": the critic's learning rate
    flow_warmup_epochs: int = 1  # "to-go-flow": epochs that fit the critic alone, the LoRA frozen


def check_section(c, setting) -> list[str]:
    """The group checks, and a tail that leaves at least one step to train."""
    e = check_groups(c, setting) + check_tail_steps("rtb.tail_steps", c.rtb.tail_steps, c.sampling.steps, setting)
    if c.rtb.log_ratio == "expected" and c.rtb.credit == "trajectory":
        e.append(f"{setting('rtb.log_ratio', c.rtb.log_ratio)} needs rtb.credit = 'to-go', 'to-go-x0' or "
                 f"'to-go-flow' (each step's weight from that step on), not {setting('rtb.credit', c.rtb.credit)}")
    return e


def check_groups(c, setting) -> list[str]:
    """VarGrad compares a group's members: groups of at least two, whole groups per sampler call."""
    size = c.rtb.group_size
    if size < 1:
        return []  # reported as not positive
    if c.rtb.log_z == "vargrad" and size < 2:
        return [f"{setting('rtb.group_size', size)}: must be at least 2 with rtb.log_z = 'vargrad'"]
    if c.sampling.batch_size % size:
        return [f"{setting('sampling.batch_size', c.sampling.batch_size)} does not divide into groups of "
                f"{setting('rtb.group_size', size)}; use a multiple of {size} or another group size"]
    return []


SECTION = Section("rtb", RtbConfig, "RTB: β, log Z (learned per prompt or VarGrad), prompt group size",
                  positive=("beta", "log_z_learning_rate", "group_size", "flow_learning_rate"),
                  non_negative=("tail_steps", "flow_warmup_epochs"),
                  choices={"log_z": LOG_Z, "credit": CREDIT, "log_ratio": LOG_RATIO}, validate=check_section)
