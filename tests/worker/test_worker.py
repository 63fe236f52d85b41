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


def test_decode_graphs_hold_the_lm_head_only_without_speculation_or_tensor_parallelism(
    monkeypatch,
):
    from types import SimpleNamespace

    from lmserve.model.layers.gemv import GEMV_MAX_ROWS
    from lmserve.worker.model_runner import ModelRunner

    def runner(spec=None, tp=1):
        parallel = SimpleNamespace(tensor_parallel_size=tp)
        return SimpleNamespace(spec_decode=spec, config=SimpleNamespace(parallel_config=parallel))

    largest = ModelRunner._decode_logits_max
    assert largest(runner()) == GEMV_MAX_ROWS
    assert largest(runner(spec=object())) == 0
    assert largest(runner(tp=2)) == 0
    monkeypatch.setenv("LMSERVE_GRAPH_LM_HEAD", "0")
    assert largest(runner()) == 0
