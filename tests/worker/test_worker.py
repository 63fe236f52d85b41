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


def test_shared_prefix_attention_is_looked_for_in_decode_steps_of_enough_requests():
    """The runner asks for the shared prefix only in decode-only steps of MIN_REQS+ requests
    with a backend that has the kernels, and uses it when it pays; its graphs come at powers
    of two and the largest decode size, so any decode batch that fits a graph fits a
    shared-prefix one."""
    from types import SimpleNamespace

    import numpy as np

    from lmserve.attention.shared_prefix import MIN_REQS
    from lmserve.worker.input_batch import FlatInputs
    from lmserve.worker.model_runner import ModelRunner

    def flat(num_reqs, tokens_per_req=1, seq_len=1700):
        n = num_reqs * tokens_per_req
        tables = np.tile(np.arange(120, dtype=np.int32), (num_reqs, 1))
        return FlatInputs(
            req_rows=np.arange(num_reqs), input_ids=np.zeros(n, np.int64),
            positions=np.zeros(n, np.int64), slot_mapping=np.zeros(n, np.int64),
            query_start_loc=np.arange(0, n + 1, tokens_per_req, dtype=np.int32),
            seq_lens=np.full(num_reqs, seq_len, np.int32), block_tables=tables,
            logits_indices=np.zeros(num_reqs, np.int64),
            completes_known_tokens=np.ones(num_reqs, bool),
        )  # fmt: skip

    runner = SimpleNamespace(shared_prefix_attention=True, block_size=16)
    found = ModelRunner._shared_prefix_len
    assert found(runner, flat(MIN_REQS)) == 106 * 16  # 1,700 // 16 whole blocks
    assert found(runner, flat(MIN_REQS - 1)) == 0
    assert found(runner, flat(MIN_REQS, seq_len=600)) == 0  # too little to re-read
    assert found(runner, flat(MIN_REQS, tokens_per_req=2)) == 0  # not decode-only
    assert found(SimpleNamespace(shared_prefix_attention=False, block_size=16), flat(16)) == 0
    sizes = ModelRunner._shared_prefix_graph_sizes
    assert sizes(runner, 512) == [16, 32, 64, 128, 256, 512]
    assert sizes(runner, 200) == [16, 32, 64, 128, 200]
    assert sizes(runner, 8) == []


def test_staged_metadata_carries_the_shared_prefix_only_when_the_step_has_one():
    import numpy as np
    import torch

    from lmserve.worker.device_inputs import DeviceInputs
    from lmserve.worker.input_batch import FlatInputs

    inputs = DeviceInputs(64, 16, 40, torch.device("cpu"))
    flat = FlatInputs(
        req_rows=np.arange(8), input_ids=np.zeros(8, np.int64), positions=np.zeros(8, np.int64),
        slot_mapping=np.zeros(8, np.int64), query_start_loc=np.arange(9, dtype=np.int32),
        seq_lens=np.full(8, 300, np.int32), block_tables=np.zeros((8, 19), np.int32),
        logits_indices=np.arange(8), completes_known_tokens=np.ones(8, bool),
    )  # fmt: skip
    assert inputs.stage(flat, 8, 8)[2].shared_prefix is None
    flat.shared_prefix_len = 288
    metadata = inputs.stage(flat, 8, 8)[2]
    assert metadata.shared_prefix.tolist() == [288]
