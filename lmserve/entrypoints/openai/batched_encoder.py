"""Prompt tokenization off the event loop, batched: what arrives together is encoded together.

    encoder = BatchedEncoder(tokenizer)
    ids = await encoder.encode(text, add_special_tokens=True)

A burst of requests used to be tokenized one after another on the server's event loop (~5 ms
for a 1,000-token prompt), so the last of 250 requests sent at once waited over a second
before the engine saw it, and nothing else (streaming, new connections) ran meanwhile. Here
every text waiting when the worker thread is free goes into one `encode_batch_fast` call of
the Rust tokenizer, which releases the GIL and spreads the batch over the machine's cores.

The batch path calls the tokenizer's Rust backend directly; a probe checks at construction
that it gives `tokenizer.encode`'s ids (with and without special tokens), else every text goes
through `tokenizer.encode` on the worker thread instead (still off the event loop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

MAX_BATCH = 256  # texts per backend call: a huge burst still yields between batches
_PROBE = "Hello world! <probe> 123\n\tdone."

BatchFn = Callable[[list[str], bool], list[list[int]]]


class BatchedEncoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._encode_batch = _batch_function(tokenizer)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lmserve-tokenize")
        self._waiting: list[tuple[str, bool, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((text, bool(add_special_tokens), future))  # grouped by `is`
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Encode what waits, in batches, until nothing does (then the next encode restarts)."""
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                try:
                    results = await loop.run_in_executor(self._executor, self._run, batch)
                except Exception as e:  # noqa: BLE001 - every waiter gets the error
                    results = [e] * len(batch)
                for (_, _, future), result in zip(batch, results):
                    if future.done():  # its request was cancelled meanwhile
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._drainer = None

    def _run(self, batch: list[tuple[str, bool, asyncio.Future]]) -> list[list[int] | Exception]:
        """On the worker thread: one backend call per add_special_tokens value."""
        results: list[list[int] | Exception] = [[] for _ in batch]
        for flag in (True, False):
            where = [i for i, (_, f, _) in enumerate(batch) if f is flag]
            if not where:
                continue
            try:
                ids = self._encode_batch([batch[i][0] for i in where], flag)
            except Exception as e:  # noqa: BLE001 - reported to those requests only
                ids = [e] * len(where)  # type: ignore[list-item]
            for i, one in zip(where, ids):
                results[i] = one
        return results

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _batch_function(tokenizer: Any) -> BatchFn:
    """The Rust backend's batch encode when it agrees with `tokenizer.encode` on a probe,
    else `tokenizer.encode` text by text."""

    def one_by_one(texts: list[str], flag: bool) -> list[list[int]]:
        return [list(tokenizer.encode(t, add_special_tokens=flag)) for t in texts]

    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None or backend.truncation is not None or backend.padding is not None:
        return one_by_one

    def batched(texts: list[str], flag: bool) -> list[list[int]]:
        return [e.ids for e in fast(texts, add_special_tokens=flag)]

    try:
        agrees = all(batched([_PROBE], f) == one_by_one([_PROBE], f) for f in (True, False))
    except Exception:  # noqa: BLE001 - any failure: the plain path
        agrees = False
    if not agrees:
        logger.warning("the tokenizer's backend encodes differently from tokenizer.encode; "
                       "prompts are encoded one by one")  # fmt: skip
        return one_by_one
    return batched
