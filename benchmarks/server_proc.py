"""Start `lmserve serve` as a child process and wait until it answers /health (imported by the
benchmark scripts here, which run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request


def start_lmserve(args: list[str], port: int, log, timeout: float = 300.0) -> subprocess.Popen:
    """`lmserve serve <args> --host 127.0.0.1 --port <port>`, output to `log`; returns once it is
    healthy, raises (and kills it) if it exits or is not healthy within `timeout` seconds."""
    cmd = [sys.executable, "-m", "lmserve.entrypoints.cli", "serve", *args]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not healthy within {timeout:.0f} s")
