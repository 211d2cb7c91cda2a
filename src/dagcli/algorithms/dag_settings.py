"""The `[dag]` section, read by dag-db, dag-kl and dag-rdb. Defaults are DAG's reference values for Stable Diffusion 1.5
unless a comment names another source."""

from __future__ import annotations

from dataclasses import dataclass

from dagcli.algorithms.settings import Section, check_tail_steps

X0_SOURCES = ("sampling", "current")
X0_GUIDANCE = ("cond", "guided")
FLOW_INITS = ("reference", "zero")


@dataclass(frozen=True)
class DagConfig:
    """Read by dag-db and dag-kl."""

    flow_learning_rate: float = 3e-4  # the flow network's learning rate
    beta: float = 100.0  # reward exponent: R(x) = exp(β r(x)) (per latent dim under reduction = "mean")
    beta_ramp_epochs: int = 50  # β grows linearly over this many epochs (reference: half of 100), 0 = no ramp
    flow_warmup_epochs: int = 0  # first epochs train only the flow network (the LoRA waits for a fitted F̃)
    # the flow network's last layer: "reference" (drawn, as DAG's code) | "zero" (F̃ = 0 at the start, so that
    # log F is β·r(x̂0) until F̃ learns a correction; for small β, whose reward term a drawn F̃ dwarfs)
    flow_init: str = "reference"
    proximity: float = 1.0  # λ: weight of mean (ε̃_θ − ε̃_sampling)²
    x0_source: str = "sampling"  # forward-looking x̂0: "sampling" (stored, each state once) | "current" (reference)
    x0_guidance: str = "cond"  # x̂0 from the conditional ε (reference) or the guided ε
    # decoder of the forward-looking x̂0 images: "" = the model's VAE; else an AutoencoderTiny folder or hub id
    # (e.g. madebyollin/taesd for SD 1.x / 2.x; "tiny-taesd" for the built-in model); final images use the VAE
    x0_decoder: str = ""
    kl_weight: float = 1.0  # DAG-KL: weight of the REINFORCE term
    clip_range: float = 1e-4  # DAG-KL: ratio clip of the REINFORCE term
    adv_clip: float = 5.0  # DAG-KL: advantages clipped to ±this
    # DAG-DB, DAG-RDB: the last k steps are the base model's (sampled with the LoRA off in training, `dag sample`
    # and `dag eval`, never trained), x_{T−k} the terminal with log F = β·r(x̂0(x_{T−k})) (0: none, the whole
    # chain): for samplers whose last steps are nearly deterministic (docs/algorithms.md)
    tail_steps: int = 0


def check_tail(c, setting) -> list[str]:
    """A tail that leaves a transition to train, and none with DAG-KL (its baseline is over the micro-batch)."""
    tail = c.dag.tail_steps
    if not tail or not c.train.algorithm.startswith("dag-"):
        return []
    if c.train.algorithm == "dag-kl":
        return [f"{setting('dag.tail_steps', tail)}: not with dag-kl; set it to 0 or use dag-db / dag-rdb"]
    return check_tail_steps("dag.tail_steps", tail, c.sampling.steps, setting, what="transition")


SECTION = Section(
    "dag", DagConfig, "DAG-DB / DAG-KL: reward exponent β and its ramp, the flow network, x̂0 rewards, proximity",
    positive=("flow_learning_rate", "clip_range", "adv_clip"),
    non_negative=("beta", "proximity", "beta_ramp_epochs", "flow_warmup_epochs", "kl_weight", "tail_steps"),
    choices={"x0_source": X0_SOURCES, "x0_guidance": X0_GUIDANCE, "flow_init": FLOW_INITS}, validate=check_tail,
)
