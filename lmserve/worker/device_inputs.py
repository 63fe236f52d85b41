"""The inputs of one forward, persistent on the device.

Every step the model runner builds its flat inputs on the host (numpy, in `InputBatch`). Here
they go to the device through preallocated buffers: each field has a pinned host staging tensor
and a device tensor of the largest size a step can need, and a step copies only its own prefix
with non-blocking copies (one small H2D transfer per field, no allocation). The device tensors
keep their addresses for the engine's lifetime, which is what CUDA graphs replay against: a graph
captured for `B` rows reads `input_ids[:B]`, `seq_lens[:B]`, ... from these same buffers.

Padding to a graph's size: rows past the real ones are one-token "requests" with `seq_len = 0`
and slot -1 — the KV write skips them and attention reads no key for them, so they cost almost
nothing and never touch real rows (every op outside attention is row-wise). A verify graph
(speculative decoding: up to 1 + k tokens per request) pads with *empty* requests instead, and
its spare tokens belong to no request: attention never visits them.
"""

from __future__ import annotations

import numpy as np
import torch

from lmserve.attention.backend import AttentionMetadata
from lmserve.worker.input_batch import FlatInputs


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small per-step host array on `device` without stalling the host: on CUDA it goes
    through pinned memory (PyTorch's caching host allocator keeps the buffer until the copy is
    done), so the copy is queued behind the running forward instead of waiting for it."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class _Staged:
    """One field: pinned host staging + device tensor of the same shape."""

    __slots__ = ("host", "host_np", "device")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        pin = device.type == "cuda"
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.host_np = self.host.numpy()
        self.device = (
            self.host if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)
        )

    def upload(self, n: int) -> torch.Tensor:
        """Copy the first `n` rows host → device (asynchronous on CUDA); the device view."""
        if self.device is not self.host:
            self.device[:n].copy_(self.host[:n], non_blocking=True)
        return self.device[:n]


