"""Worker set-up on CPU: what it reports about the loaded model."""

from __future__ import annotations

import logging

import torch
from safetensors import safe_open

from lmserve.config import EngineConfig
from lmserve.worker.worker import Worker


def test_model_load_log_reports_the_real_weight_size(tiny_model_dir, caplog):
    model_dir = tiny_model_dir("llama")
    config = EngineConfig.from_kwargs(model_dir, device="cpu", dtype="float32")
    worker = Worker(config)
    with caplog.at_level(logging.INFO, logger="lmserve.worker.worker"):
        worker.load_model()
    with safe_open(f"{model_dir}/model.safetensors", "pt") as f:  # float32 checkpoint
        checkpoint_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    weights = sum(p.numel() * p.element_size() for p in worker.model_runner.model.parameters())
    assert weights == checkpoint_bytes
    # buffers (the rotary table) count too, so the total is at least the weights
    assert worker.model_runner.weight_bytes() >= weights > 0
    line = next(r.getMessage() for r in caplog.records if "model loaded" in r.getMessage())
    assert f"{worker.model_runner.weight_bytes() / 2**20:.2f} MiB of weights on cpu" in line
    assert torch.device("cpu") == worker.device
