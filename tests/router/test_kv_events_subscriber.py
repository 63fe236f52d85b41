"""The router's KV event subscriber against the engine's real publisher (ZMQ PUB + replay
sockets): catching up on start, replaying a gap, counting what the buffer lost, restarts."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq.asyncio

from lmserve.config import KVEventsConfig
from lmserve.core.kv_events import AllBlocksCleared, KVEventBatch, ZmqEventPublisher
from lmserve.router.kv_events import EventEndpoints, EventSubscriber
from lmserve.router.kv_index import KVIndex
from lmserve.router.metrics import RouterMetrics
from tests.ports import free_port
from tests.router.test_kv_aware import BS, payload, stored

URL = "http://engine"


def publisher(
    buffer_steps: int = 100, event_format: str = "array"
) -> tuple[ZmqEventPublisher, EventEndpoints]:
    pub, replay = free_port(), free_port()
    config = KVEventsConfig(
        enable_kv_cache_events=True,
        endpoint=f"tcp://127.0.0.1:{pub}",
        replay_endpoint=f"tcp://127.0.0.1:{replay}",
        buffer_steps=buffer_steps,
        event_format=event_format,
    )
    return ZmqEventPublisher(config), EventEndpoints(config.endpoint, config.replay_endpoint)


def prompt(i: int) -> list[int]:
    return [1000 + i] * (BS + 1)  # one full block per batch


def publish(pub: ZmqEventPublisher, first: int, count: int) -> None:
    for i in range(first, first + count):
        pub.publish(KVEventBatch(ts=time.time(), events=[stored(prompt(i))]))
    deadline = time.monotonic() + 5
    while (
        not pub._buffer or pub._buffer[-1][0] < first + count - 1
    ) and time.monotonic() < deadline:
        time.sleep(0.005)


def held_prompts(index: KVIndex) -> set[int]:
    from lmserve.prefix_hash import block_hashes

    return {i for i in range(64) if index.match({URL: block_hashes(prompt(i), BS)})[URL] == 1}


def run(coro):
    return asyncio.run(coro)


def make_subscriber(endpoints: EventEndpoints, context) -> tuple[EventSubscriber, RouterMetrics]:
    metrics = RouterMetrics.create()
    return EventSubscriber(URL, endpoints, KVIndex(), metrics, context), metrics


def counter(metrics: RouterMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"backend": URL}) or 0.0


@pytest.mark.parametrize("event_format", ["array", "map"])
def test_a_router_started_after_the_engine_catches_up_from_the_replay_socket(event_format):
    """Replayed and live batches, in either wire layout an engine publishes."""
    pub, endpoints = publisher(event_format=event_format)
    try:
        publish(pub, 0, 5)  # before anyone subscribed: a PUB socket drops these

        async def main():
            context = zmq.asyncio.Context()
            subscriber, metrics = make_subscriber(endpoints, context)
            task = asyncio.create_task(subscriber.run())
            await asyncio.sleep(0.5)
            publish(pub, 5, 2)  # and the live ones after
            for _ in range(100):
                if subscriber.last_seq == 6:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
            context.destroy(linger=0)
            return subscriber, metrics

        subscriber, metrics = run(main())
        assert subscriber.live and subscriber.last_seq == 6
        assert held_prompts(subscriber.index) == set(range(7))
        # the lag histogram counts the two live batches, not the five replayed (old by design)
        lag = metrics.registry.get_sample_value
        assert lag("lmserve_router:kv_event_lag_seconds_count") == 2
        assert lag("lmserve_router:kv_event_lag_seconds_bucket", {"le": "5.0"}) == 2
    finally:
        pub.shutdown()


def test_a_gap_is_replayed_and_what_the_buffer_lost_is_counted_as_dropped():
    pub, endpoints = publisher(buffer_steps=4)
    try:
        publish(pub, 0, 10)  # buffer keeps seq 6..9

        async def main():
            context = zmq.asyncio.Context()
            subscriber, metrics = make_subscriber(endpoints, context)
            subscriber.last_seq = 2  # had 0..2; 3..8 were missed
            await subscriber.on_batch(9, pub._buffer[-1][1])
            context.destroy(linger=0)
            return subscriber, metrics

        subscriber, metrics = run(main())
        assert subscriber.last_seq == 9
        assert held_prompts(subscriber.index) == {6, 7, 8, 9}
        assert counter(metrics, "lmserve_router:kv_event_batches_replayed_total") == 4
        assert counter(metrics, "lmserve_router:kv_event_batches_dropped_total") == 3  # 3, 4, 5
    finally:
        pub.shutdown()


def test_a_sequence_that_starts_over_clears_the_engines_entries():
    async def main():
        context = zmq.asyncio.Context()
        subscriber, metrics = make_subscriber(EventEndpoints("tcp://127.0.0.1:1"), context)
        await subscriber.on_batch(0, payload(stored(prompt(1))))
        await subscriber.on_batch(1, payload(stored(prompt(2))))
        assert held_prompts(subscriber.index) == {1, 2}
        await subscriber.on_batch(0, payload(stored(prompt(3))))  # the engine restarted
        context.destroy(linger=0)
        return subscriber, metrics

    subscriber, metrics = run(main())
    assert held_prompts(subscriber.index) == {3}
    assert counter(metrics, "lmserve_router:kv_event_restarts_total") == 1


def test_all_blocks_cleared_empties_the_engines_entries():
    async def main():
        context = zmq.asyncio.Context()
        subscriber, _ = make_subscriber(EventEndpoints("tcp://127.0.0.1:1"), context)
        await subscriber.on_batch(0, payload(stored(prompt(1))))
        await subscriber.on_batch(1, payload(AllBlocksCleared()))
        context.destroy(linger=0)
        return subscriber

    assert held_prompts(run(main()).index) == set()
