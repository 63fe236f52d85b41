"""benchmarks/serve_vs_vllm.py reads each server's KV pool from its start-up log."""

from __future__ import annotations

from benchmarks.serve_vs_vllm import kv_cache_tokens


def test_the_kv_pool_is_read_from_an_lmserve_or_a_vllm_log_and_none_when_absent(tmp_path):
    lmserve = tmp_path / "lmserve.log"
    lmserve.write_text(
        "2026-12-07 13:25:59,878 INFO [EngineCore] memory profile in 1.99 s: ...\n"
        "2026-12-07 13:25:59,880 INFO [EngineCore] KV cache: 28031 blocks x 16 tokens = "
        "448496 tokens (54.75 GiB) on cuda:0, allocated in 0.00 s\n"
    )
    vllm = tmp_path / "vllm.log"
    vllm.write_text(
        "(EngineCore pid=1720) INFO 12-07 13:30:46 [kv_cache_utils.py:2177] "
        "GPU KV cache size: 474,672 tokens\n"
    )
    empty = tmp_path / "empty.log"
    empty.write_text("server exited\n")
    assert kv_cache_tokens(str(lmserve)) == 448496
    assert kv_cache_tokens(str(vllm)) == 474672
    assert kv_cache_tokens(str(empty)) is None


def test_server_figures_per_rate_are_histogram_means_and_counter_growth():
    from benchmarks.serve_vs_vllm import _server_means_ms

    before = {"request_queue_time_seconds": (2.0, 4.0), "num_preemptions": (3.0, 0.0)}
    after = {"request_queue_time_seconds": (5.0, 10.0), "num_preemptions": (12.0, 0.0)}
    assert _server_means_ms(before, after) == {
        "server_mean_request_queue_time_ms": 500.0,  # (5 - 2) s over 6 requests
        "server_num_preemptions": 9.0,
    }
