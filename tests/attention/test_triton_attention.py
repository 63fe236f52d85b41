"""The Triton attention backend against the PyTorch reference (computed in float64), and the
engine on CUDA with it against HF transformers.

Runs on CUDA. Skipped without triton, and without CUDA unless TRITON_INTERPRET=1 (Triton's
interpreter then runs the kernels on CPU tensors: slow, but it debugs kernels off the GPU; the
engine tests still need CUDA).
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

from lmserve.attention.backend import AttentionMetadata  # noqa: E402
from lmserve.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from lmserve.attention.triton_backend import (  # noqa: E402
    LONG_QUERY_LEN,
    LONG_TILE,
    SHORT_TILE,
    TritonAttentionBackend,
    _split_tickets,
    triton_paged_attention,
    triton_write_kv_cache,
)
from lmserve.model.layers.rotary import rotate_half  # noqa: E402
from tests.engine.test_hf_parity import hf_greedy_with_top_k, top5_rule_holds  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="engine tests need CUDA")

# Relative error ‖out − ref‖ / ‖ref‖ against float64. Measured on an H200 (2026, triton 3.6):
# float32 (exact ieee dots) ~2.6e-7, fp16 ~2.4e-4, bf16 ~1.9e-3 (P is rounded to the input dtype
# for the P·V product).
MAX_REL_ERROR = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}

# (cached tokens before this step, query tokens this step) per request.
MIXED = [
    (0, 37),  # a whole prompt
    (50, 1),  # decode
    (33, 17),  # a chunk continuing a cached prefix
    (0, 1),  # a one-token prompt
    (100, 1),  # decode
    (16, 16),  # a chunk starting on a block boundary
    (5, 70),  # a long chunk after a short prefix
    (200, 3),  # a short chunk after a long prefix
]
DECODE = [(n, 1) for n in (0, 15, 16, 17, 63, 130, 257, 1000)]


def make_batch(
    specs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    seed: int = 0,
):
    """Random query/key/value for `specs` and a random-filled paged cache whose block tables
    are shuffled, non-contiguous block ids (padding entries 0, as the model runner pads)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in specs]
    blocks_per_req = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_req) + 11  # spare blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(specs), max(blocks_per_req), dtype=torch.int32)
    slot_mapping, query_start_loc = [], [0]
    for i, ((context, q_len), n) in enumerate(zip(specs, blocks_per_req)):
        ids = [perm.pop() for _ in range(n)]
        block_tables[i, :n] = torch.tensor(ids, dtype=torch.int32)
        for pos in range(context, context + q_len):
            slot_mapping.append(ids[pos // block_size] * block_size + pos % block_size)
        query_start_loc.append(query_start_loc[-1] + q_len)
    num_tokens = query_start_loc[-1]

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    metadata = AttentionMetadata(
        num_reqs=len(specs),
        num_tokens=num_tokens,
        max_query_len=max(q for _, q in specs),
        max_seq_len=max(seq_lens),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
    )
    return (
        randn(num_tokens, num_heads, head_dim),  # query
        randn(num_tokens, num_kv_heads, head_dim),  # key
        randn(num_tokens, num_kv_heads, head_dim),  # value
        (randn(*cache_shape), randn(*cache_shape)),  # kv_cache: the cached prefix is random
        metadata,
    )


def reference(query, key, value, kv_cache, metadata: AttentionMetadata, scale: float):
    """The torch backend in float64 on CPU: (output, key_cache, value_cache) after the step."""

    def f64(t):
        return t.detach().to("cpu", torch.float64)

    cpu_metadata = AttentionMetadata(
        num_reqs=metadata.num_reqs,
        num_tokens=metadata.num_tokens,
        max_query_len=metadata.max_query_len,
        max_seq_len=metadata.max_seq_len,
        slot_mapping=metadata.slot_mapping.cpu(),
        query_start_loc=metadata.query_start_loc.cpu(),
        seq_lens=metadata.seq_lens.cpu(),
        block_tables=metadata.block_tables.cpu(),
        query_start_loc_cpu=metadata.query_start_loc_cpu,
        seq_lens_cpu=metadata.seq_lens_cpu,
    )
    caches = (f64(kv_cache[0]), f64(kv_cache[1]))
    out = TorchAttentionBackend().forward(
        f64(query), f64(key), f64(value), caches, cpu_metadata, scale
    )
    return out, caches[0], caches[1]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.to("cpu", torch.float64) - ref).norm() / ref.norm()).item()


