"""Free TCP ports for the servers tests start.

A server binds its port seconds after the port was chosen (after its engine started), and
meanwhile the OS may offer the same free port to the next caller, e.g. as another engine's
KV-events socket when several start at once. So a port is handed out once per process."""

from __future__ import annotations

import socket
import threading

_HANDED_OUT: set[int] = set()
_LOCK = threading.Lock()


def free_port() -> int:
    """A port nothing listens on now that this process has not handed out before."""
    with _LOCK:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
