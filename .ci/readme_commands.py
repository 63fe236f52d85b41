"""The README's commands, read out of README.md, so CI runs exactly what a user pastes.

    python3 .ci/readme_commands.py serve   the set-up-and-serve command
    python3 .ci/readme_commands.py test    the set-up-and-test command
    python3 .ci/readme_commands.py chat    the chat-completion curl of "Talk to the server"

Each command is the first line of a ```bash block in README.md that follows a comment line
starting with the marker below; stdlib only (CI runs this before any virtual environment).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
MARKERS = {
    "serve": "# set up, then serve",
    "test": "# set up, then run the tests",
}
BASH_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def bash_blocks(text: str) -> list[str]:
    return BASH_BLOCK.findall(text)


def setup_command(text: str, which: str) -> str:
    """The one-line command right after the `which` marker comment."""
    marker = MARKERS[which]
    found = []
    for block in bash_blocks(text):
        lines = block.splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.startswith(marker):
                found.append(lines[i + 1].strip())
    if len(found) != 1:
        raise SystemExit(f"README.md: expected one command after {marker!r}, found {len(found)}")
    return found[0]


def chat_curl(text: str) -> str:
    """The first curl command to /v1/chat/completions (it may span lines)."""
    for block in bash_blocks(text):
        for command in re.split(r"\n\s*\n", block):  # commands are separated by blank lines
            if command.lstrip().startswith("curl") and "/v1/chat/completions" in command:
                return command.strip()
    raise SystemExit("README.md: no curl to /v1/chat/completions in a bash block")


def command(which: str, text: str | None = None) -> str:
    text = README.read_text(encoding="utf-8") if text is None else text
    return chat_curl(text) if which == "chat" else setup_command(text, which)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("serve", "test", "chat"):
        raise SystemExit("usage: readme_commands.py serve|test|chat")
    print(command(sys.argv[1]))
