"""Static device inputs and CUDA-graph bookkeeping that need no GPU: padding rows, graph sizes,
the profiling step's inputs, and the profiling forward itself on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmserve.config import ConfigError, EngineConfig
from lmserve.worker.cuda_graphs import _bucket, decode_graph_sizes, piecewise_graph_sizes
from lmserve.worker.device_inputs import DeviceInputs
from lmserve.worker.input_batch import FlatInputs
from lmserve.worker.model_runner import ModelRunner, _profile_inputs


def _flat(q_lens: list[int], seq_lens: list[int], block_size: int = 4) -> FlatInputs:
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    n = int(starts[-1])
    width = max(-(-s // block_size) for s in seq_lens)
    return FlatInputs(
        req_rows=np.arange(len(q_lens)),
        input_ids=np.arange(10, 10 + n, dtype=np.int64),
        positions=np.arange(n, dtype=np.int64),
        slot_mapping=np.arange(100, 100 + n, dtype=np.int64),
        query_start_loc=starts,
        seq_lens=np.array(seq_lens, dtype=np.int32),
        block_tables=np.arange(len(q_lens) * width, dtype=np.int32).reshape(len(q_lens), width),
        logits_indices=(starts[1:] - 1).astype(np.int64),
        completes_known_tokens=np.ones(len(q_lens), dtype=bool),
    )


def test_graph_sizes_are_bucketed_like_vllm():
    assert decode_graph_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert decode_graph_sizes(3) == [1, 2]
    large = decode_graph_sizes(512)  # steps of 16 above 256, as vLLM captures
    assert large[-19:] == [240, 248, 256, *range(272, 513, 16)] and len(large) == 51
    assert decode_graph_sizes(300)[-3:] == [256, 272, 288]
    assert piecewise_graph_sizes(512) == [16, 32, 64, 128, 256, 512]
    assert piecewise_graph_sizes(15) == []
    sizes = decode_graph_sizes(256)
    assert [_bucket(sizes, n) for n in (1, 3, 5, 9, 256, 257)] == [1, 4, 8, 16, 256, None]


def test_graphs_larger_than_the_static_buffers_are_refused():
    from lmserve.worker.cuda_graphs import CudaGraphRunner

    inputs = DeviceInputs(max_num_tokens=32, max_num_reqs=64, max_blocks_per_req=4,
                          device=torch.device("cpu"))  # fmt: skip
    with pytest.raises(ValueError, match="decode graph size 40 > 32"):
        CudaGraphRunner(None, inputs, [], None, decode_sizes=[8, 40], piecewise_sizes=[])
    with pytest.raises(ValueError, match="piecewise graph size 64 > 32"):
        CudaGraphRunner(None, inputs, [], None, decode_sizes=[8], piecewise_sizes=[16, 64])


def test_stage_without_padding_copies_the_step_exactly():
    inputs = DeviceInputs(64, 8, 16, torch.device("cpu"))
    flat = _flat([3, 1, 2], [7, 5, 2])
    ids, pos, meta = inputs.stage(flat, 6, 3)
    assert ids.tolist() == flat.input_ids.tolist() and pos.tolist() == flat.positions.tolist()
    assert meta.num_reqs == 3 and meta.num_tokens == 6 and meta.max_query_len == 3
    assert meta.query_start_loc.tolist() == [0, 3, 4, 6]
    assert meta.seq_lens.tolist() == [7, 5, 2] and meta.max_seq_len == 7
    assert meta.block_tables.tolist() == flat.block_tables.tolist()


def test_padding_rows_write_nowhere_and_read_no_keys():
    inputs = DeviceInputs(64, 8, 16, torch.device("cpu"))
    inputs.stage(_flat([1, 1, 1, 1, 1], [9, 9, 9, 9, 9]), 5, 5)  # leaves stale values behind
    ids, pos, meta = inputs.stage(_flat([1, 1], [6, 3]), 8, 8)  # 2 real decodes padded to 8
    assert meta.slot_mapping.tolist() == [100, 101] + [-1] * 6
    assert meta.seq_lens.tolist() == [6, 3] + [0] * 6
    assert meta.query_start_loc.tolist() == list(range(9))  # one token per padding request
    assert ids[2:].tolist() == [0] * 6 and pos[2:].tolist() == [0] * 6


def test_padding_tokens_beyond_padding_requests_go_to_the_last_request():
    inputs = DeviceInputs(64, 8, 16, torch.device("cpu"))
    _, _, meta = inputs.stage(_flat([3], [3]), 8, 2)
    assert meta.query_start_loc.tolist() == [0, 3, 8]
    assert meta.slot_mapping.tolist()[3:] == [-1] * 5 and meta.seq_lens.tolist() == [3, 0]


def test_verify_padding_leaves_every_real_request_its_own_tokens():
    """A verify graph of 4 requests x 5 token slots: requests pad empty, spare slots belong to
    no request, even when the real requests fill every request slot."""
    inputs = DeviceInputs(64, 8, 16, torch.device("cpu"))
    _, _, meta = inputs.stage(_flat([5, 1, 3], [9, 6, 3]), 20, 4, empty_padding=True)
    assert meta.query_start_loc.tolist() == [0, 5, 6, 9, 9]
    assert meta.seq_lens.tolist() == [9, 6, 3, 0] and meta.max_query_len == 5
    assert meta.slot_mapping.tolist()[9:] == [-1] * 11
    _, _, meta = inputs.stage(_flat([5, 2, 5, 1], [9, 6, 5, 4]), 20, 4, empty_padding=True)
    assert meta.query_start_loc.tolist() == [0, 5, 7, 12, 13]  # the last keeps its one token
    meta = inputs.padded_metadata(20, 4, query_len=5)  # capture: every request empty
    assert meta.query_start_loc.tolist() == [0] * 5 and meta.max_query_len == 5


def test_verify_graphs_larger_than_the_static_buffers_are_refused():
    from lmserve.worker.cuda_graphs import CudaGraphRunner

    inputs = DeviceInputs(max_num_tokens=40, max_num_reqs=64, max_blocks_per_req=4,
                          device=torch.device("cpu"))  # fmt: skip
    with pytest.raises(ValueError, match="verify graph size 16 > 8"):  # 16 x 5 tokens > 40
        CudaGraphRunner(None, inputs, [], None, [8], [], verify_sizes=[8, 16], verify_query_len=5)
    with pytest.raises(ValueError, match="2\\+ tokens per request"):
        CudaGraphRunner(None, inputs, [], None, [8], [], verify_sizes=[8], verify_query_len=1)
    graphs = CudaGraphRunner(None, inputs, [], None, [8], [], verify_sizes=[8], verify_query_len=5)
    assert graphs.fits_verify_graph(_flat([5, 1, 3], [9, 6, 3]))
    assert not graphs.fits_verify_graph(_flat([6, 1], [9, 6]))


def test_verify_padding_does_not_change_the_real_rows_of_a_forward(tiny_model_dir):
    """What a verify graph computes: the real requests' hidden states with the batch padded to
    the graph's requests and token slots (empty requests, spare tokens in no request) equal an
    unpadded forward's, bit for bit on CPU."""
    from lmserve.attention.backend import ForwardContext

    config = EngineConfig.from_kwargs(
        tiny_model_dir("llama"), dtype="float32", device="cpu", max_num_seqs=8
    )
    runner = ModelRunner(config, torch.device("cpu"))
    runner.load_model()
    runner.initialize_kv_cache(16)
    block = runner.block_size
    q_lens, contexts = [5, 2, 5], [0, 0, 0]  # prompts of 5, 2 and 5 tokens, one block each
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    req_of_token = np.repeat(np.arange(3), q_lens)
    positions = np.concatenate([np.arange(q) for q in q_lens]).astype(np.int64)
    flat = FlatInputs(
        req_rows=np.arange(3),
        input_ids=np.random.default_rng(0).integers(5, 100, int(starts[-1])).astype(np.int64),
        positions=positions,
        slot_mapping=(req_of_token * block + positions).astype(np.int64),
        query_start_loc=starts,
        seq_lens=np.array([c + q for c, q in zip(contexts, q_lens)], dtype=np.int32),
        block_tables=np.arange(3, dtype=np.int32)[:, None],
        logits_indices=(starts[1:] - 1).astype(np.int64),
        completes_known_tokens=np.ones(3, dtype=bool),
    )

    def forward(num_tokens, num_reqs, empty_padding):
        ids, pos, meta = runner.inputs.stage(flat, num_tokens, num_reqs, empty_padding)
        ctx = ForwardContext(meta, runner.kv_caches, runner.attn_backend)
        with torch.inference_mode():
            return runner.model(ids, pos, ctx).clone()

    plain = forward(12, 3, False)  # [12, hidden]
    for num_reqs in (3, 4):  # every request slot filled, then one empty padding request
        padded = forward(num_reqs * 5, num_reqs, True)
        assert padded.shape[0] == num_reqs * 5
        assert torch.equal(padded[:12], plain)


