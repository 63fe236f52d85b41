"""EngineCore: scheduling and model execution, nothing else.

    step(): scheduler_output = scheduler.schedule()
            runner_output    = executor.execute_model(scheduler_output)
            outputs          = scheduler.update_from_output(scheduler_output, runner_output)

With async scheduling (`SchedulerConfig.async_scheduling`) two steps are in flight: step()
schedules and launches step N+1 while the device still runs step N, then waits for step N's
output, so the host's scheduling and input preparation hide behind the device's work:

    step(): launch(schedule(N+1)); outputs = update_from_output(N, wait(N))

(With constrained requests in step N+1 whose masks need step N's tokens, only N+1's forward is
launched first; it samples after update_from_output(N), once the masks are made, and step N+2
is scheduled just before that sampling and launched right after it.)

Tokenization, detokenization and streaming happen in the front-end. `EngineCore` runs
in-process (LMSERVE_ENABLE_MULTIPROCESSING=0); `EngineCoreProc` wraps it in its own process:

    input thread:  ZMQ PULL socket ──decode──▶ input queue
    main thread:   loop { block on the input queue while idle; drain it; step() }
    output thread: output queue ──encode──▶ ZMQ PUSH socket

The main thread never touches a socket, and never spins: with no work it blocks on the queue.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any

import msgspec

from lmserve import envs
from lmserve.config import ConfigError, EngineConfig
from lmserve.core.kv_events import KVEventBatch, make_publisher
from lmserve.core.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineCoreRequestType,
    ReadyMessage,
    UtilityOutput,
)
from lmserve.core.sched_output import SchedulerOutput
from lmserve.core.scheduler import Scheduler
from lmserve.core.structured_output import StructuredOutputManager
from lmserve.executor.uniproc_executor import UniProcExecutor
from lmserve.request import Request
from lmserve.serial_utils import MsgpackDecoder, MsgpackEncoder
from lmserve.utils import exit_with_parent, freeze_startup_heap, process_age_s, set_process_title

logger = logging.getLogger(__name__)

_LOAD_POLL_S = 0.001  # pause of a step that scheduled nothing while KV loads are in flight


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        start = time.perf_counter()
        config.resolve_device_defaults()
        self.kv_connector, kv_store = _make_kv_connector(config)
        self.kv_events = make_publisher(config.kv_events_config)  # None: events off
        self.executor = _make_executor(config, kv_store)
        try:
            num_gpu_blocks = self.executor.determine_num_gpu_blocks()
            _check_pool_holds_one_sequence(config, num_gpu_blocks)
            self.executor.initialize_kv_cache(num_gpu_blocks)
        except BaseException:
            self.shutdown()  # no orphaned workers
            raise
        config.cache_config.num_gpu_blocks = num_gpu_blocks
        self.scheduler = Scheduler(
            config.scheduler_config,
            config.cache_config,
            num_gpu_blocks,
            config.speculative_config,
            self.kv_connector,
            enable_kv_cache_events=self.kv_events is not None,
            structured_output=StructuredOutputManager(config.model_config),
        )
        # Steps launched and not yet collected (async scheduling only; at most two, counting
        # a step launched without its sampling, held aside until its masks are made).
        self.in_flight: deque[tuple[SchedulerOutput, Any]] | None = None
        self.deferred: tuple[SchedulerOutput, Any] | None = None
        if config.scheduler_config.async_scheduling:
            self.in_flight = deque()
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
                mm_features=request.mm_features,
            )
        )

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        aborted = self.scheduler.abort_requests(request_ids)
        return [EngineCoreOutput(r.request_id, [], finish_reason="abort") for r in aborted]

    def has_unfinished_requests(self) -> bool:
        return (
            self.scheduler.has_unfinished_requests()
            or bool(self.in_flight)
            or self.deferred is not None
        )

    def step(self) -> EngineCoreOutputs:
        if self.in_flight is not None:
            return self._step_async(self.in_flight)
        if not self.scheduler.has_unfinished_requests():
            return EngineCoreOutputs(timestamp=time.monotonic())
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        if scheduler_output.is_empty and self._only_waiting_aside():
            time.sleep(_LOAD_POLL_S)  # only KV loads or grammars pending: leave the GIL to them
        return self._update(scheduler_output, runner_output)

    def _only_waiting_aside(self) -> bool:
        """Whether every unfinished request waits on another thread (a KV load, a grammar)."""
        return bool(self.scheduler.loading or self.scheduler.compiling)

    def _step_async(self, in_flight: deque[tuple[SchedulerOutput, Any]]) -> EngineCoreOutputs:
        """Launch the next step if there is one, then collect the oldest step in flight —
        unless only the just-launched step is in flight (then return at once and launch
        another, so the device always has queued work while the host waits).

        A step whose grammar masks wait for a token in flight (structured outputs,
        `pending_structured_output_tokens`) is launched without its sampling and held in
        `self.deferred`: its forward runs on the device while the host collects the step
        before it, advances the grammars over that step's tokens and makes the masks; then
        it samples (vLLM V1's deferred sampling; `_sample_deferred`). Constrained requests
        thus decode every step, like the others."""
        launched = False
        if (
            self.deferred is None
            and len(in_flight) < 2
            and self.scheduler.has_unfinished_requests()
        ):
            launched = self._launch(self.scheduler.schedule(), in_flight)
        if self.deferred is None and (not in_flight or (launched and len(in_flight) == 1)):
            failed = self.scheduler.take_failed_outputs()  # grammar errors, if any
            return EngineCoreOutputs(outputs=failed, timestamp=time.monotonic())
        scheduler_output, pending = in_flight.popleft()
        runner_output = pending.result()
        if self.deferred is None:
            return self._update(scheduler_output, runner_output)
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        self._sample_deferred(in_flight)
        return self._finish_update(scheduler_output, outputs)

    def _launch(self, scheduler_output: SchedulerOutput, in_flight: deque) -> bool:
        """Queue a scheduled step on the device: into `in_flight` (True), or, when its masks
        wait for the step in flight, into `self.deferred`; an empty step only tells the
        worker of finished requests."""
        if scheduler_output.is_empty:
            runner_output = self.executor.execute_model(scheduler_output)
            self.scheduler.update_from_kv_connector(runner_output.kv_connector_output)
            if not in_flight and self._only_waiting_aside():
                time.sleep(_LOAD_POLL_S)  # only KV loads or grammars: leave them the GIL
            return False
        step = self.executor.execute_model_async(scheduler_output)
        if scheduler_output.pending_structured_output_tokens:
            assert len(in_flight) == 1, "pending masks need exactly one step in flight"
            self.deferred = (scheduler_output, step)
            return False
        in_flight.append((scheduler_output, step))
        return True

    def _sample_deferred(self, in_flight: deque) -> None:
        """The deferred step's masks (the grammars have seen the collected step's tokens),
        then its sampling, then the launch of the step after it. That step is scheduled
        before the sampling, while the deferred forward still runs, so that only its launch
        stands between the sampling and the device's next forward."""
        scheduler_output, step = self.deferred
        self.deferred = None
        masks = self.scheduler.get_grammar_bitmask(scheduler_output)
        following = None
        if self.scheduler.has_unfinished_requests():
            following = self.scheduler.schedule()
        self.executor.sample_tokens(masks)
        in_flight.append((scheduler_output, step))
        if following is not None:
            self._launch(following, in_flight)

    def _update(self, scheduler_output: SchedulerOutput, runner_output) -> EngineCoreOutputs:
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        return self._finish_update(scheduler_output, outputs)

    def _finish_update(
        self, scheduler_output: SchedulerOutput, outputs: list[EngineCoreOutput]
    ) -> EngineCoreOutputs:
        if self.scheduler.failed:  # requests whose grammar failed to compile
            outputs += self.scheduler.take_failed_outputs()
        self._publish_kv_events()
        stats = self.scheduler.make_stats()
        stats.iteration_tokens = scheduler_output.total_num_scheduled_tokens
        return EngineCoreOutputs(outputs=outputs, timestamp=time.monotonic(), scheduler_stats=stats)

    def reset_prefix_cache(self) -> bool:
        done = self.scheduler.kv_cache_manager.reset_prefix_cache()
        self._publish_kv_events()
        return done

    def _publish_kv_events(self) -> None:
        """What this step did to the prefix cache (allocation, eviction, a reset)."""
        if self.kv_events is not None:
            events = self.scheduler.kv_cache_manager.take_events()
            if events:
                self.kv_events.publish(KVEventBatch(ts=time.time(), events=events))

    def get_num_gpu_blocks(self) -> int:
        return self.scheduler.kv_cache_manager.num_gpu_blocks

    def shutdown(self) -> None:
        """Idempotent."""
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None and scheduler.structured_output is not None:
            scheduler.structured_output.shutdown()
        executor, self.executor = getattr(self, "executor", None), None
        if executor is not None and hasattr(executor, "shutdown"):
            executor.shutdown()
        connector, self.kv_connector = getattr(self, "kv_connector", None), None
        if connector is not None:
            connector.shutdown()
        publisher, self.kv_events = getattr(self, "kv_events", None), None
        if publisher is not None:
            publisher.shutdown()


