"""Random-weight rectified-flow pipelines built in code, offline: `--model tiny-random-sd3` and `tiny-random-flux`.

32 px images, 8x8x4 latents, well under a million parameters each, deterministic for a seed; for tests and
plumbing checks (their images are noise-like). The tokenizers are written here too: the CLIP one of
`builtin.tokenizer`, and a word-level stand-in for T5's (same special tokens, an end-of-sequence token appended).
"""

from __future__ import annotations

import torch

TOKENS = 16  # text window of every tiny tokenizer
TEXT_DIM = 32  # T5's width = the transformer's joint attention width = the two CLIPs' widths together


def build_t5_stand_in_tokenizer(words: tuple[str, ...] = (), model_max_length: int = TOKENS):
    """A fast tokenizer with T5's special tokens (<pad> = 0, </s> = 1, <unk> = 2) over whole words (by default
    the tiny models' words)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from dagcli.builtin.random_parts import TINY_RANDOM_WORDS

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words or TINY_RANDOM_WORDS:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def _clip(cls, tokenizer, width: int):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=width, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=2 * TEXT_DIM,
                                   num_layers=2, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae(shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=32, shift_factor=shift_factor, scaling_factor=scaling_factor,
    )


def _inference_mode(pipe):
    """Every network in eval mode, as `from_pretrained` leaves them (T5 has dropout)."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def build_tiny_random_sd3(seed: int = 0, t5: bool = False):
    """A tiny SD3.5-like pipeline (two CLIPs, dual-attention MMDiT with RMS q/k norms, shift 3); T5 only with
    `t5=True` (else `text_encoder_3=None`: zeros in its place, as diffusers does)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from dagcli.builtin.random_parts import TINY_RANDOM_WORDS
    from dagcli.builtin.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(TINY_RANDOM_WORDS, model_max_length=TOKENS)
    t5_tokenizer = build_t5_stand_in_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=TEXT_DIM, caption_projection_dim=32,
            pooled_projection_dim=TEXT_DIM, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
        )
        vae = _vae(shift_factor=0.0609, scaling_factor=1.5305)
        text_encoder = _clip(CLIPTextModelWithProjection, tokenizer, TEXT_DIM // 2)
        text_encoder_2 = _clip(CLIPTextModelWithProjection, tokenizer, TEXT_DIM // 2)
        text_encoder_3 = _t5(t5_tokenizer) if t5 else None
    return _inference_mode(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer if t5 else None,
    ))


def build_tiny_random_flux(seed: int = 0, guidance_embeds: bool = True):
    """A tiny FLUX.1-like pipeline: CLIP pooled + T5, one double and one single block, guidance embedding
    (FLUX.1-dev; `guidance_embeds=False` is -schnell-like), resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from dagcli.builtin.random_parts import TINY_RANDOM_WORDS
    from dagcli.builtin.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(TINY_RANDOM_WORDS, model_max_length=TOKENS)
    t5_tokenizer = build_t5_stand_in_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
            guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
        )
        vae = _vae(shift_factor=0.1159, scaling_factor=0.3611)
        text_encoder = _clip(CLIPTextModel, tokenizer, TEXT_DIM)
        text_encoder_2 = _t5(t5_tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return _inference_mode(FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer,
                                        transformer=transformer))
