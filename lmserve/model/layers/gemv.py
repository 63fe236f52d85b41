"""A Triton GEMV for small-batch decode: y = x W^T (+ b) for 1..GEMV_MAX_ROWS rows of activations,
a drop-in for `F.linear` that streams the weight at close to memory bandwidth.

Why: batch-1 decode of a Llama-3-8B shape reads every weight once per token (16 GB) and does ~2
flops per weight byte, so a linear layer takes (weight bytes) / (achieved bandwidth). cuBLAS's
GEMVs reach ~77-80% of copy bandwidth on an H100. What decides the rest is how many bytes each SM
keeps in flight (bandwidth x latency: ~3 MB over the chip), which this kernel is shaped for.

Design: one program per [BLOCK_N outputs] x [one K range]; a K loop over [BLOCK_N, BLOCK_K] tiles.

          K -> (contiguous)
    W  +-----------+-----------+-----------+
  N |  |  split 0  |  split 1  |  split 2  |  <- pid_n: BLOCK_N rows; pid_k: its K range
  | |  |===========|===========|===========|     (SPLIT_K programs per row block)
  v |  |           |           |           |
       +-----------+-----------+-----------+
    per iteration:  acc[16, BLOCK_N] += x[16, BLOCK_K] @ w[BLOCK_N, BLOCK_K]^T   (tl.dot)

- The tiles go through `tl.dot`, with x padded to the 16 rows of the smallest MMA (rows past M
  are masked: zeros that are never read from memory). The tensor cores' waste is free here, and
  it is what buys bandwidth: Triton pipelines loads that feed a dot as asynchronous copies into
  shared memory (cp.async, `num_stages` - 1 tiles ahead), so bytes in flight are bounded by
  shared memory rather than by registers or occupancy -- the limit of an FMA-and-reduce GEMV
  (register loads: one tile per warp outstanding, at most 2048 threads per SM). The same loop
  serves M = 1..8 at about the same cost: the weight is read once whatever M is.
- Copies are 16 bytes: K % 8 == 0 and the kernel gets K as 8 * (K // 8), so the compiler can
  prove each row starts on a 16-byte boundary (Triton infers that on its own only for K % 16 ==
  0), and the K-tail mask (only when K % BLOCK_K != 0, EVEN_K) is constant over 8 elements.
- Rows past N are clamped to the last row instead of masked (the store drops them): no row mask
  on the weight copies.
- Split-K when the row blocks alone are too few (fewer programs than SMs, or too few bytes in
  flight: small N with large K -- Qwen's down projection, tensor-parallel shards): each split
  writes float32 partial sums to a [SPLIT_K, M, N] workspace, then takes a ticket (an atomic
  counter per row block); the split that draws the last ticket adds all partials in split order
  (deterministic: the order never depends on which split finished last), adds the bias, casts,
  and resets the counter to zero. One launch, where a separate reduce kernel would cost a second
  launch (~2 us, which is what a whole small GEMV takes at batch 1). Weights under
  `_SPLIT_K_MIN_BYTES` are read in about a launch latency; they never split.
- Gated variant (`gemv_silu_and_mul`): each program also reads the up-projection rows that match
  its gate rows and writes silu(gate) * up, so a SwiGLU MLP's activation costs no extra kernel.
- CUDA-graph capturable: no host syncs; the output and the split-K workspace come from the
  caching allocator (the graph's pool under capture), as `F.linear`'s own output does; the
  ticket counters are one persistent buffer per device, zero between launches.

Numerics: float32 sums of the exact bf16/fp16 products, the bias added in float32, one rounding to
the dtype at the end -- what cuBLAS does, up to summation order. tests/model/test_gemv.py bounds
the relative error against a float32 reference.

`linear(x, weight, bias)` is the entry point for layers: `gemv_linear` where `use_gemv(x, weight)`
holds (CUDA, triton installed, bf16/fp16, few rows; `LMSERVE_DISABLE_GEMV=1` turns it off), else
`F.linear`. Importing this module does not import triton.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import torch
import torch.nn.functional as F

from lmserve import envs
from lmserve.triton_utils import pdl_launch_options, ticket_counters

GEMV_MAX_ROWS = 8  # above this a GEMM (cuBLAS) starts to reuse each weight load across rows
_DTYPES = (torch.bfloat16, torch.float16)
_BLOCK_M = 16  # the smallest M of an MMA: x is padded to 16 rows
# Heuristic constants (H100; benchmarks/gemv_bench.py --sweep measures the alternatives):
_TARGET_BYTES_IN_FLIGHT = 6 << 20  # ~2x the H100's bandwidth x loaded latency (~3 TB/s x ~1 us)
_SPLIT_K_MIN_BYTES = 4 << 20  # read in ~1.3 us: splitting would not pay for its partials
_MAX_SPLIT_K = 16  # the workspace is SPLIT_K x M x N float32 and the reduce reads all of it
_SMEM_PER_SM = 200 << 10  # shared memory for resident programs (H100: 228 KB; A100: 164 KB)


@dataclasses.dataclass(frozen=True, slots=True)
class GemvConfig:
    """Launch shape of `gemv_kernel`; `gemv_config` picks one per (M, N, K)."""

    block_n: int  # outputs per program: power of 2, >= 16 (tl.dot)
    block_k: int  # K elements per loop iteration: power of 2, >= 64
    split_k: int  # programs that share one row block, each over its own K range
    num_warps: int
    num_stages: int  # tiles in the copy pipeline (num_stages - 1 in flight per program)

    def __post_init__(self) -> None:
        for v in (self.block_n, self.block_k, self.num_warps):
            assert v > 0 and v & (v - 1) == 0, f"not a power of 2: {self}"
        assert self.block_n >= 16 and self.block_k >= 64, self
        assert self.split_k >= 1 and self.num_stages >= 2, self  # 1 would not pipeline

    def smem_bytes(self, elem_bytes: int = 2, weight_tiles: int = 1) -> int:
        """Shared memory of the copy pipeline: Triton keeps num_stages - 1 (x, w) tile buffers
        (`weight_tiles` = 2 for the gated kernel: gate and up rows)."""
        rows = _BLOCK_M + weight_tiles * self.block_n
        return (self.num_stages - 1) * rows * self.block_k * elem_bytes

    def programs_per_sm(self, elem_bytes: int = 2, weight_tiles: int = 1) -> int:
        """Programs that fit on one SM at once, by shared memory."""
        return max(1, _SMEM_PER_SM // self.smem_bytes(elem_bytes, weight_tiles))

    def bytes_in_flight(
        self, n: int, num_sms: int, elem_bytes: int = 2, weight_tiles: int = 1
    ) -> int:
        """Weight bytes being fetched at once over the chip, from resident programs (`n`
        outputs)."""
        programs = _cdiv(n, self.block_n) * self.split_k
        resident = min(programs, num_sms * self.programs_per_sm(elem_bytes, weight_tiles))
        tile_bytes = weight_tiles * self.block_n * self.block_k * elem_bytes
        return resident * (self.num_stages - 1) * tile_bytes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemv_config(
    m: int, n: int, k: int, num_sms: int, elem_bytes: int = 2, gated: bool = False
) -> GemvConfig:
    """Heuristic launch shape for x [m, k] @ W[n, k]^T on a GPU with `num_sms` SMs (`gated`:
    W holds gate and up rows, n // 2 outputs; each program reads both tiles).

    - block_n 16: the most programs for a given N; with 2 warps each warp owns one 16 x 8 MMA
      column of the output, so no warp re-reads the tile from shared memory (4 warps would
      split 16 x 16 as 2 x 2 and read everything twice).
    - block_k the largest of 256/128/64 dividing K (no tail mask): 4-8 KB of weight per stage.
    - split_k doubles (at 4 stages) while the grid has fewer programs than SMs or fewer than
      `_TARGET_BYTES_IN_FLIGHT` bytes in flight, as long as each split keeps >= num_stages
      iterations (a pipeline to fill). Never below `_SPLIT_K_MIN_BYTES` of weight: there, with
      fewer programs than SMs, up to 8 stages put a program's whole K range in flight at once.
    - Then the pipeline deepens to 6 or 5 stages where every program still fits on the GPU at
      once (one wave): more bytes in flight per program, no second wave. On an H100 this took
      the 8B shape's o_proj from 75% to 87% of copy bandwidth, qkv from 82% to 92%, and
      Qwen2.5-0.5B's gate_up from 54% to 71% (benchmarks/results/gemv_sweep_h100.json).
    - A gated GEMV that still needs several waves splits K in two (measured on the 8B shape).
    m does not change the pick: x is padded to 16 rows, and the weight traffic is the same.
    """
    del m
    tiles = 2 if gated else 1
    n_out = n // tiles
    block_k = next((bk for bk in (256, 128, 64) if k % bk == 0), 256)
    config = GemvConfig(block_n=16, block_k=block_k, split_k=1, num_warps=2, num_stages=4)
    k_blocks = _cdiv(k, block_k)
    if n * k * elem_bytes < _SPLIT_K_MIN_BYTES:
        if _cdiv(n_out, config.block_n) < num_sms:  # latency-bound: all of K in flight at once
            config = dataclasses.replace(config, num_stages=min(8, k_blocks + 1))
        return config
    while (
        config.split_k < _MAX_SPLIT_K
        and k_blocks // (2 * config.split_k) >= config.num_stages
        and (
            _cdiv(n_out, config.block_n) * config.split_k < num_sms
            or config.bytes_in_flight(n_out, num_sms, elem_bytes, tiles) < _TARGET_BYTES_IN_FLIGHT
        )
    ):
        config = dataclasses.replace(config, split_k=2 * config.split_k)
    programs = _cdiv(n_out, config.block_n) * config.split_k
    iterations = _cdiv(k_blocks, config.split_k)
    for stages in (6, 5):
        deeper = dataclasses.replace(config, num_stages=stages)
        one_wave = programs <= num_sms * deeper.programs_per_sm(elem_bytes, tiles)
        if stages - 1 <= iterations and one_wave:
            return deeper
    if gated and config.split_k == 1 and k_blocks // 2 >= config.num_stages:
        # Several waves of large gated programs: halves of K make the last wave's tail
        # shorter (H100, 8B gate_up: 84.7 -> 81.5 us; the plain GEMV gained nothing from it).
        config = dataclasses.replace(config, split_k=2)
    return config


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemv_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The shapes, dtypes and layouts `gemv_linear` takes (on any device): x [M, K] contiguous
    with 1 <= M <= GEMV_MAX_ROWS, W [N, K] contiguous, both bf16 or both fp16, K % 8 == 0."""
    return (
        x.dim() == 2
        and weight.dim() == 2
        and 1 <= x.shape[0] <= GEMV_MAX_ROWS
        and x.shape[1] == weight.shape[1]
        and x.shape[1] % 8 == 0
        and x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and x.is_contiguous()
        and weight.is_contiguous()
        and weight.device == x.device
    )


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes the GEMV: CUDA tensors `gemv_supports`, triton installed, and not
    turned off with LMSERVE_DISABLE_GEMV=1."""
    return (
        x.is_cuda
        and gemv_supports(x, weight)
        and _triton_installed()
        and not envs.LMSERVE_DISABLE_GEMV
    )


def linear(
    x: torch.Tensor,  # [M, K] (or any [..., K] when the GEMV does not apply)
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N]
    """`F.linear`, through the GEMV kernel for a few rows on CUDA (`use_gemv`)."""
    if use_gemv(x, weight):
        return gemv_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def gemv_linear(
    x: torch.Tensor,  # [M, K] contiguous, M <= GEMV_MAX_ROWS, K % 8 == 0
    weight: torch.Tensor,  # [N, K] contiguous, x's dtype
    bias: torch.Tensor | None = None,  # [N] contiguous
    config: GemvConfig | None = None,  # None: `gemv_config`'s pick (benchmarks pass their own)
) -> torch.Tensor:  # [M, N] in x's dtype
    """x @ weight.T + bias on x's device, which must be the current CUDA device (Triton launches
    there); under TRITON_INTERPRET=1 CPU tensors work too, in fp16 (the interpreter emulates
    bf16 wrongly: its results are garbage)."""
    return _gemv(x, weight, bias, config, gated=False)


def gemv_silu_and_mul(
    x: torch.Tensor,  # [M, K] contiguous, M <= GEMV_MAX_ROWS, K % 8 == 0
    weight: torch.Tensor,  # [2D, K] contiguous: the gate rows, then the up rows
    bias: torch.Tensor | None = None,  # [2D] contiguous
    config: GemvConfig | None = None,
) -> torch.Tensor:  # [M, D] in x's dtype
    """silu(x W_gate^T + b_gate) * (x W_up^T + b_up): a gated MLP's first projection and its
    activation in one kernel. Each program reads the gate rows of its outputs and the matching up
    rows, so the [M, 2D] intermediate never reaches memory; the roundings are those of the
    unfused path (the projection to the dtype, then silu, then the product)."""
    assert weight.shape[0] % 2 == 0, weight.shape
    return _gemv(x, weight, bias, config, gated=True)


_MAX_ROW_BLOCKS = 4096  # split-K tickets: one per row block (lmserve.triton_utils)


def _split_k_tickets(device: torch.device) -> torch.Tensor:  # [_MAX_ROW_BLOCKS] int32
    return ticket_counters(device, "gemv_split_k", _MAX_ROW_BLOCKS)


@dataclasses.dataclass(frozen=True, slots=True)
class _Launch:
    """What a launch of `gemv_kernel` needs beyond its tensors, for one weight shape."""

    config: GemvConfig
    grid: tuple[int, int]  # (row blocks, splits)
    k_blocks_per_split: int
    even_k: bool
    prefetch_tiles: int


def _gemv(x, weight, bias, config: GemvConfig | None, gated: bool) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]  # outputs
    assert gemv_supports(x, weight), (x.shape, x.dtype, weight.shape, weight.dtype)
    assert bias is None or (bias.shape == weight.shape[:1] and bias.is_contiguous())
    num_sms = _num_sms(x.device.index) if x.is_cuda else 132  # CPU: TRITON_INTERPRET=1
    launch = _launch(weight.shape[0], k, num_sms, x.element_size(), gated, config)
    split_k = launch.grid[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)  # [M, N]
    partials = tickets = out  # not read without split-K
    if split_k > 1:
        width = 2 * n if gated else n
        partials = torch.empty((split_k, m, width), dtype=torch.float32, device=x.device)
        tickets = _split_k_tickets(x.device)
    config = launch.config
    _kernels()[launch.grid](
        x,
        weight,
        bias if bias is not None else weight,  # not read without HAS_BIAS
        out,
        partials,
        tickets,
        m,
        n,
        k // 8,
        launch.k_blocks_per_split,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=split_k,
        EVEN_K=launch.even_k,
        HAS_BIAS=bias is not None,
        GATED=gated,
        PREFETCH_TILES=launch.prefetch_tiles,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch_options(x),
    )
    return out


@functools.lru_cache(maxsize=4096)
def _launch(
    weight_rows: int, k: int, num_sms: int, elem_bytes: int, gated: bool, config: GemvConfig | None
) -> _Launch:
    """The launch shape for a weight of `weight_rows` x `k` (`config` None: `gemv_config`'s
    pick), worked out once per shape: the LM head runs eagerly every decode step, and this
    arithmetic cost more host time than the launch itself."""
    n = weight_rows // 2 if gated else weight_rows
    if config is None:
        config = gemv_config(1, weight_rows, k, num_sms, elem_bytes, gated)
    k_blocks = _cdiv(k, config.block_k)
    k_blocks_per_split = _cdiv(k_blocks, config.split_k)
    split_k = _cdiv(k_blocks, k_blocks_per_split)  # no empty split, whatever the config says
    row_blocks = _cdiv(n, config.block_n)
    if row_blocks > _MAX_ROW_BLOCKS:  # more row blocks than tickets: enough programs anyway
        split_k, k_blocks_per_split = 1, k_blocks
    return _Launch(
        config=config,
        grid=(row_blocks, split_k),
        k_blocks_per_split=k_blocks_per_split,
        even_k=k % config.block_k == 0,
        prefetch_tiles=min(config.num_stages - 1, k_blocks_per_split),
    )


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _prefetch_l2(ptrs):
        """Ask L2 to fetch the 128-byte lines at `ptrs` (no registers filled, nothing waits)."""
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; mov.u32 $0, 0;",
            "=r,l",
            [ptrs],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def gemv_kernel(
        x_ptr,  # [M, K] contiguous
        w_ptr,  # [N, K] contiguous; GATED: [2N, K], gate rows then up rows
        bias_ptr,  # [N] (GATED: [2N]), read only with HAS_BIAS
        out_ptr,  # [M, N] in x's dtype
        partials_ptr,  # SPLIT_K > 1: float32 partial sums [SPLIT_K, M, N] (GATED: [.., 2N])
        counters_ptr,  # SPLIT_K > 1: int32 [cdiv(N, BLOCK_N)], zero at rest
        M,
        N,
        K_DIV_8,  # K // 8: K = 8 * K_DIV_8 tells the compiler rows are 16-byte aligned
        k_blocks_per_split,
        BLOCK_M: tl.constexpr,  # 16 >= M: x rows past M are masked to zero
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask
        HAS_BIAS: tl.constexpr,
        GATED: tl.constexpr,  # out = silu(x W_gate^T) * (x W_up^T)
        PREFETCH_TILES: tl.constexpr,  # with USE_PDL: weight tiles sent to L2 before the wait
        USE_PDL: tl.constexpr,  # programmatic dependent launch (lmserve.triton_utils)
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        K = K_DIV_8 * 8
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
        ms = tl.arange(0, BLOCK_M)  # [BLOCK_M] activation rows
        cols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        # Rows past N re-read row N - 1 (dropped at the store): the weight copies need no mask.
        w_rows = tl.minimum(rows, N - 1).to(tl.int64)
        w_ptrs = w_ptr + w_rows[:, None] * K + cols[None, :]  # [BLOCK_N, BLOCK_K]
        wu_ptrs = w_ptrs + N.to(tl.int64) * K  # GATED: the matching up-projection rows
        x_ptrs = x_ptr + ms[:, None] * K + cols[None, :]  # [BLOCK_M, BLOCK_K]
        x_rows_ok = (ms < M)[:, None]  # [BLOCK_M, 1]
        kb_start = pid_k * k_blocks_per_split
        kb_end = tl.minimum(kb_start + k_blocks_per_split, tl.cdiv(K, BLOCK_K))
        if USE_PDL:
            # The weights never depend on the previous kernel: while it finishes, pull this
            # program's first tiles into L2, so the loop's first copies do not wait on DRAM.
            lines = tl.arange(0, BLOCK_K // 64)[None, :] * 64  # one address per 128 bytes
            for t in tl.static_range(PREFETCH_TILES):
                k_line = tl.minimum(kb_start + t, kb_end - 1) * BLOCK_K + lines
                _prefetch_l2(w_ptr + w_rows[:, None] * K + k_line)
                if GATED:
                    _prefetch_l2(w_ptr + (w_rows[:, None] + N) * K + k_line)
            tl.extra.cuda.gdc_wait()  # the previous kernel's writes are visible past this line
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # GATED only
        for kb in range(kb_start, kb_end):
            k = kb * BLOCK_K  # a visible multiple of BLOCK_K: the copies stay 16-byte aligned
            if EVEN_K:
                x = tl.load(x_ptrs + k, mask=x_rows_ok, other=0.0)
                w = tl.load(w_ptrs + k)
                if GATED:
                    w_up = tl.load(wu_ptrs + k)
            else:
                k_ok = (k + cols < K)[None, :]  # [1, BLOCK_K], constant over 8 elements
                x = tl.load(x_ptrs + k, mask=x_rows_ok & k_ok, other=0.0)
                w = tl.load(w_ptrs + k, mask=k_ok, other=0.0)
                if GATED:
                    w_up = tl.load(wu_ptrs + k, mask=k_ok, other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)  # [BLOCK_M, BLOCK_N], float32
            if GATED:
                acc_up = tl.dot(x, tl.trans(w_up), acc_up)
        out_mask = x_rows_ok & (rows < N)[None, :]  # [BLOCK_M, BLOCK_N]
        if SPLIT_K > 1:
            # Every split stores its partial sums; the split that arrives last (an atomic
            # ticket per row block) adds all of them in split order -- deterministic, and no
            # second kernel -- and resets the ticket for the next launch.
            width = 2 * N if GATED else N
            offs = (pid_k * M + ms[:, None]) * width + rows[None, :]  # [BLOCK_M, BLOCK_N]
            tl.store(partials_ptr + offs, acc, mask=out_mask)
            if GATED:
                tl.store(partials_ptr + offs + N, acc_up, mask=out_mask)
            tl.debug_barrier()  # all threads' partials before the ticket (release)
            ticket = tl.atomic_add(counters_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if ticket != SPLIT_K - 1:
                return
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            base = ms[:, None] * width + rows[None, :]
            for s in tl.static_range(SPLIT_K):  # a fixed order: the same sum on every call
                part_ptrs = partials_ptr + s * M * width + base
                acc += tl.load(part_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(part_ptrs + N, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(counters_ptr + pid_n, 0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
            if GATED:
                up_bias = tl.load(bias_ptr + N + rows, mask=rows < N, other=0.0)
                acc_up += up_bias.to(tl.float32)[None, :]
        dtype = out_ptr.dtype.element_ty
        if GATED:  # the roundings of the unfused path: gate_up to the dtype, silu, product
            gate = acc.to(dtype).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            out = (act * acc_up.to(dtype).to(tl.float32)).to(dtype)
        else:
            out = acc.to(dtype)
        tl.store(out_ptr + ms[:, None] * N + rows[None, :], out, mask=out_mask)

    return gemv_kernel