def test_profile_inputs_fill_the_budget_with_distinct_slots():
    flat = _profile_inputs(num_tokens=100, num_reqs=7, block_size=16)
    assert len(flat.input_ids) == 100 and len(flat.req_rows) == 7
    assert np.diff(flat.query_start_loc).tolist() == [15, 15] + [14] * 5
    assert len(set(flat.slot_mapping.tolist())) == 100  # no two tokens share a slot
    # Every slot lies in a block listed in its request's block table.
    req_of_token = np.repeat(np.arange(7), np.diff(flat.query_start_loc))
    blocks = flat.slot_mapping // 16
    for token, req in enumerate(req_of_token):
        assert blocks[token] in flat.block_tables[req]
    assert (flat.seq_lens == np.diff(flat.query_start_loc)).all()


def test_profile_run_on_cpu_runs_the_largest_step_and_drops_its_cache(tiny_model_dir):
    config = EngineConfig.from_kwargs(
        tiny_model_dir("llama"), dtype="float32", device="cpu", max_num_batched_tokens=96,
        max_num_seqs=8,
    )  # fmt: skip
    runner = ModelRunner(config, torch.device("cpu"))
    runner.load_model()
    cache_bytes = runner.profile_run()
    # 8 requests of 12 tokens, one block each.
    assert cache_bytes == 8 * runner.kv_cache_bytes_per_block()
    assert runner.kv_caches == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cuda_graph_mode": "sometimes"}, "cuda_graph_mode"),
        ({"max_cuda_graph_size": 0}, "max_cuda_graph_size"),
    ],
)
def test_bad_cuda_graph_settings_are_refused(tiny_model_dir, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_kwargs(tiny_model_dir("llama"), device="cpu", **kwargs)
