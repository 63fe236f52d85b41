"""CI's first step: the README's set-up-and-serve command, verbatim, as a new user runs it.

In a copy of the working tree (so its fresh `.venv` has no test extra and nothing of the test
run), this runs the README's serve command, waits for /health, sends the README's chat `curl`
and checks the answer is a chat completion with non-empty content, checks that every
sub-command's --help works in that same environment, then stops the server with SIGTERM and
requires exit code 0. Stdlib only: it runs before any virtual environment exists.

    python3 .ci/check_serve.py [--keep]   (--keep: leave the copy in place for a look)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_commands import command  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE_URL = "http://127.0.0.1:8000"  # the README's address
SETUP_AND_START_TIMEOUT_S = 1200.0  # pip install (about 40 s here) + model conversion + start
SHUTDOWN_TIMEOUT_S = 60.0
HELP_COMMANDS = [
    ["--help"],
    ["serve", "--help"],
    ["generate", "--help"],
    ["router", "--help"],
    ["bench", "--help"],
    ["bench", "serve", "--help"],
    ["bench", "throughput", "--help"],
    ["bench", "latency", "--help"],
]


def fail(message: str, log: Path | None = None) -> None:
    if log is not None and log.exists():
        tail = log.read_text(errors="replace").splitlines()[-60:]
        print("---- last lines of the serve command's output ----", *tail, sep="\n")
    raise SystemExit(f"check_serve: FAILED: {message}")


def copy_working_tree(dest: Path) -> None:
    """Tracked files and untracked ones git does not ignore (what a clone plus edits holds)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def health_status() -> int | None:
    try:
        with urllib.request.urlopen(BASE_URL + "/health", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_for_health(proc: subprocess.Popen, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < SETUP_AND_START_TIMEOUT_S:
        if proc.poll() is not None:
            fail(f"the serve command exited with code {proc.returncode} before /health", log)
        if health_status() == 200:
            return time.monotonic() - start
        time.sleep(1.0)
    fail(f"/health not 200 within {SETUP_AND_START_TIMEOUT_S:.0f} s", log)
    raise AssertionError("unreachable")


def check_chat_answer(workdir: Path, log: Path) -> str:
    curl = command("chat")
    out = subprocess.run(["bash", "-c", curl], cwd=workdir, capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"the README's chat curl exited {out.returncode}: {out.stderr[-500:]}", log)
    try:
        answer = json.loads(out.stdout)
        assert answer["object"] == "chat.completion", f"object is {answer.get('object')!r}"
        content = answer["choices"][0]["message"]["content"]
        assert isinstance(content, str) and content.strip(), f"content is {content!r}"
    except (ValueError, KeyError, IndexError, TypeError, AssertionError) as e:
        fail(f"the chat answer is not a chat completion with content ({e}): {out.stdout[:500]}")
    return content


def check_help_commands(workdir: Path, log: Path) -> None:
    lmserve = workdir / ".venv" / "bin" / "lmserve"
    for args in HELP_COMMANDS:
        out = subprocess.run([str(lmserve), *args], capture_output=True, text=True, cwd=workdir)
        if out.returncode != 0 or "usage: lmserve" not in out.stdout:
            fail(f"`lmserve {' '.join(args)}` exited {out.returncode}: {out.stderr[-800:]}", log)


def server_pid(shell_pid: int) -> int:
    """The `lmserve serve` process: the shell itself when bash replaced itself with the last
    command of the chain (it does), else the shell's child running it."""
    candidates = [shell_pid] + [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _parent_pid(entry) == shell_pid
    ]
    for pid in candidates:
        if " serve" in _cmdline(pid) and "bin/lmserve" in _cmdline(pid):
            return pid
    fail(f"no `lmserve serve` process among the shell {shell_pid} and its children")
    raise AssertionError("unreachable")


def _parent_pid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def stop_with_sigterm(proc: subprocess.Popen, log: Path) -> None:
    pid = server_pid(proc.pid)
    print(f"check_serve: SIGTERM to pid {pid} (shell {proc.pid})", flush=True)
    os.kill(pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        fail(f"the server did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM", log)
    if code != 0:
        fail(f"the serve command exited with code {code} after SIGTERM (expected 0)", log)


def main() -> None:
    keep = "--keep" in sys.argv[1:]
    serve = command("serve")
    if "[test]" in serve:
        fail(f"the README's serve command installs the test extra: {serve}")
    if port_in_use(8000):
        fail("port 8000 is already in use: the README's server could not start there")
    workdir = Path(tempfile.mkdtemp(prefix="lmserve-readme-serve-"))
    log = workdir.parent / f"{workdir.name}.log"
    copy_working_tree(workdir)
    print(f"check_serve: running the README's serve command in {workdir}:\n  {serve}", flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", serve], cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        seconds = wait_for_health(proc, log)
        print(f"check_serve: /health is 200 after {seconds:.0f} s (set-up included)", flush=True)
        content = check_chat_answer(workdir, log)
        print(f"check_serve: the README's chat curl answered: {content!r}", flush=True)
        check_help_commands(workdir, log)
        print(f"check_serve: `lmserve {{{', '.join(' '.join(a) for a in HELP_COMMANDS)}}}` ok")
        stop_with_sigterm(proc, log)
        print("check_serve: the server exited with code 0 on SIGTERM")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
            log.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
