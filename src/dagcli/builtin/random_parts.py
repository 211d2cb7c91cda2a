"""The parts the random-weight builders share: their words, and a small UNet, VAE and CLIP text config."""

from __future__ import annotations

TINY_RANDOM_WORDS = (
    "a an the of on in with and small large big red green blue yellow purple orange white black pink "
    "circle square triangle background photo painting cat dog horse bird fish"
).split()


def tiny_unet(**config):
    """A random UNet on 8x8x4 latents, two blocks 32 and 64 wide; `config` gives its blocks and conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{"sample_size": 8, "in_channels": 4, "out_channels": 4,
                                   "block_out_channels": (32, 64), "norm_num_groups": 8, **config})


def tiny_vae(**overrides):
    """A random 4-channel VAE that maps 32 px images to 8x8 latents (random init: seed the caller's RNG)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{
        "in_channels": 3, "out_channels": 3, "block_out_channels": (16, 32, 32), "latent_channels": 4,
        "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
        "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32, **overrides,
    })


def tiny_text_config(tokenizer, **overrides):
    """A 32-wide CLIP text encoder config for `tokenizer` (its vocabulary, window and special tokens)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, **overrides,
    })
