"""ModelRunner: SchedulerOutput → persistent batch diffs → one forward → sampled tokens."""

from __future__ import annotations

import logging

import numpy as np
import torch

from lmserve import envs
from lmserve.attention import ForwardContext, get_attention_backend, shared_prefix
from lmserve.config import EngineConfig
from lmserve.core.messages import LogprobsLists
from lmserve.core.sched_output import ModelRunnerOutput, SchedulerOutput, StructuredOutputBatch
from lmserve.kv_transfer.base import KVConnectorBase, KVConnectorMetadata, KVConnectorOutput
from lmserve.model.layers.gemv import GEMV_MAX_ROWS
from lmserve.model.loader import get_kv_cache_spec, load_model
from lmserve.sample.grammar import build_grammar_mask
from lmserve.sample.logprobs import LogprobsTensors, compute_logprobs_tensors
from lmserve.sample.metadata import SamplingMetadata
from lmserve.sample.sampler import Sampler
from lmserve.triton_utils import triton_installed
from lmserve.worker.cuda_graphs import CudaGraphRunner, decode_graph_sizes, piecewise_graph_sizes
from lmserve.worker.device_inputs import DeviceInputs, host_to_device
from lmserve.worker.encoder_runner import EncoderRunner, ImageRows
from lmserve.worker.input_batch import FlatInputs, InputBatch
from lmserve.worker.sampling_inputs import (
    RepeatedInputs,
    build_sampling_metadata,
    uses_penalties,
)
from lmserve.worker.spec_decode_runner import SpecDecodeRunner

