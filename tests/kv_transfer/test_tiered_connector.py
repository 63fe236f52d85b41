"""The TieredConnector in the engine (float32, CPU): greedy output identical to HF with the
connector on, hits served by each tier, and every fault turned into recomputation."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.kv_transfer.tiered import rank_key
from tests.engine.test_hf_parity import hf_greedy, lmserve_greedy, make_prompts, scheduler_of

CHUNK = 32  # two 16-token blocks: small enough that the tiny prompts span many chunks


def kv_config(**extra) -> dict:
    extra.setdefault("chunk_size", CHUNK)
    return {"kv_connector": "TieredConnector", "kv_connector_extra_config": extra}


class HitCounter:
    """Sums what the workers report to the scheduler: tokens loaded per tier, failures."""

    def __init__(self, llm: LLM) -> None:
        self.hit_tokens: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.finished_loads: list[int] = []
        sched = scheduler_of(llm)
        original = sched.update_from_kv_connector

        def spy(output):
            if output is not None:
                self.finished_loads += list(output.finished_loading.values())
                if output.stats is not None:
                    self.hit_tokens.update(output.stats.hit_tokens)
                    self.failures.update(output.stats.failures)
            return original(output)

        sched.update_from_kv_connector = spy


def only_tier(tier: str, tmp_path, redis_url: str) -> dict:
    """Options with `tier` the only one on."""
    return {
        "cpu": {"cpu_size_gib": 0.1},
        "disk": {"cpu_size_gib": 0, "disk_path": str(tmp_path / "kv")},
        "redis": {"cpu_size_gib": 0, "remote_url": redis_url},
    }[tier]


def make_llm(model_dir: str, kv: dict | None, **kwargs) -> LLM:
    return LLM(model_dir, dtype="float32", device="cpu", kv_transfer_config=kv, **kwargs)


def evict_gpu_prefix_cache(llm: LLM) -> None:
    """Forget the GPU pool's cached prefixes, and let the store finish its writes."""
    sched = scheduler_of(llm)
    assert sched.kv_cache_manager.reset_prefix_cache()
    sched.kv_connector.store.flush()


def two_passes(llm: LLM, prompts, between=evict_gpu_prefix_cache):
    _, first = lmserve_greedy(llm, prompts)
    between(llm)
    outs, second = lmserve_greedy(llm, prompts)
    return first, outs, second


