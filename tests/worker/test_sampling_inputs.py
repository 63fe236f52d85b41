"""SamplingMetadata built from the persistent batch: only the groups in use, right values."""

from __future__ import annotations

import numpy as np
import torch

from lmserve.core.sched_output import NewRequestData
from lmserve.sampling_params import SamplingParams
from lmserve.worker.input_batch import InputBatch
from lmserve.worker.sampling_inputs import RepeatedInputs, build_sampling_metadata

VOCAB = 100
CPU = torch.device("cpu")


def make_batch(*requests):
    batch = InputBatch(max_num_reqs=4, max_model_len=32, block_size=4, device=CPU)
    for i, (prompt, output, params) in enumerate(requests):
        batch.add_request(NewRequestData(f"r{i}", prompt, output, params, 2, [i], 0))
    return batch


def test_plain_greedy_batch_builds_no_optional_groups():
    batch = make_batch(
        ([1, 2], [], SamplingParams(temperature=0)), ([3], [4], SamplingParams(temperature=0))
    )
    md = build_sampling_metadata(batch, np.array([0, 1]), VOCAB, CPU)
    assert md.all_greedy and not md.all_random
    assert md.top_k is md.top_p is md.min_p is md.presence_penalties is None
    assert md.logit_bias is md.banned_tokens is md.max_num_logprobs is None


def test_truncation_values_per_row_with_off_rows_neutral():
    batch = make_batch(
        ([1], [], SamplingParams(temperature=1.0, top_k=5, top_p=0.9)),
        ([1], [], SamplingParams(temperature=0.5, min_p=0.1)),
    )
    md = build_sampling_metadata(batch, np.array([1, 0]), VOCAB, CPU)  # logits order: r1, r0
    assert md.top_k.tolist() == [VOCAB, 5]
    assert md.top_p.tolist() == [1.0, np.float32(0.9)]
    assert md.min_p.tolist() == [np.float32(0.1), 0.0]
    assert md.temperature.tolist() == [0.5, 1.0]


def test_penalty_token_ids_are_padded_with_vocab_size():
    batch = make_batch(
        ([5, 6, 7], [8], SamplingParams(presence_penalty=0.5)), ([9], [10, 11], SamplingParams())
    )
    md = build_sampling_metadata(batch, np.array([0, 1]), VOCAB, CPU)
    assert md.prompt_token_ids.tolist() == [[5, 6, 7], [9, VOCAB, VOCAB]]
    assert md.output_token_ids.tolist() == [[8, VOCAB], [10, 11]]
    assert md.presence_penalties.tolist() == [0.5, 0.0]
    assert md.repetition_penalties.tolist() == [1.0, 1.0]


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    batch = make_batch(
        ([1], [4], SamplingParams(min_tokens=3, stop_token_ids=[7])),
        ([1], [4, 5, 6], SamplingParams(min_tokens=3, stop_token_ids=[7])),
    )
    md = build_sampling_metadata(batch, np.array([0, 1]), VOCAB, CPU)
    rows, ids, values = md.banned_tokens
    assert sorted(zip(rows.tolist(), ids.tolist())) == [(0, 2), (0, 7)]  # row 1 has 3 outputs
    assert values.tolist() == [float("-inf")] * 2


def test_a_ban_that_repeats_reuses_its_device_tensors_and_a_changed_one_does_not():
    batch = make_batch(
        ([1], [4], SamplingParams(min_tokens=3, stop_token_ids=[7])),
        ([1], [4], SamplingParams(min_tokens=3, stop_token_ids=[8])),
    )
    repeated = RepeatedInputs(CPU)
    first = build_sampling_metadata(batch, np.array([0, 1]), VOCAB, CPU, repeated=repeated)
    again = build_sampling_metadata(batch, np.array([0, 1]), VOCAB, CPU, repeated=repeated)
    assert all(a is b for a, b in zip(first.banned_tokens, again.banned_tokens))
    # Row 1 alone: a different ban, built afresh and right.
    other = build_sampling_metadata(batch, np.array([1]), VOCAB, CPU, repeated=repeated)
    assert other.banned_tokens[0] is not first.banned_tokens[0]
    assert sorted(other.banned_tokens[1].tolist()) == [2, 8]
    assert other.banned_tokens[0].tolist() == [0, 0]


