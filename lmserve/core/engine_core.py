"""EngineCore: scheduling and model execution, nothing else.

    step(): scheduler_output = scheduler.schedule()
            runner_output    = executor.execute_model(scheduler_output)
            outputs          = scheduler.update_from_output(scheduler_output, runner_output)

Tokenization, detokenization and streaming happen in the front-end. This class runs in-process
for now; a later change wraps it in its own process behind the same client interface.
"""

from __future__ import annotations

import logging
import time

from lmserve.config import ConfigError, EngineConfig
from lmserve.core.scheduler import Scheduler
from lmserve.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from lmserve.executor.uniproc_executor import UniProcExecutor
from lmserve.request import Request

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        start = time.perf_counter()
        self.executor = UniProcExecutor(config)
        num_gpu_blocks = self.executor.determine_num_gpu_blocks()
        _check_pool_holds_one_sequence(config, num_gpu_blocks)
        self.executor.initialize_kv_cache(num_gpu_blocks)
        config.cache_config.num_gpu_blocks = num_gpu_blocks
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, num_gpu_blocks)
        logger.info("EngineCore ready in %.2f s", time.perf_counter() - start)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(
            Request(
                request_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                sampling_params=request.sampling_params,
                eos_token_id=request.eos_token_id,
                arrival_time=request.arrival_time,
                priority=request.priority,
                cache_salt=request.cache_salt,
                max_model_len=self.config.model_config.max_model_len,
            )
        )

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        aborted = self.scheduler.abort_requests(request_ids)
        return [EngineCoreOutput(r.request_id, [], finish_reason="abort") for r in aborted]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        if not self.scheduler.has_unfinished_requests():
            return EngineCoreOutputs(timestamp=time.monotonic())
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        return EngineCoreOutputs(outputs=outputs, timestamp=time.monotonic())


def _check_pool_holds_one_sequence(config: EngineConfig, num_gpu_blocks: int) -> None:
    block_size = config.cache_config.block_size
    max_model_len = config.model_config.max_model_len
    if num_gpu_blocks * block_size < max_model_len:
        raise ConfigError(
            f"the KV cache holds {num_gpu_blocks} blocks x {block_size} tokens = "
            f"{num_gpu_blocks * block_size} tokens, fewer than max_model_len={max_model_len}: "
            "lower max_model_len or give the cache more memory"
        )
