"""What a piece of code imports, run in a fresh interpreter (for the import-cost tests)."""

from __future__ import annotations

import json
import subprocess
import sys


def modules_loaded_by(code: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules under `prefixes` that running `code` in a fresh interpreter imported."""
    code += (
        "\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])