# Methods the front-end may call by name (UTILITY messages); nothing else is reachable.
UTILITY_METHODS = frozenset({"reset_prefix_cache", "get_num_gpu_blocks"})


class EngineCoreProc:
    """The EngineCore in its own process: the busy loop and its two socket threads."""

    def __init__(
        self, config: EngineConfig, input_address: str, output_address: str, handshake_address: str
    ) -> None:
        import zmq

        self.ctx = zmq.Context()
        handshake = self.ctx.socket(zmq.PUSH)
        handshake.connect(handshake_address)
        try:
            self.engine_core = EngineCore(config)
        except BaseException:  # tell the front-end the real cause, then die
            ready = ReadyMessage(ok=False, error=traceback.format_exc())
            handshake.send(msgspec.msgpack.encode(ready))
            handshake.close(linger=5000)
            raise
        self.output_socket = self.ctx.socket(zmq.PUSH)
        self.output_socket.connect(output_address)
        self.input_socket = self.ctx.socket(zmq.PULL)  # used only by the input thread
        self.input_socket.bind(input_address)
        self.encoder = MsgpackEncoder()
        self.input_queue: queue.Queue[tuple[EngineCoreRequestType, Any]] = queue.Queue()
        self.output_queue: queue.Queue[EngineCoreOutputs | None] = queue.Queue()
        freeze_startup_heap()  # before serving: full collections skip the start-up heap
        ready = ReadyMessage(ok=True, num_gpu_blocks=self.engine_core.get_num_gpu_blocks())
        handshake.send(msgspec.msgpack.encode(ready))
        handshake.close(linger=5000)

    def run(self) -> None:
        threading.Thread(target=self._input_thread, daemon=True, name="input").start()
        output_thread = threading.Thread(target=self._output_thread, name="output")
        output_thread.start()
        try:
            self._busy_loop()
        finally:
            self.output_queue.put(None)
            output_thread.join(timeout=5)

    def _busy_loop(self) -> None:
        engine = self.engine_core
        while True:
            if not engine.has_unfinished_requests():
                if not self._handle(*self.input_queue.get()):  # idle: block, never spin
                    return
            while not self.input_queue.empty():
                if not self._handle(*self.input_queue.get_nowait()):
                    return
            if engine.has_unfinished_requests():
                outputs = engine.step()
                if outputs.outputs or outputs.scheduler_stats:
                    self.output_queue.put(outputs)

    def _handle(self, request_type: EngineCoreRequestType, payload: Any) -> bool:
        """Apply one front-end message; False means shut down."""
        if request_type is None:
            return False
        if request_type == EngineCoreRequestType.ADD:
            self.engine_core.add_request(payload)
        elif request_type == EngineCoreRequestType.ABORT:
            aborted = self.engine_core.abort_requests(payload)
            stats = self.engine_core.scheduler.make_stats()
            self.output_queue.put(EngineCoreOutputs(aborted, time.monotonic(), stats))
        elif request_type == EngineCoreRequestType.UTILITY:
            self.output_queue.put(EngineCoreOutputs(utility_output=self._call_utility(*payload)))
        return True

    def _call_utility(self, call_id: int, method: str, args: list) -> UtilityOutput:
        if method not in UTILITY_METHODS:
            return UtilityOutput(call_id, error=f"unknown utility method {method!r}")
        try:
            return UtilityOutput(call_id, result=getattr(self.engine_core, method)(*args))
        except Exception as e:
            return UtilityOutput(call_id, error=f"{type(e).__name__}: {e}")

    def _input_thread(self) -> None:
        """socket → queue: decode each message; a bad message is logged, not fatal."""
        socket = self.input_socket
        add_decoder = MsgpackDecoder(EngineCoreRequest)
        while True:
            frames = socket.recv_multipart(copy=False)
            try:
                request_type = EngineCoreRequestType(bytes(frames[0].buffer))
                if request_type == EngineCoreRequestType.ADD:
                    payload = add_decoder.decode(frames[1:])
                else:
                    payload = msgspec.msgpack.decode(frames[1].buffer)
            except Exception:
                logger.exception("dropping a malformed message from the front-end")
                continue
            self.input_queue.put((request_type, payload))

    def _output_thread(self) -> None:
        """queue → socket."""
        while (outputs := self.output_queue.get()) is not None:
            self.output_socket.send_multipart(self.encoder.encode(outputs), copy=False)


