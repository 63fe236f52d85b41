"""KV cache events in vLLM's wire format: what the prefix cache gains and loses, read from a
real engine by a plain pyzmq + msgpack subscriber (no lmserve code on the reading side)."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from lmserve import LLM, SamplingParams
from lmserve.config import ConfigError, KVEventsConfig
from lmserve.core.kv_cache_manager import KVCacheManager
from lmserve.core.kv_events import stored_runs
from lmserve.request import Request
from tests.ports import free_port


# ---- the cache manager's events ---------------------------------------------------------------
def make_request(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=1))


def test_manager_reports_blocks_stored_removed_and_cleared():
    kv = KVCacheManager(
        num_gpu_blocks=4, block_size=4, max_model_len=64, enable_kv_cache_events=True
    )
    a = make_request("a", list(range(10, 19)))  # 2 full blocks + 1 token
    kv.allocate_slots(a, 9)
    (stored,) = kv.take_events()  # one event for the run of blocks cached together
    assert type(stored).__name__ == "BlockStored" and stored.parent_block_hash is None
    assert stored.block_hashes == a.block_hashes[:2] and stored.block_size == 4
    assert stored.token_ids == list(range(10, 18))
    assert kv.take_events() == []
    kv.free(a)
    b = make_request("b", list(range(50, 66)))  # needs all 4 blocks: evicts a's
    kv.allocate_slots(b, 16)
    events = kv.take_events()
    removed = [e for e in events if type(e).__name__ == "BlockRemoved"]
    assert len(removed) == 1  # evicted by one allocation: one event
    assert sorted(removed[0].block_hashes) == sorted(a.block_hashes[:2])
    kv.free(b)
    assert kv.reset_prefix_cache()
    assert [type(e).__name__ for e in kv.take_events()] == ["AllBlocksCleared"]


def test_a_hash_already_cached_elsewhere_is_not_reported_twice():
    kv = KVCacheManager(
        num_gpu_blocks=8, block_size=4, max_model_len=64, enable_kv_cache_events=True
    )
    kv.allocate_slots(make_request("a", list(range(8))), 8)
    kv.allocate_slots(make_request("b", list(range(8))), 8)  # same tokens, fresh blocks
    (stored,) = kv.take_events()
    assert len(stored.block_hashes) == 2  # a's two blocks only


def test_a_run_after_cached_blocks_names_its_parent_and_gaps_split_runs():
    kv = KVCacheManager(
        num_gpu_blocks=8, block_size=4, max_model_len=64, enable_kv_cache_events=True
    )
    kv.allocate_slots(make_request("a", list(range(8))), 8)
    b = make_request("b", list(range(16)))  # a's two blocks (cached already) + two new ones
    kv.take_events()
    kv.allocate_slots(b, 16)
    (stored,) = kv.take_events()
    assert stored.block_hashes == b.block_hashes[2:4]
    assert stored.parent_block_hash == b.block_hashes[1]
    assert stored.token_ids == list(range(8, 16))
    hashes = [bytes([i]) for i in range(5)]
    runs = stored_runs(hashes, list(range(20)), 4, [0, 1, 3])
    assert [(r.block_hashes, r.parent_block_hash, r.token_ids) for r in runs] == [
        (hashes[0:2], None, list(range(8))),
        (hashes[3:4], hashes[2], list(range(12, 16))),
    ]


def test_events_off_records_nothing():
    kv = KVCacheManager(num_gpu_blocks=4, block_size=4, max_model_len=64)
    kv.allocate_slots(make_request("a", list(range(8))), 8)
    assert kv.events is None and kv.take_events() == []


@pytest.mark.parametrize(
    "value, message",
    [
        ({"publisher": "kafka"}, "publisher='kafka'"),
        ({"endpoint": "5557"}, "ZMQ address"),
        ({"buffer_steps": 0}, "buffer_steps=0"),
        ({"enable_kv_cache_events": "yes"}, "true or false"),
        ({"enable": True}, "unknown key(s) ['enable']"),
        ({"event_format": "json"}, "event_format='json'"),
    ],
)
def test_bad_config_names_the_field(value, message):
    with pytest.raises(ConfigError) as exc:
        KVEventsConfig.from_user(value)
    assert message in str(exc.value)


# ---- a real engine -----------------------------------------------------------------------------
STORED_FIELDS = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
]


@pytest.mark.parametrize("event_format", ["array", "map"])
def test_engine_events_decode_with_plain_msgpack_and_match_the_cache_then_replay(
    tiny_model_dir, event_format
):
    """Both wire layouts: tagged arrays (the default), and vLLM 0.26's maps."""
    pub, replay = free_port(), free_port()
    config = {
        "enable_kv_cache_events": True,
        "endpoint": f"tcp://127.0.0.1:{pub}",
        "replay_endpoint": f"tcp://127.0.0.1:{replay}",
        "topic": "kv",
        "event_format": event_format,
    }
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", kv_events_config=config)
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{pub}")
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    time.sleep(0.3)  # PUB/SUB: the subscription must reach the publisher first
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (40, 70, 33)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)

    held: set[bytes] = set()
    seqs = []
    while sub.poll(1000):
        topic, seq, payload = sub.recv_multipart()
        assert topic == b"kv"
        seqs.append(int.from_bytes(seq, "big"))
        ts, events, _rank = msgpack.unpackb(payload)
        assert isinstance(ts, float)
        for event in events:
            if event_format == "map":  # vLLM 0.26: {"type": ..., field: value, ...}
                assert isinstance(event, dict)
                kind, fields = event["type"], event
            else:
                assert isinstance(event, list)
                names = {"BlockStored": STORED_FIELDS, "BlockRemoved": ["block_hashes", "medium"]}
                kind, fields = event[0], dict(zip(names.get(event[0], []), event[1:]))
            if kind == "BlockStored":
                assert fields["block_size"] == 16 and fields["medium"] == "GPU"
                # a run: all its blocks' tokens
                assert len(fields["token_ids"]) == 16 * len(fields["block_hashes"])
                held.update(fields["block_hashes"])
            elif kind == "BlockRemoved":
                held.difference_update(fields["block_hashes"])
    assert seqs == list(range(len(seqs))) and seqs
    kv = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    assert held == set(kv.cached_blocks)

    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{replay}")
    dealer.send_multipart((b"", (1).to_bytes(8, "big")))  # resend from sequence number 1
    replayed = []
    while dealer.poll(2000):
        _, topic, seq, payload = dealer.recv_multipart()  # vLLM 0.26's replay frames
        number = int.from_bytes(seq, "big", signed=True)
        if number == -1:
            assert topic == b"" and payload == b""
            break
        assert topic == b"kv"
        replayed.append(number)
    assert replayed == seqs[1:]
    context.destroy(linger=0)
    llm.shutdown()
