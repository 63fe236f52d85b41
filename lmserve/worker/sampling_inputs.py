"""Build one step's SamplingMetadata from the persistent batch.

Every optional group is built only when some sampling row uses it, so plain greedy or
temperature batches pay for two small gathers and nothing else.
"""

from __future__ import annotations

import numpy as np
import torch

from lmserve.sample.metadata import SamplingMetadata
from lmserve.worker.device_inputs import host_to_device
from lmserve.worker.input_batch import InputBatch


class RepeatedInputs:
    """Device tensors of sampling inputs that repeat from step to step, reused while their
    content stays the same: the same rows keep their temperatures, top-k/p, min-p and
    penalties, a request's min_tokens ban or logit bias holds for many steps, and an
    all-greedy batch of n rows always gets the same zeros. Each reuse saves a host->device
    copy: a pinned staging buffer, the copy's launch and, on the host, their Python. One entry
    per kind: the latest content. The tensors are read, never written, by the sampler."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._latest: dict[str, tuple[bytes, tuple[torch.Tensor, ...]]] = {}

    def get(self, kind: str, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
        """`arrays` on the device, as `host_to_device` gives them; the same tensors as the last
        call of this `kind` when the arrays are equal (dtypes and shapes included)."""
        key = b"|".join(
            f"{a.dtype.str}{a.shape}".encode() + np.ascontiguousarray(a).tobytes() for a in arrays
        )
        latest = self._latest.get(kind)
        if latest is not None and latest[0] == key:
            return latest[1]
        tensors = tuple(host_to_device(a, self.device) for a in arrays)
        self._latest[kind] = (key, tensors)
        return tensors

    def zeros(self, n: int) -> torch.Tensor:  # [n] float32 on the device
        return self.get("zeros", np.zeros(n, dtype=np.float32))[0]


def build_sampling_metadata(
    batch: InputBatch,
    rows: np.ndarray,  # [num_reqs] batch rows that sample this step, in logits order
    vocab_size: int,
    device: torch.device,
    num_tokens: np.ndarray | None = None,  # [num_reqs] tokens each row sees; default all known
    keyed_race: bool = False,  # CUDA: random rows race in one launch (SamplingMetadata.race_keys)
    repeated: RepeatedInputs | None = None,  # reuse the device copies of repeating inputs
) -> SamplingMetadata:
    """`rows` may repeat a batch row: speculative decoding samples a request at each draft
    position, row j seeing its known tokens plus drafts 1..j (`num_tokens` = known + j, the
    drafts being already written after the known tokens), so penalties and min_tokens bans
    count the drafts before it. Seeded generators then map to the row's last occurrence."""

    def to_dev(array: np.ndarray) -> torch.Tensor:
        return host_to_device(array, device)

    repeated = repeated or RepeatedInputs(device)

    def per_row(kind: str, array: np.ndarray) -> torch.Tensor:
        """A per-row sampling parameter: the same rows ask for the same values step after
        step, so the last step's device copy usually serves."""
        return repeated.get(kind, array)[0]

    temperature = batch.temperature[rows]
    random_rows = temperature > 0
    row_pos = {int(r): i for i, r in enumerate(rows)}
    metadata = SamplingMetadata(
        # All greedy: no row reads it.
        temperature=(
            per_row("temperature", temperature) if random_rows.any() else repeated.zeros(len(rows))
        ),
        all_greedy=not random_rows.any(),
        all_random=bool(random_rows.all()),
        # The keyed race draws from (seed, position) and reads no generator.
        generators=(
            {}
            if keyed_race
            else {row_pos[r]: g for r, g in batch.generators.items() if r in row_pos}
        ),
    )
    if random_rows.any():
        top_k, top_p, min_p = batch.top_k[rows], batch.top_p[rows], batch.min_p[rows]
        if (top_k > 0).any():
            top_k = np.where(top_k > 0, np.minimum(top_k, vocab_size), vocab_size)
            metadata.top_k = per_row("top_k", top_k)
        if (top_p < 1).any():
            metadata.top_p = per_row("top_p", top_p)
        if (min_p > 0).any():
            metadata.min_p = per_row("min_p", min_p)
    if num_tokens is None:
        num_tokens = batch.num_tokens[rows]
    if keyed_race and random_rows.any():
        metadata.race_keys = to_dev(race_keys(batch, rows, num_tokens))
    _add_penalties(metadata, batch, rows, num_tokens, vocab_size, to_dev, per_row)
    _add_logit_bias_and_bans(metadata, batch, rows, num_tokens, repeated)
    num_logprobs = batch.num_logprobs[rows]
    if (num_logprobs >= 0).any():
        metadata.max_num_logprobs = int(num_logprobs.max())
    return metadata


