"""A simulated engine: lmserve's scheduler and prefix cache as arithmetic, with no model.

What it keeps from the real engine (lmserve/core/scheduler.py, kv_cache_manager.py):
  - one token budget per step (`max_num_batched_tokens`) and `max_num_seqs`; running requests
    first (decodes and unfinished prompt chunks, in admission order), then waiting ones in
    arrival order (chunked prefill: a prompt takes what is left of the budget), only in a step
    with no preemption; a request that cannot get blocks preempts the latest admitted one,
    which goes back to the front of the queue and recomputes (its cached blocks usually hit);
  - a block pool of `num_gpu_blocks` blocks of `block_size` tokens; full blocks are named by
    the real hash chain (lmserve/prefix_hash.py) over prompt and generated tokens, registered
    when a step fills them, shared by later requests, and evicted least recently freed first;
    the hit stops short of the prompt's last token; hit rate = hit tokens / prompt tokens at
    admission, as lmserve:prefix_cache_hits / queries count them;
  - KV events: every registration and eviction becomes a `BlockStored` / `BlockRemoved` of
    lmserve/core/kv_events.py, one batch per step, msgpack-encoded as the engine publishes it.

Time: the step time comes from a StepProfile. Steps in which nothing but decoding happens
(every running request needs one token, nobody can be admitted) are identical but for their
growing context, so a run of them until the first request finishes is ONE event whose length
is summed in closed form; an arrival cuts the run at the step in flight (the real scheduler
would admit it at the next step boundary). Everything else is one event per step.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import add, eq, itemgetter, not_
from typing import Any

import msgspec

from lmserve.core.kv_events import BlockRemoved, KVEventBatch, stored_runs
from lmserve.prefix_hash import BlockHash
from lmserve.sim.profile import StepProfile, prefill_pairs

_encode = msgspec.msgpack.Encoder().encode


def _values(mapping: dict, keys: list) -> list:
    """[mapping[k] for k in keys] in one C call (itemgetter of several keys gives a tuple)."""
    if len(keys) > 1:
        return list(itemgetter(*keys)(mapping))
    return [mapping[k] for k in keys]


class SimRequest:
    """One request as the engine sees it. `token_ids[:num_tokens_total]` holds the prompt and
    the answer it will generate (drawn up front, so blocks of generated tokens hash as the real
    engine's do); `hashes` covers at least its full blocks (lists may be shared by a session
    and grow past this request)."""

    __slots__ = (
        "request_id", "token_ids", "hashes", "num_prompt_tokens", "max_tokens", "session",
        "arrival_s", "sent_s", "first_token_s", "finish_s", "engine", "decision",
        "num_computed", "num_output", "num_cached_tokens", "blocks_held", "num_hashed",
        "shared", "admitted", "num_preemptions",
    )  # fmt: skip

    def __init__(
        self,
        request_id: int,
        token_ids: list[int],
        hashes: list[BlockHash],
        num_prompt_tokens: int,
        max_tokens: int,
        session: Any = None,
    ) -> None:
        self.request_id = request_id
        self.token_ids = token_ids
        self.hashes = hashes
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.session = session
        self.arrival_s = self.sent_s = 0.0
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.engine: SimEngine | None = None
        self.decision: Any = None
        self.reset()
        self.num_output = 0
        self.num_cached_tokens = -1
        self.num_preemptions = 0

    def reset(self) -> None:
        self.num_computed = 0
        self.blocks_held = 0
        self.num_hashed = 0  # blocks of this request already registered (or found duplicate)
        self.shared: list[BlockHash] = []  # hashes it holds a reference on
        self.admitted = False

    @property
    def num_tokens(self) -> int:
        """Prompt plus tokens sampled so far: what it must have computed before sampling."""
        return self.num_prompt_tokens + self.num_output


@dataclass
class EngineStats:
    steps: int = 0
    busy_s: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    requests: int = 0
    preemptions: int = 0
    evicted_blocks: int = 0
    token_steps: dict[int, float] = field(default_factory=dict)  # ITL histogram (see itl_bin)


ITL_BIN_RATIO = 1.01  # inter-token latencies are kept in 1%-wide bins


def itl_bin(seconds: float) -> int:
    return int(math.log(max(seconds, 1e-7)) / math.log(ITL_BIN_RATIO))


class SimEngine:
    """One engine. The cluster calls `add`, then `on_step_end` at the time `next_event_s`
    names; `hooks` report first tokens, finishes and KV event batches back to it."""

    # `freed` entries tolerated beyond twice the valid ones before a compaction, and consumed
    # ones before they are dropped (a class attribute so a test can make them 0)
    freed_slack = 4096

    def __init__(
        self,
        url: str,
        profile: StepProfile,
        on_first_token: Callable[[SimRequest, float], None],
        on_finish: Callable[[SimRequest, float], None],
        on_kv_events: Callable[[SimEngine, bytes, float], None] | None,
        host_load: Callable[[], float] | None = None,
    ) -> None:
        self.url = url
        self.profile = p = profile
        self.bs = p.block_size
        self.on_first_token = on_first_token
        self.on_finish = on_finish
        self.on_kv_events = on_kv_events
        self.host_load = host_load  # engines stepping on this host right now (CPU sharing)
        self.running: list[SimRequest] = []
        self.waiting: deque[SimRequest] = deque()
        # Block pool: referenced hashed blocks, free hashed blocks (LRU), free empty blocks.
        # `refs` maps every hash the cache holds to its references (> 0) or, once free, to
        # its stamp -(1 + its position in the eviction queue `freed`, least recently freed
        # first; position = freed_base + list index, entries before freed_head are consumed).
        # A block taken again keeps its queue entry, which goes stale (the stamp no longer
        # matches) and is skipped when evicting: no per-block unlinking, 8 bytes an entry
        # instead of an OrderedDict node (the LRU was most of the memory at scale), and whole
        # requests' blocks are counted, freed and evicted with C-level map/zip/compress.
        self.refs: dict[BlockHash, int] = {}
        self.freed: list[BlockHash] = []
        self.freed_base = 0
        self.freed_head = 0
        self.num_cached_free = 0  # hashes with no reference (the valid entries of `freed`)
        self.empty = p.num_gpu_blocks  # free blocks holding nothing
        self.stats = EngineStats()
        self.events: list[Any] = []  # KV events of the step in progress
        self.seq = 0
        # the step (or decode run) in flight
        self.busy = False
        self.step_end_s = 0.0
        self.version = 0  # bumps when the end time moves (the heap holds stale entries)
        self._run: tuple | None = None  # (start, rows, k, a, b, c0): a decode run
        self._plan: list[tuple[SimRequest, int]] = []

    # ---- the cluster's interface -----------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_blocks(self) -> int:
        return self.empty + self.num_cached_free

    def add(self, request: SimRequest, now: float) -> bool:
        """Queue a request. True when the engine was idle and must be started (`start_step`);
        a decode run in flight is cut at its current step so the request joins the next."""
        request.engine = self
        self.waiting.append(request)
        if not self.busy:
            return True
        if self._run is not None:
            self._cut_run(now)
        return False

    def start_step(self, now: float) -> bool:
        """Plan the next step (or decode run) from `now`; False when there is nothing to do."""
        plan, preempted = self._schedule()
        if not plan:
            self.busy = False
            return False
        factor = self._sharing_factor()
        if not preempted and self._is_pure_decode(plan):
            k = self._decode_run_length(plan)
            if k > 1:
                self._start_run(plan, k, now, factor)
                return True
        rows = sum(1 for r, n in plan if n == 1 and r.num_computed >= r.num_tokens - 1)
        prefill = sum(n for _, n in plan) - rows
        context = sum(r.num_computed + n for r, n in plan)
        pairs = 0.0
        if prefill:
            pairs = sum(
                prefill_pairs(n, r.num_computed)
                for r, n in plan
                if n > 1 or r.num_computed < r.num_tokens - 1
            )
        duration = self.profile.step_time(prefill, rows, context, pairs) * factor
        self._plan = plan
        self._run = None
        self.busy = True
        self.step_end_s = now + duration
        self.stats.busy_s += duration
        self.stats.steps += 1
        if rows:
            self._record_itl(duration, rows)
        return True

    def on_step_end(self, now: float) -> None:
        """The step (or run) in flight ended at `now`: advance every request, report."""
        if self._run is not None:
            self._finish_run(now)
        else:
            for request, n in self._plan:
                self._advance(request, n, 1, now)
            self._plan = []
        self._publish(now)

    # ---- scheduling (scheduler.py's policy) ---------------------------------------------------
    def _schedule(self) -> tuple[list[tuple[SimRequest, int]], bool]:
        budget = self.profile.max_num_batched_tokens
        plan: list[tuple[SimRequest, int]] = []
        preempted = False
        for request in list(self.running):
            if budget <= 0:
                break
            if not request.admitted:
                continue  # preempted as a victim earlier in this step
            n = min(request.num_tokens - request.num_computed, budget)
            if n <= 0:
                continue
            if not self._allocate_or_preempt(request, n, plan):
                preempted = True
                continue
            plan.append((request, n))
            budget -= n
        if preempted:
            return plan, True
        while self.waiting and budget > 0 and len(self.running) < self.profile.max_num_seqs:
            request = self.waiting[0]
            counts = self._lookup(request)
            hit = len(counts)
            hit_free = sum(map((0).__gt__, counts))  # free cached blocks it will take
            n = min(request.num_tokens - hit * self.bs, budget)
            need = -(-(hit * self.bs + n) // self.bs) - hit
            if need > self.num_free_blocks - hit_free:
                break
            self.waiting.popleft()
            self._admit(request, counts, hit_free)
            self._take_blocks(need)
            request.blocks_held += need
            plan.append((request, n))
            budget -= n
        return plan, False

    def _lookup(self, request: SimRequest) -> list[int]:
        """The `refs` values of the longest cached prefix's blocks (never the prompt's last
        token), looked up 32 at a time (past the first miss is wasted, but in C)."""
        max_hit = (request.num_tokens - 1) // self.bs
        hashes, get = request.hashes, self.refs.get
        counts: list[int] = []
        while len(counts) < max_hit:
            start = len(counts)
            part = list(map(get, hashes[start : min(start + 32, max_hit)]))
            if None in part:
                counts += part[: part.index(None)]
                break
            counts += part
        return counts

    def _admit(self, request: SimRequest, counts: list[int], free: int) -> None:
        """Take a reference on the `len(counts)` hit blocks (`free` of them were free: their
        entries in `freed` go stale)."""
        hit = len(counts)
        shared = request.hashes[:hit]
        self.refs.update(zip(shared, [c + 1 if c > 0 else 1 for c in counts]))
        self.num_cached_free -= free
        request.shared = shared
        request.num_hashed = request.blocks_held = hit
        request.num_computed = hit * self.bs
        request.admitted = True
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = hit * self.bs
        self.stats.prefix_queries += request.num_tokens
        self.stats.prefix_hits += hit * self.bs
        self.running.append(request)

    def _allocate_or_preempt(
        self, request: SimRequest, n: int, plan: list[tuple[SimRequest, int]]
    ) -> bool:
        need = -(-(request.num_computed + n) // self.bs) - request.blocks_held
        while need > self.num_free_blocks:
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is request:
                return False
        if need > 0:
            self._take_blocks(need)
            request.blocks_held += need
        return True

    def _preempt(self, request: SimRequest, plan: list[tuple[SimRequest, int]]) -> None:
        self.running.remove(request)
        for i, (r, _) in enumerate(plan):
            if r is request:
                del plan[i]
                break
        self._free(request)
        request.reset()
        request.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(request)

    def _is_pure_decode(self, plan: list[tuple[SimRequest, int]]) -> bool:
        if len(plan) != len(self.running):
            return False
        for request, n in plan:
            if n != 1 or request.num_computed < request.num_prompt_tokens:
                return False
        # Nobody was admitted (the queue is empty, or its head did not fit: full, no blocks;
        # until a request finishes blocks only get scarcer), so the next steps are the same.
        return True

    # ---- decode runs -----------------------------------------------------------------------------
    def _decode_run_length(self, plan: list[tuple[SimRequest, int]]) -> int:
        """Identical decode steps until the first request finishes, as long as the blocks last
        (the first step's blocks are already taken)."""
        k = min(r.max_tokens - r.num_output for r, _ in plan)
        if k <= 1:
            return k
        free = self.num_free_blocks

        def extra_blocks(steps: int) -> int:
            bs = self.bs
            return sum(max(0, -(-(r.num_computed + steps) // bs) - r.blocks_held) for r, _ in plan)

        if extra_blocks(k) <= free:
            return k
        low, high = 1, k  # extra_blocks(low) <= free < extra_blocks(high)
        while high - low > 1:
            mid = (low + high) // 2
            if extra_blocks(mid) <= free:
                low = mid
            else:
                high = mid
        return low

    def _start_run(
        self, plan: list[tuple[SimRequest, int]], k: int, now: float, factor: float
    ) -> None:
        p = self.profile
        rows = len(plan)
        a = (p.base_s + p.per_row_s * rows) * factor
        b = p.per_context_token_s * factor
        c0 = sum(r.num_computed + 1 for r, _ in plan)
        self._plan = plan
        self._run = (now, rows, k, a, b, c0)
        self.busy = True
        self._set_run_end(k)

    def _run_duration(self, steps: int) -> float:
        _, rows, _, a, b, c0 = self._run
        return steps * a + b * (steps * c0 + rows * steps * (steps - 1) / 2)

    def _set_run_end(self, k: int) -> None:
        start, rows, _, a, b, c0 = self._run
        self._run = (start, rows, k, a, b, c0)
        self.step_end_s = start + self._run_duration(k)
        self.version += 1

    def _cut_run(self, now: float) -> None:
        """End the run at the step in flight at `now`."""
        start, _, k, a, _, _ = self._run
        done = min(k, int((now - start) / a) + 1) if a > 0 else 1
        while done > 1 and start + self._run_duration(done - 1) > now:
            done -= 1
        while done < k and start + self._run_duration(done) <= now:
            done += 1
        if done < k:
            self._set_run_end(done)

    def _finish_run(self, now: float) -> None:
        start, rows, k, _, _, _ = self._run
        duration = self._run_duration(k)
        self.stats.busy_s += duration
        self.stats.steps += k
        self._record_itl(duration / k, rows * k)
        bs = self.bs
        for request, _ in self._plan:
            computed = request.num_computed + k
            extra = -(-computed // bs) - request.blocks_held
            if extra > 0:
                self._take_blocks(extra)
                request.blocks_held += extra
            output = request.num_output + k
            if (
                computed // bs <= request.num_hashed  # no block filled: nothing to register
                and output < request.max_tokens
                and request.first_token_s is not None
                and computed >= request.num_prompt_tokens + request.num_output
            ):  # what _advance would do for most rows of a run, inlined
                request.num_computed, request.num_output = computed, output
            else:
                self._advance(request, 1, k, now)
        self._plan = []
        self._run = None

    # ---- progress ----------------------------------------------------------------------------
    def _advance(self, request: SimRequest, n: int, steps: int, now: float) -> None:
        """`steps` steps of `n` tokens each ended at `now` (steps > 1 only for decode runs)."""
        request.num_computed += n * steps
        self._register_blocks(request)
        if request.num_computed < request.num_tokens:
            return  # a prompt chunk: nothing sampled yet
        request.num_output += steps
        if request.first_token_s is None:
            request.first_token_s = now
            self.on_first_token(request, now)
        if request.num_output >= request.max_tokens:
            self.running.remove(request)
            self._free(request)
            request.finish_s = now
            self.stats.requests += 1
            self.on_finish(request, now)

    def _register_blocks(self, request: SimRequest) -> None:
        """Full blocks the step wrote enter the prefix cache (a copy of a block the cache
        already holds stays private, as in kv_cache_manager.cache_blocks)."""
        full = min(request.num_computed // self.bs, len(request.hashes))
        start = request.num_hashed
        if full <= start:
            return
        refs = self.refs
        hashes = request.hashes
        part = hashes[start:full]
        if self.on_kv_events is None:
            new = [h for h in part if h not in refs]
        else:
            held = list(map(refs.__contains__, part))
            if True in held:
                new = list(compress(part, map(not_, held)))
                stored = list(compress(range(start, full), map(not_, held)))
            else:
                new, stored = part, range(start, full)
            # one event per run of newly cached blocks, as the engine's kv_cache_manager
            self.events += stored_runs(hashes, request.token_ids, self.bs, list(stored))
        refs.update(zip(new, repeat(1)))
        request.shared += new
        request.num_hashed = full

    def _free(self, request: SimRequest) -> None:
        """Drop the request's blocks: hashed ones join the LRU's tail (its last blocks first,
        so they are evicted first), private ones become empty."""
        private = request.blocks_held - len(request.shared)
        refs, freed = self.refs, self.freed
        shared = request.shared[::-1]
        counts = _values(refs, shared)
        if counts.count(1) == len(counts):  # the usual case: nobody else holds one of them
            to_free = shared
        else:
            held = list(map((1).__lt__, counts))  # others hold these: one reference less
            refs.update(zip(compress(shared, held), map(add, compress(counts, held), repeat(-1))))
            to_free = list(compress(shared, map(not_, held)))
        first = self.freed_base + len(freed) + 1
        refs.update(zip(to_free, range(-first, -first - len(to_free), -1)))
        freed += to_free
        self.num_cached_free += len(to_free)
        self.empty += private
        request.shared = []
        request.blocks_held = 0
        if len(freed) - self.freed_head > 2 * self.num_cached_free + self.freed_slack:
            self._compact_freed()

    def _compact_freed(self) -> None:
        """Drop the stale entries of `freed` (many when blocks are freed and taken again
        while nothing is evicted), renumbering the rest in the same order."""
        refs, freed = self.refs, self.freed
        first = self.freed_base + self.freed_head + 1
        entries = freed[self.freed_head :]
        valid = map(eq, map(refs.get, entries), range(-first, -first - len(entries), -1))
        # the same list object: Cluster.run freezes it out of the GC's full scans
        freed[:] = compress(entries, valid)
        refs.update(zip(freed, range(-1, -len(freed) - 1, -1)))
        self.freed_base = self.freed_head = 0

    def _take_blocks(self, n: int) -> None:
        """Claim `n` free blocks: empty ones first, then evict the least recently freed."""
        from_empty = min(n, self.empty)
        self.empty -= from_empty
        evict = n - from_empty
        if evict <= 0:
            return
        victims = self._next_victims(evict)
        refs = self.refs
        for h in victims:
            del refs[h]
        if self.on_kv_events is not None:
            self.events.append(BlockRemoved(victims))  # evicted together: one event
        self.num_cached_free -= evict
        self.stats.evicted_blocks += evict

    def _next_victims(self, n: int) -> list[BlockHash]:
        """Consume the first `n` valid entries of `freed` (skipping stale ones)."""
        refs, freed = self.refs, self.freed
        head = self.freed_head
        victims: list[BlockHash] = []
        while len(victims) < n:
            chunk = freed[head : head + n - len(victims)]
            if not chunk:
                raise RuntimeError("no free block to evict")
            first = self.freed_base + head + 1
            valid = list(map(eq, map(refs.get, chunk), range(-first, -first - len(chunk), -1)))
            head += len(chunk)
            victims += chunk if valid.count(True) == len(chunk) else compress(chunk, valid)
        if head > self.freed_slack and head > len(freed) // 2:  # drop the consumed entries
            del freed[:head]
            self.freed_base += head
            head = 0
        self.freed_head = head
        return victims

    def _publish(self, now: float) -> None:
        if self.events:
            payload = _encode(KVEventBatch(now, self.events))
            self.events = []
            self.on_kv_events(self, payload, now)

    # ---- helpers -----------------------------------------------------------------------------
    def _sharing_factor(self) -> float:
        cores = self.profile.host_cores
        if not cores or self.host_load is None:
            return 1.0
        return max(1.0, (self.host_load() + 1) / cores)

    def _record_itl(self, seconds: float, tokens: int) -> None:
        hist = self.stats.token_steps
        b = itl_bin(seconds)
        hist[b] = hist.get(b, 0) + tokens
