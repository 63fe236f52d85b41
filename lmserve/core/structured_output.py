"""The EngineCore's side of structured outputs: grammars compiled off the engine loop, one
matcher per constrained request, one token bitmask per step.

    add_request ──▶ submit(): compile in the pool (cached by grammar text); the request waits
                    aside as WAITING_FOR_FSM, blocking nobody
    schedule()  ──▶ poll(): compiled → its matcher is made and it joins the waiting queue;
                    failed or past LMSERVE_GRAMMAR_COMPILE_TIMEOUT_S → it finishes with an error
                ──▶ grammar_bitmask(): rows for every constrained request that samples this
                    step (1 + its scheduled drafts), into SchedulerOutput.structured_output —
                    at once, or (async scheduling) once the step in flight is collected
    update_from_output ──▶ the matchers accept the step's sampled tokens, one batched call
                    for all requests (tokens past a stop are rolled back)

The rows of one step are filled together: one backend call (xgrammar's BatchGrammarMatcher or
llguidance's executor, over LMSERVE_GRAMMAR_BITMASK_THREADS threads, without the GIL) for every
request's first row, then one per draft depth; the worker applies them on the device
(lmserve/sample/grammar.py).

Why the worker can trust the mask (the matcher must be at the request's last token when the
mask is made):
  - speculative decoding: row j is the mask after the request's known tokens and drafts
    1..j, made by accepting the drafts transiently and rolling them back at once; the
    rejection sampler then only accepts drafts the grammar allows, and the matcher later
    accepts only the tokens emitted. Drafts are also cut to their grammar-valid prefix when
    they are stored (`validate_drafts`), so no verification is wasted on them.
  - preemption: the matcher only ever advances over tokens appended to the request (kept
    across preemption); a token in flight when its request is preempted is dropped unseen,
    so there is nothing to roll back.
  - async scheduling: step N+1 is scheduled (and its forward launched) before step N's
    sampled token is known. A constrained request is scheduled ahead like any other, but its
    mask for step N+1 needs that token: the scheduler marks such a step
    `pending_structured_output_tokens`, the worker runs its forward and holds its sampling,
    and the EngineCore, after collecting step N (the matchers accept its tokens), makes the
    masks (`Scheduler.get_grammar_bitmask`), schedules step N+2 and has the worker sample
    (`sample_tokens`), then launches N+2 — vLLM V1's deferred sampling. The forward of N+1
    hides the host's work on step N, and constrained requests decode every step; a request
    that finished in step N gets no row (its token from N+1 is dropped, as for any request).

What a constrained row costs the host (the test schemas, a 49k-token vocabulary, one core of
a dev machine): ~2 us to accept a token, 20-30 us to fill (spread over the fill threads; most
of it is the JSON whitespace bound, MAX_WHITESPACE: with unbounded whitespace a fill takes
~3 us).

Nothing here runs for a batch without constrained requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from lmserve import envs
from lmserve.config import ModelConfig
from lmserve.core.sched_output import StructuredOutputBatch
from lmserve.request import Request
from lmserve.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 512  # compiled grammars kept (LRU), keyed by their text


class GrammarCompileError(Exception):
    """A grammar that failed to compile, or took longer than the timeout."""


class StructuredOutputRequest:
    """One request's grammar: its compilation, then its matcher."""

    __slots__ = ("params", "future", "deadline", "grammar")

    def __init__(self, params: StructuredOutputsParams, future: Future, deadline: float) -> None:
        self.params = params
        self.future = future  # -> the compiled grammar (shared through the cache)
        self.deadline = deadline  # time.monotonic() after which waiting is an error
        self.grammar: Any = None  # StructuredOutputGrammar, once compiled


