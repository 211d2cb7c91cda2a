"""Shared fixtures: tiny models built in code, saved and loaded through the same code users hit."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A random tiny Stable Diffusion pipeline written with `save_pretrained` (safetensors)."""
    from dagcli.builtin.random_models import build_tiny_random_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_random_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_pipeline_dir):
    """The saved tiny pipeline loaded through `dagcli.models.load_model` on CPU."""
    from dagcli.models import load_model

    return load_model(str(tiny_pipeline_dir), device="cpu")
