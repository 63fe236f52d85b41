"""How many threads a CPU engine's steps use, chosen by measuring.

A batch-1 decode step on the CPU is ~150 small parallel regions (one per matmul and per larger
op). With every core in use, each region waits for all its threads: when another busy process
holds one of the cores, the thread that was pushed off it comes back only after a scheduler
time slice, and the step slows down by an order of magnitude. Measured on 2 cores with one busy
neighbour process: 13 tok/s with 2 threads, 38 with 1; on the idle machine 2 threads win. The
API server next to the engine is such a neighbour while it streams.

So the tuner measures instead of guessing: for small steps (few tokens: the weight-bound decode
steps where this matters) it runs blocks of steps with each candidate count (a a a b b b a a a
b b b: a change of load hits both alike), keeps the faster by median step time, and probes again
every `explore_every` small steps in case the machine's load changed. The first step of each
block is not counted: it pays for waking the threads that the switch brought back. Larger steps
use the current best.

    tuner = CpuThreadTuner(torch.get_num_threads())
    threads = tuner.threads_for_step(small=True); torch.set_num_threads(threads)
    ... run the step ...
    tuner.record(threads, seconds, small=True)
"""

from __future__ import annotations

import logging
import statistics

logger = logging.getLogger(__name__)

SMALL_STEP_TOKENS = 16  # steps of at most this many tokens are timed and tuned


class CpuThreadTuner:
    def __init__(self, max_threads: int, explore_every: int = 256, block_steps: int = 4) -> None:
        self.candidates = sorted({max(max_threads, 1), 1}, reverse=True)
        self.best = self.candidates[0]
        self.explore_every = explore_every
        self.block_steps = block_steps
        # The thread counts of the probe steps still to run, each with whether it is timed.
        self._probe: list[tuple[int, bool]] = self._probe_order()  # start by measuring
        self._samples: dict[int, list[float]] = {n: [] for n in self.candidates}
        self._small_steps_since_probe = 0

    @property
    def probing(self) -> bool:
        return bool(self._probe)

    def threads_for_step(self, small: bool) -> int:
        """The thread count to run the next step with."""
        if not small or len(self.candidates) == 1:
            return self.best
        if not self._probe and self._small_steps_since_probe >= self.explore_every:
            self._probe = self._probe_order()
        return self._probe[0][0] if self._probe else self.best

    def record(self, threads: int, seconds: float, small: bool) -> None:
        """A step ran with `threads` threads in `seconds`."""
        if not small:
            return
        if not self._probe or threads != self._probe[0][0]:
            self._small_steps_since_probe += 1
            return
        _, timed = self._probe.pop(0)
        if timed:
            self._samples[threads].append(seconds)
        if not self._probe:  # every candidate measured: keep the fastest
            medians = {n: statistics.median(self._samples[n]) for n in self.candidates}
            self.best = min(self.candidates, key=medians.__getitem__)
            logger.debug(
                "CPU threads: %d (median small step: %s)", self.best,
                ", ".join(f"{n} threads {t * 1e3:.1f} ms" for n, t in medians.items()),
            )  # fmt: skip
            self._samples = {n: [] for n in self.candidates}
            self._small_steps_since_probe = 0

    def _probe_order(self) -> list[tuple[int, bool]]:
        """Two rounds of a block per candidate; a block's first step is not timed."""
        block = [(n, i > 0) for n in self.candidates for i in range(self.block_steps)]
        return block * 2
