"""Running a test file's Triton kernel tests on CPU, in Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys


def run_kernel_tests_interpreted(test_file: str, expected: str) -> None:
    """Run `test_file` in a fresh pytest process with TRITON_INTERPRET=1 (the setting must
    precede Triton's import, which other tests of this session may have done); assert it passes
    with `expected` (e.g. "15 passed") in its summary."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert expected in run.stdout, run.stdout[-2000:]
