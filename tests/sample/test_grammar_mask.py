"""The grammar bitmask on the sampler's path: bits unpack to the right tokens, disallowed tokens
never win (greedy, random, rejection sampling), only the constrained rows change (in place),
our torch code and xgrammar's kernels (CPU; Triton on CUDA) mask exactly the same entries, and
the step's mask rows map to logits rows (one per request, or 1 + drafts with speculation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmserve.core.sched_output import StructuredOutputBatch
from lmserve.sample.grammar import (
    GrammarMask,
    apply_grammar_mask,
    build_grammar_mask,
    unpack_bitmask,
)
from lmserve.sample.metadata import SamplingMetadata
from lmserve.sample.sampler import Sampler

VOCAB = 70  # not a multiple of 32: the last word is partly padding


def bitmask_allowing(allowed: list[list[int]], vocab: int = VOCAB) -> torch.Tensor:
    words = -(-vocab // 32)
    mask = np.zeros((len(allowed), words), dtype=np.uint32)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            mask[row, t // 32] |= np.uint32(1 << (t % 32))
    return torch.from_numpy(mask.view(np.int32))


def test_unpack_matches_the_bits():
    allowed = [[0, 31, 32, 69], [5], list(range(VOCAB))]
    unpacked = unpack_bitmask(bitmask_allowing(allowed), VOCAB)
    assert unpacked.shape == (3, VOCAB)
    for row, tokens in enumerate(allowed):
        assert torch.nonzero(unpacked[row]).flatten().tolist() == sorted(tokens)


def test_masked_rows_only_in_place():
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    mask = GrammarMask(rows=torch.tensor([1]), bitmask=bitmask_allowing([[3, 40]]))
    masked = apply_grammar_mask(logits, mask)
    assert masked is logits  # in place: no copy of the batch's logits
    assert torch.equal(masked[0], before[0]) and torch.equal(masked[2], before[2])
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [3, 40]
    assert torch.equal(masked[1, [3, 40]], before[1, [3, 40]])


def test_tokens_past_a_narrow_mask_are_never_allowed():
    """Masks cover the tokenizer's ids; a model's logits padded past them stay disallowed."""
    logits = torch.randn(3, VOCAB + 50)
    before = logits.clone()
    mask = GrammarMask(rows=torch.tensor([1]), bitmask=bitmask_allowing([[3, 40, 69]]))
    masked = apply_grammar_mask(logits, mask)
    assert torch.equal(masked[0], before[0]) and torch.equal(masked[2], before[2])
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [3, 40, 69]


def random_case(num_rows: int, vocab: int, seed: int, mask_vocab: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=gen)
    rows = torch.randperm(num_rows, generator=gen)[: num_rows // 2 + 1]  # unique, any order
    words = -(-(mask_vocab or vocab) // 32)
    bits = torch.randint(-(2**31), 2**31 - 1, (len(rows), words), dtype=torch.int32, generator=gen)
    return logits, GrammarMask(rows=rows, bitmask=bits)


def test_torch_path_equals_xgrammar_kernel():
    import xgrammar as xgr

    from lmserve.sample.grammar import apply_grammar_mask_torch

    for num_rows, vocab, seed in [(5, VOCAB, 0), (16, 1000, 1), (33, 4099, 2)]:
        logits, mask = random_case(num_rows, vocab, seed)
        ours = logits.clone()
        apply_grammar_mask_torch(ours, mask)
        full = torch.full((num_rows, mask.bitmask.shape[1]), -1, dtype=torch.int32)
        full[mask.rows] = mask.bitmask
        theirs = logits.clone()
        xgr.apply_token_bitmask_inplace(theirs, full, indices=mask.rows.tolist(), backend="cpu")
        assert torch.equal(ours, theirs)
        untouched = torch.ones(num_rows, dtype=torch.bool)
        untouched[mask.rows] = False
        assert torch.equal(ours[untouched], logits[untouched])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernel)")
def test_triton_path_equals_torch_path_on_cuda():
    from lmserve.sample.grammar import (
        apply_grammar_mask_torch,
        apply_grammar_mask_triton,
        use_triton_kernel,
    )

    for dtype, mask_vocab in (
        (torch.float32, None),
        (torch.bfloat16, None),
        (torch.float32, 49152),
    ):
        logits, mask = random_case(64, 128256, 3, mask_vocab)
        logits = logits.to("cuda", dtype)
        mask = GrammarMask(mask.rows.cuda(), mask.bitmask.cuda())
        assert use_triton_kernel(logits, mask)
        ours, theirs = logits.clone(), logits.clone()
        apply_grammar_mask_torch(ours, mask)
        apply_grammar_mask_triton(theirs, mask)
        assert torch.equal(ours, theirs)


def test_sampler_never_picks_a_disallowed_token():
    torch.manual_seed(0)
    num_reqs = 64
    logits = torch.randn(num_reqs, VOCAB) * 5
    allowed = [[(7 * i) % VOCAB, (11 * i + 3) % VOCAB] for i in range(num_reqs)]
    mask = GrammarMask(rows=torch.arange(num_reqs), bitmask=bitmask_allowing(allowed))
    for temperature in (0.0, 1.0):
        metadata = SamplingMetadata(
            temperature=torch.full((num_reqs,), temperature),
            all_greedy=temperature == 0,
            all_random=temperature > 0,
            generators={},
            max_num_logprobs=1,
            grammar_mask=mask,
        )
        out = Sampler()(logits, metadata)
        for i, token in enumerate(out.sampled_token_ids.tolist()):
            assert token in allowed[i]
        if temperature == 0:  # greedy = the best allowed token
            best = [max(a, key=lambda t, i=i: logits[i, t].item()) for i, a in enumerate(allowed)]
            assert out.sampled_token_ids.tolist() == best


def test_mask_rows_map_to_logits_rows_with_drafts():
    bitmask = np.arange(5 * 3, dtype=np.int32).reshape(5, 3)  # 5 rows: b has 1, a has 1 + 3
    batch = StructuredOutputBatch({"b": 0, "a": 1}, bitmask.tobytes(), 3)
    # logits order: x (unconstrained, rows 0..1), a (rows 2..5), b (row 6)
    mask = build_grammar_mask(batch, ["x", "a", "b"], np.array([0, 2, 6]), torch.device("cpu"))
    assert mask.rows.tolist() == [2, 3, 4, 5, 6]
    assert mask.bitmask.tolist() == bitmask[[1, 2, 3, 4, 0]].tolist()
    # without drafts: one logits row per request, in order
    plain = StructuredOutputBatch({"a": 0}, bitmask[:1], 3)  # an array, as the manager makes
    assert build_grammar_mask(plain, ["x", "a"], None, torch.device("cpu")).rows.tolist() == [1]
    assert build_grammar_mask(plain, ["x"], None, torch.device("cpu")) is None
