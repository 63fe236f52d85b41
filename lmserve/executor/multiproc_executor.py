"""One worker process per tensor-parallel rank.

    EngineCore ──(shm ring broadcast: method + msgpack args)──▶ worker 0 … worker N-1
               ◀──(ZMQ PUSH/PULL: msgpack results, arrays as zero-copy frames)──

Every rank runs every call (the model is split across them; they meet in all-reduces); only
rank 0 answers `execute_model`, every rank answers the set-up calls. A worker that dies is
noticed while its answer is awaited, and the EngineCore then dies too (so the front-end sees
an engine death, never a hang).
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import socket
import tempfile
import time
import traceback
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any

import msgspec
import zmq

from lmserve import envs
from lmserve.config import EngineConfig
from lmserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from lmserve.distributed.shm_ring import MessageQueue
from lmserve.kv_transfer.base import KVConnectorOutput
from lmserve.serial_utils import MsgpackDecoder, MsgpackEncoder
from lmserve.utils import exit_with_parent, set_process_title

logger = logging.getLogger(__name__)

# Calls the executor may make on a worker, and the type their msgpack argument decodes to.
_ARG_TYPES: dict[str, Any] = {
    "determine_num_gpu_blocks": None,
    "initialize_kv_cache": int,
    "execute_model": SchedulerOutput,
    "shutdown": None,
}


class _Result(msgspec.Struct, array_like=True):
    rank: int
    ok: bool
    value: Any = None  # ModelRunnerOutput is re-decoded by the caller
    error: str | None = None


class MultiprocExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.world_size = config.parallel_config.tensor_parallel_size
        self._rpc_dir = tempfile.mkdtemp(prefix="lmserve-tp-", dir=envs.LMSERVE_RPC_BASE_PATH)
        self.ctx = zmq.Context()
        self.result_socket = self.ctx.socket(zmq.PULL)
        result_address = f"ipc://{self._rpc_dir}/results"
        self.result_socket.bind(result_address)
        self.broadcast = MessageQueue(n_reader=self.world_size)
        handle = self.broadcast.export_handle()
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        mp = multiprocessing.get_context("spawn")
        self.workers = [
            mp.Process(
                target=run_worker,
                args=(config, rank, init_method, handle, result_address),
                name=f"lmserve::Worker-TP{rank}",
                daemon=False,
            )
            for rank in range(self.world_size)
        ]
        for proc in self.workers:
            proc.start()
        self.encoder = MsgpackEncoder()
        self.result_decoder = MsgpackDecoder(_Result)
        # With a KV connector, a load is done when every rank has loaded its share.
        self.kv_loads = _KVLoadsAcrossRanks(self.world_size) if config.kv_transfer_config else None
        self.broadcast.wait_until_ready(timeout=envs.LMSERVE_ENGINE_READY_TIMEOUT_S)
        self._collect(all_ranks=True)  # each worker reports once its model is loaded

    def determine_num_gpu_blocks(self) -> int:
        return min(self._call("determine_num_gpu_blocks", None, all_ranks=True))

    def initialize_kv_cache(self, num_gpu_blocks: int) -> None:
        self._call("initialize_kv_cache", num_gpu_blocks, all_ranks=True)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self.kv_loads is None:
            (output,) = self._call("execute_model", scheduler_output, all_ranks=False)
            return msgspec.convert(output, ModelRunnerOutput)  # arrays stay zero-copy views
        outputs = [
            msgspec.convert(o, ModelRunnerOutput)
            for o in self._call("execute_model", scheduler_output, all_ranks=True)
        ]
        outputs[0].kv_connector_output = self.kv_loads.merge(
            [o.kv_connector_output for o in outputs]
        )
        return outputs[0]

    def _call(self, method: str, arg: Any, all_ranks: bool) -> list[Any]:
        self.broadcast.enqueue(msgspec.msgpack.encode((method, arg)))
        return self._collect(all_ranks)

    def _collect(self, all_ranks: bool) -> list[Any]:
        """Answers of every rank (or rank 0), in rank order; raises if a worker failed/died."""
        wanted = self.world_size if all_ranks else 1
        results: dict[int, Any] = {}
        while len(results) < wanted:
            if not self.result_socket.poll(timeout=1000):
                self._check_workers_alive()
                continue
            result = self.result_decoder.decode(self.result_socket.recv_multipart(copy=False))
            if not result.ok:
                self._name_dead_peer(result.rank)
                raise RuntimeError(f"tensor-parallel worker {result.rank} failed:\n{result.error}")
            results[result.rank] = result.value
        return [results[r] for r in sorted(results)]

    def _name_dead_peer(self, failed_rank: int, timeout: float = 3.0) -> None:
        """A rank fails when a peer dies mid-collective (its socket resets before the kernel
        reports the process gone, and later still on a loaded machine): wait up to `timeout`
        for another rank to be seen dead, and raise naming it. The failed rank itself is left
        out: it exits after reporting, which is a consequence, not the cause."""
        peers = [(rank, p) for rank, p in enumerate(self.workers) if rank != failed_rank]
        deadline = time.monotonic() + timeout
        while True:
            for rank, proc in peers:
                if not proc.is_alive():
                    raise RuntimeError(
                        f"tensor-parallel worker {rank} (pid {proc.pid}) died with exit code "
                        f"{proc.exitcode}"
                    )
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wait_for_sentinels([p.sentinel for _, p in peers], timeout=min(left, 0.25))

    def _check_workers_alive(self) -> None:
        for rank, proc in enumerate(self.workers):
            if not proc.is_alive():
                raise RuntimeError(
                    f"tensor-parallel worker {rank} (pid {proc.pid}) died with exit code "
                    f"{proc.exitcode}"
                )

    def shutdown(self) -> None:
        if any(p.is_alive() for p in self.workers):
            try:
                self.broadcast.enqueue(msgspec.msgpack.encode(("shutdown", None)), timeout=2)
            except Exception:
                pass
        for proc in self.workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self.broadcast.close()
        self.result_socket.close(linger=0)
        shutil.rmtree(self._rpc_dir, ignore_errors=True)


def run_worker(
    config: EngineConfig, rank: int, init_method: str, handle: Any, result_address: str
) -> None:
    """Entry point of one tensor-parallel worker process. It ends the process itself (see
    exit_worker_process): 0 after a "shutdown" command, 1 after an error (traceback printed)."""
    from lmserve.distributed.parallel_state import exit_worker_process

    code = 1
    try:
        _run_worker(config, rank, init_method, handle, result_address)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        exit_worker_process(code)


def _run_worker(
    config: EngineConfig, rank: int, init_method: str, handle: Any, result_address: str
) -> None:
    from lmserve.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
    from lmserve.worker.worker import Worker

    set_process_title(f"lmserve::Worker-TP{rank}")
    logging.basicConfig(
        level=envs.LMSERVE_LOGGING_LEVEL, format=f"%(asctime)s %(levelname)s [TP{rank}] %(message)s"
    )
    commands = MessageQueue.create_from_handle(handle, reader_rank=rank)
    context = zmq.Context()
    results = context.socket(zmq.PUSH)
    results.connect(result_address)
    encoder = MsgpackEncoder()

    def reply(ok: bool, value: Any = None, error: str | None = None) -> None:
        results.send_multipart(encoder.encode(_Result(rank, ok, value, error)), copy=False)

    try:
        commands.wait_until_ready()
        exit_with_parent()
        world = config.parallel_config.tensor_parallel_size
        backend = "nccl" if config.device_config.device == "cuda" else "gloo"
        try:
            worker = Worker(config, local_rank=rank)  # selects the GPU before NCCL starts
            init_tensor_parallel(world, rank, init_method, backend)
            worker.load_model()
        except Exception:
            reply(False, error=traceback.format_exc())
            raise
        reply(True)
        try:
            _serve(worker, rank, commands, reply, config.kv_transfer_config is not None)
        finally:
            worker.shutdown()
            destroy_tensor_parallel()
            commands.close()
    finally:
        results.close(linger=5000)  # an error reply still queued goes out before the exit
        context.term()


def _serve(worker: Any, rank: int, commands: MessageQueue, reply, all_ranks_step: bool) -> None:
    """Run commands until "shutdown". A step's answer comes from rank 0 only, unless a KV
    connector runs: then every rank reports which of its loads finished."""
    decoders = {m: msgspec.msgpack.Decoder(tuple[str, t]) for m, t in _ARG_TYPES.items() if t}
    while True:
        raw = commands.dequeue()
        method = msgspec.msgpack.decode(raw, type=tuple[str, Any])[0]
        if method == "shutdown":
            return
        arg = decoders[method].decode(raw)[1] if method in decoders else None
        try:
            value = getattr(worker, method)(*([] if arg is None else [arg]))
        except Exception:
            reply(False, error=traceback.format_exc())
            raise
        if method != "execute_model" or rank == 0 or all_ranks_step:
            reply(True, value)


class _KVLoadsAcrossRanks:
    """Joins the ranks' KV connector reports: a request's load is finished once every rank
    reported it, with the fewest tokens any rank loaded (all ranks must hold the KV)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.pending: dict[str, list[int]] = {}  # req_id -> tokens loaded, per reporting rank

    def merge(self, outputs: list[KVConnectorOutput | None]) -> KVConnectorOutput:
        finished: dict[str, int] = {}
        for output in outputs:
            for req_id, num_tokens in (output.finished_loading if output else {}).items():
                reports = self.pending.setdefault(req_id, [])
                reports.append(num_tokens)
                if len(reports) == self.world_size:
                    finished[req_id] = min(self.pending.pop(req_id))
        stats = outputs[0].stats if outputs[0] is not None else None  # rank 0's counters
        return KVConnectorOutput(finished_loading=finished, stats=stats)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
