"""The small-batch GEMV (lmserve/model/layers/gemv.py): on the GPU against a float32 reference at
the Llama-3-8B and Qwen2.5-0.5B weight shapes, every split-K path, and CUDA-graph replay; on the
CPU (no triton needed) its dispatch rules and launch heuristics."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from lmserve.model.layers.gemv import (
    GEMV_MAX_ROWS,
    GemvConfig,
    _split_k_tickets,
    gemv_config,
    gemv_linear,
    gemv_silu_and_mul,
    gemv_supports,
    linear,
    use_gemv,
)

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs CUDA and triton",
)

# Relative error ‖gemv − ref‖ / ‖ref‖ against the float32 reference. The kernel sums in float32
# and rounds once to the dtype, so each output is within the unit roundoff u of the exact value
# (bf16: u = 2^-8 ≈ 3.9e-3, fp16: 2^-11 ≈ 4.9e-4), plus float32 summation-order differences.
MAX_REL = {torch.bfloat16: 4e-3, torch.float16: 6e-4}

# (out_features, in_features) of each linear layer; lm_head rows scaled down 8x (odd, so the last
# row block is partial).
SHAPES = {
    "8b_qkv": (6144, 4096),
    "8b_o_proj": (4096, 4096),
    "8b_gate_up": (28672, 4096),
    "8b_down": (4096, 14336),
    "8b_lm_head": (128256 // 8 + 5, 4096),
    "0.5b_qkv": (1152, 896),
    "0.5b_o_proj": (896, 896),
    "0.5b_gate_up": (9728, 896),
    "0.5b_down": (896, 4864),
    "0.5b_lm_head": (151936 // 8 + 3, 896),
    "tp8_qkv": (768, 4096),  # a tensor-parallel shard: small N, split-K
    "ragged": (1000, 904),  # N % 16 != 0, K % 16 == 8: masked K tail, no 16-divisible stride
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _problem(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    """x [m, k], W [n, k] scaled so outputs are ~N(0, 1), and a bias [n] or None."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype, generator=gen) if bias else None
    return x, w, b


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    ref = x.float() @ w.float().T  # [m, n] float32 (TF32 is off: see the fixture)
    return ref + b.float() if b is not None else ref


@pytest.fixture(autouse=True)
def _no_tf32():
    """A float32 reference, not a TF32 one (10-bit mantissa), whatever another test set."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


# --- GPU ---------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", range(1, GEMV_MAX_ROWS + 1))
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_float32_reference_bf16(shape, m, bias):
    n, k = SHAPES[shape]
    x, w, b = _problem(m, n, k, torch.bfloat16, bias)
    out = gemv_linear(x, w, b)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert _rel(out, _reference(x, w, b)) <= MAX_REL[torch.bfloat16]


@needs_cuda
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("shape", ["8b_o_proj", "0.5b_down", "ragged"])
def test_gemv_matches_float32_reference_fp16(shape, m, bias):
    n, k = SHAPES[shape]
    x, w, b = _problem(m, n, k, torch.float16, bias)
    out = gemv_linear(x, w, b)
    assert out.dtype == torch.float16
    assert _rel(out, _reference(x, w, b)) <= MAX_REL[torch.float16]


# Launch shapes the heuristic may not pick for these sizes: split-K that does not divide the K
# blocks, more splits than K blocks, wide and narrow tiles, deep and shallow pipelines.
CONFIGS = [
    GemvConfig(block_n=16, block_k=64, split_k=1, num_warps=2, num_stages=2),
    GemvConfig(block_n=16, block_k=256, split_k=3, num_warps=2, num_stages=4),
    GemvConfig(block_n=32, block_k=128, split_k=2, num_warps=4, num_stages=3),
    GemvConfig(block_n=64, block_k=512, split_k=16, num_warps=8, num_stages=3),
    GemvConfig(block_n=16, block_k=128, split_k=1, num_warps=4, num_stages=8),
]


@needs_cuda
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("shape", ["8b_o_proj", "0.5b_down", "ragged"])
@pytest.mark.parametrize("m", [1, 5, 8])
def test_gemv_any_config_matches_float32_reference(config, shape, m):
    n, k = SHAPES[shape]
    x, w, b = _problem(m, n, k, torch.bfloat16, bias=True)
    assert _rel(gemv_linear(x, w, b, config), _reference(x, w, b)) <= MAX_REL[torch.bfloat16]


@needs_cuda
def test_split_k_sums_in_a_fixed_order_and_leaves_its_tickets_at_zero():
    """Whichever split finishes last adds the partials in split order: the same inputs give
    the same bits on every call, and every row block's ticket counter is back to zero."""
    x, w, b = _problem(4, 896, 4864, torch.bfloat16, bias=True)
    config = GemvConfig(block_n=16, block_k=256, split_k=8, num_warps=2, num_stages=4)
    first = gemv_linear(x, w, b, config)
    for _ in range(20):
        assert torch.equal(gemv_linear(x, w, b, config), first)
    assert int(_split_k_tickets(x.device).abs().sum()) == 0