def check_against_reference(
    specs, num_heads, num_kv_heads, head_dim, dtype, num_kv_splits=None, tile=None, **kw
) -> float:
    """Run the backend (NaN-poisoned output) and the reference; assert the cache write is exact,
    every output element is written, the error is within bounds, and a rerun is bit-identical.
    Returns the relative error."""
    query, key, value, kv_cache, metadata = make_batch(
        specs, num_heads, num_kv_heads, head_dim, dtype, **kw
    )
    scale = 1.0 / math.sqrt(head_dim)
    ref_out, ref_key_cache, ref_value_cache = reference(
        query, key, value, kv_cache, metadata, scale
    )

    triton_write_kv_cache(key, value, kv_cache[0], kv_cache[1], metadata.slot_mapping)
    # Written slots hold the inputs bit for bit; every other slot is untouched.
    assert torch.equal(kv_cache[0].to("cpu", torch.float64), ref_key_cache)
    assert torch.equal(kv_cache[1].to("cpu", torch.float64), ref_value_cache)

    out = torch.full_like(query, float("nan"))
    triton_paged_attention(
        query, kv_cache[0], kv_cache[1], metadata, scale, out=out, num_kv_splits=num_kv_splits,
        tile=tile,
    )  # fmt: skip
    assert not out.isnan().any(), f"{out.isnan().sum().item()} output elements never written"
    error = relative_error(out, ref_out)
    assert error < MAX_REL_ERROR[dtype], f"relative error {error:.2e}"

    again = triton_paged_attention(
        query, kv_cache[0], kv_cache[1], metadata, scale, num_kv_splits=num_kv_splits, tile=tile
    )
    assert torch.equal(out, again), "two runs on the same inputs differ: a race?"
    return error


