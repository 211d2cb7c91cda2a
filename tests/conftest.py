"""Shared fixtures: tiny models built in code, saved and loaded through the same code users hit."""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread per test process, and for the processes tests start: the models here are tiny, so threads
# buy nothing, and with pytest-xdist's workers sharing the cores a second thread each only adds OpenMP's waiting
# (a tiny UNet's forward and backward took 4-10x longer at 2 threads than at 1 on a loaded 2-core machine).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


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