def _gated_reference(x, w, b):
    """The unfused path in the dtype: the projection rounded, then silu, then the product."""
    gate_up = _reference(x, w, b).to(x.dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# (2 * intermediate, hidden) of the gated MLPs, and a small-N shard that splits K.
GATED_SHAPES = {
    "8b": (2 * 14336, 4096),
    "0.5b": (2 * 4864, 896),
    "tp8_8b": (2 * 1792, 4096),
    "ragged": (2 * 1000, 904),
}


@needs_cuda
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("shape", GATED_SHAPES)
def test_gated_gemv_matches_projection_then_silu_and_mul(shape, m, bias):
    n2, k = GATED_SHAPES[shape]
    x, w, b = _problem(m, n2, k, torch.bfloat16, bias)
    out = gemv_silu_and_mul(x, w, b)
    assert out.shape == (m, n2 // 2) and out.dtype == torch.bfloat16
    assert _rel(out, _gated_reference(x, w, b)) <= MAX_REL[torch.bfloat16]


def _gated_fits(c: GemvConfig) -> bool:  # a gated stage holds two weight tiles
    return (c.num_stages - 1) * (16 + 2 * c.block_n) * c.block_k * 2 <= 200 << 10


@needs_cuda
@pytest.mark.parametrize("config", [c for c in CONFIGS if _gated_fits(c)], ids=str)
def test_gated_gemv_any_config_matches(config):
    x, w, b = _problem(3, 2 * 1000, 904, torch.bfloat16, bias=True)
    got = gemv_silu_and_mul(x, w, b, config)
    assert _rel(got, _gated_reference(x, w, b)) <= MAX_REL[torch.bfloat16]
    assert int(_split_k_tickets(x.device).abs().sum()) == 0


@needs_cuda
@pytest.mark.parametrize(
    "config",
    [None, GemvConfig(block_n=16, block_k=256, split_k=4, num_warps=2, num_stages=4)],
    ids=["heuristic", "split_k"],
)
@pytest.mark.parametrize("m", [1, 8])
def test_gemv_replays_in_a_cuda_graph_with_new_inputs(config, m):
    n, k = SHAPES["0.5b_down"]
    x, w, b = _problem(m, n, k, torch.bfloat16, bias=True)
    static_x = x.clone()  # [m, k]: the graph reads this buffer on every replay
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        gemv_linear(static_x, w, b, config)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = gemv_linear(static_x, w, b, config)  # [m, n]
    for seed in range(1, 4):
        new_x, _, _ = _problem(m, n, k, torch.bfloat16, bias=False, seed=seed)
        static_x.copy_(new_x)
        graph.replay()
        assert _rel(static_out, _reference(new_x, w, b)) <= MAX_REL[torch.bfloat16]
    assert int(_split_k_tickets(x.device).abs().sum()) == 0


@needs_cuda
@pytest.mark.parametrize("gated", [False, True])
def test_programmatic_dependent_launch_changes_no_bit(monkeypatch, gated):
    """With PDL the kernel waits for the previous one before touching its inputs and prefetches
    weights into L2 first: the results are the same bits as without it, back to back too."""
    fn = gemv_silu_and_mul if gated else gemv_linear
    x, w, b = _problem(3, 2 * 1000 if gated else 896, 4864 if not gated else 904, torch.bfloat16,
                       bias=True)  # fmt: skip
    monkeypatch.setenv("LMSERVE_DISABLE_PDL", "1")
    expected = [fn(x, w, b) for _ in range(3)]
    monkeypatch.setenv("LMSERVE_DISABLE_PDL", "0")
    got = [fn(x, w, b) for _ in range(3)]
    assert all(torch.equal(a, e) for a, e in zip(got, expected))


@needs_cuda
def test_linear_takes_the_gemv_for_few_rows_and_f_linear_otherwise(monkeypatch):
    monkeypatch.delenv("LMSERVE_DISABLE_GEMV", raising=False)
    x, w, b = _problem(GEMV_MAX_ROWS + 1, 4096, 4096, torch.bfloat16, bias=True)
    assert use_gemv(x[:1], w) and not use_gemv(x, w)
    assert _rel(linear(x[:1], w, b), _reference(x[:1], w, b)) <= MAX_REL[torch.bfloat16]
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))  # 9 rows: cuBLAS
    assert not use_gemv(x[:1].float(), w.float())
    monkeypatch.setenv("LMSERVE_DISABLE_GEMV", "1")
    assert not use_gemv(x[:1], w)
    assert torch.equal(linear(x[:1], w, b), F.linear(x[:1], w, b))


