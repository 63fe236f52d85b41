"""Start the EngineCore process before its configuration exists.

`lmserve serve` spends its first seconds importing the server and building the configuration
(transformers' AutoConfig); the EngineCore process then spends seconds more importing torch and
the engine. An `EngineLauncher` started first lets the two overlap: its process imports the
engine at once and then waits on a pipe for `(config, addresses)`; `_EngineProcess` hands them
over when the client is built. This module imports nothing heavy, so it can run first.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
from multiprocessing.connection import Connection


def start_launcher() -> EngineLauncher | None:
    """A launcher when the EngineCore runs in its own process, else None."""
    from lmserve import envs

    return EngineLauncher() if envs.LMSERVE_ENABLE_MULTIPROCESSING else None


def _engine_main(conn: Connection) -> None:
    """The process: heavy imports first (while the front-end builds its config), then wait."""
    from lmserve.core.engine_core import run_engine_core

    try:
        args = conn.recv()
    except (EOFError, KeyboardInterrupt):  # the front-end gave up before it had a config
        return
    finally:
        conn.close()
    run_engine_core(*args)


class EngineLauncher:
    """A started EngineCore process waiting for its configuration. Hand it to the client with
    `launch(...)` exactly once, or `cancel()` it. The engine client `adopt()`s it: from then on
    the client owns the process and the socket folder."""

    def __init__(self) -> None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            raise RuntimeError(
                "lmserve starts its EngineCore in a new process (spawn), which re-imports your "
                "main script: put the code that creates LLM(...) under "
                '`if __name__ == "__main__":`, or set LMSERVE_ENABLE_MULTIPROCESSING=0'
            )
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=_engine_main,
            args=(child_conn,),
            name="lmserve::EngineCore",
            daemon=False,  # it may start tensor-parallel workers; it exits with us regardless
        )
        self.proc.start()
        child_conn.close()
        self.launched = False
        self.adopted = False
        # The sockets' addresses: fixed now, so the configuration can be sent before the client
        # that binds them exists (ZMQ connects whichever side comes first).
        from lmserve import envs

        self.rpc_dir = tempfile.mkdtemp(prefix="lmserve-", dir=envs.LMSERVE_RPC_BASE_PATH)
        self.input_address = f"ipc://{self.rpc_dir}/input"
        self.output_address = f"ipc://{self.rpc_dir}/output"
        self.handshake_address = f"ipc://{self.rpc_dir}/handshake"

    def launch(self, config) -> None:
        """Send the configuration and the addresses (once): the EngineCore starts building."""
        self.launched = True
        self._conn.send((config, self.input_address, self.output_address, self.handshake_address))
        self._conn.close()

    def adopt(self) -> None:
        """The engine client takes over the process and the socket folder (and their clean-up)."""
        self.adopted = True

    def cancel(self) -> None:
        """No client will own the process: stop it and remove the socket folder. Without a
        configuration the process sees the pipe close and exits; launched but never adopted
        (the front-end failed in between), it is building an engine nobody will use, and is
        terminated. A no-op once adopted."""
        if self.adopted:
            return
        shutil.rmtree(self.rpc_dir, ignore_errors=True)
        if not self._conn.closed:
            self._conn.close()
        if self.launched:
            self.proc.terminate()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
