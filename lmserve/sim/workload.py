"""Simulated clients: when requests arrive and what their prompts are, as token ids.

    poisson / gamma arrivals   `lmserve bench serve`'s process: gaps drawn from a gamma of shape
                               `burstiness` and mean 1 / rate (1 = Poisson, < 1 burstier)
    random                     prompts of random ids
    prefix-repetition          `num_prefixes` shared prefixes, each + its own suffix (bench's)
    multi-round-qa             users over shared system prompts (`num_system_prompts` groups;
                               bench's has one); each user's rounds run one after another, a
                               round's prompt = the history so far (questions and the answers
                               the engine generated) + a new question; `think_s` between rounds
    trace                      a file of (timestamp, prompt tokens or a prefix group, output
                               tokens): JSON lines or CSV, see `trace_items`

Prompts are token ids (random, from a seed) so the engines' block hashes and the router's are
the real chain of lmserve/prefix_hash.py; a request carries the answer the engine will
"generate" too, so a multi-round history hits the blocks its answer filled.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmserve.prefix_hash import HASH_FUNCTIONS, BlockHash, extend_block_hashes
from lmserve.router.prefix_trie import extend_chain
from lmserve.sim.engine import SimRequest

WORKLOADS = ("random", "prefix-repetition", "multi-round-qa", "trace")
FIRST_ID = 8  # ids below are left for special tokens, as the bench's random text avoids them
# Ids are drawn this many at a time and handed out in slices: one numpy call per request was
# ~10 us of overhead (a tenth of a request's simulation). Only the block structure (which
# prompts share which blocks) reaches the results, not the ids' values.
IDS_CHUNK = 1 << 16


@dataclass
class WorkloadSpec:
    """What `lmserve simulate` is asked to send (flags named as `lmserve bench serve`'s)."""

    name: str = "multi-round-qa"
    request_rate: float = 1.0  # requests/s (multi-round-qa: users/s)
    burstiness: float = 1.0
    duration_s: float | None = None  # stop arrivals after this; None: after num_prompts/users
    num_prompts: int = 1000
    input_len: int = 1024
    output_len: int = 128
    prefix_len: int = 256
    suffix_len: int = 256
    num_prefixes: int = 10
    num_users: int = 10
    num_rounds: int = 5
    system_prompt_len: int = 1000
    num_system_prompts: int = 1
    question_len: int = 100
    answer_len: int = 100
    think_s: float = 0.0  # bench serve's --user-request-interval
    max_concurrency: int | None = None
    trace_path: str | None = None
    vocab_size: int = 32000
    seed: int = 0


# The engines' prefix caches only compare block keys. Unless the router reads them (kv-aware's
# KV events carry the engines' real SHA-256 chain, which it checks), the simulator keys blocks
# by this cheaper chain: the same blocks match, so the same run, at ~8% less time.
KEYS_ONLY = "keys-only"


class TokenSource:
    """Random ids and the engines' hash chain (block size and algorithm of the profile)."""

    def __init__(self, spec: WorkloadSpec, block_size: int, hash_algo: str) -> None:
        self.rng = np.random.default_rng([spec.seed, 1])
        self.vocab = spec.vocab_size
        self.block_size = block_size
        self.hash_fn = HASH_FUNCTIONS[hash_algo] if hash_algo != KEYS_ONLY else None
        self.next_id = 0
        self._ids: list[int] = []  # drawn, not handed out from _pos on
        self._pos = 0
        # One Python int per id of the vocabulary, which every drawn id refers to: a run draws
        # ~400 ids per request, and allocating a new int object for each (numpy's tolist) was
        # a tenth of an hour's simulation at 1,000 replicas, with the memory it churned.
        self._id_objects = np.array(range(self.vocab), dtype=object)

    def ids(self, n: int) -> list[int]:
        if self._pos + n > len(self._ids):
            drawn = self.rng.integers(FIRST_ID, self.vocab, size=max(n, IDS_CHUNK))
            self._ids = self._id_objects[drawn].tolist()  # the same values, shared objects
            self._pos = 0
        self._pos += n
        return self._ids[self._pos - n : self._pos]

    def extend(self, hashes: list[BlockHash], ids: list[int]) -> None:
        if self.hash_fn is not None:
            extend_block_hashes(hashes, ids, self.block_size, self.hash_fn)
            return
        # KEYS_ONLY: the prefix trie's chain of Python's (deterministic) tuple hashes, one C
        # call per block instead of SHA-256 over its packed ids
        size, first = self.block_size, len(hashes)
        blocks = zip(*[iter(ids[first * size : len(ids) // size * size])] * size)
        extend_chain(hashes, blocks)  # type: ignore[arg-type]

    def request(
        self, ids: list[int], hashes: list[BlockHash], prompt_len: int, max_tokens: int, session
    ) -> SimRequest:
        self.next_id += 1
        return SimRequest(self.next_id, ids, hashes, prompt_len, max_tokens, session)


class Session:
    """One multi-round-qa user (or a single request: one round with a fixed prompt)."""

    __slots__ = ("user_id", "ids", "hashes", "rounds_left", "question_len", "answer_len",
                 "source", "think_s", "multi_round")  # fmt: skip

    def __init__(
        self,
        user_id: int,
        ids: list[int],
        hashes: list[BlockHash],
        rounds: int,
        question_len: int,
        answer_len: int,
        source: TokenSource,
        think_s: float,
    ) -> None:
        self.user_id = user_id
        self.ids, self.hashes = ids, hashes
        self.rounds_left = rounds
        self.multi_round = rounds > 1  # a conversation: its requests carry a session id
        self.question_len, self.answer_len = question_len, answer_len
        self.source = source
        self.think_s = think_s

    def next_request(self) -> SimRequest | None:
        """The next round: history + a new question, and the answer it will get."""
        if self.rounds_left <= 0:
            return None
        self.rounds_left -= 1
        self.ids += self.source.ids(self.question_len)
        prompt_len = len(self.ids)
        self.ids += self.source.ids(self.answer_len)
        self.source.extend(self.hashes, self.ids)
        return self.source.request(self.ids, self.hashes, prompt_len, self.answer_len, self)


def arrival_gaps(spec: WorkloadSpec, rng: np.random.Generator) -> Iterator[float]:
    """Seconds between arrivals: 0 first, then gamma(burstiness) gaps of mean 1 / rate (the
    draws of lmserve.bench.serve.arrivals, in the same order)."""
    yield 0.0
    while True:
        if not math.isfinite(spec.request_rate):
            yield 0.0
        else:
            k = spec.burstiness
            yield float(rng.gamma(shape=k, scale=1.0 / (spec.request_rate * k)))


def _prefix(source: TokenSource, n: int) -> tuple[list[int], list[BlockHash]]:
    ids = source.ids(n)
    hashes: list[BlockHash] = []
    source.extend(hashes, ids)
    return ids, hashes


def sessions(
    spec: WorkloadSpec, block_size: int, hash_algo: str
) -> Iterator[tuple[float, Session]]:
    """(arrival time, session) in time order; every workload is sessions (one round each for
    the single-request ones)."""
    if spec.name == "trace":
        yield from _trace_sessions(spec, block_size, hash_algo)
        return
    source = TokenSource(spec, block_size, hash_algo)
    # bench serve's arrival generator, seeded as it seeds it: same seed, same arrival times
    gaps = arrival_gaps(spec, np.random.default_rng(spec.seed))
    order = np.random.default_rng([spec.seed, 2])
    if spec.name == "multi-round-qa":
        groups = [_prefix(source, spec.system_prompt_len) for _ in range(spec.num_system_prompts)]
        limit = spec.num_users
    elif spec.name == "prefix-repetition":
        groups = [_prefix(source, spec.prefix_len) for _ in range(spec.num_prefixes)]
        limit = spec.num_prompts
    elif spec.name == "random":
        groups, limit = [([], [])], spec.num_prompts
    else:
        raise ValueError(f"unknown workload {spec.name!r}; choose from {WORKLOADS}")
    now, i = 0.0, 0
    while spec.duration_s is not None or i < limit:
        now += next(gaps)
        if spec.duration_s is not None and now > spec.duration_s:
            return
        ids, hashes = groups[int(order.integers(len(groups)))]
        yield now, _session(spec, source, i, list(ids), list(hashes))
        i += 1


def _session(
    spec: WorkloadSpec, source: TokenSource, i: int, ids: list[int], hashes: list[BlockHash]
) -> Session:
    if spec.name == "multi-round-qa":
        return Session(i, ids, hashes, spec.num_rounds, spec.question_len, spec.answer_len,
                       source, spec.think_s)  # fmt: skip
    if spec.name == "prefix-repetition":
        return Session(i, ids, hashes, 1, spec.suffix_len, spec.output_len, source, 0.0)
    return Session(i, ids, hashes, 1, spec.input_len, spec.output_len, source, 0.0)


# ---- traces ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceItem:
    timestamp: float  # seconds from the trace's start
    prompt_tokens: int  # the whole prompt, shared prefix included
    output_tokens: int
    prefix_group: str | None = None  # requests of one group share their first prefix_tokens
    prefix_tokens: int = 0


def trace_items(path: str) -> list[TraceItem]:
    """A trace: JSON lines ({"timestamp": 0.5, "prompt_tokens": 900, "output_tokens": 120,
    "prefix_group": "faq", "prefix_tokens": 600}; the last two optional) or a CSV file with
    those column names. Sorted by timestamp."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"trace {path!r} is not a file")
    if file.suffix == ".csv":
        with file.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    items = []
    for n, row in enumerate(rows, 1):
        try:
            group = row.get("prefix_group") or None
            items.append(
                TraceItem(
                    float(row["timestamp"]),
                    int(row["prompt_tokens"]),
                    int(row["output_tokens"]),
                    None if group is None else str(group),
                    int(row.get("prefix_tokens") or 0),
                )
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"trace {path!r}, row {n}: {e!r}") from None
        if items[-1].prefix_tokens > items[-1].prompt_tokens or items[-1].output_tokens < 1:
            raise ValueError(f"trace {path!r}, row {n}: prefix longer than prompt, or no output")
    items.sort(key=lambda t: t.timestamp)
    return items


def _trace_sessions(
    spec: WorkloadSpec, block_size: int, hash_algo: str
) -> Iterator[tuple[float, Session]]:
    if spec.trace_path is None:
        raise ValueError("the trace workload needs --trace FILE")
    source = TokenSource(spec, block_size, hash_algo)
    groups: dict[tuple[str, int], tuple[list[int], list[BlockHash]]] = {}
    for i, item in enumerate(trace_items(spec.trace_path)):
        if spec.duration_s is not None and item.timestamp > spec.duration_s:
            return
        ids: list[int] = []
        hashes: list[BlockHash] = []
        if item.prefix_group is not None and item.prefix_tokens:
            key = (item.prefix_group, item.prefix_tokens)
            if key not in groups:
                groups[key] = _prefix(source, item.prefix_tokens)
            ids, hashes = list(groups[key][0]), list(groups[key][1])
        suffix = item.prompt_tokens - len(ids)
        yield item.timestamp, Session(i, ids, hashes, 1, suffix, item.output_tokens, source, 0.0)