# ---- a hit from each tier matches HF --------------------------------------------------------
@pytest.mark.parametrize("tier", ["cpu", "disk", "redis"])
def test_hit_from_each_tier_matches_hf(tiny_model_dir, tmp_path, redis_server, tier):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    tiers = only_tier(tier, tmp_path, redis_server.url)
    llm = make_llm(model_dir, kv_config(**tiers))
    hits = HitCounter(llm)
    first, second_outs, second = two_passes(llm, prompts)
    expected = hf_greedy(model_dir, prompts)
    assert first == expected and second == expected
    # Every prompt loads its whole chunks before the last token: 300 tokens -> 9 chunks.
    loadable = sum((n - 1) // CHUNK * CHUNK for n in map(len, prompts))
    assert hits.hit_tokens == {tier: loadable}
    assert [o.num_cached_tokens for o in second_outs] == [
        (len(p) - 1) // CHUNK * CHUNK for p in prompts
    ]
    assert not hits.failures


@pytest.mark.parametrize("tier", ["cpu", "disk", "redis"])
def test_tiny_gpu_pool_evicts_prefixes_and_a_tier_brings_them_back(
    tiny_model_dir, tmp_path, redis_server, tier
):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    tiers = only_tier(tier, tmp_path, redis_server.url)
    # 40 blocks x 16 = 640 slots for ~1,100 prompt tokens: a second pass finds little on the
    # GPU, and preemption and chunked prefill both happen on the way.
    llm = make_llm(
        model_dir, kv_config(**tiers), num_gpu_blocks_override=40, max_model_len=384,
        max_num_batched_tokens=64,
    )  # fmt: skip
    hits = HitCounter(llm)
    first, _, second = two_passes(
        llm, prompts, between=lambda llm: scheduler_of(llm).kv_connector.store.flush()
    )
    expected = hf_greedy(model_dir, prompts)
    assert first == expected and second == expected
    assert hits.hit_tokens[tier] > 0 and set(hits.hit_tokens) == {tier}
    sched = scheduler_of(llm)
    assert sched.num_preemptions > 0
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_gpu_blocks  # nothing leaked, loads included


def test_chunked_prefill_after_a_partial_hit_matches_hf(tiny_model_dir):
    """Prompts that share only their first chunks with the stored ones: the hit is loaded,
    the rest is computed in small chunks."""
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    llm = make_llm(model_dir, kv_config(cpu_size_gib=0.1), max_num_batched_tokens=24,
                   long_prefill_token_threshold=20)  # fmt: skip
    hits = HitCounter(llm)
    lmserve_greedy(llm, prompts)
    evict_gpu_prefix_cache(llm)
    changed = [p[:70] + [7] + p[71:] if len(p) > 100 else p for p in prompts]
    _, got = lmserve_greedy(llm, changed)
    assert got == hf_greedy(model_dir, changed)
    assert hits.hit_tokens["cpu"] >= 3 * 64  # the three long prompts: 2 chunks before token 70


def test_ngram_spec_decode_with_connector_matches_plain_greedy(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    prompts = [[i % 7 + 4 for i in range(200)], [(i * 3) % 11 + 4 for i in range(150)]]
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    plain = make_llm(model_dir, None)
    _, expected = lmserve_greedy(plain, prompts)
    llm = make_llm(model_dir, kv_config(cpu_size_gib=0.1), speculative_config=spec)
    hits = HitCounter(llm)
    first, _, second = two_passes(llm, prompts)
    assert first == expected and second == expected
    assert hits.hit_tokens["cpu"] == (199 // CHUNK + 149 // CHUNK) * CHUNK


def test_tp2_engine_hits_disk_tier_and_matches_tp1(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()[:6]
    kv = kv_config(cpu_size_gib=0.05, disk_path=str(tmp_path / "kv"))
    expected = hf_greedy(model_dir, prompts)
    for _ in range(2):  # the second engine finds the first one's chunks on disk
        llm = make_llm(model_dir, kv, tensor_parallel_size=2, max_model_len=512)
        try:
            outs, got = lmserve_greedy(llm, prompts)
        finally:
            llm.shutdown()
        assert got == expected
    assert [o.num_cached_tokens for o in outs] == [(len(p) - 1) // CHUNK * CHUNK for p in prompts]
    files = os.listdir(tmp_path / "kv")
    stored_chunks = sum(len(p) // CHUNK for p in prompts)
    assert len([f for f in files if f.endswith(".kv")]) >= 2 * stored_chunks  # both ranks


def test_disk_tier_survives_an_engine_restart(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    kv = kv_config(cpu_size_gib=0.05, disk_path=str(tmp_path / "kv"))
    first = make_llm(model_dir, kv)
    _, expected = lmserve_greedy(first, prompts)
    first.shutdown()  # flushes the disk writes
    second = make_llm(model_dir, kv)
    hits = HitCounter(second)
    _, got = lmserve_greedy(second, prompts)
    assert got == expected == hf_greedy(model_dir, prompts)
    assert hits.hit_tokens["disk"] == sum((len(p) - 1) // CHUNK * CHUNK for p in prompts)


def test_keys_are_the_same_in_another_process(tiny_model_dir):
    """No PYTHONHASHSEED dependence: a fresh interpreter with another seed names chunks alike."""
    import subprocess
    import sys

    model_dir = tiny_model_dir("llama")
    code = (
        "import sys\n"
        "from lmserve.config import EngineConfig\n"
        "from lmserve.kv_transfer.tiered import chain_root, extend_chunk_hashes, rank_key\n"
        f"c = EngineConfig.from_kwargs({model_dir!r}, device='cpu', dtype='float32',\n"
        f"    kv_transfer_config={kv_config()!r})\n"
        "hashes = []\n"
        f"extend_chunk_hashes(hashes, list(range(100)), {CHUNK}, chain_root(c, 2, 2, 16), None)\n"
        "print(rank_key(hashes[-1], 1))\n"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }  # fmt: skip
    assert len(keys) == 1 and len(keys.pop()) == 64


def test_keys_differ_by_model_dtype_salt_and_rank(tiny_model_dir):
    from lmserve.config import EngineConfig
    from lmserve.kv_transfer.tiered import chain_root, extend_chunk_hashes

    def last_hash(model: str, dtype: str, salt: str | None = None) -> str:
        config = EngineConfig.from_kwargs(
            model, device="cpu", dtype=dtype, kv_transfer_config=kv_config()
        )
        hashes: list[str] = []
        extend_chunk_hashes(hashes, list(range(64)), CHUNK, chain_root(config, 2, 2, 16), salt)
        return hashes[-1]

    llama, qwen = tiny_model_dir("llama"), tiny_model_dir("qwen2")
    base = last_hash(llama, "float32")
    assert base == last_hash(llama, "float32")
    assert len({base, last_hash(qwen, "float32"), last_hash(llama, "bfloat16"),
                last_hash(llama, "float32", salt="tenant-a")}) == 4  # fmt: skip
    assert rank_key(base, 0) != rank_key(base, 1)


# ---- faults: recomputation, a counted failure, correct tokens -------------------------------
def _corrupt_disk_chunks(llm: LLM, mode: str) -> None:
    evict_gpu_prefix_cache(llm)
    disk = next(t for t in scheduler_of(llm).kv_connector.store.tiers if t.name == "disk")
    for name in sorted(os.listdir(disk.path))[::2]:
        path = os.path.join(disk.path, name)
        if mode == "missing":
            os.unlink(path)
        elif mode == "truncated":
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        else:
            with open(path, "r+b") as f:
                f.seek(-9, os.SEEK_END)
                f.write(b"corrupted")


@pytest.mark.parametrize("mode", ["missing", "truncated", "corrupt"])
def test_bad_disk_chunks_are_recomputed(tiny_model_dir, tmp_path, mode):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    llm = make_llm(model_dir, kv_config(cpu_size_gib=0, disk_path=str(tmp_path / "kv")))
    hits = HitCounter(llm)
    first, _, second = two_passes(llm, prompts, between=lambda llm: _corrupt_disk_chunks(llm, mode))
    expected = hf_greedy(model_dir, prompts)
    assert first == expected and second == expected
    loadable = sum((n - 1) // CHUNK * CHUNK for n in map(len, prompts))
    assert 0 < hits.hit_tokens["disk"] < loadable  # some chunks loaded, the bad ones not
    if mode != "missing":
        assert hits.failures[f"disk:{mode}"] > 0


def test_unreachable_redis_serves_correct_tokens_and_counts_failures(
    tiny_model_dir, dead_redis_url
):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    llm = make_llm(model_dir, kv_config(cpu_size_gib=0.05, remote_url=dead_redis_url))
    hits = HitCounter(llm)
    first, _, second = two_passes(llm, prompts)
    expected = hf_greedy(model_dir, prompts)
    assert first == expected and second == expected
    assert hits.hit_tokens["cpu"] > 0  # the CPU tier still works
    assert sum(n for k, n in hits.failures.items() if k.startswith("redis:")) > 0


def test_redis_restarted_between_passes_recomputes_then_recovers(tiny_model_dir, redis_server):
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    llm = make_llm(model_dir, kv_config(cpu_size_gib=0, remote_url=redis_server.url))
    hits = HitCounter(llm)

    def restart(llm):
        evict_gpu_prefix_cache(llm)
        redis_server.stop()
        redis_server.start()  # empty: every lookup misses, nothing breaks

    first, _, second = two_passes(llm, prompts, between=restart)
    expected = hf_greedy(model_dir, prompts)
    assert first == expected and second == expected
    evict_gpu_prefix_cache(llm)
    _, third = lmserve_greedy(llm, prompts)  # the second pass stored them again
    assert third == expected
    assert hits.hit_tokens["redis"] == sum((len(p) - 1) // CHUNK * CHUNK for p in prompts)


def test_chunk_missing_at_load_time_is_recomputed(tiny_model_dir, tmp_path, redis_server):
    """The lookup saw the chunks; by the time the worker fetched them, Redis had lost them."""
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    llm = make_llm(model_dir, kv_config(cpu_size_gib=0, remote_url=redis_server.url))
    hits = HitCounter(llm)
    lmserve_greedy(llm, prompts)
    evict_gpu_prefix_cache(llm)
    connector = scheduler_of(llm).kv_connector
    store = connector.store
    original_get = store.get
    client = redis_server.client()

    def get_after_flush(key):
        client.flushall()  # gone between the scheduler's lookup and the worker's fetch
        return original_get(key)

    store.get = get_after_flush
    _, got = lmserve_greedy(llm, prompts)
    assert got == hf_greedy(model_dir, prompts)
    assert hits.hit_tokens.get("redis", 0) == 0
    assert hits.finished_loads and set(hits.finished_loads[-5:]) == {0}


def test_aborting_a_request_mid_load_frees_its_blocks_once_the_load_reports(tiny_model_dir):
    import threading

    model_dir = tiny_model_dir("llama")
    prompt = list(range(4, 300))
    llm = make_llm(model_dir, kv_config(cpu_size_gib=0.1))
    lmserve_greedy(llm, [prompt])
    evict_gpu_prefix_cache(llm)
    core = llm.llm_engine.engine_core.engine_core
    sched = core.scheduler
    from lmserve.core.messages import EngineCoreRequest

    worker = core.executor.worker.model_runner.kv_connector._worker
    original_write, writing = worker._write_blocks, threading.Event()

    def slow_write(*args):
        writing.wait(10)  # the load stays in flight until the test lets it go
        return original_write(*args)

    worker._write_blocks = slow_write
    core.add_request(EngineCoreRequest("r1", prompt, SamplingParams(temperature=0, max_tokens=4)))
    core.step()  # admitted for loading; the worker starts the load
    assert "r1" in sched.loading
    core.abort_requests(["r1"])
    kv = sched.kv_cache_manager
    core.step()
    assert "r1" in sched.aborted_loading and kv.num_free_blocks < kv.num_gpu_blocks
    writing.set()
    while sched.has_unfinished_requests():
        core.step()
    assert kv.num_free_blocks == kv.num_gpu_blocks and not sched.aborted_loading


def test_store_keys_are_per_rank_hashes(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    llm = make_llm(model_dir, kv_config(cpu_size_gib=0.1))
    prompt = list(range(4, 4 + 2 * CHUNK + 1))
    lmserve_greedy(llm, [prompt])
    connector = scheduler_of(llm).kv_connector
    from lmserve.kv_transfer.tiered import extend_chunk_hashes

    hashes: list[str] = []
    extend_chunk_hashes(hashes, prompt, CHUNK, connector.root, None)
    cpu = connector.store.tiers[0]
    assert all(cpu.contains(rank_key(h, 0)) for h in hashes)


@pytest.mark.slow
def test_default_model_greedy_is_identical_with_the_connector_on_and_off(tmp_path, default_model):
    model = default_model
    passage = " ".join(
        "The river town wakes slowly and the baker lights the oven before dawn." for _ in range(12)
    )
    prompts = [f"{passage} Question {i}: what does the baker do?" for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=12)

    def run(kv: dict | None, passes: int) -> tuple[list[list[int]], HitCounter | None]:
        llm = LLM(model, device="cpu", dtype="float32", cpu_kvcache_space_gib=0.25,
                  max_model_len=1024, kv_transfer_config=kv)  # fmt: skip
        hits = HitCounter(llm) if kv else None
        for i in range(passes):
            if i:
                evict_gpu_prefix_cache(llm)
            outs = llm.generate(prompts, params, use_tqdm=False)
        llm.shutdown()
        return [o.outputs[0].token_ids for o in outs], hits

    expected, _ = run(None, 1)
    got, hits = run(kv_config(cpu_size_gib=0.1, disk_path=str(tmp_path / "kv")), 2)
    assert got == expected
    assert hits.hit_tokens["cpu"] > 3 * 128  # the shared passage and each prompt's own chunks


def test_full_disk_saves_nothing_and_serves_correct_tokens(tiny_model_dir, tmp_path, monkeypatch):
    import errno

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    llm = make_llm(model_dir, kv_config(cpu_size_gib=0, disk_path=str(tmp_path / "kv")))
    hits = HitCounter(llm)
    monkeypatch.setattr(os, "write", no_space)
    first, _, second = two_passes(llm, prompts)
    monkeypatch.undo()
    expected = hf_greedy(model_dir, prompts)
    assert first == expected and second == expected
    assert not hits.hit_tokens  # nothing was stored, so nothing is loaded
    assert hits.failures["disk:write_error"] > 0


def test_slow_redis_is_a_timed_out_miss_and_tokens_stay_correct(tiny_model_dir, redis_server):
    import contextlib
    import threading
    import time

    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    kv = kv_config(cpu_size_gib=0, remote_url=redis_server.url, remote_timeout_s=0.2)
    llm = make_llm(model_dir, kv)
    hits = HitCounter(llm)

    def stall_redis(llm):
        evict_gpu_prefix_cache(llm)

        def sleep_redis():
            with contextlib.suppress(Exception):  # the server may be stopped meanwhile
                redis_server.client().execute_command("DEBUG", "SLEEP", "1.5")

        threading.Thread(target=sleep_redis, daemon=True).start()
        time.sleep(0.05)  # Redis is asleep before the second pass asks it

    first, _, second = two_passes(llm, prompts, between=stall_redis)
    expected = hf_greedy(model_dir, prompts)
    assert first == expected and second == expected
    assert hits.failures["redis:timeout"] > 0


def _worker_side(kv_caches, block_size: int, blocks_per_chunk: int):
    from types import SimpleNamespace

    from lmserve.kv_transfer.tiered import _WorkerSide, kv_pool

    connector = SimpleNamespace(
        block_size=block_size, blocks_per_chunk=blocks_per_chunk,
        chunk_size=block_size * blocks_per_chunk,
    )  # fmt: skip
    side = _WorkerSide(connector)
    side.kv_caches, side.kv_pool = kv_caches, kv_pool(kv_caches)
    return side


def test_one_pool_and_per_layer_caches_load_and_save_the_same_blocks():
    """The model runner's single [layers, 2, blocks, ...] pool takes one indexed copy per
    chunk; separate per-layer tensors take two per layer: both put a chunk in the same places
    and gather the same bytes back."""
    from lmserve.kv_transfer.base import ChunkTransfer

    gen = torch.Generator().manual_seed(0)
    layers, num_blocks, shape = 3, 10, (4, 2, 8)  # block_size 4, 2 kv heads, head_dim 8
    pool = torch.zeros((layers, 2, num_blocks, *shape))
    pooled = [(pool[i, 0], pool[i, 1]) for i in range(layers)]
    separate = [(torch.zeros(num_blocks, *shape), torch.zeros(num_blocks, *shape))
                for _ in range(layers)]  # fmt: skip
    chunks = [torch.randn(layers, 2, 2, *shape, generator=gen) for _ in range(2)]
    # the first block of chunk 0 is already in the GPU cache (skip 4 tokens): 3 blocks arrive
    transfer = ChunkTransfer("r", ["h0", "h1"], 0, [9, 7, 3, 5], skip_tokens=4)
    sides = [_worker_side(caches, 4, 2) for caches in (pooled, separate)]
    assert sides[0].kv_pool is pool and sides[1].kv_pool is None
    for side in sides:
        side._copy_chunks_in(transfer, [c.flatten().view(torch.uint8) for c in chunks])
    for (pk, pv), (sk, sv) in zip(pooled, separate):
        assert torch.equal(pk, sk) and torch.equal(pv, sv)
    assert torch.equal(pool[:, :, 7], chunks[0][:, :, 1]) and not pool[:, :, 9].any()
    assert torch.equal(pool[:, :, 5], chunks[1][:, :, 1])
    index = torch.tensor([3, 7, 5])
    assert torch.equal(sides[0]._gather(index), sides[1]._gather(index))


def test_layer_hooks_run_in_layer_order_between_start_load_and_wait_for_save(tiny_model_dir):
    """Each forward: start_load_kv, then per layer wait_for_layer_load(i) before its attention
    and save_kv_layer(i) after it, in layer order, then wait_for_save."""
    llm = make_llm(tiny_model_dir("llama"), kv_config())
    runner = llm.llm_engine.engine_core.engine_core.executor.worker.model_runner
    connector, calls = runner.kv_connector, []
    for name in ("start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save"):
        original = getattr(connector, name)

        def record(*args, _name=name, _original=original):
            calls.append((_name, *args) if "_layer" in _name else (_name,))
            return _original(*args)

        setattr(connector, name, record)
    lmserve_greedy(llm, make_prompts(2))
    num_layers = len(runner.kv_caches)
    one_step = [("start_load_kv",)]
    for i in range(num_layers):
        one_step += [("wait_for_layer_load", i), ("save_kv_layer", i)]
    one_step.append(("wait_for_save",))
    assert len(calls) % len(one_step) == 0 and len(calls) >= 2 * len(one_step)
    assert calls == one_step * (len(calls) // len(one_step))
    llm.shutdown()


def test_cpu_tier_publishes_kv_events_with_its_medium_as_chunks_enter_and_leave(tiny_model_dir):
    """With KV events on, the blocks of each chunk the CPU tier stores are published as
    BlockStored(medium="CPU") and, when the tier evicts the chunk, BlockRemoved(medium="CPU"):
    a plain pyzmq + msgpack subscriber ends holding exactly the tier's chunks' blocks."""
    import socket
    import time

    import msgpack
    import zmq

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    events = {"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{port}",
              "replay_endpoint": None, "topic": "kv"}  # fmt: skip
    chunk_bytes = 2 * 2 * CHUNK * 2 * 16 * 4  # layers, k/v, tokens, kv heads, head_dim, fp32
    tier = kv_config(cpu_size_gib=8 * chunk_bytes / (1 << 30))  # 8 chunks
    llm = make_llm(tiny_model_dir("llama"), tier, kv_events_config=events)
    slab = worker_connector(llm)._worker.slab
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{port}")
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    time.sleep(0.3)
    for i in range(6):  # 3 chunks each, one prompt at a time: 18 chunks through 8 slots
        lmserve_greedy(llm, [list(range(10 + i, 10 + i + 100))])
    gpu, cpu, removed_cpu = set(), {}, 0
    while sub.poll(1000):
        _, _, payload = sub.recv_multipart()
        for event in msgpack.unpackb(payload)[1]:
            if event[0] == "BlockStored":
                hashes, parent, tokens, block_size, _, medium = event[1:]
                if medium == "GPU":
                    gpu.update(hashes)
                else:
                    assert medium == "CPU" and len(hashes) == CHUNK // 16 == len(tokens) // 16
                    cpu[hashes[0]] = hashes
            elif event[0] == "BlockRemoved" and event[2] == "CPU":
                removed_cpu += 1
                assert cpu.pop(event[1][0]) == event[1]
    assert len(slab) == 8 and removed_cpu == 10
    assert len(cpu) == len(slab)  # one published chunk per chunk the tier holds now
    assert all(set(hashes) <= gpu for hashes in cpu.values())  # the engine's own hashes
    context.destroy(linger=0)
    llm.shutdown()


def worker_connector(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.executor.worker.model_runner.kv_connector
