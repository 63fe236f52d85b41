"""CUDA graphs: capture the model forward once per size, replay it every step.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python the
GPU waits on the CPU. A graph replays all of them with one launch. Two kinds, as in vLLM V1:

  full       decode-only batches (every request schedules one token). The whole forward,
             attention included, is captured at bucketed batch sizes 1, 2, 4, 8, 16, ..., 256,
             then every 16th;
             a batch of `n` requests is padded to the next size with requests that have no keys
             and write nowhere (see `DeviceInputs.pad_host`). The smallest sizes (up to
             `decode_logits_max`) run the LM head in the graph too: at batch 1-8 its eager
             launch from Python cost more host time per step than the head's GPU time.
  shared     decode-only batches of 16+ requests that all start with the same KV blocks (a
             shared system prompt, the n samples of a prompt): full graphs like the decode ones,
             at power-of-two sizes, whose attention reads that prefix once for the batch
             (lmserve/attention/shared_prefix.py). Its length is a device input, so one graph
             serves every prefix length.
  verify     speculative decoding's verify batches: every request schedules at most 1 + k
             tokens (its last token and up to k drafts). Full graphs like the decode ones, at
             the same batch sizes, each holding size x (1 + k) token slots; a batch pads with
             empty requests, and slots its requests leave unused belong to none (attention
             skips them). Without them a verify step would take the piecewise graphs below,
             with one eager attention call per layer.
  piecewise  mixed batches (prompt chunks and decodes) of up to `max_cuda_graph_size` tokens. A
             mixed batch's attention depends on how tokens split into requests, which a graph
             cannot vary, so only the pieces *between* attention calls are captured — at
             bucketed token counts 16, 32, 64, ... — and attention runs eagerly between them:

                 [embed .. qkv, rope]  attn_0  [o_proj .. mlp .. qkv, rope]  attn_1  ...  [.. norm]
                  graph 0              eager    graph 1                       eager        graph L

             The split needs nothing from the model: during capture a stand-in attention backend
             ends the current graph at each attention call, notes the call's (static) q, k, v
             and output tensors, and begins the next graph.

All graphs share one memory pool and are captured largest first, so smaller ones reuse the
larger ones' intermediate memory. Inputs are the static buffers of `DeviceInputs`; outputs are
tensors the graphs write in place, valid until the next replay.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from lmserve.attention.backend import AttentionBackend, AttentionMetadata, ForwardContext
from lmserve.worker.device_inputs import DeviceInputs
from lmserve.worker.input_batch import FlatInputs

logger = logging.getLogger(__name__)


def decode_graph_sizes(max_size: int) -> list[int]:
    """Batch sizes of the full (decode) graphs: 1, 2, 4, every multiple of 8 up to 256, then
    every multiple of 16 (vLLM's capture sizes): above 256 a batch pads by under 6%, and a
    start-up with 512 as the largest captures 51 graphs instead of 67."""
    sizes = [s for s in (1, 2, 4) if s <= max_size]
    return sizes + list(range(8, min(max_size, 256) + 1, 8)) + list(range(272, max_size + 1, 16))


def piecewise_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts of the piecewise graphs: powers of two from 16 (at most 2x padding)."""
    sizes, size = [], 16
    while size <= max_tokens:
        sizes.append(size)
        size *= 2
    return sizes


@dataclass(slots=True)
class _AttentionCall:
    """One attention call of a piecewise graph: static tensors sized for the graph."""

    query: torch.Tensor  # [size, num_heads, head_dim]
    key: torch.Tensor  # [size, num_kv_heads, head_dim]
    value: torch.Tensor  # [size, num_kv_heads, head_dim]
    kv_cache: tuple[torch.Tensor, torch.Tensor]
    scale: float
    out: torch.Tensor  # [size, num_heads, head_dim], read by the next piece
    rope: tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin) [size, head_dim], or None


class _FullGraph:
    def __init__(
        self, graph: torch.cuda.CUDAGraph, output: torch.Tensor, logits: torch.Tensor | None
    ) -> None:
        self.graph = graph
        self.output = output  # [size, hidden_size]
        self.logits = logits  # [size, vocab] float32, or None: the graph has no LM head

    def replay(self, num_tokens: int) -> torch.Tensor:  # [num_tokens, hidden_size]
        self.graph.replay()
        return self.output[:num_tokens]


