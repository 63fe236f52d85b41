"""The EngineCore process freezes its start-up heap: full collections while serving skip it."""

from __future__ import annotations

import gc

from lmserve.utils import freeze_startup_heap


def test_objects_alive_at_start_up_are_frozen_and_later_ones_are_not():
    startup = [[] for _ in range(1000)]  # container objects: tracked by the collector
    before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        frozen = gc.get_freeze_count()
        assert frozen >= before + len(startup)
        serving = [[] for _ in range(1000)]
        assert gc.get_freeze_count() == frozen  # new objects stay collectable
        gc.collect()
        assert gc.get_freeze_count() == frozen  # and a full collection leaves the frozen ones
        assert len(serving) == len(startup)
    finally:
        gc.unfreeze()
