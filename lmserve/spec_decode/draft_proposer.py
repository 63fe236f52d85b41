"""Draft-model proposer: a smaller model with the target's tokenizer drafts k tokens greedily.

It lives in the target's model runner and shares its machinery: the same persistent batch, the
same block ids and slot mapping, the same attention backend. Only its weights and its per-layer
KV caches are its own (allocated with the target's number of blocks, so a block id means the
same tokens in both). One step:

    1. forward over exactly the step's scheduled tokens (same ids, positions and slots as the
       target) — keeps its KV in step with the target's, prompt chunks and drafts included;
    2. after verification, k single-token forwards from each request's last sampled token:

         position:  N-1 (last sampled)  N (draft 1)  ...  N+k-2 (draft k-1)
         input:     t_{N-1}             d_1          ...  d_{k-1}
         output:    d_1                 d_2          ...  d_k            (argmax of the logits)

       These write KV at positions N-1 .. N+k-2, past the step's tokens, hence the scheduler's
       k lookahead slots per request. Positions >= N hold drafts, and the next step's forward
       (1.) writes them again with whatever was accepted, so stale KV is never attended.

The drafts are greedy, i.e. deterministic given the context: the rejection sampler treats them
as point masses, which keeps random sampling exact (a sampled draft with its q would accept
more often at high temperature; not done here). Eager forwards: no CUDA graphs for the draft.
"""

from __future__ import annotations

import numpy as np
import torch

from lmserve.attention import ForwardContext
from lmserve.attention.backend import AttentionBackend
from lmserve.config import ModelConfig
from lmserve.model.loader import get_kv_cache_spec, load_model
from lmserve.worker.device_inputs import DeviceInputs
from lmserve.worker.input_batch import FlatInputs, InputBatch


class DraftModelProposer:
    def __init__(
        self,
        model_config: ModelConfig,
        block_size: int,
        inputs: DeviceInputs,
        attn_backend: AttentionBackend,
    ) -> None:
        """`inputs`: the target runner's static device inputs; the draft's forwards come after
        the target's in the same stream, so they stage into the same buffers."""
        self.model_config = model_config
        self.block_size = block_size
        self.inputs = inputs
        self.device = inputs.device
        self.attn_backend = attn_backend
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ---- set-up -------------------------------------------------------------------------------
    def load_model(self) -> None:
        mc = self.model_config
        self.model = load_model(
            mc.hf_config, mc.model_path, mc.dtype, self.device, mc.load_format, mc.seed
        )

    def kv_cache_bytes_per_block(self) -> int:
        num_layers, num_kv_heads, head_dim = get_kv_cache_spec(self.model_config.hf_config)
        element_size = torch.empty((), dtype=self.model_config.dtype).element_size()
        return 2 * num_layers * self.block_size * num_kv_heads * head_dim * element_size

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Per layer (key, value), each [num_blocks, block_size, num_kv_heads, head_dim]."""
        self.kv_caches = []  # drop a previous (e.g. profiling) cache before allocating
        num_layers, num_kv_heads, head_dim = get_kv_cache_spec(self.model_config.hf_config)
        shape = (num_blocks, self.block_size, num_kv_heads, head_dim)
        alloc = torch.empty if self.device.type == "cpu" else torch.zeros
        dtype = self.model_config.dtype
        self.kv_caches = [
            (alloc(shape, dtype=dtype, device=self.device), alloc(shape, dtype=dtype, device=self.device))
            for _ in range(num_layers)
        ]  # fmt: skip

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_scheduled(self, flat: FlatInputs) -> None:
        """1. Write the draft's KV for every token the target computed this step."""
        self._forward(flat)

    @torch.inference_mode()
    def propose(
        self,
        batch: InputBatch,
        rows: np.ndarray,  # [n] batch rows that sampled this step (tokens already appended)
        num_drafts: np.ndarray,  # [n] drafts wanted per row (<= k)
    ) -> np.ndarray:  # [n, max(num_drafts)] int64; row i's first num_drafts[i] are its drafts
        """2. Greedy drafts by single-token forwards; a row leaves once it has its drafts."""
        width = int(num_drafts.max()) if len(num_drafts) else 0
        drafts = np.full((len(rows), width), -1, dtype=np.int64)
        positions = batch.num_tokens[rows].astype(np.int64) - 1  # [n]: last sampled token
        tokens = batch.token_ids[rows, positions].astype(np.int64)  # [n]
        for j in range(width):
            active = np.nonzero(num_drafts > j)[0]  # [n_j]
            flat = _single_token_inputs(batch, rows[active], tokens[active], positions[active] + j)
            hidden = self._forward(flat)  # [n_j, hidden]
            next_tokens = self.model.compute_logits(hidden).argmax(dim=-1).cpu().numpy()
            drafts[active, j] = next_tokens
            tokens[active] = next_tokens
        return drafts

    def _forward(self, flat: FlatInputs) -> torch.Tensor:  # [num_tokens, hidden]
        num_tokens, num_reqs = len(flat.input_ids), len(flat.req_rows)
        input_ids, positions, metadata = self.inputs.stage(flat, num_tokens, num_reqs)
        ctx = ForwardContext(metadata, self.kv_caches, self.attn_backend)
        return self.model(input_ids, positions, ctx)


def _single_token_inputs(
    batch: InputBatch,
    rows: np.ndarray,  # [n]
    token_ids: np.ndarray,  # [n] int64
    positions: np.ndarray,  # [n] int64
) -> FlatInputs:
    """One query token per row at `positions`, attending to everything before it."""
    n, bs = len(rows), batch.block_size
    seq_lens = (positions + 1).astype(np.int32)  # [n]
    block_ids = batch.block_table[rows, positions // bs].astype(np.int64)  # [n]
    max_blocks = int(-(-seq_lens.max() // bs))
    return FlatInputs(
        req_rows=rows,
        input_ids=token_ids,
        positions=positions,
        slot_mapping=block_ids * bs + positions % bs,
        query_start_loc=np.arange(n + 1, dtype=np.int32),
        seq_lens=seq_lens,
        block_tables=batch.block_table[rows, :max_blocks],
        logits_indices=np.arange(n, dtype=np.int64),
        completes_known_tokens=np.ones(n, dtype=bool),
    )