def run_engine_core(
    config: EngineConfig, input_address: str, output_address: str, handshake_address: str
) -> None:
    """Entry point of the EngineCore process (spawned by the front-end's client)."""
    set_process_title("lmserve::EngineCore")
    logging.basicConfig(
        level=envs.LMSERVE_LOGGING_LEVEL,
        format="%(asctime)s %(levelname)s [EngineCore] %(message)s",
    )
    signal.signal(signal.SIGTERM, _raise_system_exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front-end decides when we stop
    exit_with_parent()
    logger.info("EngineCore configured %.2f s after its process started", process_age_s())
    proc = None
    try:
        proc = EngineCoreProc(config, input_address, output_address, handshake_address)
    except BaseException:
        logger.exception("EngineCore failed to start")
        sys.exit(1)
    try:
        proc.run()
    except SystemExit:
        pass
    except BaseException:
        logger.exception("EngineCore died")
        proc.engine_core.shutdown()
        sys.exit(1)
    proc.engine_core.shutdown()


def _raise_system_exit(signum, frame) -> None:
    raise SystemExit(0)


def _make_executor(config: EngineConfig, kv_store: Any = None):
    if config.parallel_config.tensor_parallel_size > 1:
        from lmserve.executor.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor(config)
    return UniProcExecutor(config, kv_store)


def _make_kv_connector(config: EngineConfig) -> tuple[Any, Any]:
    """The scheduler side of the configured KV connector and the store a worker in this
    process shares with it (TP=1); (None, None) without one. Workers in their own processes
    build their own stores; this side then sees only the shared tiers (disk, Redis)."""
    if config.kv_transfer_config is None:
        return None, None
    from lmserve.kv_transfer.base import KVConnectorRole
    from lmserve.kv_transfer.tiered import build_store, make_kv_connector

    in_process = config.parallel_config.tensor_parallel_size == 1
    store = build_store(config, with_cpu_tier=in_process)
    if store is None:
        logger.warning(
            "kv_transfer_config: with tensor parallelism the scheduler looks chunks up in the "
            "shared tiers only, and none is set (add disk_path or remote_url): KV is saved to "
            "the workers' CPU tiers but never loaded"
        )
    connector = make_kv_connector(config, KVConnectorRole.SCHEDULER, store=store)
    return connector, (store if in_process else None)


def _check_pool_holds_one_sequence(config: EngineConfig, num_gpu_blocks: int) -> None:
    block_size = config.cache_config.block_size
    max_model_len = config.model_config.max_model_len
    if num_gpu_blocks * block_size < max_model_len:
        raise ConfigError(
            f"the KV cache holds {num_gpu_blocks} blocks x {block_size} tokens = "
            f"{num_gpu_blocks * block_size} tokens, fewer than max_model_len={max_model_len}: "
            "lower max_model_len or give the cache more memory"
        )
