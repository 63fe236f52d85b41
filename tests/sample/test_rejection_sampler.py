"""Rejection sampler: greedy acceptance, recovered and bonus tokens, exactness of random mode
(chi-square tests at alpha = 1e-6 each), sampling-parameter processing, seeds and logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmserve.sample.metadata import SamplingMetadata
from lmserve.sample.rejection_sampler import RejectionSampler
from lmserve.spec_decode.metadata import PLACEHOLDER_TOKEN_ID as PAD
from lmserve.spec_decode.metadata import SpecDecodeMetadata
from tests.spec_decode.chi_square import chi_square_p_value

ALPHA = 1e-6  # false-failure rate of each statistical test
CPU = torch.device("cpu")


def spec_metadata(drafts: list[list[int]]) -> SpecDecodeMetadata:
    """Requests laid out back to back, each scheduling 1 + k_i tokens."""
    num_tokens = np.array([len(d) + 1 for d in drafts])
    return SpecDecodeMetadata.build(drafts, np.cumsum(num_tokens) - 1, CPU)


def sampling(temperature: list[float], **extra) -> SamplingMetadata:
    t = torch.tensor(temperature, dtype=torch.float32)
    return SamplingMetadata(
        temperature=t,
        all_greedy=bool((t == 0).all()),
        all_random=bool((t > 0).all()),
        generators={},
        **extra,
    )


def one_hot_logits(tokens: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


def test_metadata_lays_out_target_rows_per_request():
    spec = spec_metadata([[5, 6, 7], [], [9]])
    # flat tokens: r0 = 0..3, r1 = 4, r2 = 5..6
    assert spec.logits_indices.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert spec.draft_token_ids.tolist() == [[5, 6, 7], [PAD] * 3, [9, PAD, PAD]]
    assert spec.target_rows.tolist() == [[0, 1, 2, 3], [4, 4, 4, 4], [5, 6, 6, 6]]
    assert spec.row_offsets().tolist() == [0, 1, 2, 3, 0, 0, 1]


def test_greedy_accepts_until_first_mismatch_then_emits_the_target_argmax():
    # r0: target argmax rows [5, 6, 1, 4]; drafts [5, 6, 7] -> accept 5, 6; reject 7 -> emit 1.
    # r1: no drafts -> emits its row's argmax 3.
    # r2: drafts [2] match -> bonus from the last row: 0.
    spec = spec_metadata([[5, 6, 7], [], [2]])
    logits = one_hot_logits([5, 6, 1, 4, 3, 2, 0])
    out = RejectionSampler()(spec, logits, sampling([0.0] * 7))
    assert out.output_token_ids.tolist() == [[5, 6, 1, PAD], [3, PAD, PAD, PAD], [2, 0, PAD, PAD]]
    assert out.num_output_tokens.tolist() == [3, 1, 2]


def test_greedy_with_every_draft_accepted_emits_the_bonus_token():
    spec = spec_metadata([[1, 2, 3]])
    out = RejectionSampler()(spec, one_hot_logits([1, 2, 3, 7]), sampling([0.0] * 4))
    assert out.output_token_ids.tolist() == [[1, 2, 3, 7]]


def test_greedy_first_draft_rejected_emits_one_token():
    spec = spec_metadata([[4, 2]])
    out = RejectionSampler()(spec, one_hot_logits([1, 2, 3]), sampling([0.0] * 3))
    assert out.output_token_ids.tolist() == [[1, PAD, PAD]]


@pytest.mark.parametrize("seed", range(5))
def test_all_greedy_batches_emit_what_the_general_path_emits(seed):
    """The all-greedy shortcut (one gather of the argmax by target row) against the general
    path, which a batch takes as soon as one row samples: same tokens, counts and padding."""
    gen = torch.Generator().manual_seed(seed)
    vocab, ks = 50, torch.randint(0, 5, (7,), generator=gen).tolist()
    logits = torch.randn(sum(ks) + len(ks), vocab, generator=gen)
    argmax, drafts, row = logits.argmax(dim=-1).tolist(), [], 0
    for k in ks:  # draft j of a request is checked at its row j: mostly right, sometimes not
        good = torch.rand(k, generator=gen) < 0.8
        drafts.append(
            [argmax[row + j] if good[j] else (argmax[row + j] + 1) % vocab for j in range(k)]
        )
        row += k + 1
    spec = spec_metadata(drafts)
    greedy = RejectionSampler()(spec, logits.clone(), sampling([0.0] * spec.num_rows))
    general_sampling = sampling([0.0] * spec.num_rows)
    general_sampling.all_greedy = False  # zero temperatures through the general path
    general = RejectionSampler()(spec, logits.clone(), general_sampling)
    assert greedy.output_token_ids.tolist() == general.output_token_ids.tolist()
    assert greedy.num_output_tokens.tolist() == general.num_output_tokens.tolist()
    assert greedy.num_output_tokens.max() > 1  # some drafts were accepted


def test_greedy_applies_penalties_before_the_argmax():
    # Row 0 prefers 5 (logit 5) over 6 (logit 4.5); a logit bias of -1 on 5 flips it to 6.
    spec = spec_metadata([[6]])
    logits = one_hot_logits([5, 1])
    logits[0, 6] = 4.5
    bias = (torch.tensor([0]), torch.tensor([5]), torch.tensor([-1.0]))
    out = RejectionSampler()(spec, logits, sampling([0.0, 0.0], logit_bias=bias))
    assert out.output_token_ids.tolist() == [[6, 1]]


def test_random_rows_with_top_k_1_accept_only_the_argmax():
    spec = spec_metadata([[5, 6], [5, 6]])
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    logits[0, 5] = logits[1, 6] = logits[3, 5] = 10.0  # argmax of r0's rows; r1's row 1 not 6
    logits[4, 6] = -10.0
    top_k = torch.full((6,), 1, dtype=torch.int64)
    for _ in range(20):
        out = RejectionSampler()(spec, logits, sampling([1.0] * 6, top_k=top_k))
        assert out.output_token_ids[0, :2].tolist() == [5, 6]
        assert out.output_token_ids[1, 0].item() == 5
        assert out.output_token_ids[1, 1].item() == int(logits[4].argmax())


def target_rows(vocab: int, num_rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab, generator=g) * 1.5  # [num_rows, vocab] logits


def emitted_sequence_probs(p: torch.Tensor, drafts: list[int]) -> torch.Tensor:
    """Exact distribution of the emitted sequence for point-mass drafts d_1..d_k under target
    rows p [k+1, vocab]: outcome (L, x) = L tokens emitted, the last being x (the first L-1 are
    d_1..d_{L-1}); flat index (L-1) * vocab + x."""
    k, vocab = len(drafts), p.shape[1]
    probs = torch.zeros((k + 1) * vocab, dtype=torch.float64)
    prefix = 1.0  # probability of having accepted d_1..d_{L-1}
    for j in range(k + 1):
        row = p[j].double()
        probs[j * vocab : (j + 1) * vocab] = prefix * row
        if j < k:
            probs[j * vocab + drafts[j]] = 0.0  # emitting d_j continues to the next row
            prefix *= float(row[drafts[j]])
    return probs


def outcome_counts(out, vocab: int, k: int) -> torch.Tensor:
    length = out.num_output_tokens  # [n]
    last = out.output_token_ids.gather(1, (length - 1)[:, None])[:, 0]
    return torch.bincount((length - 1) * vocab + last, minlength=(k + 1) * vocab)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_random_point_mass_drafts_emit_exactly_the_target_distribution(temperature):
    vocab, drafts, n = 8, [3, 5], 200_000
    logits = target_rows(vocab, 3, seed=1)
    # Draft 3 is likely, 5 less so: every outcome class (rejections at 0, 1, bonus) is common.
    logits[0, 3] += 3.0
    logits[1, 5] += 5.0
    spec = spec_metadata([drafts] * n)
    batch_logits = logits.repeat(n, 1)  # [3n, vocab]
    torch.manual_seed(0)
    out = RejectionSampler()(spec, batch_logits, sampling([temperature] * (3 * n)))
    p = torch.softmax(logits / temperature, dim=-1)
    p_value, stat, dof = chi_square_p_value(
        outcome_counts(out, vocab, 2), emitted_sequence_probs(p, drafts)
    )
    assert p_value > ALPHA, (p_value, stat, dof)
    assert (out.num_output_tokens == 3).float().mean() > 0.05  # the bonus path ran


def test_random_drafts_sampled_from_q_keep_each_position_distributed_as_the_target():
    """General q: x1 ~ p0 over all samples, and x2 ~ p1 among samples that emitted two."""
    vocab, k, n = 6, 2, 200_000
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g), dim=-1)  # [k+1, vocab]
    q = torch.softmax(torch.randn(k + 1, vocab, generator=g), dim=-1)
    q[k] = 0.0  # no draft at the bonus row
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(k)], 1)  # fmt: skip
    spec = spec_metadata(drafts.tolist())
    logits = torch.log(p).repeat(n, 1)
    torch.manual_seed(1)
    out = RejectionSampler()(spec, logits, sampling([1.0] * (3 * n)), draft_probs=q.repeat(n, 1))
    tokens = out.output_token_ids
    x1 = torch.bincount(tokens[:, 0], minlength=vocab)
    p1_value, *_ = chi_square_p_value(x1, p[0])
    two = out.num_output_tokens >= 2
    x2 = torch.bincount(tokens[two, 1], minlength=vocab)
    p2_value, *_ = chi_square_p_value(x2, p[1])
    assert p1_value > ALPHA and p2_value > ALPHA, (p1_value, p2_value)
    assert two.float().mean() > 0.2


def test_seeded_request_draws_the_same_tokens_whatever_the_batch():
    logits = target_rows(8, 3, seed=4)
    spec_one = spec_metadata([[1, 2]])
    spec_two = spec_metadata([[4], [1, 2]])
    logits_two = torch.cat([target_rows(8, 2, seed=5), logits])

    def run(spec, rows, index):
        gen = torch.Generator().manual_seed(123)
        temps = [1.0] * rows.shape[0]
        return RejectionSampler()(spec, rows, sampling(temps), generators={index: gen})

    for _ in range(3):
        a = run(spec_one, logits, 0).output_token_ids[0]
        b = run(spec_two, logits_two, 1).output_token_ids[1]
        assert a.tolist() == b[: len(a)].tolist()


def test_logprobs_are_the_raw_model_logprobs_of_the_emitted_tokens():
    spec = spec_metadata([[5, 6, 7], [2]])
    logits = target_rows(8, 6, seed=6)
    logits[0, 5] = logits[1, 6] = 20.0  # accept 5, 6; row 2 decides the third token
    logits[4, 2] = -20.0  # r1 rejects 2
    out = RejectionSampler()(spec, logits, sampling([0.0] * 6, max_num_logprobs=2))
    raw = torch.log_softmax(logits, dim=-1)
    emitted_rows = [0, 1, 2, 4]  # r0 emitted 3 tokens (rows 0..2), r1 one (row 4)
    tokens = out.output_token_ids[0, :3].tolist() + [out.output_token_ids[1, 0].item()]
    lp = out.logprobs
    assert lp.token_ids[emitted_rows, 0].tolist() == tokens
    expected = raw[emitted_rows, tokens]
    torch.testing.assert_close(lp.logprobs[emitted_rows, 0], expected)
    assert lp.token_ids.shape == (6, 3)