class StructuredOutputManager:
    def __init__(self, model_config: ModelConfig) -> None:
        self.model_config = model_config
        self.compile_timeout_s = envs.LMSERVE_GRAMMAR_COMPILE_TIMEOUT_S
        num_threads = envs.LMSERVE_GRAMMAR_COMPILE_THREADS
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="lmserve-grammar")
        self._num_threads = num_threads
        self._backend: Any = None  # built in the pool on first use (loads the tokenizer)
        self._backend_lock = threading.Lock()
        self._compiled: OrderedDict[tuple, Future] = OrderedDict()
        self.compile_seconds: list[float] = []  # per compilation that ran (not cache hits)

    # ---- compilation ----------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Start (or reuse) the compilation of the request's grammar; returns at once."""
        params = request.sampling_params.structured_outputs
        key = params.key()
        future = self._compiled.get(key)
        if future is None:
            future = self._pool.submit(self._compile, params)
            self._compiled[key] = future
            if len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        deadline = time.monotonic() + self.compile_timeout_s
        request.structured_output = StructuredOutputRequest(params, future, deadline)

    def poll(self, request: Request) -> bool:
        """True once the request's matcher exists (made here when its grammar is compiled);
        False while compiling. Raises GrammarCompileError on failure or timeout."""
        so = request.structured_output
        if so.grammar is not None:
            return True
        if not so.future.done():
            if time.monotonic() > so.deadline:
                raise GrammarCompileError(
                    f"the grammar did not compile within {self.compile_timeout_s:g} s "
                    "(LMSERVE_GRAMMAR_COMPILE_TIMEOUT_S); simplify the schema"
                )
            return False
        try:
            compiled = so.future.result()
        except Exception as e:
            from lmserve.structured_output.validate import clean_backend_error

            message = f"the grammar failed to compile: {clean_backend_error(e)}"
            raise GrammarCompileError(message) from None
        stop_ids = [request.eos_token_id] if request.eos_token_id is not None else []
        stop_ids += [t for t in request.sampling_params.stop_token_ids if t not in stop_ids]
        so.grammar = self._backend.make_grammar(compiled, stop_ids)
        return True

    def _compile(self, params: StructuredOutputsParams) -> Any:  # runs in the pool
        backend = self._get_backend()
        start = time.perf_counter()
        compiled = backend.compile(params)
        self.compile_seconds.append(time.perf_counter() - start)
        return compiled

    def _get_backend(self) -> Any:
        with self._backend_lock:
            if self._backend is None:
                self._backend = make_backend(self.model_config, self._num_threads)
            return self._backend

    # ---- one step -------------------------------------------------------------------------
    def grammar_bitmask(
        self, requests: list[Request], spec_tokens: dict[str, list[int]]
    ) -> StructuredOutputBatch | None:
        """The masks for `requests` (constrained, sampling this step, each matcher at its
        request's last token): 1 + len(drafts) rows each, row j allowing what may follow the
        known tokens and drafts 1..j. Rows are filled in batches, one xgrammar call (over its
        threads) for every request's first row, then one per draft depth."""
        requests = [r for r in requests if not r.structured_output.grammar.is_terminated()]
        if not requests:
            return None
        row_start: dict[str, int] = {}
        num_rows = 0
        for request in requests:
            row_start[request.request_id] = num_rows
            num_rows += 1 + len(spec_tokens.get(request.request_id, ()))
        num_words = -(-self._backend.vocab_size // 32)
        bitmask = np.full((num_rows, num_words), -1, dtype=np.int32)  # [num_rows, num_words]
        grammars = [r.structured_output.grammar for r in requests]
        self._backend.batch_fill_bitmask(grammars, bitmask, list(row_start.values()))
        with_drafts = [
            (r.structured_output.grammar, row_start[r.request_id], drafts)
            for r in requests
            if (drafts := spec_tokens.get(r.request_id))
        ]
        if with_drafts:
            _fill_draft_rows(self._backend, with_drafts, bitmask)
        return StructuredOutputBatch(row_start, bitmask, num_words)

    def accept_tokens(self, requests: list[Request], token_ids: list[list[int]]) -> list[int]:
        """Each request's matcher advances over its tokens until one it refuses or a stop
        token: how many each accepted. One batched backend call for all of them."""
        grammars = [r.structured_output.grammar for r in requests]
        return self._backend.batch_accept_tokens(grammars, token_ids)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _fill_draft_rows(backend: Any, items: list[tuple[Any, int, list[int]]], bitmask) -> None:
    """Rows start+1.. of requests with drafts (their first row is filled): row start+j+1 is
    the mask after drafts 0..j, made by accepting the drafts transiently, one depth at a time
    for all requests (one batched fill per depth), then rolling them back. Rows after a draft
    the grammar refuses stay all-allowed: they are never used, since the sampler rejects that
    draft (and rows after an accepted stop token are never emitted: the stop check ends the
    request there)."""
    num_accepted = [0] * len(items)
    active = list(range(len(items)))
    depth = 0
    while active:
        grammars, rows, still = [], [], []
        for i in active:
            grammar, start, drafts = items[i]
            if not grammar.accept_tokens([drafts[depth]]):
                continue
            num_accepted[i] += 1
            if grammar.is_terminated():  # a stop token: whatever follows is cut by the stop check
                continue
            grammars.append(grammar)
            rows.append(start + depth + 1)
            if depth + 1 < len(drafts):
                still.append(i)
        backend.batch_fill_bitmask(grammars, bitmask, rows)
        active = still
        depth += 1
    for (grammar, _, _), n in zip(items, num_accepted):
        grammar.rollback(n)


def make_backend(model_config: ModelConfig, num_threads: int) -> Any:
    """The configured backend (`ModelConfig.structured_outputs_backend`: xgrammar or
    guidance) for the model's tokenizer and logits width."""
    from transformers import AutoTokenizer

    if model_config.skip_tokenizer_init:
        raise GrammarCompileError("structured outputs need a tokenizer (skip_tokenizer_init=True)")
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer)
    fill_threads = envs.LMSERVE_GRAMMAR_BITMASK_THREADS
    if model_config.structured_outputs_backend == "guidance":
        from lmserve.structured_output.llguidance_backend import GuidanceBackend

        return GuidanceBackend(tokenizer, model_config.vocab_size, fill_threads)
    from lmserve.structured_output.xgrammar_backend import XgrammarBackend

    return XgrammarBackend(tokenizer, model_config.vocab_size, num_threads, fill_threads)
