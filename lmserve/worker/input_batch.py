"""The persistent batch: one row per running request, in preallocated host arrays.

Each step applies the scheduler's diffs (remove finished/preempted rows, append new block ids,
add new requests, condense holes) instead of rebuilding the batch, then builds the flat inputs of
one forward with vectorised numpy, never a Python loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmserve.core.sched_output import NewRequestData
from lmserve.sampling_params import SamplingParams


@dataclass(slots=True)
class FlatInputs:
    """Host-side inputs of one forward over the scheduled rows (`req_rows`, in batch order)."""

    req_rows: np.ndarray  # [num_reqs] batch rows with > 0 scheduled tokens
    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    query_start_loc: np.ndarray  # [num_reqs + 1] int32
    seq_lens: np.ndarray  # [num_reqs] int32, KV length after this step
    block_tables: np.ndarray  # [num_reqs, max_blocks_in_step] int32
    logits_indices: np.ndarray  # [num_reqs] flat index of each request's last scheduled token
    completes_known_tokens: np.ndarray  # [num_reqs] bool: samples a new token this step
    # Async scheduling: (flat indices, token ids), both [n] on the device, of input tokens the
    # previous step sampled and the host has not seen yet (`input_ids` holds junk there);
    # indices None = the first n inputs.
    input_ids_on_device: tuple[torch.Tensor | None, torch.Tensor] | None = None
    # Decode-only steps: tokens at the start of every request's keys held in the same blocks
    # (lmserve/attention/shared_prefix.py); 0 = none, or not looked for.
    shared_prefix_len: int = 0


class InputBatch:
    def __init__(
        self,
        max_num_reqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.device = device  # where seeded generators draw their noise
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.block_size = block_size
        max_blocks_per_req = -(-max_model_len // block_size)
        # +1 column: a request may sample the token at position max_model_len (never computed).
        self.token_ids = np.zeros((max_num_reqs, max_model_len + 1), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int32)  # known tokens per row
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int32)
        self.temperature = np.zeros(max_num_reqs, dtype=np.float32)
        # Per-row sampling parameters, as arrays so a step gathers them without a Python loop.
        self.top_k = np.zeros(max_num_reqs, dtype=np.int64)  # 0 = off
        self.top_p = np.ones(max_num_reqs, dtype=np.float32)
        self.min_p = np.zeros(max_num_reqs, dtype=np.float32)
        self.presence_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.frequency_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.repetition_penalty = np.ones(max_num_reqs, dtype=np.float32)
        self.min_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.max_tokens = np.zeros(max_num_reqs, dtype=np.int32)  # None -> max_model_len
        self.num_logprobs = np.full(max_num_reqs, -1, dtype=np.int32)  # -1 = not asked
        self.eos_token_id = np.full(max_num_reqs, -1, dtype=np.int64)  # -1 = none
        self.has_logit_bias = np.zeros(max_num_reqs, dtype=bool)
        self.generators: dict[int, torch.Generator] = {}  # row -> seeded generator
        self.seeded = np.zeros(max_num_reqs, dtype=bool)  # the rows in `generators`
        self.seed = np.zeros(max_num_reqs, dtype=np.int64)  # their seeds (low 64 bits)
        # Keys of unseeded rows in a keyed race (sampling_inputs.py), from the engine's seed.
        self.race_rng = np.random.default_rng(seed)
        self.sampling_params: list[SamplingParams | None] = [None] * max_num_reqs
        self.req_ids: list[str | None] = [None] * max_num_reqs
        self.req_id_to_index: dict[str, int] = {}
        self.num_reqs = 0  # rows [0, num_reqs) are live after condense()

    # ---- diffs --------------------------------------------------------------------------------
    def add_request(self, new: NewRequestData) -> None:
        row = self._first_free_row()
        tokens = new.prompt_token_ids + new.output_token_ids
        n = len(tokens)
        self.token_ids[row, :n] = tokens
        self.num_tokens[row] = n
        self.num_prompt_tokens[row] = len(new.prompt_token_ids)
        self.num_computed_tokens[row] = new.num_computed_tokens
        self.num_blocks[row] = 0
        self.append_block_ids(row, new.block_ids)
        params = new.sampling_params
        self.temperature[row] = 0.0 if params.greedy else params.temperature
        self.top_k[row] = max(params.top_k, 0)
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.presence_penalty[row] = params.presence_penalty
        self.frequency_penalty[row] = params.frequency_penalty
        self.repetition_penalty[row] = params.repetition_penalty
        self.min_tokens[row] = params.min_tokens
        self.max_tokens[row] = min(params.max_tokens or self.max_model_len, self.max_model_len)
        self.num_logprobs[row] = -1 if params.logprobs is None else params.logprobs
        self.eos_token_id[row] = -1 if new.eos_token_id is None else new.eos_token_id
        self.has_logit_bias[row] = bool(params.logit_bias)
        self.seeded[row] = params.seed is not None and not params.greedy
        if self.seeded[row]:
            self.generators[row] = torch.Generator(self.device).manual_seed(params.seed)
            self.seed[row] = _as_int64(params.seed)
        self.sampling_params[row] = params
        self.req_ids[row] = new.req_id
        self.req_id_to_index[new.req_id] = row
        self.num_reqs = max(self.num_reqs, row + 1)

    def append_block_ids(self, row: int, block_ids: list[int]) -> None:
        if block_ids:
            start = self.num_blocks[row]
            self.block_table[row, start : start + len(block_ids)] = block_ids
            self.num_blocks[row] = start + len(block_ids)

    def remove_request(self, req_id: str) -> None:
        row = self.req_id_to_index.pop(req_id, None)
        if row is None:
            return
        self.req_ids[row] = None
        self.sampling_params[row] = None
        self.generators.pop(row, None)

    def condense(self) -> None:
        """Fill holes left by removed rows with the last live rows, so rows [0, num_reqs) are
        all live. Moves whole rows; nothing else changes."""
        live = self.num_reqs
        while live > 0 and self.req_ids[live - 1] is None:
            live -= 1
        hole = 0
        while True:
            while hole < live and self.req_ids[hole] is not None:
                hole += 1
            if hole >= live:
                break
            last = live - 1
            self._move_row(last, hole)
            live -= 1
            while live > 0 and self.req_ids[live - 1] is None:
                live -= 1
        self.num_reqs = live

    def _move_row(self, src: int, dst: int) -> None:
        n = self.num_tokens[src]
        self.token_ids[dst, :n] = self.token_ids[src, :n]
        nb = self.num_blocks[src]
        self.block_table[dst, :nb] = self.block_table[src, :nb]
        for arr in self._per_row_arrays():
            arr[dst] = arr[src]
        if src in self.generators:
            self.generators[dst] = self.generators.pop(src)
        self.sampling_params[dst], self.sampling_params[src] = self.sampling_params[src], None
        req_id = self.req_ids[src]
        self.req_ids[dst], self.req_ids[src] = req_id, None
        self.req_id_to_index[req_id] = dst

    def _per_row_arrays(self) -> tuple[np.ndarray, ...]:
        return (
            self.num_tokens, self.num_prompt_tokens, self.num_computed_tokens, self.num_blocks,
            self.temperature, self.top_k, self.top_p, self.min_p, self.presence_penalty,
            self.frequency_penalty, self.repetition_penalty, self.min_tokens, self.max_tokens,
            self.num_logprobs, self.eos_token_id, self.has_logit_bias, self.seeded,
            self.seed,
        )  # fmt: skip

    def _first_free_row(self) -> int:
        for row in range(self.num_reqs):
            if self.req_ids[row] is None:
                return row
        if self.num_reqs >= self.max_num_reqs:
            raise RuntimeError(f"InputBatch is full ({self.max_num_reqs} rows)")
        return self.num_reqs

    def append_sampled(self, rows: np.ndarray, token_ids: np.ndarray) -> None:
        """Record one sampled token for each of `rows`."""
        self.token_ids[rows, self.num_tokens[rows]] = token_ids
        self.num_tokens[rows] += 1

    def write_draft_tokens(self, row: int, token_ids: list[int]) -> None:
        """Place a request's scheduled draft tokens right after its known tokens, where
        `prepare_inputs` reads them; `num_tokens` is unchanged (they are not known yet)."""
        start = self.num_tokens[row]
        self.token_ids[row, start : start + len(token_ids)] = token_ids

    def append_token_ids(
        self,
        rows: np.ndarray,  # [n] batch rows
        token_ids: np.ndarray,  # [n, width] tokens per row, left-aligned
        num_new: np.ndarray,  # [n] how many of each row's tokens to append (<= width)
    ) -> None:
        """Record a variable number of sampled tokens per row (speculative decoding)."""
        width = token_ids.shape[1]
        valid = np.arange(width)[None, :] < num_new[:, None]  # [n, width]
        token_rows = np.repeat(rows, num_new)  # [total]
        cols = np.repeat(self.num_tokens[rows], num_new) + np.nonzero(valid)[1]
        self.token_ids[token_rows, cols] = token_ids[valid]
        self.num_tokens[rows] += num_new.astype(self.num_tokens.dtype)

    # ---- flat inputs -------------------------------------------------------------------------
    def prepare_inputs(self, num_scheduled_tokens: dict[str, int]) -> FlatInputs:
        n_reqs = self.num_reqs
        num_sched = np.array(
            [num_scheduled_tokens.get(r, 0) for r in self.req_ids[:n_reqs]], dtype=np.int32
        )
        rows = np.nonzero(num_sched)[0]
        num_sched = num_sched[rows]  # [num_reqs]
        cu = np.cumsum(num_sched)
        total = int(cu[-1]) if len(cu) else 0
        token_rows = np.repeat(rows, num_sched)  # [num_tokens]
        offsets = np.arange(total) - np.repeat(cu - num_sched, num_sched)
        computed = self.num_computed_tokens[rows]
        positions = np.repeat(computed, num_sched) + offsets  # [num_tokens]
        bs = self.block_size
        seq_lens = (computed + num_sched).astype(np.int32)
        max_blocks = int(-(-seq_lens.max() // bs)) if len(rows) else 0
        return FlatInputs(
            req_rows=rows,
            input_ids=self.token_ids[token_rows, positions].astype(np.int64),
            positions=positions.astype(np.int64),
            slot_mapping=(
                self.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
            ),
            query_start_loc=np.concatenate([[0], cu]).astype(np.int32),
            seq_lens=seq_lens,
            block_tables=self.block_table[rows, :max_blocks],
            logits_indices=cu - 1,
            completes_known_tokens=seq_lens >= self.num_tokens[rows],
        )


def _as_int64(seed: int) -> int:
    """A seed in [-2**63, 2**64) as the int64 with the same low 64 bits."""
    seed %= 2**64
    return seed - 2**64 if seed >= 2**63 else seed