# ---- kernels against the reference -------------------------------------------------------------
HEADS = [(8, 8), (8, 4), (14, 2), (32, 8)]  # (query heads, KV heads): GQA groups of 1, 2, 7, 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_mixed_batch_matches_reference(heads, head_dim, dtype):
    check_against_reference(MIXED, *heads, head_dim, dtype, seed=head_dim + heads[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(32, 8), (14, 2), (8, 8)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_decode_batch_matches_reference(heads, head_dim, dtype):
    check_against_reference(DECODE, *heads, head_dim, dtype, seed=1)


@pytest.mark.parametrize("num_kv_splits", [1, 2, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_split_kv_decode_matches_reference(dtype, num_kv_splits):
    """Long and short contexts in one decode batch, split into segments (1 = the mixed-batch
    kernel): segments past a short sequence's end are empty and must merge to nothing."""
    specs = [(4000, 1), (700, 1), (0, 1), (255, 1), (256, 1), (1500, 1)]
    check_against_reference(specs, 32, 8, 128, dtype, num_kv_splits=num_kv_splits, seed=5)
    # The segment that merges resets its ticket: the next launch starts from zero.
    assert int(_split_tickets(torch.device(DEVICE)).abs().sum()) == 0


@pytest.mark.parametrize("heads", [(16, 1), (32, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("specs", [MIXED, DECODE], ids=["mixed", "decode"])
def test_large_gqa_groups_match_reference(heads, specs):
    check_against_reference(specs, *heads, 128, torch.bfloat16, seed=2)


@pytest.mark.parametrize("head_dim", [16, 32, 80, 96, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_other_head_dims_match_reference(head_dim, dtype):
    """Tiny test models use 16 and 32; 80 and 96 are padded to the next power of two."""
    check_against_reference(MIXED, 4, 2, head_dim, dtype, seed=3)


@pytest.mark.parametrize("block_size", [1, 5, 32])
def test_other_block_sizes_match_reference(block_size):
    check_against_reference(MIXED, 8, 2, 64, torch.bfloat16, block_size=block_size, seed=4)


def test_single_long_prompt_matches_reference():
    check_against_reference([(0, 1000)], 8, 2, 128, torch.bfloat16, seed=5)


# Long prompts take LONG_TILE: whole prompts, a long chunk after a cached prefix, and decodes and
# short chunks in the same batch (their programs run with the long tile too).
LONG = [(0, 1100), (300, LONG_QUERY_LEN + 6), (7, 1), (2000, 5), (0, LONG_QUERY_LEN), (64, 130)]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(32, 8), (14, 2), (8, 8)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_long_prompt_batches_match_reference(heads, head_dim):
    check_against_reference(LONG, *heads, head_dim, torch.bfloat16, seed=8)


def test_long_float32_prompts_keep_the_short_tile_and_match_reference():
    """float32 tiles the long size would overflow shared memory; the choice falls back."""
    check_against_reference([(0, LONG_QUERY_LEN + 3), (20, 1)], 8, 2, 128, torch.float32, seed=9)


@pytest.mark.parametrize(
    "tile", [SHORT_TILE, LONG_TILE, (128, 128, 8, 2), (64, 32, 4, 3), (32, 64, 4, 2)], ids=str
)
def test_every_tile_shape_computes_the_same_attention(tile):
    """The tile shape is a speed choice only: every shape a benchmark may pick is exact on a
    batch whose diagonal tiles, interior tiles and partial tiles all occur."""
    specs = MIXED + [(40, 300), (0, 129), (1000, 64)]
    check_against_reference(specs, 32, 8, 128, torch.bfloat16, tile=tile, seed=10)


@pytest.mark.parametrize("pad_len", [1, 100, LONG_QUERY_LEN + 40])
def test_padding_requests_read_no_keys_and_leave_real_rows_exact(pad_len):
    """CUDA-graph padding as the model runner builds it: a request with seq_len 0 but query
    tokens (its block table row all zeros). Its programs must read no key (a negative position
    would be an illegal address) and the real request's rows keep their value."""
    import dataclasses

    query, key, value, kv_cache, metadata = make_batch([(30, 40)], 32, 8, 128, torch.bfloat16)
    scale = 1.0 / math.sqrt(128)
    ref_out = reference(query, key, value, kv_cache, metadata, scale)[0]
    triton_write_kv_cache(key, value, kv_cache[0], kv_cache[1], metadata.slot_mapping)
    padded_query = torch.cat([query, torch.randn_like(query[:1]).expand(pad_len, -1, -1)])
    tables = metadata.block_tables
    padded = dataclasses.replace(
        metadata,
        num_reqs=2,
        num_tokens=40 + pad_len,
        max_query_len=max(40, pad_len),
        query_start_loc=torch.tensor([0, 40, 40 + pad_len], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([70, 0], dtype=torch.int32, device=DEVICE),
        block_tables=torch.cat([tables, torch.zeros_like(tables)]),
        query_start_loc_cpu=[0, 40, 40 + pad_len],
        seq_lens_cpu=[70, 0],
    )
    out = triton_paged_attention(padded_query, kv_cache[0], kv_cache[1], padded, scale)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert relative_error(out[:40], ref_out) < MAX_REL_ERROR[torch.bfloat16]


@pytest.mark.parametrize("empty_reqs", [0, 3])
def test_verify_graph_padding_leaves_real_rows_exact(empty_reqs):
    """A verify graph's layout: real requests of <= 1 + k query tokens, then empty padding
    requests, then spare tokens that belong to no request, all under the grid and tile of the
    graph's size. The real rows equal the unpadded reference; nothing else is read."""
    import dataclasses

    specs = [(50, 5), (7, 1), (200, 3)]  # (cached, 1 + drafts): full, none, some drafts
    query, key, value, kv_cache, metadata = make_batch(specs, 32, 8, 128, torch.bfloat16)
    scale = 1.0 / math.sqrt(128)
    ref_out = reference(query, key, value, kv_cache, metadata, scale)[0]
    triton_write_kv_cache(key, value, kv_cache[0], kv_cache[1], metadata.slot_mapping)
    num_reqs = len(specs) + empty_reqs
    num_tokens = num_reqs * 5  # the graph's token slots
    spare = num_tokens - metadata.num_tokens
    padded_query = torch.cat([query, torch.randn_like(query[:1]).expand(spare, -1, -1)])
    starts = metadata.query_start_loc_cpu + [metadata.num_tokens] * empty_reqs
    tables = metadata.block_tables
    padded = dataclasses.replace(
        metadata,
        num_reqs=num_reqs,
        num_tokens=num_tokens,
        max_query_len=5,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(
            metadata.seq_lens_cpu + [0] * empty_reqs, dtype=torch.int32, device=DEVICE
        ),
        block_tables=torch.cat([tables, torch.zeros_like(tables[:1]).expand(empty_reqs, -1)]),
        query_start_loc_cpu=starts,
        seq_lens_cpu=metadata.seq_lens_cpu + [0] * empty_reqs,
    )
    out = triton_paged_attention(padded_query, kv_cache[0], kv_cache[1], padded, scale)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert relative_error(out[: metadata.num_tokens], ref_out) < MAX_REL_ERROR[torch.bfloat16]


def test_fresh_random_batches_match_reference():
    """Random mixes of decodes, prompts and chunks: the kernel computes the same function on any
    valid input, not only on the hand-picked batches above."""
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        num_reqs = int(torch.randint(1, 12, (), generator=gen))
        specs = []
        for _ in range(num_reqs):
            context = int(torch.randint(0, 300, (), generator=gen))
            q_len = (
                1
                if torch.rand((), generator=gen) < 0.5
                else int(torch.randint(1, 90, (), generator=gen))
            )
            specs.append((context, q_len))
        check_against_reference(specs, 32, 8, 128, torch.bfloat16, seed=len(specs))


def test_write_skips_negative_slots():
    query, key, value, kv_cache, metadata = make_batch(MIXED, 8, 4, 64, torch.bfloat16)
    slots = metadata.slot_mapping.clone()
    skipped = torch.arange(0, len(slots), 3, device=slots.device)
    slots[skipped] = -1
    before = (kv_cache[0].clone(), kv_cache[1].clone())
    triton_write_kv_cache(key, value, kv_cache[0], kv_cache[1], slots)
    for cache, old, new in ((kv_cache[0], before[0], key), (kv_cache[1], before[1], value)):
        expected = old.view(-1, 4, 64).clone()
        kept = slots >= 0
        expected[slots[kept]] = new[kept]
        assert torch.equal(cache.view(-1, 4, 64), expected)


def _rope_tables(num_tokens: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(num_tokens, head_dim // 2, generator=gen) * 100
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in float64 on the CPU, over [tokens, heads, head_dim]."""
    x, c, s = (t.to("cpu", torch.float64) for t in (x, cos[:, None, :], sin[:, None, :]))
    return x * c + rotate_half(x) * s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("heads, head_dim", [((32, 8), 128), ((14, 2), 64), ((4, 4), 32)])
def test_write_with_rope_rotates_query_in_place_and_caches_rotated_key(heads, head_dim, dtype):
    """One kernel: every query (padding tokens too) is rotated in place; the cache gets the
    rotated key and the untouched value at each non-negative slot; the key input is unchanged."""
    query, key, value, kv_cache, metadata = make_batch(MIXED, *heads, head_dim, dtype)
    cos, sin = _rope_tables(metadata.num_tokens, head_dim, dtype)
    slots = metadata.slot_mapping.clone()
    slots[::4] = -1  # padding tokens
    q_ref, k_ref = _rotated(query, cos, sin), _rotated(key, cos, sin)
    key_before, caches_before = key.clone(), (kv_cache[0].clone(), kv_cache[1].clone())
    triton_write_kv_cache(key, value, *kv_cache, slots, query=query, rope=(cos, sin))
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # one rounding of float32 math
    assert relative_error(query, q_ref) < tol
    assert torch.equal(key, key_before)
    kept = slots >= 0
    key_cache = kv_cache[0].view(-1, heads[1], head_dim)
    assert relative_error(key_cache[slots[kept]], k_ref[kept.cpu()]) < tol
    expected_values = caches_before[1].view(-1, heads[1], head_dim).clone()
    expected_values[slots[kept]] = value[kept]
    assert torch.equal(kv_cache[1].view(-1, heads[1], head_dim), expected_values)
    untouched = torch.ones(key_cache.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slots[kept]] = False
    assert torch.equal(key_cache[untouched], caches_before[0].view_as(key_cache)[untouched])


def test_backend_forward_with_rope_equals_rotating_first():
    """forward(..., rope=(cos, sin)) = the reference over the rotated query and key."""
    if DEVICE != "cuda":
        pytest.skip("the backend refuses non-CUDA tensors")
    query, key, value, kv_cache, metadata = make_batch(MIXED, 14, 2, 64, torch.bfloat16)
    cos, sin = _rope_tables(metadata.num_tokens, 64, torch.bfloat16, seed=3)
    q_rot = _rotated(query, cos, sin).to(DEVICE, torch.bfloat16)
    k_rot = _rotated(key, cos, sin).to(DEVICE, torch.bfloat16)
    ref_caches = (kv_cache[0].clone(), kv_cache[1].clone())
    ref_out, _, _ = reference(q_rot, k_rot, value, ref_caches, metadata, 0.125)
    out = TritonAttentionBackend().forward(
        query, key, value, kv_cache, metadata, 0.125, rope=(cos, sin)
    )
    assert relative_error(out, ref_out) < MAX_REL_ERROR[torch.bfloat16]


def test_backend_forward_writes_cache_then_attends():
    """The AttentionBackend entry point does both steps (and accepts q/k/v as views of one
    fused qkv projection, as the models pass them)."""
    if DEVICE != "cuda":
        pytest.skip("the backend refuses non-CUDA tensors")
    num_tokens = sum(q for _, q in MIXED)
    _, _, _, kv_cache, metadata = make_batch(MIXED, 32, 8, 128, torch.bfloat16)
    qkv = torch.randn(num_tokens, (32 + 2 * 8) * 128, device=DEVICE, dtype=torch.bfloat16)
    q, k, v = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    q, k, v = q.view(-1, 32, 128), k.view(-1, 8, 128), v.view(-1, 8, 128)
    ref_out, ref_key_cache, _ = reference(q, k, v, kv_cache, metadata, 128**-0.5)
    out = TritonAttentionBackend().forward(q, k, v, kv_cache, metadata, 128**-0.5)
    assert torch.equal(kv_cache[0].to("cpu", torch.float64), ref_key_cache)
    assert relative_error(out, ref_out) < MAX_REL_ERROR[torch.bfloat16]


# ---- the engine on CUDA against HF transformers -----------------------------------------------
ENGINE_MODELS = [
    ("llama", {}),  # head_dim 16, 4 query heads on 2 KV heads
    ("qwen3", {}),  # head_dim 32, QK-norm
    ("llama", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1)),  # hd 64
]
ENGINE_IDS = ["llama-hd16", "qwen3-hd32", "llama-hd64-gqa4"]
ENGINE_MAX_TOKENS = 16


def run_engine(model_dir: str, prompts, dtype: str, logprobs: int | None = None):
    """Two passes through one LLM (triton backend, chunked prefill with a 32-token budget,
    prefix caching on): the second pass serves prompts from the prefix cache."""
    from lmserve import LLM, SamplingParams

    llm = LLM(
        model_dir,
        dtype=dtype,
        device="cuda",
        max_num_batched_tokens=32,
        long_prefill_token_threshold=24,
        enable_prefix_caching=True,
        num_gpu_blocks_override=2048,
    )
    runner = llm.llm_engine.engine_core.engine_core.executor.worker.model_runner
    assert runner.attn_backend.name == "triton"
    params = SamplingParams(temperature=0.0, max_tokens=ENGINE_MAX_TOKENS, logprobs=logprobs)
    passes = [
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for _ in range(2)
    ]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return passes


@needs_cuda
@pytest.mark.parametrize("arch,overrides", ENGINE_MODELS, ids=ENGINE_IDS)
def test_engine_bf16_greedy_close_to_hf(tiny_model_dir, monkeypatch, arch, overrides):
    """vLLM's rule for bf16: at the first position where the greedy tokens differ, each side's
    token is among the other side's top-5."""
    from tests.engine.test_hf_parity import make_prompts

    monkeypatch.setenv("LMSERVE_ATTENTION_BACKEND", "triton")
    model_dir = tiny_model_dir(arch, **overrides)
    prompts = make_prompts()
    hf_tokens, hf_tops = hf_greedy_with_top_k(model_dir, prompts, torch.bfloat16, ENGINE_MAX_TOKENS)
    passes = run_engine(model_dir, prompts, "bfloat16", logprobs=5)
    assert sum(o.num_cached_tokens for o in passes[1]) > 0  # the second pass hit the cache
    for outputs in passes:
        for i, out in enumerate(outputs):
            ours = out.outputs[0]
            ours_top5 = [set(lp) for lp in ours.logprobs]
            assert top5_rule_holds(ours.token_ids, ours_top5, hf_tokens[i], hf_tops[i]), i


@needs_cuda
@pytest.mark.parametrize("arch,overrides", ENGINE_MODELS, ids=ENGINE_IDS)
def test_engine_fp32_greedy_equals_hf(tiny_model_dir, monkeypatch, arch, overrides):
    """float32 (exact dots in the kernel): greedy ids identical to HF's (float32 on CUDA)."""
    from tests.engine.test_hf_parity import make_prompts

    monkeypatch.setenv("LMSERVE_ATTENTION_BACKEND", "triton")
    model_dir = tiny_model_dir(arch, **overrides)
    prompts = make_prompts()
    expected, _ = hf_greedy_with_top_k(model_dir, prompts, torch.float32, ENGINE_MAX_TOKENS)
    for outputs in run_engine(model_dir, prompts, "float32"):
        assert [o.outputs[0].token_ids for o in outputs] == expected
