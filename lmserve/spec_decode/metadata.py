"""SpecDecodeMetadata: where one step's draft tokens sit in the flat batch and in the logits.

Example: request 0 verifies 3 drafts, request 1 none (it samples one token as usual):

    flat tokens (scheduled):  | r0: last d1 d2 d3 | r1: last |
    target rows (logits):     | r0: row0 row1 row2 row3 | r1: row4 |        num_rows = sum(k_i + 1)
    row j of a request:       the target distribution after its j-th draft (row 0: after `last`);
                              row k_i is the bonus row, used when every draft is accepted
    draft_token_ids [2, 3]:   [[d1, d2, d3], [-1, -1, -1]]                 padded with -1
    target_rows     [2, 4]:   [[0, 1, 2, 3], [4, 4, 4, 4]]                 clamped to the bonus row

Built once per step on the host with numpy (no loop over tokens); the device tensors go to the
rejection sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmserve.worker.device_inputs import host_to_device

PLACEHOLDER_TOKEN_ID = -1  # pads draft and output token rows


@dataclass(slots=True)
class SpecDecodeMetadata:
    num_draft_tokens: np.ndarray  # [num_reqs] int64, k_i (0 for a request without drafts)
    logits_indices: np.ndarray  # [num_rows] int64, flat token index of each target row
    row_start: np.ndarray  # [num_reqs] int64, first target row of each request
    draft_token_ids: torch.Tensor  # [num_reqs, max_k] int64, padded with PLACEHOLDER_TOKEN_ID
    target_rows: torch.Tensor  # [num_reqs, max_k + 1] int64, target row of (request, j)
    num_draft_tokens_dev: torch.Tensor  # [num_reqs] int64, on the device
    logits_indices_dev: torch.Tensor  # [num_rows] int64, logits_indices on the device

    def __post_init__(self) -> None:
        num_reqs = len(self.num_draft_tokens)
        assert len(self.logits_indices) == int(self.num_draft_tokens.sum()) + num_reqs
        assert self.target_rows.shape == (num_reqs, self.max_num_draft_tokens + 1)

    @property
    def num_reqs(self) -> int:
        return len(self.num_draft_tokens)

    @property
    def max_num_draft_tokens(self) -> int:
        return self.draft_token_ids.shape[1]

    @property
    def num_rows(self) -> int:
        return len(self.logits_indices)

    @classmethod
    def build(
        cls,
        draft_token_ids: list[list[int]],  # per request (in sampling order), [] when none
        last_token_index: np.ndarray,  # [num_reqs] flat index of each request's last token
        device: torch.device,
    ) -> SpecDecodeMetadata:
        """The drafts are the last k_i scheduled tokens of request i, so its target rows are
        the logits at flat indices last - k_i .. last."""
        num_draft = np.fromiter((len(d) for d in draft_token_ids), np.int64, len(draft_token_ids))
        num_rows = num_draft + 1  # [num_reqs]
        cu_rows = np.cumsum(num_rows)
        row_start = cu_rows - num_rows
        total = int(cu_rows[-1]) if len(cu_rows) else 0
        offsets = np.arange(total) - np.repeat(row_start, num_rows)  # [num_rows]: j within request
        first = np.asarray(last_token_index, dtype=np.int64) - num_draft
        max_k = int(num_draft.max()) if len(num_draft) else 0
        drafts = np.full((len(num_draft), max_k), PLACEHOLDER_TOKEN_ID, dtype=np.int64)
        drafts[np.arange(max_k)[None, :] < num_draft[:, None]] = np.fromiter(
            (t for d in draft_token_ids for t in d), np.int64, int(num_draft.sum())
        )  # row-major boolean assignment fills each request's drafts in order
        j = np.arange(max_k + 1)[None, :]
        target_rows = row_start[:, None] + np.minimum(j, num_draft[:, None])  # [num_reqs, max_k+1]
        logits_indices = np.repeat(first, num_rows) + offsets  # [num_rows]
        # One host->device copy for the four arrays (each copy is a launch and a pinned
        # buffer, on a verify step whose host time is not hidden behind the GPU).
        parts = (drafts, target_rows, num_draft, logits_indices)
        packed = host_to_device(np.concatenate([a.ravel() for a in parts]), device)
        views = torch.split(packed, [a.size for a in parts])
        return cls(
            num_draft_tokens=num_draft,
            logits_indices=logits_indices,
            row_start=row_start,
            draft_token_ids=views[0].view(drafts.shape),
            target_rows=views[1].view(target_rows.shape),
            num_draft_tokens_dev=views[2],
            logits_indices_dev=views[3],
        )

    def row_repeats(self) -> np.ndarray:  # [num_reqs] target rows per request (k_i + 1)
        return self.num_draft_tokens + 1

    def row_offsets(self) -> np.ndarray:  # [num_rows] j of each target row within its request
        repeats = self.row_repeats()
        return np.arange(self.num_rows) - np.repeat(self.row_start, repeats)
