"""EngineCoreClient: how the front-end talks to the EngineCore. One interface, three clients:

- InprocClient:   the EngineCore lives in this process; get_output() runs one step.
- SyncMPClient:   the EngineCore runs in its own process (LLM's default); blocking ZMQ.
- AsyncMPClient:  the same process and sockets, through asyncio (the API server).

The EngineCore process is started with `spawn`, answers a start-up handshake (ready, or the
real cause of failure), and is watched: if it dies, the next (or current) wait for output
raises EngineDeadError at once.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from lmserve import envs
from lmserve.config import EngineConfig
from lmserve.core.messages import (
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineCoreRequestType,
    ReadyMessage,
)
from lmserve.engine.launcher import EngineLauncher
from lmserve.serial_utils import MsgpackDecoder, MsgpackEncoder

logger = logging.getLogger(__name__)

_DEAD_MARKER = b"lmserve:engine-dead"  # sent by the death watcher into the output socket


class EngineDeadError(RuntimeError):
    """The EngineCore process is gone; nothing more will come from it."""


class EngineStartupError(RuntimeError):
    """The EngineCore process could not start; the message carries its real cause."""


class EngineCoreClient(ABC):
    @abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: list[str]) -> None: ...

    @abstractmethod
    def get_output(self) -> EngineCoreOutputs:
        """Run (or wait for) one engine step and return its outputs."""

    @abstractmethod
    def call_utility(self, method: str, *args: Any) -> Any: ...

    @abstractmethod
    def shutdown(self) -> None: ...

    @staticmethod
    def make_client(
        config: EngineConfig, launcher: EngineLauncher | None = None
    ) -> EngineCoreClient:
        if envs.LMSERVE_ENABLE_MULTIPROCESSING:
            return SyncMPClient(config, launcher)
        return InprocClient(config)

    @staticmethod
    def make_async_mp_client(
        config: EngineConfig, launcher: EngineLauncher | None = None
    ) -> AsyncMPClient:
        return AsyncMPClient(config, launcher)


class InprocClient(EngineCoreClient):
    """The EngineCore lives in this process; get_output() runs one step."""

    def __init__(self, config: EngineConfig) -> None:
        from lmserve.core.engine_core import EngineCore

        self.engine_core = EngineCore(config)
        self._pending_aborts: list = []

    def add_request(self, request: EngineCoreRequest) -> None:
        self.engine_core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self._pending_aborts.extend(self.engine_core.abort_requests(request_ids))

    def get_output(self) -> EngineCoreOutputs:
        outputs = self.engine_core.step()
        if self._pending_aborts:  # report aborts with the next outputs
            outputs.outputs = self._pending_aborts + outputs.outputs
            self._pending_aborts = []
        return outputs

    def call_utility(self, method: str, *args: Any) -> Any:
        return getattr(self.engine_core, method)(*args)

    def shutdown(self) -> None:
        self.engine_core.shutdown()  # stops tensor-parallel workers, if any


class _EngineProcess:
    """Starts the EngineCore process, performs the handshake, watches for its death."""

    def __init__(self, config: EngineConfig, launcher: EngineLauncher) -> None:
        """`launcher`: the started process (lmserve/engine/launcher.py), given `config` here
        unless the caller launched it earlier. The caller has bound a PULL socket at
        `output_address` already (so the engine's PUSH and this watcher's can connect)."""
        launcher.adopt()  # from here on, shutdown() removes the process and the sockets
        self._rpc_dir = launcher.rpc_dir
        self.output_address = launcher.output_address
        self.dead_error: EngineDeadError | None = None
        self._shutting_down = False
        ctx = zmq.Context.instance()
        handshake = ctx.socket(zmq.PULL)
        handshake.bind(launcher.handshake_address)
        self.proc = launcher.proc
        try:
            if not launcher.launched:
                launcher.launch(config)
            self.ready = self._wait_ready(handshake)
        except BaseException:
            self.shutdown()
            raise
        finally:
            handshake.close(linger=0)
        threading.Thread(target=self._watch, daemon=True, name="engine-watcher").start()
        atexit.register(self.shutdown)  # before multiprocessing's own exit hook kills it

    def _wait_ready(self, handshake: zmq.Socket) -> ReadyMessage:
        deadline = time.monotonic() + envs.LMSERVE_ENGINE_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if handshake.poll(timeout=200):
                ready = msgspec.msgpack.decode(handshake.recv(), type=ReadyMessage)
                if not ready.ok:
                    raise EngineStartupError(f"the EngineCore failed to start:\n{ready.error}")
                return ready
            if not self.proc.is_alive():
                raise EngineStartupError(
                    f"the EngineCore process exited with code {self.proc.exitcode} before it "
                    "was ready (see its log above)"
                )
        raise EngineStartupError(
            f"the EngineCore was not ready within {envs.LMSERVE_ENGINE_READY_TIMEOUT_S} s "
            "(LMSERVE_ENGINE_READY_TIMEOUT_S)"
        )

    def _watch(self) -> None:
        """Block until the process exits; if unplanned, record why and wake the reader."""
        wait_for_sentinels([self.proc.sentinel])
        self.proc.join(timeout=1)  # reap it, so exitcode is known
        if self._shutting_down:
            return
        self.dead_error = EngineDeadError(
            f"the EngineCore process (pid {self.proc.pid}) exited unexpectedly with code "
            f"{self.proc.exitcode}"
        )
        logger.error("%s", self.dead_error)
        with contextlib.suppress(zmq.ZMQError):
            socket = zmq.Context.instance().socket(zmq.PUSH)
            socket.connect(self.output_address)
            socket.send(_DEAD_MARKER)
            socket.close(linger=1000)

    def shutdown(self) -> None:
        self._shutting_down = True
        atexit.unregister(self.shutdown)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
        shutil.rmtree(self._rpc_dir, ignore_errors=True)


class _MPClientBase:
    """Shared by the sync and async clients: the process, the codec, utility call ids."""

    def __init__(
        self, config: EngineConfig, ctx: zmq.Context, launcher: EngineLauncher | None = None
    ) -> None:
        launcher = launcher or EngineLauncher()  # refuses to start inside a spawned child
        self.ctx = ctx
        self.output_socket = ctx.socket(zmq.PULL)
        self.output_socket.bind(launcher.output_address)
        self.input_socket = ctx.socket(zmq.PUSH)
        self.input_socket.connect(launcher.input_address)  # the engine binds it
        try:
            self.engine = _EngineProcess(config, launcher)
        except BaseException:
            self.input_socket.close(linger=0)
            self.output_socket.close(linger=0)
            raise
        self.encoder = MsgpackEncoder()
        self.decoder = MsgpackDecoder(EngineCoreOutputs)
        self._call_ids = itertools.count()
        self._closed = False

    @property
    def is_dead(self) -> bool:
        return self.engine.dead_error is not None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self.engine.dead_error

    @property
    def engine_pid(self) -> int | None:
        return self.engine.proc.pid

    def _add_frames(self, request: EngineCoreRequest) -> list[Any]:
        return [EngineCoreRequestType.ADD.value, *self.encoder.encode(request)]

    @staticmethod
    def _msg_frames(request_type: EngineCoreRequestType, payload: Any) -> list[bytes]:
        return [request_type.value, msgspec.msgpack.encode(payload)]

    def _decode(self, frames: list[Any]) -> EngineCoreOutputs:
        if len(frames) == 1 and bytes(frames[0].buffer) == _DEAD_MARKER:
            raise self.engine.dead_error or EngineDeadError("the EngineCore process died")
        return self.decoder.decode(frames)

    def _check_alive(self) -> None:
        if self.engine.dead_error is not None:
            raise self.engine.dead_error

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine.shutdown()
        self.input_socket.close(linger=0)
        self.output_socket.close(linger=0)


class SyncMPClient(_MPClientBase, EngineCoreClient):
    def __init__(self, config: EngineConfig, launcher: EngineLauncher | None = None) -> None:
        super().__init__(config, zmq.Context.instance(), launcher)
        self._buffered: deque[EngineCoreOutputs] = deque()

    def add_request(self, request: EngineCoreRequest) -> None:
        self._check_alive()
        self.input_socket.send_multipart(self._add_frames(request), copy=False)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and not self.is_dead:
            self.input_socket.send_multipart(
                self._msg_frames(EngineCoreRequestType.ABORT, request_ids)
            )

    def get_output(self) -> EngineCoreOutputs:
        if self._buffered:
            return self._buffered.popleft()
        self._check_alive()
        return self._decode(self.output_socket.recv_multipart(copy=False))

    def call_utility(self, method: str, *args: Any) -> Any:
        self._check_alive()
        call_id = next(self._call_ids)
        payload = (call_id, method, list(args))
        self.input_socket.send_multipart(self._msg_frames(EngineCoreRequestType.UTILITY, payload))
        while True:
            outputs = self._decode(self.output_socket.recv_multipart(copy=False))
            result = outputs.utility_output
            if result is not None and result.call_id == call_id:
                if result.error:
                    raise RuntimeError(f"EngineCore.{method}: {result.error}")
                return result.result
            self._buffered.append(outputs)


class AsyncMPClient(_MPClientBase):
    """Create inside the event loop that will use it."""

    def __init__(self, config: EngineConfig, launcher: EngineLauncher | None = None) -> None:
        super().__init__(config, zmq.asyncio.Context.instance(), launcher)
        self._pending_calls: dict[int, asyncio.Future] = {}

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        self._check_alive()
        await self.input_socket.send_multipart(self._add_frames(request), copy=False)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        if request_ids and not self.is_dead:
            frames = self._msg_frames(EngineCoreRequestType.ABORT, request_ids)
            await self.input_socket.send_multipart(frames)

    async def get_output_async(self) -> EngineCoreOutputs:
        """The next engine outputs; utility answers are routed to their callers on the way."""
        while True:
            self._check_alive()
            outputs = self._decode(await self.output_socket.recv_multipart(copy=False))
            result = outputs.utility_output
            if result is None:
                return outputs
            future = self._pending_calls.pop(result.call_id, None)
            if future is not None and not future.done():
                if result.error:
                    future.set_exception(RuntimeError(result.error))
                else:
                    future.set_result(result.result)

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        """Needs someone awaiting get_output_async (AsyncLLM's output loop) to deliver."""
        self._check_alive()
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._pending_calls[call_id] = future
        payload = (call_id, method, list(args))
        await self.input_socket.send_multipart(
            self._msg_frames(EngineCoreRequestType.UTILITY, payload)
        )
        return await future
