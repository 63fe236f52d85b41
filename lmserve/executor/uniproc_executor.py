"""One worker in this process (tensor_parallel_size=1)."""

from __future__ import annotations

from typing import Any

from lmserve.config import EngineConfig
from lmserve.core.sched_output import ModelRunnerOutput, SchedulerOutput, StructuredOutputBatch
from lmserve.worker.model_runner import StepOutput
from lmserve.worker.worker import Worker


class UniProcExecutor:
    def __init__(self, config: EngineConfig, kv_store: Any = None) -> None:
        """`kv_store`: the KV connector's store, shared with the scheduler's side."""
        self.worker = Worker(config, kv_store=kv_store)
        self.worker.load_model()

    def determine_num_gpu_blocks(self) -> int:
        return self.worker.determine_num_gpu_blocks()

    def initialize_kv_cache(self, num_gpu_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_gpu_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepOutput:
        """Queue the step; its `.result()` waits for it (async scheduling)."""
        return self.worker.execute_model_async(scheduler_output)

    def sample_tokens(self, structured_output: StructuredOutputBatch | None) -> None:
        """Sample the step launched last whose grammar masks were pending (async scheduling
        with structured outputs); its `.result()` then waits for it as usual."""
        self.worker.sample_tokens(structured_output)

    def shutdown(self) -> None:
        self.worker.shutdown()
