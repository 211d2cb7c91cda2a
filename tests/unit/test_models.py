"""Model loading: local folders, built-in names, offline hub ids, devices and dtypes."""

from __future__ import annotations

import pytest
import torch

from dagcli.errors import DagError
from dagcli.models import check_model_name, load_model, resolve_device, resolve_dtype


def test_local_folder_loads_through_user_path(tiny_pipeline_dir):
    loaded = load_model(str(tiny_pipeline_dir), device="cpu", dtype="fp32")
    assert loaded.resolution == 32
    assert loaded.family.latent_channels == 4
    assert not any(p.requires_grad for p in loaded.pipe.unet.parameters())
    assert all(f.suffix != ".bin" for f in tiny_pipeline_dir.rglob("*") if f.is_file())


def test_frozen_dtype_applies(tiny_pipeline_dir):
    loaded = load_model(str(tiny_pipeline_dir), device="cpu", dtype="bf16")
    assert loaded.pipe.unet.dtype == torch.bfloat16
    assert loaded.dtype == torch.bfloat16


def test_tiny_random_is_deterministic():
    a = load_model("tiny-random", device="cpu").pipe.unet.state_dict()
    b = load_model("tiny-random", device="cpu").pipe.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["foo", "no such thing", "./missing-folder/x/y"])
def test_unknown_model_names_fail_before_loading(name):
    with pytest.raises(DagError, match="valid options"):
        check_model_name(name)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(DagError, match="model_index.json"):
        check_model_name(str(tmp_path))


def test_uncached_hub_id_offline_names_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DagError) as info:
        load_model("some-org/not-cached-model", device="cpu")
    message = str(info.value)
    assert "some-org/not-cached-model" in message and "HF_HUB_OFFLINE" in message and "\n" not in message


def test_device_and_dtype_validation():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(DagError, match="valid options: auto, cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(DagError, match="valid options: fp32, bf16, fp16"):
        resolve_dtype("fp8")
    if not torch.cuda.is_available():
        with pytest.raises(DagError, match="no CUDA"):
            resolve_device("cuda")
