"""A prompt's conditioning does not depend on which prompts were encoded beside it: the encoders see one prompt
per call, so a resumed run (whose first batch brings other prompts together than the uninterrupted run's did)
samples from the same embeddings, bit for bit."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["a red circle", "a blue square on a white background", "an orange triangle"]


@pytest.mark.parametrize("model", ["tiny", "tiny-flow", "tiny-random-sd3", "tiny-random-flux", "tiny-random-sdxl"])
def test_an_embedding_is_the_same_whatever_was_encoded_with_it(model):
    from dagcli.models import load_model

    together = load_model(model, device="cpu").family.encode(PROMPTS + [""])
    family = load_model(model, device="cpu").family
    for p in reversed(PROMPTS):
        family.encode([p])
    one_by_one = family.encode(PROMPTS + [""])
    assert together.tensors.keys() == one_by_one.tensors.keys()
    for key, value in together.tensors.items():
        assert torch.equal(value, one_by_one.tensors[key]), key
