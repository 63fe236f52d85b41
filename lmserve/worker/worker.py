"""Worker: owns one device — initialises it, loads the model, sizes and allocates the KV cache,
and runs the model runner each step."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lmserve import envs
from lmserve.config import EngineConfig
from lmserve.core.sched_output import ModelRunnerOutput, SchedulerOutput, StructuredOutputBatch
from lmserve.kernel_cache import install_shipped_kernels
from lmserve.worker.cpu_threads import SMALL_STEP_TOKENS, CpuThreadTuner
from lmserve.worker.model_runner import ModelRunner, StepOutput

logger = logging.getLogger(__name__)

_GiB = 1 << 30


class Worker:
    def __init__(
        self, config: EngineConfig, local_rank: int | None = None, kv_store: Any = None
    ) -> None:
        """`local_rank`: this worker's tensor-parallel rank, which is also its GPU index.
        `kv_store`: the KV connector's store when the scheduler shares this process."""
        self.config = config
        self.device = torch.device(config.device_config.device)
        if self.device.type == "cuda":
            if local_rank is not None:
                self.device = torch.device("cuda", local_rank)
            elif self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
            # Before anything compiles: the kernels shipped for this Triton and GPU.
            install_shipped_kernels(torch.cuda.get_device_capability(self.device))
        self.model_runner = ModelRunner(
            config, self.device, _make_kv_connector(config, local_rank or 0, kv_store)
        )
        self.thread_tuner = _make_thread_tuner() if self.device.type == "cpu" else None

    def load_model(self) -> None:
        start = time.perf_counter()
        self.model_runner.load_model()
        logger.info(
            "model loaded in %.2f s (%.2f MiB of weights on %s)",
            time.perf_counter() - start,
            self.model_runner.weight_bytes() / (1 << 20),
            self.device,
        )

    def determine_num_gpu_blocks(self) -> int:
        """Blocks that fit: `num_gpu_blocks_override` if set; on CUDA, what remains of
        `gpu_memory_utilization` × total memory after the weights and a profiling forward;
        on CPU, `cpu_kvcache_space_gib`."""
        cache = self.config.cache_config
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        bytes_per_block = self.model_runner.kv_cache_bytes_per_block()
        if self.device.type == "cpu":
            return max(int(cache.cpu_kvcache_space_gib * _GiB) // bytes_per_block, 1)
        return self._profile_gpu_blocks(bytes_per_block)

    def _profile_gpu_blocks(self, bytes_per_block: int) -> int:
        """Peak memory of the largest possible step (weights + activations), measured by a
        profiling forward; the KV cache gets the rest of the budget."""
        start = time.perf_counter()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()  # other processes
        throwaway_cache_bytes = self.model_runner.profile_run()
        peak = torch.cuda.max_memory_allocated() - throwaway_cache_bytes
        torch.cuda.empty_cache()
        budget = total * self.config.cache_config.gpu_memory_utilization
        available = budget - used_by_others - peak
        num_blocks = int(available // bytes_per_block)
        logger.info(
            "memory profile in %.2f s: peak %.2f GiB (weights %.2f GiB + activations of a "
            "%d-token step), budget %.2f GiB, %.2f GiB left for the KV cache",
            time.perf_counter() - start,
            peak / _GiB,
            self.model_runner.weight_bytes() / _GiB,
            self.config.scheduler_config.max_num_batched_tokens,
            budget / _GiB,
            max(available, 0) / _GiB,
        )
        if num_blocks <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: budget {budget / _GiB:.2f} GiB "
                f"(gpu_memory_utilization={self.config.cache_config.gpu_memory_utilization}), "
                f"weights and activations {peak / _GiB:.2f} GiB; raise gpu_memory_utilization"
            )
        return num_blocks

    def initialize_kv_cache(self, num_gpu_blocks: int) -> None:
        """Allocate the KV cache, then capture CUDA graphs (they read the cache's addresses)."""
        start = time.perf_counter()
        self.model_runner.initialize_kv_cache(num_gpu_blocks)
        block_size = self.config.cache_config.block_size
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB) on %s, allocated in %.2f s",
            num_gpu_blocks,
            block_size,
            num_gpu_blocks * block_size,
            num_gpu_blocks * self.model_runner.kv_cache_bytes_per_block() / _GiB,
            self.device,
            time.perf_counter() - start,
        )
        self.model_runner.capture_model()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        tuner = self.thread_tuner
        if tuner is None:
            return self.model_runner.execute_model(scheduler_output)
        small = scheduler_output.total_num_scheduled_tokens <= SMALL_STEP_TOKENS
        threads = tuner.threads_for_step(small)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        start = time.perf_counter()
        output = self.model_runner.execute_model(scheduler_output)
        tuner.record(threads, time.perf_counter() - start, small)
        return output

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepOutput:
        return self.model_runner.execute_model_async(scheduler_output)

    def sample_tokens(self, structured_output: StructuredOutputBatch | None) -> None:
        self.model_runner.sample_tokens(structured_output)

    def shutdown(self) -> None:
        """Finish background work (the KV connector's pending saves)."""
        if self.model_runner.kv_connector is not None:
            self.model_runner.kv_connector.shutdown()


def _make_thread_tuner() -> CpuThreadTuner | None:
    """LMSERVE_CPU_THREADS: "auto" tunes (lmserve/worker/cpu_threads.py); a number fixes it."""
    setting = envs.LMSERVE_CPU_THREADS
    if setting == "auto":
        return CpuThreadTuner(torch.get_num_threads())
    try:
        threads = int(setting)
    except ValueError:
        raise ValueError(
            f"LMSERVE_CPU_THREADS must be 'auto' or an integer, got {setting!r}"
        ) from None
    if threads < 1:
        raise ValueError(f"LMSERVE_CPU_THREADS must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return None


def _make_kv_connector(config: EngineConfig, rank: int, store: Any):
    if config.kv_transfer_config is None:
        return None
    from lmserve.kv_transfer.base import KVConnectorRole
    from lmserve.kv_transfer.tiered import make_kv_connector

    return make_kv_connector(config, KVConnectorRole.WORKER, store=store, rank=rank)
