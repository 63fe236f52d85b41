"""Small helpers shared by the front-end and the EngineCore process."""

from __future__ import annotations

import time


def process_age_s() -> float:
    """Seconds since this process was created (start-up logs: how long imports took)."""
    import psutil

    return time.time() - psutil.Process().create_time()
