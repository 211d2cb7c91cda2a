"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet predicting ε or v, sampled with DDIM.

Whatever scheduler the pipeline ships (SD 1.5 ships PNDM), sampling uses DDIM with the same β schedule, so every
step is a Gaussian with an exact log-probability (`kernels.ddim`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dagcli.families.base import Cond, Denoise, FamilyDefaults, decode_latents
from dagcli.kernels import ddim
from dagcli.kernels.gaussian import Reduction, StepOutput, initial_noise

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class PromptEncoder:
    """Text conditioning per prompt (name -> tensor), cached; the empty prompt gives the unconditional one.

    Stable Diffusion's is the text encoder's last hidden states, `embeds` [L, D]; subclasses add their own tensors.
    """

    def __init__(self, tokenizer, text_encoder, device: torch.device):
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, device
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def truncated(self, prompt: str) -> bool:
        """True when the prompt is longer than the tokenizer's window (its tail is dropped)."""
        return len(self.tokenizer(prompt).input_ids) > self.tokenizer.model_max_length

    def warn_truncated(self, prompts: Sequence[str], warn: Callable[[str], None]) -> int:
        """Warn once about every prompt that will be cut to the text encoder's window; returns how many."""
        long = sorted({p for p in prompts if self.truncated(p)})
        if long:
            example = long[0] if len(long[0]) <= 60 else long[0][:57] + "..."
            warn(f"{len(long)} prompt(s) exceed the text encoder's {self.tokenizer.model_max_length} tokens and "
                 f"are truncated, e.g. {example!r}")
        return len(long)

    def token_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        """[N, L] token ids padded and truncated to the tokenizer's window, on the encoders' device."""
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def embed(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Uncached conditioning of `prompts`: name -> [N, ...]."""
        ids = self.token_ids(self.tokenizer, prompts)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        return {"embeds": self.text_encoder(ids, attention_mask=mask)[0]}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """name -> [B, ...] for the prompts, in the text encoders' dtype, on their device."""
        # one prompt per encoder call: a CPU matmul's rounding can depend on the batch it is in, so encoding the
        # prompts a batch happened to bring together would make a prompt's embedding depend on the run's history
        # (a resumed run would then sample other latents than the uninterrupted one)
        for p in sorted({p for p in prompts if p not in self._cache}):
            self._cache[p] = {k: v[0] for k, v in self.embed([p]).items()}
        return {k: torch.stack([self._cache[p][k] for p in prompts]) for k in self._cache[prompts[0]]}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, L, D] text embeddings (what the UNet cross-attends to)."""
        return self.encode(prompts)["embeds"]


def guided_unet(unet, cond: torch.Tensor, uncond: torch.Tensor, guidance: float, detach_uncond: bool = False,
                **added) -> Callable:
    """(x, t) -> (ε̃, ε(c)) with classifier-free guidance ε̃ = ε(∅) + w (ε(c) − ε(∅)) in one UNet call on [∅; c].

    `cond` is [B, L, D], `uncond` [1, L, D] or [B, L, D]; `added` are extra UNet inputs given as (∅, c) pairs of
    [B, ...] tensors (SDXL's pooled embeddings and time ids). With w <= 1 only the conditional branch runs (as
    diffusers does) and ε̃ = ε(c). `detach_uncond`: ε(∅) enters ε̃ as a constant, so gradients reach the weights
    through ε(c) alone (Flow-GRPO's training forward).
    """
    batch = cond.shape[0]
    uncond = uncond.expand(batch, -1, -1)
    use_cfg = guidance > 1.0
    both = torch.cat([uncond, cond]) if use_cfg else cond
    extra = {k: torch.cat([u, c]) if use_cfg else c for k, (u, c) in added.items()}
    kwargs = {"added_cond_kwargs": extra} if extra else {}
    dtype = cond.dtype

    def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = torch.cat([t, t]) if use_cfg else t
        out = unet(x_in.to(dtype), t_in, encoder_hidden_states=both, return_dict=False, **kwargs)[0].float()
        if not use_cfg:
            return out, out
        eps_u, eps_c = out.chunk(2)
        if detach_uncond:
            eps_u = eps_u.detach()
        return eps_u + guidance * (eps_c - eps_u), eps_c

    return denoise


def ddim_scheduler(scheduler):
    """The sampler is DDIM whatever scheduler a pipeline ships with: same β schedule. A latent's x̂0 is never
    clipped unless the shipped config says so (DDIM's own default, clipping to [-1, 1], is for pixel models;
    an Euler scheduler built in code carries no `clip_sample`)."""
    from diffusers import DDIMScheduler

    if isinstance(scheduler, DDIMScheduler):
        return scheduler
    return DDIMScheduler.from_config({"clip_sample": False, **scheduler.config})


class SDFamily:
    """Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`)."""

    name = "sd"
    lora_prefix = "unet"
    default_lora_targets = ATTENTION_TARGETS
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}  # from_pretrained extras
    max_resolution: int | None = None  # a convolutional UNet takes any size
    reference = FamilyDefaults(steps=50, guidance=5.0, train_eta=1.0, sample_eta=1.0, prompts="simple_animals",
                               source="Stable Diffusion reference (DDPO and DAG papers)")

    def __init__(self, pipe, device: torch.device):
        pipe.scheduler = ddim_scheduler(pipe.scheduler)
        self.pipe, self.device = pipe, device
        self.denoiser = pipe.unet
        self.encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, device)

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def resolution_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def native_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.resolution_multiple

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.unet.config.in_channels)

    def initial_latents(self, batch: int, height: int, width: int, generator) -> torch.Tensor:
        f = self.resolution_multiple
        return initial_noise((batch, self.latent_channels, height // f, width // f), generator, device=self.device)

    # --- prompts -----------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> Cond:
        return Cond(self.encoder.encode(list(prompts)))

    def warn_truncated(self, prompts: Sequence[str], warn: Callable[[str], None]) -> int:
        return self.encoder.warn_truncated(prompts, warn)

    # --- the chain ---------------------------------------------------------------------------------------
    def schedule(self, steps: int, height: int, width: int) -> ddim.Schedule:
        return ddim.Schedule.from_scheduler(self.pipe.scheduler, steps)

    def num_steps(self, schedule: ddim.Schedule) -> int:
        return schedule.num_steps

    def timestep(self, schedule: ddim.Schedule, j: torch.Tensor) -> torch.Tensor:
        """The DDIM timestep of states j (long); the final state (j = T) is at timestep 0."""
        j = torch.as_tensor(j).reshape(-1)
        last = schedule.prev(schedule.timesteps[-1:]).clamp(min=0)
        return torch.cat([schedule.timesteps, last])[j]

    def denoiser_fn(self, model, schedule: ddim.Schedule, cond: Cond, guidance: float,
                    detach_uncond: bool = False) -> Denoise:
        guided = guided_unet(model, cond.tensors["embeds"], self.encoder([""]), guidance, detach_uncond)
        return lambda x, j: guided(x, self.timestep(schedule, j).to(x.device))

    def step(self, schedule, i, x, out, eta, prev=None, generator=None, reduction: Reduction = "mean") -> StepOutput:
        t = self.timestep(schedule, i).to(x.device)
        return ddim.ddim_step(schedule, out, t, x, eta, prev_sample=prev, generator=generator, reduction=reduction)

    def backward_log_prob(self, schedule, i, x, prev, reduction: Reduction = "mean") -> torch.Tensor:
        t = self.timestep(schedule, i).to(x.device)
        return ddim.backward_log_prob(schedule, x, t, prev, reduction=reduction)

    def predict_x0(self, schedule, j, x, out) -> torch.Tensor:
        return ddim.pred_x0_from_eps(schedule, x, self.timestep(schedule, j), out)

    def noised(self, schedule, j, x0, noise) -> torch.Tensor:
        """x0 carried forward to state j with `noise`: √ᾱ·x0 + √(1 − ᾱ)·ε at state j's DDIM timestep."""
        from dagcli.kernels.forward import vp_noised

        return vp_noised(x0, noise, schedule.alpha(self.timestep(schedule, j)).to(x0.device, x0.dtype))

    def x0_coefficients(self, schedule, j) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) [n] of x̂0 = a·x + b·out at states j, for the scheduler's prediction type."""
        from dagcli.kernels.forward import x0_coefficients

        return x0_coefficients(schedule.prediction_type, schedule.alpha(self.timestep(schedule, j)))

    def decode(self, latents: torch.Tensor, vae=None) -> torch.Tensor:
        return decode_latents(vae if vae is not None else self.pipe.vae, latents)

    # --- the flow network and LoRA files -----------------------------------------------------------------
    def flow_inputs(self, schedule, j, x, cond: Cond):
        return x, self.timestep(schedule, j).to(x.device), cond.tensors["embeds"]

    def flow_config(self, height: int, width: int):
        from dagcli.algorithms.flow import flow_config_for

        latent = min(height, width) // self.resolution_multiple  # it cross-attends to what the UNet attends to
        return flow_config_for(self.pipe.unet.config, int(self.pipe.unet.config.cross_attention_dim), latent)

    def save_lora(self, folder, weights: dict, metadata: dict) -> None:
        type(self.pipe).save_lora_weights(str(folder), unet_lora_layers=weights, safe_serialization=True,
                                          unet_lora_adapter_metadata=metadata)

    @staticmethod
    def kohya_weights(weights: dict, alpha: float) -> dict:
        """diffusers-format LoRA (`unet.` keys) -> kohya's `lora_unet_*` keys (what ComfyUI / A1111 read), with
        the LoRA's real alpha in every `.alpha` (not diffusers' default alpha = rank)."""
        return unet_kohya_weights(weights, alpha)


def unet_kohya_weights(weights: dict, alpha: float, module_name: Callable[[str], str] | None = None) -> dict:
    """kohya keys of a UNet LoRA given with diffusers names: `lora_unet_<module path with _>.lora_down/up.weight`;
    `module_name` renames the module paths first (a family whose kohya names follow another UNet layout)."""
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    from dagcli.errors import DagError

    unet = {k: v for k, v in weights.items() if k.startswith("unet.")}
    if len(unet) != len(weights):
        other = next(k for k in weights if not k.startswith("unet."))
        raise DagError(f"only UNet LoRAs can be exported to kohya format; found {other!r}")
    peft = convert_all_state_dict_to_peft(unet)  # unet.<module path>.lora_A/B.weight
    if module_name is not None:
        peft = {_renamed(key, module_name): value for key, value in peft.items()}
    kohya = convert_state_dict_to_kohya(peft)
    return {key: (torch.tensor(alpha, dtype=torch.float32) if key.endswith(".alpha") else value).detach().float()
            .contiguous() for key, value in kohya.items()}


def _renamed(key: str, module_name: Callable[[str], str]) -> str:
    """`unet.<path>.lora_A.weight` with its module path renamed."""
    path, sep, tail = key.removeprefix("unet.").rpartition(".lora_")
    return f"unet.{module_name(path)}{sep}{tail}"
