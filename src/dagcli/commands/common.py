"""Options shared by several commands (their checks: `dagcli.checks`)."""

from __future__ import annotations

import typer

from dagcli.builtin import BUILTIN_NAMES

# The names of `dagcli.models.DEVICES` and `DTYPES`, spelt out so that `--help` and usage errors need no torch.
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("fp32", "bf16", "fp16")

# Help texts are rich markup: `\\[` keeps a bracket literal.
MODEL_HELP = "Base model (see below). \\[default: the checkpoint's, else tiny]"
# Below the options, at full width: a hub id is too long for the help column of an 80-column terminal.
MODEL_EPILOG = (
    f"--model takes a built-in model ({', '.join(BUILTIN_NAMES)}), a local diffusers folder, or a hub id, "
    "e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 for Stable Diffusion 1.5."
)
# Below the options of the commands that take a reward spec.
REWARD_SERVERS_EPILOG = (
    "A reward spec part may be a server: http://HOST:PORT (dagcli's JSON protocol, e.g. dag serve-reward), "
    "pickle+http://HOST:PORT (Flow-GRPO's GenEval/OCR servers) or vlm+http://HOST:PORT (an OpenAI-compatible VLM "
    "judge), with options in its query, e.g. http://127.0.0.1:8000?timeout=30; in a sum the weight follows the "
    "port: clip:0.5,http://127.0.0.1:8000:1. Warning: a pickle server's reply is unpickled, and unpickling can run "
    "the server's code: only hosts on this machine are used unless the option allow_remote=true is given. "
    "See docs/rewards.md."
)
SAMPLER_DEFAULTS_HELP = {
    "steps": "Sampler steps. \\[default: the model's; Stable Diffusion: 50]",
    "guidance": "Classifier-free guidance weight. \\[default: the model's; Stable Diffusion: 5]",
}


def model_option():
    """`--model` of the commands that can take the base model from a checkpoint."""
    return typer.Option(None, "--model", "-m", help=MODEL_HELP)


def device_option():
    return typer.Option("auto", "--device", help=f"Device: {'|'.join(DEVICES)}.")


def dtype_option(default: str | None = "fp32"):
    """`--dtype`; `default=None` where a preset may give it (`dag train`: model.dtype)."""
    shown = "" if default else f" \\[default: {DTYPES[0]}]"
    return typer.Option(default, "--dtype", help=f"Dtype of the frozen weights: {'|'.join(DTYPES)}.{shown}")


def eta_option(training: bool = False):
    """`--eta`, checked by `check_eta` (for training by `config.validate`, which needs it > 0: a stochastic
    policy). Sampling flows defaults to their deterministic ODE, training them to their SDE."""
    if training:
        bounds, defaults = "(0, 1], the flow SDE's level > 0", "Stable Diffusion: 1, SD3: 0.7, FLUX: 0.9"
    else:
        bounds, defaults = "[0, 1], the flow SDE's level >= 0; 0: deterministic", "Stable Diffusion: 1, SD3 and FLUX: 0"
    return typer.Option(None, "--eta", help=f"Sampler noise: DDIM's η in {bounds}. \\[default: the model's; {defaults}]")


def flow_sampler_option():
    """`--sampler`: the flow families' step (`sampling.sampler`); None leaves the setting as it is."""
    return typer.Option(None, "--sampler", help="Flow models' step: sde (Flow-GRPO's SDE) | ddim (DDIM for rectified "
                        "flow, eta 1 matches P_B). \\[default: sde]")


def sampler_option(name: str):
    """`--steps` or `--guidance`, whose defaults come from the model."""
    return typer.Option(None, f"--{name}", help=SAMPLER_DEFAULTS_HELP[name])