logger = logging.getLogger(__name__)
_GiB = 1 << 30


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        device: torch.device,
        kv_connector: KVConnectorBase | None = None,
    ) -> None:
        """`kv_connector`: the worker side of a KV connector (lmserve/kv_transfer/), if any."""
        self.config = config
        self.kv_connector = kv_connector
        self.device = device
        model_config = config.model_config
        self.dtype = model_config.dtype
        self.block_size = config.cache_config.block_size
        self.input_batch = InputBatch(
            max_num_reqs=config.scheduler_config.max_num_seqs,
            max_model_len=model_config.max_model_len,
            block_size=self.block_size,
            device=device,
            seed=model_config.seed,
        )
        # Random rows race in one launch, keyed by (seed, position): sample/triton_race.py.
        self.keyed_race = device.type == "cuda" and triton_installed() and envs.LMSERVE_KEYED_RACE
        self.attn_backend = get_attention_backend(device.type)
        self.shared_prefix_attention = (
            self.attn_backend.supports_shared_prefix and envs.LMSERVE_SHARED_PREFIX_ATTENTION
        )
        self.sampler = Sampler()
        self.repeated_inputs = RepeatedInputs(device)  # sampling inputs alike from step to step
        self.vocab_size = model_config.vocab_size
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.model: torch.nn.Module | None = None
        sched = config.scheduler_config
        self.inputs = DeviceInputs(
            max_num_tokens=sched.max_num_batched_tokens,
            max_num_reqs=sched.max_num_seqs,
            max_blocks_per_req=-(-model_config.max_model_len // self.block_size),
            device=device,
        )
        self.graphs: CudaGraphRunner | None = None  # set by capture_model()
        self._last_sampled: SampledTokens | None = None  # the latest step's sampled tokens
        # The step launched last when its sampling waits for grammar masks (async scheduling
        # with structured outputs): (step, sample rows, logits, sampling metadata).
        self._awaiting_grammar: tuple | None = None
        self._sampled_host = _HostRing(config.scheduler_config.max_num_seqs, device)
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.spec_decode: SpecDecodeRunner | None = None  # speculative decoding, if configured
        self.encoder: EncoderRunner | None = None  # vision-language models only
        if config.speculative_config is not None:
            self.spec_decode = SpecDecodeRunner(self, config.speculative_config)

    # ---- set-up -------------------------------------------------------------------------------
    def load_model(self) -> None:
        mc = self.config.model_config
        torch.manual_seed(mc.seed)
        self.model = load_model(
            mc.hf_config, mc.model_path, mc.dtype, self.device, mc.load_format, mc.seed,
            quantization=mc.quantization,
        )  # fmt: skip
        if self.spec_decode is not None:  # the draft model, if any
            self.spec_decode.load_model()
        if hasattr(self.model, "embed_images"):
            self.encoder = EncoderRunner(self.model, self.device, self.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the loaded weights and buffers (the draft model's included), on any
        device; a tied weight counts once."""
        models = [self.model]
        if self.spec_decode is not None and self.spec_decode.drafter is not None:
            models.append(self.spec_decode.drafter.model)
        tensors = {
            id(t): t
            for model in models
            if model is not None
            for t in [*model.parameters(), *model.buffers()]
        }
        packed = {
            id(m.packed): m.packed
            for model in models
            if model is not None
            for m in model.modules()
            if getattr(m, "packed", None) is not None
        }  # weights kept packed (lmserve/model/quantize.py); their float placeholders hold ~nothing
        stored = sum(
            min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
            for t in tensors.values()
        )
        return stored + sum(p.nbytes() for p in packed.values())

    def kv_cache_bytes_per_block(self) -> int:
        num_layers, num_kv_heads, head_dim = get_kv_cache_spec(self.config.model_config.hf_config)
        element_size = torch.empty((), dtype=self.dtype).element_size()
        target_bytes = 2 * num_layers * self.block_size * num_kv_heads * head_dim * element_size
        spec_bytes = self.spec_decode.kv_cache_bytes_per_block() if self.spec_decode else 0
        return target_bytes + spec_bytes  # the draft model's layers share the blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        if self.spec_decode is not None:  # first: it frees the draft's profiling cache
            self.spec_decode.initialize_kv_cache(num_blocks)  # the draft's, on the same block ids
        num_layers, num_kv_heads, head_dim = get_kv_cache_spec(self.config.model_config.hf_config)
        shape = (num_blocks, self.block_size, num_kv_heads, head_dim)
        # NOTE: on the CPU the pool is left uninitialised so pages are touched lazily (zeroing
        # gigabytes costs seconds at start-up); attention never reads a slot it did not write.
        # On the GPU zeros are cheap and keep masked-out tiles of future kernels finite.
        # One allocation for every layer's keys and values, [num_layers, 2, *shape]; each
        # layer's caches are contiguous views of it, so a KV connector moves a block of every
        # layer with one indexed copy instead of two per layer.
        alloc = torch.empty if self.device.type == "cpu" else torch.zeros
        pool = alloc((num_layers, 2, *shape), dtype=self.dtype, device=self.device)
        self.kv_caches = [(pool[layer, 0], pool[layer, 1]) for layer in range(num_layers)]
        if self.kv_connector is not None:
            self.kv_connector.register_kv_caches(self.kv_caches)

    def capture_model(self) -> None:
        """Capture CUDA graphs (after the KV cache exists). No-op on CPU, with
        `enforce_eager`, or with `cuda_graph_mode="none"`."""
        mc = self.config.model_config
        if self.device.type != "cuda" or mc.enforce_eager or mc.cuda_graph_mode == "none":
            return
        sched = self.config.scheduler_config
        full = mc.cuda_graph_mode in ("full", "full_and_piecewise")
        if full and not self.attn_backend.supports_full_cuda_graph:
            logger.info("attention backend %r: no full CUDA graphs", self.attn_backend.name)
            full = False
        piecewise = mc.cuda_graph_mode in ("piecewise", "full_and_piecewise")
        # A decode batch of n requests is n tokens: it must fit the token budget as well.
        max_batch = min(mc.max_cuda_graph_size, sched.max_num_seqs, sched.max_num_batched_tokens)
        max_tokens = min(mc.max_cuda_graph_size, sched.max_num_batched_tokens)
        verify_sizes, verify_query_len = [], 1
        if full and self.spec_decode is not None:  # each request: its last token + k drafts
            verify_query_len = 1 + self.spec_decode.num_spec_tokens
            max_verify = min(max_batch, max_tokens // verify_query_len)
            verify_sizes = decode_graph_sizes(max_verify)  # [] when not even one fits
        self.graphs = CudaGraphRunner(
            self.model,
            self.inputs,
            self.kv_caches,
            self.attn_backend,
            decode_sizes=decode_graph_sizes(max_batch) if full else [],
            piecewise_sizes=piecewise_graph_sizes(max_tokens) if piecewise else [],
            verify_sizes=verify_sizes,
            verify_query_len=verify_query_len,
            decode_logits_max=self._decode_logits_max() if full else 0,
            shared_prefix_sizes=self._shared_prefix_graph_sizes(max_batch) if full else [],
        )
        self.graphs.capture()

    def _shared_prefix_graph_sizes(self, max_batch: int) -> list[int]:
        """Powers of two from shared_prefix.MIN_REQS, and the largest decode size, so every
        decode batch a graph fits fits a shared-prefix one."""
        if not self.shared_prefix_attention or max_batch < shared_prefix.MIN_REQS:
            return []
        sizes = [s for s in decode_graph_sizes(max_batch) if s >= shared_prefix.MIN_REQS]
        return [s for s in sizes if s & (s - 1) == 0 or s == sizes[-1]]

    def _shared_prefix_len(self, flat: FlatInputs) -> int:
        """The prefix every request of a decode-only step holds in the same blocks, when the
        shared-prefix kernels pay for it (else 0, as for any other step)."""
        num_reqs = len(flat.req_rows)
        if not self.shared_prefix_attention or num_reqs < shared_prefix.MIN_REQS:
            return 0
        if len(flat.input_ids) != num_reqs:
            return 0
        found = shared_prefix.shared_prefix_len(flat.block_tables, flat.seq_lens, self.block_size)
        return found if shared_prefix.pays_off(found, num_reqs) else 0

    def _decode_logits_max(self) -> int:
        """Decode graphs of up to this many requests also run the LM head: at small batch its
        eager launch cost the host more than the GPU work (a Triton GEMV launched from Python
        every step). Not with speculative decoding (its steps take logits at chosen rows, and a
        decode graph's head would be wasted work) nor tensor parallelism (the head gathers
        across ranks)."""
        if self.spec_decode is not None or self.config.parallel_config.tensor_parallel_size > 1:
            return 0
        return GEMV_MAX_ROWS if envs.LMSERVE_GRAPH_LM_HEAD else 0

    @torch.inference_mode()
    def profile_run(self) -> int:
        """The largest step there can be, to measure peak activation memory before the KV
        cache is sized: `max_num_batched_tokens` tokens over `max_num_seqs` fresh requests
        (split evenly, none longer than max_model_len), then logits, top-p sampling and logprobs for
        every request. A throwaway cache of the blocks this step touches stands in for the KV
        cache. Returns that cache's size in bytes (part of the peak, but not of a real step)."""
        sched = self.config.scheduler_config
        num_reqs = min(sched.max_num_seqs, sched.max_num_batched_tokens)
        num_tokens = min(sched.max_num_batched_tokens, num_reqs * sched.max_model_len)
        flat = _profile_inputs(num_tokens, num_reqs, self.block_size)
        num_blocks = int(flat.block_tables.max()) + 1
        self.initialize_kv_cache(num_blocks)
        cache_bytes = num_blocks * self.kv_cache_bytes_per_block()
        hidden, _ = self._forward(flat)  # [num_tokens, hidden_size]
        if self.encoder is not None:
            self._profile_encoder()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            forward_peak = torch.cuda.max_memory_allocated(self.device)
        logits_indices = torch.from_numpy(flat.logits_indices).to(self.device)
        logits = self.model.compute_logits(hidden[logits_indices])  # [num_reqs, vocab]
        metadata = SamplingMetadata(
            temperature=torch.ones(num_reqs, device=self.device),
            all_greedy=False,
            all_random=True,
            generators={},
            top_p=torch.full((num_reqs,), 0.9, device=self.device),
            max_num_logprobs=20,
        )
        self.sampler(logits, metadata)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            logger.info(
                "profile step: peak %.2f GiB after the forward, %.2f GiB with logits and "
                "sampling of %d requests (throwaway cache %.2f GiB)",
                forward_peak / _GiB, peak / _GiB, num_reqs, cache_bytes / _GiB,
            )  # fmt: skip
        self.kv_caches = []
        return cache_bytes

    def _profile_encoder(self) -> None:
        """The vision encoder on the most images one step may encode (zeros as pixels)."""
        hf_config = self.config.model_config.hf_config
        vision = hf_config.vision_config
        get = vision.get if isinstance(vision, dict) else lambda k: getattr(vision, k)
        size, channels = get("image_size"), get("num_channels") or 3
        per_image = self.config.model_config.max_tokens_per_image
        budget = self.config.scheduler_config.max_num_encoder_input_tokens
        num_images = max(budget // per_image, 1)
        pixels = torch.zeros(
            (num_images, channels, size, size), dtype=self.dtype, device=self.device
        )  # [num_images, channels, height, width]
        self.model.embed_images(pixels)

    # ---- one step ---------------------------------------------------------------------------
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepOutput:
        """Queue one step on the device and return at once; `.result()` waits for its
        device->host copies. The step may read tokens the previous step sampled that the host
        has not seen yet: they go from the device's sampled tokens straight into the inputs."""
        self._update_states(scheduler_output)
        if self.kv_connector is None:
            return self._execute(scheduler_output)
        connector = self.kv_connector
        connector.start_load_kv(scheduler_output.kv_connector_metadata or KVConnectorMetadata())
        step = self._execute(scheduler_output)
        connector.wait_for_save()  # gathers queued after this step's forward
        step.kv_connector_output = connector.get_finished()
        return step

    def _execute(self, scheduler_output: SchedulerOutput) -> StepOutput:
        encoder_seconds = 0.0
        if self.encoder is not None:  # evictions, then the images this step reads first
            encoder_seconds = self.encoder.execute_encoder(scheduler_output)
        if scheduler_output.is_empty:
            return StepOutput.done(
                ModelRunnerOutput(req_ids=[], req_id_to_index={}, sampled_token_ids=[])
            )
        if self.spec_decode is not None:
            self.spec_decode.write_drafts(scheduler_output)
        flat = self.input_batch.prepare_inputs(scheduler_output.num_scheduled_tokens)
        flat.input_ids_on_device = self._tokens_in_flight(flat)
        flat.shared_prefix_len = self._shared_prefix_len(flat)
        image_rows = None
        if self.encoder is not None and self.encoder.has_work:
            image_rows = self.encoder.gather(flat, self.input_batch)
        hidden, graph_logits = self._forward(flat, image_rows)  # [num_tokens, hidden_size]
        if self.spec_decode is not None:  # verify drafts, then propose the next ones
            output = self.spec_decode.sample_and_propose(scheduler_output, flat, hidden)
            output.encoder_seconds = encoder_seconds
            return StepOutput.done(output)
        # Only rows that reach their last known token sample; a mid-prompt chunk's logits are
        # never computed (and its seeded generator never advanced).
        sampling = flat.completes_known_tokens  # [num_reqs] bool
        sample_rows = flat.req_rows[sampling]
        logits = metadata = None
        if len(sample_rows):
            # Queued behind the forward, no host stall: the host builds the sampling inputs
            # while the GPU runs; the step's one sync is the sampled tokens' copy back.
            if len(sample_rows) == len(hidden):  # decode only: one row per request
                # [num_sampling, vocab]; a small decode graph has run the LM head already
                logits = graph_logits
                if logits is None:
                    logits = self.model.compute_logits(hidden)
            else:
                logits_indices = host_to_device(flat.logits_indices[sampling], self.device)
                logits = self.model.compute_logits(hidden[logits_indices])
            if self._tokens_pending() and uses_penalties(self.input_batch, sample_rows):
                self._last_sampled.write_to(self.input_batch)  # penalties read every token
            metadata = build_sampling_metadata(
                self.input_batch, sample_rows, self.vocab_size, self.device,
                keyed_race=self.keyed_race, repeated=self.repeated_inputs,
            )  # fmt: skip
        prompt_logprobs = self.compute_prompt_logprobs(flat, hidden)
        step = self._new_step(flat, prompt_logprobs)
        step.encoder_seconds = encoder_seconds
        if logits is not None and scheduler_output.pending_structured_output_tokens:
            # The grammar masks wait for the step in flight: sample_tokens() samples.
            self._awaiting_grammar = (step, sample_rows, logits, metadata)
            step.awaiting_grammar = True
            return step
        self._sample(step, sample_rows, logits, metadata, scheduler_output.structured_output)
        return step

    @torch.inference_mode()
    def sample_tokens(self, structured_output: StructuredOutputBatch | None) -> None:
        """Sample the step launched last, whose grammar masks were pending
        (`SchedulerOutput.pending_structured_output_tokens`): `structured_output` holds them,
        made after the step before it was collected. Its forward is already queued."""
        step, sample_rows, logits, metadata = self._awaiting_grammar
        self._awaiting_grammar = None
        step.awaiting_grammar = False
        self._sample(step, sample_rows, logits, metadata, structured_output)

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in scheduler_output.finished_req_ids | scheduler_output.preempted_req_ids:
            batch.remove_request(req_id)
            if self.encoder is not None:
                self.encoder.remove_request(req_id)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_block_ids, num_computed in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens
        ):
            row = batch.req_id_to_index[req_id]
            batch.append_block_ids(row, new_block_ids)
            batch.num_computed_tokens[row] = num_computed
        for new in scheduler_output.scheduled_new_reqs:
            batch.add_request(new)
            if self.encoder is not None:
                self.encoder.add_request(new.req_id, new.mm_features)
        batch.condense()

    def _forward(
        self, flat: FlatInputs, image_rows: ImageRows | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A captured CUDA graph when one fits the step, else an eager forward. A step that
        reads image embeddings runs eagerly (the graphs start from token ids). Returns the
        hidden states [num_tokens, hidden_size] and, when the graph computed them too (small
        decode batches), every token's logits [num_tokens, vocab] float32, else None."""
        if self.graphs is not None and image_rows is None:
            replayed = self.graphs.forward(flat)
            if replayed is not None:
                return replayed
        num_tokens, num_reqs = len(flat.input_ids), len(flat.req_rows)
        input_ids, positions, metadata = self.inputs.stage(flat, num_tokens, num_reqs)
        ctx = ForwardContext(metadata, self.kv_caches, self.attn_backend, self.kv_connector)
        if image_rows is None:
            return self.model(input_ids, positions, ctx), None
        inputs_embeds = self.encoder.merge(input_ids, image_rows)  # [num_tokens, hidden_size]
        return self.model(input_ids, positions, ctx, inputs_embeds), None

    def compute_prompt_logprobs(
        self, flat: FlatInputs, hidden: torch.Tensor
    ) -> dict[str, LogprobsTensors]:
        """Logprobs of each scheduled prompt token's successor, for requests that asked.
        Prompt logprobs requests skip the prefix cache, so every prompt position is computed
        here, chunk by chunk."""
        batch = self.input_batch
        result: dict[str, LogprobsTensors] = {}
        for i, row in enumerate(flat.req_rows.tolist()):
            params = batch.sampling_params[row]
            if params.prompt_logprobs is None:
                continue
            start, end = int(flat.query_start_loc[i]), int(flat.query_start_loc[i + 1])
            first_pos = int(flat.positions[start])
            num_prompt = int(batch.num_prompt_tokens[row])
            last_pos = min(first_pos + (end - start), num_prompt - 1)  # exclusive
            if last_pos <= first_pos:
                continue
            targets = host_to_device(
                batch.token_ids[row, first_pos + 1 : last_pos + 1].astype(np.int64), self.device
            )
            logits = self.model.compute_logits(hidden[start : start + last_pos - first_pos])
            tensors = compute_logprobs_tensors(logits, targets, params.prompt_logprobs)
            result[batch.req_ids[row]] = tensors
        return result

    # ---- tokens sampled on the device, not yet seen by the host (async scheduling) -----------
    def _tokens_in_flight(
        self, flat: FlatInputs
    ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """(flat indices, token ids) on the device for the inputs that are tokens the previous
        step sampled and the host does not have yet (indices None: the first n inputs), or
        None when there are none."""
        if not self._tokens_pending():
            return None
        last, batch = self._last_sampled, self.input_batch
        n = len(last.req_ids)
        if (
            n == len(flat.req_rows) == len(flat.input_ids)  # decode only, same requests
            and last.req_ids == [batch.req_ids[r] for r in flat.req_rows]
            and (flat.positions == last.positions).all()
        ):
            return None, last.token_ids  # input token i is sampled token i
        row_to_req = np.full(batch.max_num_reqs, -1, dtype=np.int64)
        row_to_req[flat.req_rows] = np.arange(len(flat.req_rows))
        rows = np.array([batch.req_id_to_index.get(r, -1) for r in last.req_ids], dtype=np.int64)
        reqs = np.where(rows >= 0, row_to_req[np.maximum(rows, 0)], -1)  # [n] index in flat
        starts = flat.query_start_loc[np.maximum(reqs, 0)]  # [n]
        ends = flat.query_start_loc[np.maximum(reqs, 0) + 1]
        first_pos = flat.positions[np.minimum(starts, len(flat.positions) - 1)]
        dst = starts + (last.positions - first_pos)  # [n] flat index of each token
        used = (reqs >= 0) & (dst >= starts) & (dst < ends)
        if not used.any():
            return None
        index = host_to_device(
            np.stack([dst[used], np.nonzero(used)[0]]).astype(np.int64), self.device
        )
        return index[0], last.token_ids.index_select(0, index[1])

    def _tokens_pending(self) -> bool:
        return self._last_sampled is not None and not self._last_sampled.on_host

    # ---- output ----------------------------------------------------------------------------
    def _new_step(
        self, flat: FlatInputs, prompt_logprobs: dict[str, LogprobsTensors]
    ) -> StepOutput:
        batch = self.input_batch
        return StepOutput(
            req_ids=[batch.req_ids[r] for r in flat.req_rows],
            sample_positions=np.nonzero(flat.completes_known_tokens)[0],
            sampled=None,
            logprobs=None,
            prompt_logprobs={r: _logprobs_to_host(t) for r, t in prompt_logprobs.items()},
            batch=batch,
        )

    def _sample(
        self,
        step: StepOutput,
        sample_rows: np.ndarray,  # [num_sampling] persistent-batch rows, in logits order
        logits: torch.Tensor | None,  # [num_sampling, vocab]; None: nobody samples
        metadata: SamplingMetadata | None,
        structured_output: StructuredOutputBatch | None,
    ) -> None:
        """Sample (grammar masks first, if any), then queue the step's device->host copies
        and count its sampled tokens in the persistent batch (their values land there when
        the copies are done)."""
        batch = self.input_batch
        if logits is not None:
            if structured_output is not None:
                req_ids = [batch.req_ids[r] for r in sample_rows]
                metadata.grammar_mask = build_grammar_mask(
                    structured_output, req_ids, None, self.device
                )
            sampler_output = self.sampler(logits, metadata)
            token_ids = sampler_output.sampled_token_ids  # [num_sampling] int64
            sampled = SampledTokens(
                req_ids=[batch.req_ids[r] for r in sample_rows],
                positions=batch.num_tokens[sample_rows].copy(),
                token_ids=token_ids,
                host=self._sampled_host.copy(token_ids),
            )
            batch.num_tokens[sample_rows] += 1
            self._last_sampled = step.sampled = sampled
            lp = sampler_output.logprobs
            if lp is not None:
                step.logprobs = (batch.num_logprobs[sample_rows] >= 0, _logprobs_to_host(lp))
        if self.device.type == "cuda":
            step.copied = torch.cuda.Event()
            step.copied.record(self._stream)
            if step.sampled is not None:
                step.sampled.copied = step.copied


class SampledTokens:
    """One step's sampled tokens: on the device at once (the next step's inputs may read them
    there), on the host once the non-blocking copy is done."""

    __slots__ = ("req_ids", "positions", "token_ids", "host", "on_host", "copied")

    def __init__(
        self, req_ids: list[str], positions: np.ndarray, token_ids: torch.Tensor, host: torch.Tensor
    ) -> None:
        self.req_ids = req_ids  # the requests that sampled, in sampling order
        self.positions = positions  # [n] where each token goes in its request's token ids
        self.token_ids = token_ids  # [n] int64, device
        self.host = host  # [n] int64, host (pinned on CUDA), valid once `copied` is done
        self.on_host = False  # written into the persistent batch
        self.copied: torch.cuda.Event | None = None  # recorded after the step's copies

    def write_to(self, batch: InputBatch) -> np.ndarray:
        """Wait for the copy, write the tokens into the rows still holding their requests
        (idempotent). Returns them, [n] int64."""
        if self.copied is not None:
            self.copied.synchronize()
        tokens = self.host.numpy()
        if not self.on_host:
            self.on_host = True
            for req_id, pos, token in zip(self.req_ids, self.positions.tolist(), tokens.tolist()):
                row = batch.req_id_to_index.get(req_id)
                if row is not None:
                    batch.token_ids[row, pos] = token
        return tokens


class StepOutput:
    """A step queued on the device; `result()` waits for its copies and builds the
    ModelRunnerOutput. Steps are collected in launch order."""

    def __init__(
        self,
        req_ids: list[str],
        sample_positions: np.ndarray,  # [num_sampling] index in req_ids of each sampled token
        sampled: SampledTokens | None,
        logprobs: tuple[np.ndarray, LogprobsTensors] | None,  # (asked per sampling row, host)
        prompt_logprobs: dict[str, LogprobsTensors],  # host tensors
        batch: InputBatch | None,
    ) -> None:
        self.req_ids = req_ids
        self.sample_positions = sample_positions
        self.sampled = sampled
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.batch = batch
        self.copied: torch.cuda.Event | None = None
        self.output: ModelRunnerOutput | None = None
        self.kv_connector_output: KVConnectorOutput | None = None  # set by execute_model_async
        self.encoder_seconds = 0.0  # set by _execute
        self.awaiting_grammar = False  # launched without its sampling (see sample_tokens)

    @classmethod
    def done(cls, output: ModelRunnerOutput) -> StepOutput:
        step = cls([], np.zeros(0, dtype=np.int64), None, None, {}, None)
        step.output = output
        return step

    def result(self) -> ModelRunnerOutput:
        assert not self.awaiting_grammar, "the step's grammar masks never came (sample_tokens)"
        if self.output is None:
            self.output = self._build_output()
        if self.kv_connector_output is not None:
            self.output.kv_connector_output = self.kv_connector_output
        if self.encoder_seconds:
            self.output.encoder_seconds = self.encoder_seconds
        return self.output

    def _build_output(self) -> ModelRunnerOutput:
        if self.copied is not None:
            self.copied.synchronize()
        sampled_token_ids: list[list[int]] = [[] for _ in self.req_ids]
        logprobs: list[LogprobsLists | None] = [None] * len(self.req_ids)
        if self.sampled is not None:
            tokens = self.sampled.write_to(self.batch).tolist()
            lp_lists = None
            if self.logprobs is not None:
                asked, lp_tensors = self.logprobs
                lp_lists = LogprobsLists.from_tensors(lp_tensors)
            for j, (pos, token) in enumerate(zip(self.sample_positions.tolist(), tokens)):
                sampled_token_ids[pos] = [token]
                if lp_lists is not None and asked[j]:
                    logprobs[pos] = lp_lists.rows(j, j + 1)
        output = ModelRunnerOutput(
            req_ids=self.req_ids,
            req_id_to_index={r: i for i, r in enumerate(self.req_ids)},
            sampled_token_ids=sampled_token_ids,
            logprobs=logprobs,
            prompt_logprobs={
                r: LogprobsLists.from_tensors(t) for r, t in self.prompt_logprobs.items()
            },
        )
        self.batch = self.sampled = None  # drop references to device tensors
        return output


class _HostRing:
    """Pinned host slots for the sampled tokens of the last few steps, reused in turn: a slot
    is read (`StepOutput.result`) before the step two launches later, which is the soonest it
    is written again."""

    def __init__(self, max_num_reqs: int, device: torch.device, num_slots: int = 3) -> None:
        pin = device.type == "cuda"
        self.slots = torch.zeros((num_slots, max_num_reqs), dtype=torch.int64, pin_memory=pin)
        self.next = 0

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:  # [n] int64 -> [n] host view
        if not tensor.is_cuda:
            return tensor
        slot = self.slots[self.next, : len(tensor)]
        self.next = (self.next + 1) % len(self.slots)
        return slot.copy_(tensor, non_blocking=True)


def copy_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A non-blocking copy into pinned memory on CUDA (valid after an event recorded later on
    the stream completes); the tensor itself on the CPU."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _logprobs_to_host(tensors: LogprobsTensors) -> LogprobsTensors:
    return LogprobsTensors(
        copy_to_host(tensors.token_ids), copy_to_host(tensors.logprobs), copy_to_host(tensors.ranks)
    )


def _profile_inputs(num_tokens: int, num_reqs: int, block_size: int) -> FlatInputs:
    """Fresh prompts: `num_tokens` split evenly over `num_reqs` requests; each request's tokens
    fill blocks of its own from slot 0."""
    q_lens = np.full(num_reqs, num_tokens // num_reqs, dtype=np.int32)  # [num_reqs]
    q_lens[: num_tokens % num_reqs] += 1
    starts = np.zeros(num_reqs + 1, dtype=np.int32)  # [num_reqs + 1]
    np.cumsum(q_lens, out=starts[1:])
    blocks_per_req = -(-q_lens // block_size)  # [num_reqs]
    first_block = np.concatenate([[0], np.cumsum(blocks_per_req)[:-1]])  # [num_reqs]
    cols = np.minimum(np.arange(int(blocks_per_req.max()))[None, :], blocks_per_req[:, None] - 1)
    req_of_token = np.repeat(np.arange(num_reqs), q_lens)  # [num_tokens]
    positions = np.arange(num_tokens) - starts[req_of_token]  # [num_tokens]
    return FlatInputs(
        req_rows=np.arange(num_reqs),
        input_ids=np.zeros(num_tokens, dtype=np.int64),
        positions=positions.astype(np.int64),
        slot_mapping=(first_block[req_of_token] * block_size + positions).astype(np.int64),
        query_start_loc=starts,
        seq_lens=q_lens.copy(),
        block_tables=(first_block[:, None] + cols).astype(np.int32),  # [num_reqs, max_blocks]
        logits_indices=(starts[1:] - 1).astype(np.int64),
        completes_known_tokens=np.ones(num_reqs, dtype=bool),
    )
