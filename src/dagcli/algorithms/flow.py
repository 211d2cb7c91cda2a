"""The flow network F̃_φ(x_t, t, c): the down half of a conditional UNet, pooled to one scalar per sample.

Sinusoidal timestep embedding, cross-attention to the text embeddings in every block but the last (8 heads in
every block, as the reference DAG code), one layer per block, global average pooling (so any latent size and
batch size 1 work), a linear layer to a scalar.
Reference sizes for Stable Diffusion: channels 64/128/256/256; `flow_config_for` scales them down for small
base models so the flow network never dwarfs the UNet it trains beside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import get_down_block
from torch import nn


@dataclass(frozen=True)
class FlowConfig:
    block_out_channels: tuple[int, ...] = (64, 128, 256, 256)  # one down block each
    cross_attention_dim: int = 768  # the text encoder's hidden size
    in_channels: int = 4  # latent channels
    num_heads: int = 8  # attention heads in every block (head width = the block's channels / num_heads)
    norm_num_groups: int = 32
    attention_head_dim: int = 0  # > 0: fixed head width instead (flow networks saved before num_heads existed)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FlowConfig:
        return cls(**{**d, "block_out_channels": tuple(d["block_out_channels"])})


def flow_config_for(unet_config, text_hidden_size: int, latent_size: int) -> FlowConfig:
    """Reference sizes for SD-sized UNets; for small UNets, half of the UNet's widths and fewer blocks."""
    base = int(unet_config.block_out_channels[0])
    max_blocks = max(1, int(math.log2(max(latent_size, 2))))
    if base >= 320:
        channels = (64, 128, 256, 256)
        groups = 32
    else:
        half = [max(8, int(c) // 2) for c in unet_config.block_out_channels]
        channels = tuple(half + [half[-1]])
        groups = min(8, min(channels))
    channels = channels[: min(len(channels), max_blocks)]
    return FlowConfig(
        block_out_channels=channels,
        cross_attention_dim=text_hidden_size,
        in_channels=int(unet_config.in_channels),
        norm_num_groups=groups,
    )


def _heads(channels: int, wanted: int) -> int:
    """`wanted` heads when they divide the channels, else the largest number below it that does."""
    return next(h for h in range(min(wanted, channels), 0, -1) if channels % h == 0)


class FlowNetwork(nn.Module):
    """log F̃_φ(x_t, t, c) -> [B] (float32)."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        self.time_proj = Timesteps(ch[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, padding=1)
        blocks = []
        for i, out_ch in enumerate(ch):
            kind = "DownBlock2D" if i == len(ch) - 1 else "CrossAttnDownBlock2D"
            heads = (max(1, out_ch // config.attention_head_dim) if config.attention_head_dim
                     else _heads(out_ch, config.num_heads))
            blocks.append(
                get_down_block(
                    kind,
                    num_layers=1,
                    in_channels=ch[max(i - 1, 0)],
                    out_channels=out_ch,
                    temb_channels=ch[0] * 4,
                    add_downsample=True,
                    resnet_eps=1e-5,
                    resnet_act_fn="silu",
                    resnet_groups=config.norm_num_groups,
                    cross_attention_dim=config.cross_attention_dim,
                    num_attention_heads=heads,
                    attention_head_dim=out_ch // heads,
                    downsample_padding=1,
                )
            )
        self.down_blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(ch[-1], 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x [B,C,h,w], t [B] timesteps, text [B,L,D] -> [B]."""
        dtype = self.head.weight.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(dtype))
        h = self.conv_in(x.to(dtype))
        text = text.to(dtype)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        return self.head(h.mean(dim=(2, 3))).squeeze(-1).float()


def seeded_flow_network(ctx, zero_head: bool = False) -> tuple[FlowConfig, FlowNetwork]:
    """The run's flow network, sized for its model and image size (`Context`), on its device; its initial weights
    depend on the run seed alone (the global random state is left as it was). `zero_head`: the last layer at zero,
    so that F̃ = 0 everywhere until it is trained (the rest drawn as without it)."""
    config = ctx.family.flow_config(ctx.height, ctx.width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        network = FlowNetwork(config)
    if zero_head:
        torch.nn.init.zeros_(network.head.weight)
        torch.nn.init.zeros_(network.head.bias)
    return config, network.to(ctx.device)
