"""ModelRunner: SchedulerOutput → persistent batch diffs → one forward → sampled tokens."""

from __future__ import annotations

import logging

import numpy as np
import torch

from lmserve.attention import AttentionMetadata, ForwardContext, get_attention_backend
from lmserve.config import EngineConfig
from lmserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from lmserve.model.loader import get_kv_cache_spec, load_model
from lmserve.sample.sampler import Sampler, SamplingMetadata
from lmserve.worker.input_batch import FlatInputs, InputBatch

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        model_config = config.model_config
        self.dtype = model_config.dtype
        self.block_size = config.cache_config.block_size
        self.input_batch = InputBatch(
            max_num_reqs=config.scheduler_config.max_num_seqs,
            max_model_len=model_config.max_model_len,
            block_size=self.block_size,
            device=device,
        )
        self.attn_backend = get_attention_backend(device.type)
        self.sampler = Sampler()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.model: torch.nn.Module | None = None

    # ---- set-up -------------------------------------------------------------------------------
    def load_model(self) -> None:
        mc = self.config.model_config
        torch.manual_seed(mc.seed)
        self.model = load_model(
            mc.hf_config, mc.model_path, mc.dtype, self.device, mc.load_format, mc.seed
        )

    def kv_cache_bytes_per_block(self) -> int:
        num_layers, num_kv_heads, head_dim = get_kv_cache_spec(self.config.model_config.hf_config)
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * num_layers * self.block_size * num_kv_heads * head_dim * element_size

    def initialize_kv_cache(self, num_blocks: int) -> None:
        num_layers, num_kv_heads, head_dim = get_kv_cache_spec(self.config.model_config.hf_config)
        shape = (num_blocks, self.block_size, num_kv_heads, head_dim)
        # NOTE: on the CPU the pool is left uninitialised so pages are touched lazily (zeroing
        # gigabytes costs seconds at start-up); attention never reads a slot it did not write.
        # On the GPU zeros are cheap and keep masked-out tiles of future kernels finite.
        alloc = torch.empty if self.device.type == "cpu" else torch.zeros
        self.kv_caches = [
            (
                alloc(shape, dtype=self.dtype, device=self.device),  # key cache
                alloc(shape, dtype=self.dtype, device=self.device),  # value cache
            )
            for _ in range(num_layers)
        ]

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(scheduler_output)
        batch = self.input_batch
        if scheduler_output.is_empty:
            return ModelRunnerOutput(req_ids=[], req_id_to_index={}, sampled_token_ids=[])
        flat = batch.prepare_inputs(scheduler_output.num_scheduled_tokens)
        ctx = self._forward_context(flat)
        input_ids = torch.from_numpy(flat.input_ids).to(self.device)
        positions = torch.from_numpy(flat.positions).to(self.device)
        hidden = self.model(input_ids, positions, ctx)  # [num_tokens, hidden_size]
        logits_indices = torch.from_numpy(flat.logits_indices).to(self.device)
        logits = self.model.compute_logits(hidden[logits_indices])  # [num_reqs, vocab]
        sampled = self.sampler(logits, self._sampling_metadata(flat.req_rows)).cpu().numpy()
        return self._collect(flat, sampled)

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in scheduler_output.finished_req_ids | scheduler_output.preempted_req_ids:
            batch.remove_request(req_id)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_block_ids, num_computed in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens
        ):
            row = batch.req_id_to_index[req_id]
            batch.append_block_ids(row, new_block_ids)
            batch.num_computed_tokens[row] = num_computed
        for new in scheduler_output.scheduled_new_reqs:
            batch.add_request(new)
        batch.condense()

    def _forward_context(self, flat: FlatInputs) -> ForwardContext:
        dev = self.device
        metadata = AttentionMetadata(
            num_reqs=len(flat.req_rows),
            num_tokens=len(flat.input_ids),
            max_query_len=int(np.diff(flat.query_start_loc).max()),
            max_seq_len=int(flat.seq_lens.max()),
            slot_mapping=torch.from_numpy(flat.slot_mapping).to(dev),
            query_start_loc=torch.from_numpy(flat.query_start_loc).to(dev),
            seq_lens=torch.from_numpy(flat.seq_lens).to(dev),
            block_tables=torch.from_numpy(flat.block_tables).to(dev),
            query_start_loc_cpu=flat.query_start_loc.tolist(),
            seq_lens_cpu=flat.seq_lens.tolist(),
        )
        return ForwardContext(metadata, self.kv_caches, self.attn_backend)

    def _sampling_metadata(self, rows: np.ndarray) -> SamplingMetadata:
        batch = self.input_batch
        temperature = batch.temperature[rows]
        row_pos = {int(r): i for i, r in enumerate(rows)}
        generators = {row_pos[r]: g for r, g in batch.generators.items() if r in row_pos}
        return SamplingMetadata(
            temperature=torch.from_numpy(temperature).to(self.device),
            all_greedy=bool((temperature == 0).all()),
            all_random=bool((temperature > 0).all()),
            generators=generators,
        )

    def _collect(self, flat: FlatInputs, sampled: np.ndarray) -> ModelRunnerOutput:
        """Keep samples only of rows that reached their last known token (a mid-prompt chunk's
        sample is meaningless) and append them to the persistent batch."""
        batch = self.input_batch
        keep = flat.completes_known_tokens
        batch.append_sampled(flat.req_rows[keep], sampled[keep])
        req_ids = [batch.req_ids[r] for r in flat.req_rows]
        sampled_token_ids = [[int(t)] if k else [] for t, k in zip(sampled, keep)]
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled_token_ids,
        )
