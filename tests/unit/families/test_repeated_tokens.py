"""An SD3 pipeline without T5 carries its 256 identical zero tokens as one (`families.repeated_tokens`): checked
against the transformer run on the full sequence by diffusers' own attention processor."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from dagcli.builtin.random_flow import build_tiny_random_sd3
from dagcli.families import family_for, repeated_tokens

PROMPTS = ["a red circle", "a small blue square on a yellow background"]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_random_sd3(0)


def full_sequence(pipe, prompts):
    """The pipeline's own encoding, one prompt per call as the family encodes: CLIP tokens then 256 zero tokens."""
    parts = [pipe.encode_prompt([p], None, None, do_classifier_free_guidance=False) for p in prompts]
    return torch.cat([e for e, _, _, _ in parts]), torch.cat([pooled for _, _, pooled, _ in parts])


def plain_transformer(pipe):
    """A copy of the transformer with diffusers' own processor everywhere."""
    model = copy.deepcopy(pipe.transformer)
    model.set_attn_processor(JointAttnProcessor2_0())
    return model


def inputs(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=gen), torch.tensor([950.0, 400.0, 120.0, 30.0])[:batch]


def test_family_carries_one_zero_token_and_its_guided_velocity_equals_the_full_sequence(pipe):
    family = family_for(pipe, torch.device("cpu"))
    cond = family.encode(PROMPTS)
    full, pooled = full_sequence(pipe, PROMPTS)
    assert family.short_t5 and cond.tensors["embeds"].shape[1] == full.shape[1] - 255
    assert torch.equal(cond.tensors["embeds"], full[:, : cond.tensors["embeds"].shape[1]])
    assert torch.equal(cond.tensors["pooled"], pooled)

    schedule = family.schedule(4, 32, 32)
    x, _ = inputs(2)
    j = torch.tensor([0, 2])
    with torch.no_grad():
        guided, conditional = family.denoiser_fn(pipe.transformer, schedule, cond, 4.5)(x, j)
        empty, empty_pooled = full_sequence(pipe, [""])
        plain = plain_transformer(pipe)
        t = schedule.time(j)
        out = plain(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                    encoder_hidden_states=torch.cat([empty.expand_as(full), full]),
                    pooled_projections=torch.cat([empty_pooled.expand_as(pooled), pooled]), return_dict=False)[0]
    v_u, v_c = out.chunk(2)
    assert torch.allclose(conditional, v_c, atol=1e-5)
    assert torch.allclose(guided, v_u + 4.5 * (v_c - v_u), atol=5e-5)
    assert (guided - v_u).abs().max() > 1e-2  # the prompt matters: not a comparison of two blank outputs


@pytest.mark.parametrize("copies", [2, 256])
def test_short_sequence_equals_the_full_one_in_every_block_kind(pipe, copies):
    """Block 0 has SD3.5's image-only second attention, block 1 is `context_pre_only`."""
    model = copy.deepcopy(pipe.transformer)
    repeated_tokens.install(model)
    assert any(b.attn2 is not None for b in model.transformer_blocks) and model.transformer_blocks[-1].context_pre_only
    gen = torch.Generator().manual_seed(1)
    short = torch.randn(3, 5, pipe.transformer.config.joint_attention_dim, generator=gen)
    pooled = torch.randn(3, pipe.transformer.config.pooled_projection_dim, generator=gen)
    x, t = inputs(3, seed=2)
    with torch.no_grad():
        ours = model(hidden_states=x, timestep=t, encoder_hidden_states=short, pooled_projections=pooled,
                     joint_attention_kwargs={repeated_tokens.KWARG: copies}, return_dict=False)[0]
        full = plain_transformer(pipe)(hidden_states=x, timestep=t, pooled_projections=pooled,
                                       encoder_hidden_states=repeated_tokens.expand(short, copies),
                                       return_dict=False)[0]
        one = plain_transformer(pipe)(hidden_states=x, timestep=t, encoder_hidden_states=short,
                                      pooled_projections=pooled, return_dict=False)[0]
    assert torch.allclose(ours, full, atol=1e-5)
    assert (ours - one).abs().max() > 1e-3  # the weight of the repeated token matters


def test_without_the_keyword_the_wrapped_processor_is_diffusers_own_bit_for_bit(pipe):
    model = copy.deepcopy(pipe.transformer)
    repeated_tokens.install(model)
    repeated_tokens.install(model)  # idempotent
    assert all(isinstance(p.base, JointAttnProcessor2_0) for p in model.attn_processors.values())
    full, pooled = full_sequence(pipe, PROMPTS)
    x, t = inputs(2)
    with torch.no_grad():
        ours = model(hidden_states=x, timestep=t, encoder_hidden_states=full, pooled_projections=pooled,
                     return_dict=False)[0]
        ref = plain_transformer(pipe)(hidden_states=x, timestep=t, encoder_hidden_states=full,
                                      pooled_projections=pooled, return_dict=False)[0]
    assert torch.equal(ours, ref)


def test_bfloat16_runs_the_full_sequence(pipe):
    """log 256 would be rounded in bfloat16: the processor repeats the token and runs diffusers' arithmetic."""
    model = copy.deepcopy(pipe.transformer).to(torch.bfloat16)
    plain = plain_transformer(pipe).to(torch.bfloat16)
    repeated_tokens.install(model)
    full, pooled = full_sequence(pipe, PROMPTS)
    short = full[:, : full.shape[1] - 255]
    x, t = inputs(2)
    with torch.no_grad():
        ours = model(hidden_states=x.bfloat16(), timestep=t, encoder_hidden_states=short.bfloat16(),
                     pooled_projections=pooled.bfloat16(), joint_attention_kwargs={repeated_tokens.KWARG: 256},
                     return_dict=False)[0]
        ref = plain(hidden_states=x.bfloat16(), timestep=t, encoder_hidden_states=full.bfloat16(),
                    pooled_projections=pooled.bfloat16(), return_dict=False)[0]
    assert torch.equal(ours, ref)


def test_flow_network_sees_the_pipelines_full_sequence(pipe):
    family = family_for(pipe, torch.device("cpu"))
    cond = family.encode(PROMPTS)
    schedule = family.schedule(4, 32, 32)
    x, _ = inputs(2)
    _, _, text = family.flow_inputs(schedule, torch.tensor([1, 1]), x, cond)
    assert torch.equal(text, full_sequence(pipe, PROMPTS)[0])