def test_repeated_inputs_tell_equal_bytes_of_other_dtypes_or_shapes_apart():
    repeated = RepeatedInputs(CPU)
    (a,) = repeated.get("k", np.zeros(2, dtype=np.int64))
    (b,) = repeated.get("k", np.zeros(4, dtype=np.int32))  # the same 16 zero bytes
    (c,) = repeated.get("k", np.zeros((2, 2), dtype=np.int32))
    assert (a.dtype, b.dtype, tuple(c.shape)) == (torch.int64, torch.int32, (2, 2))
    assert repeated.zeros(3).tolist() == [0.0] * 3


def test_logit_bias_coordinates_and_max_logprobs():
    batch = make_batch(
        ([1], [], SamplingParams(logit_bias={3: 1.5, 9: -2.0}, logprobs=2)),
        ([1], [], SamplingParams(logprobs=5)),
    )
    md = build_sampling_metadata(batch, np.array([0, 1]), VOCAB, CPU)
    rows, ids, vals = md.logit_bias
    assert list(zip(rows.tolist(), ids.tolist(), vals.tolist())) == [(0, 3, 1.5), (0, 9, -2.0)]
    assert md.max_num_logprobs == 5


def test_seeded_generators_follow_their_rows():
    batch = make_batch(
        ([1], [], SamplingParams(temperature=1.0)),
        ([1], [], SamplingParams(temperature=1.0, seed=11)),
    )
    md = build_sampling_metadata(batch, np.array([1, 0]), VOCAB, CPU)
    assert list(md.generators) == [0]  # row 1 sits first in logits order
    assert md.race_keys is None  # not asked for


def test_keyed_race_keys_are_each_seeded_rows_seed_and_the_drawn_tokens_position():
    batch = make_batch(
        ([1, 2, 3], [], SamplingParams(temperature=1.0)),
        ([1], [7, 8], SamplingParams(temperature=1.0, seed=2**64 - 1)),  # = -1 as int64
        ([5], [], SamplingParams(temperature=0.8, seed=11)),
    )
    rows = np.array([2, 1, 0])
    md = build_sampling_metadata(batch, rows, VOCAB, CPU, keyed_race=True)
    seeds, positions = md.race_keys.tolist()
    assert seeds[:2] == [11, -1] and positions == [1, 3, 3]  # where each drawn token goes
    again = build_sampling_metadata(batch, rows, VOCAB, CPU, keyed_race=True)
    assert again.race_keys[0, :2].tolist() == seeds[:2]
    assert again.race_keys[0, 2] != seeds[2]  # the unseeded row: a fresh key each step
    assert md.generators == {}  # the race reads keys, not generators
    assert build_sampling_metadata(batch, rows, VOCAB, CPU).generators.keys() == {0, 1}
    greedy = make_batch(([1], [], SamplingParams(temperature=0)))
    assert (
        build_sampling_metadata(greedy, np.array([0]), VOCAB, CPU, keyed_race=True).race_keys
        is None
    )


def test_per_row_parameters_that_repeat_reuse_their_device_tensors():
    batch = make_batch(
        ([1], [], SamplingParams(temperature=0.7, top_p=0.9, top_k=5, presence_penalty=0.5)),
        ([1], [], SamplingParams(temperature=1.0, min_p=0.1)),
    )
    repeated = RepeatedInputs(CPU)
    first = build_sampling_metadata(batch, np.array([0, 1]), VOCAB, CPU, repeated=repeated)
    again = build_sampling_metadata(batch, np.array([0, 1]), VOCAB, CPU, repeated=repeated)
    for name in ("temperature", "top_k", "top_p", "min_p", "presence_penalties"):
        assert getattr(again, name) is getattr(first, name), name
    swapped = build_sampling_metadata(batch, np.array([1, 0]), VOCAB, CPU, repeated=repeated)
    assert swapped.temperature is not first.temperature
    assert swapped.temperature.tolist() == [1.0, np.float32(0.7)]
    assert swapped.top_k.tolist() == [VOCAB, 5]
