"""The server's prompt encoder: off the event loop, batched, and the ids tokenizer.encode gives."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lmserve.entrypoints.openai.batched_encoder import BatchedEncoder
from tests.tiny_models import TRAINING_TEXT, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def _texts() -> list[str]:
    lines = [line for line in TRAINING_TEXT.splitlines() if line.strip()]
    return [*lines[:20], "", "  spaces  and\ttabs\n", "<s> a special token inside", "ünïcödé ✓"]


def test_concurrent_encodes_equal_tokenizer_encode_and_share_backend_calls(tokenizer):
    encoder = BatchedEncoder(tokenizer)
    calls: list[int] = []
    batch = encoder._encode_batch

    def counting(texts, flag):
        calls.append(len(texts))
        return batch(texts, flag)

    encoder._encode_batch = counting
    texts = _texts()

    async def main():
        plain = asyncio.gather(*(encoder.encode(t) for t in texts))
        raw = asyncio.gather(*(encoder.encode(t, add_special_tokens=False) for t in texts))
        return await plain, await raw

    with_special, without = asyncio.run(main())
    assert with_special == [tokenizer.encode(t) for t in texts]
    assert without == [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert with_special[0][0] == tokenizer.bos_token_id != without[0][0]
    # everything waited together: one backend call per add_special_tokens value
    assert sum(calls) == 2 * len(texts) and len(calls) == 2
    encoder.shutdown()


def test_encoding_runs_on_a_worker_thread_not_the_event_loop(tokenizer):
    encoder = BatchedEncoder(tokenizer)
    threads: list[str] = []
    batch = encoder._encode_batch

    def recording(texts, flag):
        threads.append(threading.current_thread().name)
        return batch(texts, flag)

    encoder._encode_batch = recording

    async def main():
        return await encoder.encode("hello world"), threading.current_thread().name

    ids, loop_thread = asyncio.run(main())
    assert ids == tokenizer.encode("hello world")
    # a truthy flag that is not a bool still lands in its group
    assert asyncio.run(encoder.encode("hello", add_special_tokens=1)) == tokenizer.encode("hello")
    assert threads and all(t.startswith("lmserve-tokenize") for t in threads)
    assert loop_thread not in threads
    encoder.shutdown()


def test_a_failing_text_fails_only_its_own_flag_group_and_the_encoder_recovers(tokenizer):
    encoder = BatchedEncoder(tokenizer)
    batch = encoder._encode_batch

    def failing_without_special(texts, flag):
        if not flag:
            raise ValueError("boom")
        return batch(texts, flag)

    encoder._encode_batch = failing_without_special

    async def main():
        good = encoder.encode("fine")
        bad = encoder.encode("not fine", add_special_tokens=False)
        results = await asyncio.gather(good, bad, return_exceptions=True)
        encoder._encode_batch = batch
        return results, await encoder.encode("later", add_special_tokens=False)

    (good, bad), later = asyncio.run(main())
    assert good == tokenizer.encode("fine")
    assert isinstance(bad, ValueError) and "boom" in str(bad)
    assert later == tokenizer.encode("later", add_special_tokens=False)
    encoder.shutdown()


def test_a_backend_that_disagrees_with_encode_falls_back_to_encode(tokenizer, monkeypatch):
    backend = tokenizer.backend_tokenizer

    class Skewed:  # the backend's batch call, off by one id
        truncation = padding = None

        def encode_batch_fast(self, texts, add_special_tokens):
            out = backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
            return [type("E", (), {"ids": [i + 1 for i in e.ids]})() for e in out]

    class Wrapped:
        backend_tokenizer = Skewed()
        bos_token_id = tokenizer.bos_token_id

        def encode(self, text, add_special_tokens=True):
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    encoder = BatchedEncoder(Wrapped())
    assert asyncio.run(encoder.encode("hello")) == tokenizer.encode("hello")
    encoder.shutdown()