class _PiecewiseGraph:
    def __init__(self, graphs, calls: list[_AttentionCall], output: torch.Tensor) -> None:
        assert len(graphs) == len(calls) + 1
        self.graphs = graphs
        self.calls = calls
        self.output = output  # [size, hidden_size]

    def replay(
        self, backend: AttentionBackend, metadata: AttentionMetadata, num_tokens: int
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        n = num_tokens
        for graph, call in zip(self.graphs, self.calls):
            graph.replay()
            rope = None if call.rope is None else (call.rope[0][:n], call.rope[1][:n])
            backend.forward(
                call.query[:n], call.key[:n], call.value[:n], call.kv_cache, metadata,
                call.scale, out=call.out[:n], rope=rope,
            )  # fmt: skip
        self.graphs[-1].replay()
        return self.output[:n]


class _GraphSplitter(AttentionBackend):
    """Stands in for the attention backend while a piecewise graph is captured: each call
    closes the graph being captured and opens the next one. Nothing runs during capture."""

    name = "graph-splitter"

    def __init__(self, pool) -> None:
        self.pool = pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.calls: list[_AttentionCall] = []

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.graphs.append(graph)

    def end(self) -> None:
        self.graphs[-1].capture_end()

    def forward(self, query, key, value, kv_cache, metadata, scale, out=None, rope=None):
        out = torch.empty_like(query)  # in the pool, kept alive by the call record
        self.end()
        self.calls.append(_AttentionCall(query, key, value, kv_cache, scale, out, rope))
        self.begin()
        return out


class CudaGraphRunner:
    """Owns the captured graphs of one model and picks the one a step can use."""

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: DeviceInputs,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_backend: AttentionBackend,
        decode_sizes: list[int],
        piecewise_sizes: list[int],
        verify_sizes: list[int] = (),
        verify_query_len: int = 1,
        decode_logits_max: int = 0,
        shared_prefix_sizes: list[int] = (),
    ) -> None:
        """`decode_logits_max`: decode graphs of up to this many requests also compute the
        logits (`model.compute_logits`), which `forward` then returns. `shared_prefix_sizes`:
        batch sizes of the shared-prefix decode graphs (steps with `flat.shared_prefix_len`)."""
        self.model = model
        self.inputs = inputs
        self.kv_caches = kv_caches
        self.attn_backend = attn_backend
        self.decode_sizes = sorted(decode_sizes)
        self.piecewise_sizes = sorted(piecewise_sizes)
        self.verify_sizes = sorted(verify_sizes)
        self.verify_query_len = verify_query_len  # 1 + k: tokens per request of a verify graph
        self.decode_logits_max = decode_logits_max
        self.shared_prefix_sizes = sorted(shared_prefix_sizes)
        if self.verify_sizes and verify_query_len < 2:
            raise ValueError(f"verify graphs need 2+ tokens per request, not {verify_query_len}")
        # Every captured size must fit the static buffers it reads.
        max_decode = min(inputs.max_num_reqs, inputs.max_num_tokens)
        for sizes in (self.decode_sizes, self.shared_prefix_sizes):
            if sizes and sizes[-1] > max_decode:
                raise ValueError(f"decode graph size {sizes[-1]} > {max_decode}")
        max_verify = min(inputs.max_num_reqs, inputs.max_num_tokens // verify_query_len)
        if self.verify_sizes and self.verify_sizes[-1] > max_verify:
            raise ValueError(f"verify graph size {self.verify_sizes[-1]} > {max_verify}")
        if self.piecewise_sizes and self.piecewise_sizes[-1] > inputs.max_num_tokens:
            raise ValueError(
                f"piecewise graph size {self.piecewise_sizes[-1]} > {inputs.max_num_tokens}"
            )
        self.full: dict[int, _FullGraph] = {}
        self.verify: dict[int, _FullGraph] = {}  # by batch size (requests)
        self.shared: dict[int, _FullGraph] = {}  # shared-prefix decode graphs, by batch size
        self.piecewise: dict[int, _PiecewiseGraph] = {}
        self.pool = None

    # ---- capture ------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        self.pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.verify_sizes):  # the largest token counts first
            self.verify[size] = self._capture_full(size, self.verify_query_len)
        for size in reversed(self.decode_sizes):
            self.full[size] = self._capture_full(size, logits=size <= self.decode_logits_max)
        for size in reversed(self.shared_prefix_sizes):
            logits = size <= self.decode_logits_max
            self.shared[size] = self._capture_full(size, logits=logits, shared_prefix=True)
        for size in reversed(self.piecewise_sizes):
            self.piecewise[size] = self._capture_piecewise(size)
        torch.cuda.synchronize()
        used = free_before - torch.cuda.mem_get_info()[0]
        extra = f", {len(self.shared)} shared-prefix decode" if self.shared else ""
        if self.verify:
            extra += f", {len(self.verify)} verify ({self.verify_query_len} tokens per request, "
            extra += f"batch sizes {_span(self.verify_sizes)})"
        logger.info(
            "captured %d full (decode batch sizes %s)%s and %d piecewise CUDA graph sets "
            "(token counts %s) in %.2f s, %.2f GiB",
            len(self.full),
            _span(self.decode_sizes),
            extra,
            len(self.piecewise),
            _span(self.piecewise_sizes),
            time.perf_counter() - start,
            used / (1 << 30),
        )

    def _run(self, num_tokens: int, backend: AttentionBackend, metadata: AttentionMetadata):
        ctx = ForwardContext(metadata, self.kv_caches, backend)
        ids = self.inputs.input_ids.device[:num_tokens]
        pos = self.inputs.positions.device[:num_tokens]
        return self.model(ids, pos, ctx)  # [num_tokens, hidden_size]

    def _capture_full(
        self, size: int, query_len: int = 1, logits: bool = False, shared_prefix: bool = False
    ) -> _FullGraph:
        """A whole forward of `size` requests with `query_len` tokens each (1: decode), and the
        logits of every token if `logits`; with shared-prefix attention if `shared_prefix`."""
        num_tokens = size * query_len
        # The padding inputs are uploaded before capture: a copy inside it would be replayed.
        verify_len = query_len if query_len > 1 else None
        metadata = self.inputs.padded_metadata(num_tokens, size, verify_len, shared_prefix)

        def forward() -> tuple[torch.Tensor, torch.Tensor | None]:
            hidden = self._run(num_tokens, self.attn_backend, metadata)
            return hidden, self.model.compute_logits(hidden) if logits else None

        forward()  # warm-up: compiles, inits cuBLAS
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output, out_logits = forward()
        return _FullGraph(graph, output, out_logits)

    def _capture_piecewise(self, size: int) -> _PiecewiseGraph:
        metadata = self.inputs.padded_metadata(size, min(size, self.inputs.max_num_reqs))
        self._run(size, self.attn_backend, metadata)  # warm-up
        torch.cuda.synchronize()
        splitter = _GraphSplitter(self.pool)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            splitter.begin()
            output = self._run(size, splitter, metadata)
            splitter.end()
        torch.cuda.current_stream().wait_stream(stream)
        return _PiecewiseGraph(splitter.graphs, splitter.calls, output)

    # ---- replay -------------------------------------------------------------------------------
    def forward(self, flat: FlatInputs) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Run the step's forward from a graph, or return None when no graph fits (then the
        caller runs eagerly). Returns the hidden states [num_tokens, hidden_size] and, from a
        decode graph that has an LM head, the logits [num_tokens, vocab] (else None)."""
        num_tokens, num_reqs = len(flat.input_ids), len(flat.req_rows)
        if num_tokens == num_reqs:  # decode only
            graphs, sizes = self.full, self.decode_sizes
            if flat.shared_prefix_len and self.shared_prefix_sizes:
                graphs, sizes = self.shared, self.shared_prefix_sizes
            size = _bucket(sizes, num_reqs)
            if size is not None:
                self.inputs.upload(flat, size, size)
                graph = graphs[size]
                hidden = graph.replay(num_tokens)
                return hidden, None if graph.logits is None else graph.logits[:num_tokens]
        elif self.verify_sizes and self.fits_verify_graph(flat):
            size = _bucket(self.verify_sizes, num_reqs)
            if size is not None:
                self.inputs.upload(flat, size * self.verify_query_len, size, empty_padding=True)
                return self.verify[size].replay(num_tokens), None
        size = _bucket(self.piecewise_sizes, num_tokens)
        if size is None:
            return None
        # Tokens past num_tokens in the static buffers are stale but valid ids and positions:
        # the pieces are row-wise, so those rows never touch the real ones.
        _, _, metadata = self.inputs.stage(flat, num_tokens, num_reqs)
        return self.piecewise[size].replay(self.attn_backend, metadata, num_tokens), None

    def fits_verify_graph(self, flat: FlatInputs) -> bool:
        """Every request schedules at most `verify_query_len` tokens (a verify step; also a
        mix of decodes and short prompt chunks, which the graph computes the same way)."""
        return int(np.diff(flat.query_start_loc).max()) <= self.verify_query_len


def _bucket(sizes: list[int], n: int) -> int | None:
    """The smallest size >= n, or None."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def _span(sizes: list[int]) -> str:
    return f"{sizes[0]}..{sizes[-1]}" if sizes else "none"
