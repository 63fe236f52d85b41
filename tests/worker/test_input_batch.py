"""The persistent batch: diffs applied in place, flat inputs built right."""

from __future__ import annotations

import numpy as np
import torch

from lmserve.core.sched_output import NewRequestData
from lmserve.sampling_params import SamplingParams
from lmserve.worker.input_batch import InputBatch


def new_req(req_id, prompt, blocks, computed=0, output=(), **params):
    return NewRequestData(
        req_id=req_id,
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        sampling_params=SamplingParams(**params),
        eos_token_id=2,
        block_ids=list(blocks),
        num_computed_tokens=computed,
    )


def make_batch(max_reqs=4):
    return InputBatch(
        max_num_reqs=max_reqs, max_model_len=64, block_size=4, device=torch.device("cpu")
    )


def test_flat_inputs_for_a_mixed_batch_of_prefill_chunk_and_decode():
    batch = make_batch()
    batch.add_request(new_req("a", range(10, 20), blocks=[5, 2, 7]))  # 10-token prompt
    batch.add_request(new_req("b", range(30, 36), blocks=[1, 3], computed=5))  # decoding
    flat = batch.prepare_inputs({"a": 6, "b": 1})  # a: first chunk of 6; b: its last token
    assert flat.input_ids.tolist() == [10, 11, 12, 13, 14, 15, 35]
    assert flat.positions.tolist() == [0, 1, 2, 3, 4, 5, 5]
    # a: tokens 0-3 in block 5, 4-5 in block 2; b: position 5 -> block 3, offset 1
    assert flat.slot_mapping.tolist() == [20, 21, 22, 23, 8, 9, 13]
    assert flat.query_start_loc.tolist() == [0, 6, 7]
    assert flat.seq_lens.tolist() == [6, 6]
    assert flat.logits_indices.tolist() == [5, 6]
    assert flat.completes_known_tokens.tolist() == [False, True]  # a is mid-prompt
    assert flat.block_tables.tolist() == [[5, 2], [1, 3]]


def test_unscheduled_rows_are_left_out_of_the_forward():
    batch = make_batch()
    batch.add_request(new_req("a", [1, 2, 3], blocks=[0]))
    batch.add_request(new_req("b", [4, 5], blocks=[1]))
    flat = batch.prepare_inputs({"b": 2})
    assert flat.req_rows.tolist() == [1]
    assert flat.input_ids.tolist() == [4, 5]


def test_condense_fills_holes_with_the_last_rows():
    batch = make_batch()
    for i, name in enumerate("abcd"):
        batch.add_request(new_req(name, [i + 1] * (i + 1), blocks=[i], temperature=0.5 * i, seed=i))
    batch.remove_request("a")
    batch.remove_request("c")
    batch.condense()
    assert batch.num_reqs == 2
    assert batch.req_ids[:2] == ["d", "b"]
    assert batch.req_id_to_index == {"d": 0, "b": 1}
    assert batch.token_ids[0, :4].tolist() == [4, 4, 4, 4]
    assert batch.num_tokens[:2].tolist() == [4, 2]
    assert batch.block_table[0, 0] == 3
    assert np.isclose(batch.temperature[0], 1.5)
    assert set(batch.generators) == {0, 1}  # seeded generators moved with their rows
    assert batch.seeded[:2].tolist() == [True, True] and batch.seed[:2].tolist() == [3, 1]


def test_a_new_request_takes_the_first_free_row():
    batch = make_batch()
    batch.add_request(new_req("a", [1], blocks=[0]))
    batch.add_request(new_req("b", [2], blocks=[1]))
    batch.remove_request("a")
    batch.add_request(new_req("c", [3], blocks=[2]))
    assert batch.req_id_to_index["c"] == 0


def test_appended_blocks_and_sampled_tokens_extend_the_row():
    batch = make_batch()
    batch.add_request(new_req("a", [1, 2, 3, 4], blocks=[9]))
    batch.append_block_ids(0, [4])
    batch.append_sampled(np.array([0]), np.array([77]))
    batch.num_computed_tokens[0] = 4
    flat = batch.prepare_inputs({"a": 1})
    assert flat.input_ids.tolist() == [77]
    assert flat.slot_mapping.tolist() == [16]  # position 4 -> block 4, offset 0


def test_resumed_request_replays_prompt_and_outputs():
    batch = make_batch()
    batch.add_request(new_req("a", [1, 2], blocks=[0], output=[3, 4]))
    flat = batch.prepare_inputs({"a": 4})
    assert flat.input_ids.tolist() == [1, 2, 3, 4]
    assert flat.completes_known_tokens.tolist() == [True]