# --- CPU (no triton needed) --------------------------------------------------------------------


def _cpu(m: int = 1, k: int = 64, dtype: torch.dtype = torch.bfloat16):
    return torch.randn(m, k).to(dtype), torch.randn(32, k).to(dtype)


def test_gemv_supports_few_rows_of_bf16_or_fp16():
    for dtype in (torch.bfloat16, torch.float16):
        for m in range(1, GEMV_MAX_ROWS + 1):
            assert gemv_supports(*_cpu(m, dtype=dtype))


@pytest.mark.parametrize(
    "case",
    ["float32", "too_many_rows", "no_rows", "k_not_multiple_of_8", "strided_x", "3d_x", "mixed"],
)
def test_gemv_supports_rejects(case):
    x, w = _cpu()
    if case == "float32":
        x, w = x.float(), w.float()
    elif case == "too_many_rows":
        x = torch.randn(GEMV_MAX_ROWS + 1, 64).bfloat16()
    elif case == "no_rows":
        x = x[:0]
    elif case == "k_not_multiple_of_8":
        x, w = _cpu(k=68)
    elif case == "strided_x":
        x = torch.randn(1, 128).bfloat16()[:, ::2]
    elif case == "3d_x":
        x = x[None]
    elif case == "mixed":
        w = w.half()
    assert not gemv_supports(x, w)
    assert not use_gemv(x, w)


def test_use_gemv_is_false_on_cpu():
    x, w = _cpu()
    assert gemv_supports(x, w) and not use_gemv(x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, GEMV_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_on_cpu_is_f_linear(dtype, m, bias):
    x, w = _cpu(m, dtype=dtype)
    b = torch.randn(32).to(dtype) if bias else None
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(linear(x[None], w, b), F.linear(x[None], w, b))  # [..., K] too


@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_config_is_a_valid_launch(shape, m):
    n, k = SHAPES[shape]
    c = gemv_config(m, n, k, num_sms=132)
    k_blocks = -(-k // c.block_k)
    assert c.block_n >= 16 and c.block_k >= 64 and 1 <= c.split_k <= 16
    assert k % c.block_k == 0 or k % 64 != 0  # the K tail is masked only when it must be
    if c.split_k > 1:  # every split fills its pipeline (num_stages - 1 tiles in flight)
        assert -(-k_blocks // c.split_k) >= c.num_stages - 1
    assert c.smem_bytes() <= 160 << 10  # fits an SM (and an A100's) with room to spare


@pytest.mark.parametrize("shape", SHAPES)
def test_config_keeps_every_program_in_one_wave_when_it_deepens(shape):
    """5 or 6 stages only where all programs still fit on the GPU at once."""
    n, k = SHAPES[shape]
    for gated, tiles in ((False, 1), (True, 2)):
        c = gemv_config(1, 2 * n if gated else n, k, num_sms=132, gated=gated)
        if c.num_stages in (5, 6):
            programs = -(-n // c.block_n) * c.split_k
            assert programs <= 132 * c.programs_per_sm(weight_tiles=tiles), (shape, gated, c)
        assert c.smem_bytes(weight_tiles=tiles) <= 200 << 10


def test_config_deepens_the_pipeline_where_the_h100_sweep_found_it_faster():
    """The picks benchmarks/results/gemv_sweep_h100.json measured fastest on an H100."""
    assert gemv_config(1, *SHAPES["8b_o_proj"], num_sms=132).num_stages == 6
    assert gemv_config(1, *SHAPES["8b_qkv"], num_sms=132).num_stages == 5
    assert gemv_config(1, *SHAPES["0.5b_gate_up"], num_sms=132).num_stages == 6
    down = gemv_config(1, *SHAPES["0.5b_down"], num_sms=132)
    assert (down.split_k, down.num_stages) == (4, 6)
    gate_up = gemv_config(1, *SHAPES["8b_gate_up"], num_sms=132, gated=True)
    assert (gate_up.split_k, gate_up.num_stages) == (2, 4)


def test_config_splits_k_only_for_small_n_with_large_k():
    """Large-N layers fill the GPU by rows; small N with long K rows splits; small weights
    (read in about a launch latency) never pay for partial sums."""
    for shape in ["8b_qkv", "8b_o_proj", "8b_gate_up", "8b_down", "8b_lm_head", "0.5b_gate_up"]:
        assert gemv_config(1, *SHAPES[shape], num_sms=132).split_k == 1, shape
    for shape in ["0.5b_down", "tp8_qkv"]:
        c = gemv_config(1, *SHAPES[shape], num_sms=132)
        assert c.split_k > 1 and -(-SHAPES[shape][0] // c.block_n) * c.split_k >= 132, shape
    for shape in ["0.5b_qkv", "0.5b_o_proj"]:
        assert gemv_config(1, *SHAPES[shape], num_sms=132).split_k == 1, shape
