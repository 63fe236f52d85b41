"""The grammar bitmask on the sampler's path: bits unpack to the right tokens, disallowed tokens
never win (greedy, random, rejection sampling), the caller's logits are not modified, and the
step's mask rows map to logits rows (one per request, or 1 + drafts with speculation)."""

from __future__ import annotations

import numpy as np
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


def test_masked_rows_only_and_logits_untouched():
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    mask = GrammarMask(rows=torch.tensor([1]), bitmask=bitmask_allowing([[3, 40]]))
    masked = apply_grammar_mask(logits, mask)
    assert torch.equal(logits, before)
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [3, 40]


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
    plain = StructuredOutputBatch({"a": 0}, bitmask[:1].tobytes(), 3)
    assert build_grammar_mask(plain, ["x", "a"], None, torch.device("cpu")).rows.tolist() == [1]
    assert build_grammar_mask(plain, ["x"], None, torch.device("cpu")) is None