def race_keys(
    batch: InputBatch,
    rows: np.ndarray,  # [num_reqs]
    positions: np.ndarray,  # [num_reqs] where each row's drawn token goes in its request
) -> np.ndarray:  # [2, num_reqs] int64
    """(seed, position) per row for `seeded_race`: a seeded row's own seed, so its draw depends
    on nothing but the request; an unseeded row a fresh random key."""
    fresh = batch.race_rng.integers(-(2**63), 2**63 - 1, size=len(rows), dtype=np.int64)
    seeds = np.where(batch.seeded[rows], batch.seed[rows], fresh)
    return np.stack([seeds, positions.astype(np.int64)])


def uses_penalties(batch: InputBatch, rows: np.ndarray) -> bool:
    """Whether any of `rows` has a presence, frequency or repetition penalty (these read every
    prompt and output token of the row)."""
    return bool(
        (batch.presence_penalty[rows] != 0).any()
        or (batch.frequency_penalty[rows] != 0).any()
        or (batch.repetition_penalty[rows] != 1).any()
    )


def _add_penalties(
    metadata, batch: InputBatch, rows, num_tokens, vocab_size: int, to_dev, per_row
) -> None:
    if not uses_penalties(batch, rows):
        return
    metadata.presence_penalties = per_row("presence", batch.presence_penalty[rows])
    metadata.frequency_penalties = per_row("frequency", batch.frequency_penalty[rows])
    metadata.repetition_penalties = per_row("repetition", batch.repetition_penalty[rows])
    num_prompt = batch.num_prompt_tokens[rows]  # [num_reqs]
    max_prompt, max_output = int(num_prompt.max()), int((num_tokens - num_prompt).max())
    tokens = batch.token_ids[rows].astype(np.int64)  # [num_reqs, max_model_len + 1]
    cols = np.arange(max_prompt)[None, :]
    prompt = np.where(cols < num_prompt[:, None], tokens[:, :max_prompt], vocab_size)
    cols = np.arange(max(max_output, 1))[None, :]
    out_pos = np.minimum(num_prompt[:, None] + cols, tokens.shape[1] - 1)
    output = np.where(
        cols < (num_tokens - num_prompt)[:, None],
        np.take_along_axis(tokens, out_pos, axis=1),
        vocab_size,
    )
    metadata.prompt_token_ids = to_dev(prompt)  # [num_reqs, max_prompt_len], pad = vocab
    metadata.output_token_ids = to_dev(output)  # [num_reqs, max_output_len], pad = vocab


def _add_logit_bias_and_bans(
    metadata, batch: InputBatch, rows, num_tokens, repeated: RepeatedInputs
) -> None:
    bias_rows, bias_ids, bias_vals, ban_rows, ban_ids = [], [], [], [], []
    num_output = num_tokens - batch.num_prompt_tokens[rows]
    below_min = num_output < batch.min_tokens[rows]
    has_bias = batch.has_logit_bias[rows]
    for i in np.nonzero(below_min | has_bias)[0].tolist():  # usually none
        row = rows[i]
        params = batch.sampling_params[row]
        if params.logit_bias:
            for token_id, bias in params.logit_bias.items():
                bias_rows.append(i)
                bias_ids.append(int(token_id))
                bias_vals.append(float(bias))
        if below_min[i]:
            eos = int(batch.eos_token_id[row])
            for token_id in ([eos] if eos >= 0 else []) + list(params.stop_token_ids):
                ban_rows.append(i)
                ban_ids.append(token_id)
    # Through pinned memory (host_to_device): `torch.tensor(list, device=cuda)` copies from
    # pageable memory and waits for the GPU, which stalled every step of a min_tokens request.
    # A ban or bias usually repeats the last step's: its device copies are reused.
    if bias_rows:
        metadata.logit_bias = repeated.get(
            "logit_bias",
            np.array(bias_rows, dtype=np.int64),
            np.array(bias_ids, dtype=np.int64),
            np.array(bias_vals, dtype=np.float32),
        )
    if ban_rows:
        metadata.banned_tokens = repeated.get(
            "banned_tokens",
            np.array(ban_rows, dtype=np.int64),
            np.array(ban_ids, dtype=np.int64),
            np.full(len(ban_rows), -np.inf, dtype=np.float32),
        )