class DeviceInputs:
    """Static device buffers for input ids, positions and attention metadata."""

    def __init__(
        self,
        max_num_tokens: int,
        max_num_reqs: int,
        max_blocks_per_req: int,
        device: torch.device,
    ) -> None:
        self.device = device
        self.max_num_tokens = max_num_tokens
        self.max_num_reqs = max_num_reqs
        self.input_ids = _Staged((max_num_tokens,), torch.int64, device)  # [max_num_tokens]
        self.positions = _Staged((max_num_tokens,), torch.int64, device)  # [max_num_tokens]
        self.slot_mapping = _Staged((max_num_tokens,), torch.int64, device)  # [max_num_tokens]
        self.query_start_loc = _Staged((max_num_reqs + 1,), torch.int32, device)  # [reqs + 1]
        self.seq_lens = _Staged((max_num_reqs,), torch.int32, device)  # [max_num_reqs]
        # [max_num_reqs, max_blocks_per_req]; columns past a step's widest row keep stale ids,
        # which attention never reads (it stops at seq_len).
        self.block_tables = _Staged((max_num_reqs, max_blocks_per_req), torch.int32, device)
        # [1]: the shared prefix's length for shared-prefix decode attention; uploaded only by
        # steps that use it (others never read it).
        self.shared_prefix = _Staged((1,), torch.int32, device)
        # The pinned buffers are rewritten every step: wait until the previous step's copies
        # have left them (a step with no sampling never synchronises with the device).
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def stage(
        self, flat: FlatInputs, num_tokens: int, num_reqs: int, empty_padding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Upload `flat`, padded to `num_tokens` tokens and `num_reqs` requests (>= the real
        counts; equal for an eager forward). Returns device (input_ids, positions, metadata).
        `empty_padding`: see `pad_host`."""
        self.upload(flat, num_tokens, num_reqs, empty_padding)
        metadata = AttentionMetadata(
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            max_query_len=int(np.diff(flat.query_start_loc).max()),
            max_seq_len=int(flat.seq_lens.max()),
            slot_mapping=self.slot_mapping.device[:num_tokens],
            query_start_loc=self.query_start_loc.device[: num_reqs + 1],
            seq_lens=self.seq_lens.device[:num_reqs],
            block_tables=self.block_tables.device[:num_reqs, : flat.block_tables.shape[1]],
            query_start_loc_cpu=self.query_start_loc.host_np[: num_reqs + 1].tolist(),
            seq_lens_cpu=self.seq_lens.host_np[:num_reqs].tolist(),
            shared_prefix=self.shared_prefix.device if flat.shared_prefix_len else None,
        )
        return self.input_ids.device[:num_tokens], self.positions.device[:num_tokens], metadata

    def upload(
        self, flat: FlatInputs, num_tokens: int, num_reqs: int, empty_padding: bool = False
    ) -> None:
        """`stage` without the metadata: what a full CUDA graph's replay needs (it reads the
        device buffers, and its metadata was fixed at capture)."""
        real_tokens, real_reqs = len(flat.input_ids), len(flat.req_rows)
        if self._copied is not None:
            self._copied.synchronize()
        self._fill_host(flat, real_tokens, real_reqs, num_tokens, num_reqs, empty_padding)
        input_ids = self.input_ids.upload(num_tokens)
        if flat.input_ids_on_device is not None:  # tokens the host has not seen yet
            index, token_ids = flat.input_ids_on_device
            if index is None:  # the first len(token_ids) inputs
                input_ids[: len(token_ids)].copy_(token_ids)
            else:
                input_ids.index_copy_(0, index, token_ids)
        for field in (self.positions, self.slot_mapping):
            field.upload(num_tokens)
        self.query_start_loc.upload(num_reqs + 1)
        self.seq_lens.upload(num_reqs)
        self.block_tables.upload(num_reqs)
        if flat.shared_prefix_len:
            self.shared_prefix.host_np[0] = flat.shared_prefix_len
            self.shared_prefix.upload(1)
        if self._copied is not None:
            self._copied.record(self._stream)

    def _fill_host(
        self,
        flat: FlatInputs,
        real_tokens: int,
        real_reqs: int,
        num_tokens: int,
        num_reqs: int,
        empty_padding: bool,
    ) -> None:
        self.input_ids.host_np[:real_tokens] = flat.input_ids
        self.positions.host_np[:real_tokens] = flat.positions
        self.slot_mapping.host_np[:real_tokens] = flat.slot_mapping
        self.query_start_loc.host_np[: real_reqs + 1] = flat.query_start_loc
        self.seq_lens.host_np[:real_reqs] = flat.seq_lens
        width = flat.block_tables.shape[1]
        self.block_tables.host_np[:real_reqs, :width] = flat.block_tables
        self.pad_host(real_tokens, real_reqs, num_tokens, num_reqs, empty_padding)

    def pad_host(
        self,
        real_tokens: int,
        real_reqs: int,
        num_tokens: int,
        num_reqs: int,
        empty_padding: bool = False,
    ) -> None:
        """Padding rows: token 0 at position 0 writing nowhere; each padding request has one
        query token (the last request also takes any surplus tokens) and no keys.

        `empty_padding` (verify graphs): padding requests have no query token, and the spare
        tokens past the real ones belong to no request. A batch that fills every request slot
        but not every token slot then leaves its last real request its own tokens."""
        self.input_ids.host_np[real_tokens:num_tokens] = 0
        self.positions.host_np[real_tokens:num_tokens] = 0
        self.slot_mapping.host_np[real_tokens:num_tokens] = -1
        starts = self.query_start_loc.host_np
        if empty_padding:
            starts[real_reqs + 1 : num_reqs + 1] = real_tokens
        else:
            extra = np.arange(1, num_reqs - real_reqs + 1, dtype=np.int32)
            starts[real_reqs + 1 : num_reqs + 1] = np.minimum(real_tokens + extra, num_tokens)
            starts[num_reqs] = num_tokens
        self.seq_lens.host_np[real_reqs:num_reqs] = 0

    def padded_metadata(
        self,
        num_tokens: int,
        num_reqs: int,
        query_len: int | None = None,
        shared_prefix: bool = False,
    ) -> AttentionMetadata:
        """Metadata over the device buffers for an all-padding batch (graph capture and
        warm-up): nothing is written to the KV cache and no key is read. `query_len`: a verify
        graph's tokens per request (empty padding; the attention kernel's tile is chosen for
        queries of that length). `shared_prefix`: a decode graph with shared-prefix attention
        (captured with a prefix of 0; replays read the step's)."""
        self.pad_host(0, 0, num_tokens, num_reqs, empty_padding=query_len is not None)
        self.query_start_loc.host_np[0] = 0
        self.shared_prefix.host_np[0] = 0
        self.shared_prefix.upload(1)
        for field in (self.input_ids, self.positions, self.slot_mapping):
            field.upload(num_tokens)
        return AttentionMetadata(
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            # by default the last padding request takes the rest
            max_query_len=query_len or num_tokens - num_reqs + 1,
            max_seq_len=0,
            slot_mapping=self.slot_mapping.device[:num_tokens],
            query_start_loc=self.query_start_loc.upload(num_reqs + 1),
            seq_lens=self.seq_lens.upload(num_reqs),
            block_tables=self.block_tables.upload(num_reqs)[:, :1],
            query_start_loc_cpu=self.query_start_loc.host_np[: num_reqs + 1].tolist(),
            seq_lens_cpu=self.seq_lens.host_np[:num_reqs].tolist(),
            shared_prefix=self.shared_prefix.device if shared_prefix else None,
        )
