"""CPU training's thread count under contention: `ThreadTuner` keeps the faster of torch's thread count and one;
`torch_threads`, a block that puts torch's thread count back as it found it.

Beside another busy process on a small machine, torch's OpenMP threads spin while they wait for each other and for
the sampler's reader threads; one thread can then be far faster. The tuner measures that on the training steps
themselves (wall time per step) and on the CPU other processes use (/proc/stat, `others_cpu_seconds`). The training
loop (train.py) calls `step_started` before each step and `restore` at the end; nothing here knows of the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import numpy as np
import torch

logger = logging.getLogger("scvi_scale.train")  # its decisions are the training loop's log lines

PROBE_CUT_STEPS, PROBE_CUT_FACTOR = 3, 2.0
# CPU in use by other processes, in cores, from which the tuner probes one thread. One busy process is ~1 core; a
# quiet machine's daemons use ~0.01. Below it a probe would only cost: its slower steps and, where the likelihood
# runs torch.compile'd (no C kernel: scvi_scale.kernels), a recompile for the new thread count (~1 s once per
# process). With the C kernel a thread change compiles nothing (tests/test_startup.py).
OTHERS_BUSY_CORES = 0.25


@contextlib.contextmanager
def torch_threads(count: int | None = None):
    """torch at `count` threads inside the block (None: as it is), and at its thread count from before after it,
    whatever the block changed (numba's parallel loops, pynndescent's and umap-learn's, share the OpenMP runtime
    with torch and set its thread count to every core when their pool starts)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def others_cpu_seconds() -> float | None:
    """CPU seconds that every process but this one has used on this machine so far (all cores, steal time
    included: a busy VM host takes cores as a neighbour does), from /proc/stat less os.times(); None where the
    machine has no /proc/stat. Only differences of two readings mean anything."""
    try:
        with open("/proc/stat") as stat:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    ours = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK") - ours.user - ours.system


class ThreadTuner:
    """Keeps CPU training at the faster of `threads` torch threads and one, as measured on its own steps.

    Why: with two threads on two cores and one other busy process, torch's OpenMP threads spin while they wait for
    each other and for the sampler's reader threads, and whole training ran many times slower, one thread hardly
    slower (benchmarks/contention.py --training; benchmarks/RESULTS.md, Threads under contention). From step `lead` on
    (after the first steps' compilation), every `period` steps the tuner times `window` steps at the thread count in
    use, then `window` steps at the other one, and keeps the faster by median step time (the wall time from one step's
    start to the next's, the wait for the minibatch included), switching only when the other is faster by more than
    `margin`. One thread is probed only while other processes use at least OTHERS_BUSY_CORES of CPU (`others_cpu`,
    measured since the last probe's start): on a quiet machine the tuner never leaves torch's count, since the first
    steps at one thread are slow once per process where torch.compile'd graphs recompile for it; under load a probe
    costs `window` slower steps a period. A probe of more threads always runs (the load may be gone), and stops after
    its first steps if each is over twice as slow. The schedule is by global step, so a resumed run probes at the same
    steps as an uninterrupted one.
    `step_started(global_step)` is called before every step, `restore()` at the end of training.
    """

    def __init__(
        self,
        threads: int,
        period: int = 500,
        window: int = 16,
        lead: int = 32,
        margin: float = 1.15,
        clock=time.perf_counter,
        others_cpu=others_cpu_seconds,
    ):
        if period <= 2 * window:
            raise ValueError(f"period={period} must exceed two windows of {window} steps")
        self.threads, self.period, self.window, self.lead, self.clock = threads, period, window, lead, clock
        self.margin, self.others_cpu = margin, others_cpu
        self.others_since: tuple[float, float | None] | None = None  # (clock, others_cpu()) at the last probe's start
        self.in_use = threads
        self.durations: dict[int, list[float]] = {}  # threads -> step times in this period's two windows
        self.previous: tuple[int, float] | None = None  # (global step, start time) of the last step
        self.probe_cut_in: int | None = None  # the period whose probe was skipped or stopped early

    def _position(self, global_step: int) -> int | None:
        return None if global_step < self.lead else (global_step - self.lead) % self.period

    def _timed_at(self, global_step: int) -> int | None:
        """The thread count a step runs at inside the windows (the probe: the other count); None outside them."""
        position = self._position(global_step)
        if position is None or position >= 2 * self.window:
            return None
        if position < self.window or self.probe_cut_in == (global_step - self.lead) // self.period:
            return self.in_use
        return 1 if self.in_use == self.threads else self.threads

    def step_started(self, global_step: int) -> None:
        now = self.clock()
        if self.previous is not None and self.previous[0] == global_step - 1:
            timed_at = self._timed_at(global_step - 1)
            if timed_at is not None:
                self.durations.setdefault(timed_at, []).append(now - self.previous[1])
                self._cut_a_hopeless_probe(global_step - 1, timed_at)
        self.previous = (global_step, now)
        if self.others_since is None or self._position(global_step) == self.window:
            self._skip_a_needless_probe(global_step, now)
        if self._position(global_step) == 2 * self.window:
            if len(self.durations) == 2:
                other = 1 if self.in_use == self.threads else self.threads
                in_use_ms, other_ms = (1e3 * float(np.median(self.durations[count])) for count in (self.in_use, other))
                if other_ms * self.margin < in_use_ms:
                    logger.info(
                        "training at %d torch thread(s) from step %d: median step %.1f ms against %.1f ms",
                        other,
                        global_step,
                        other_ms,
                        in_use_ms,
                    )
                    self.in_use = other
            self.durations = {}
        wanted = self._timed_at(global_step) or self.in_use
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _skip_a_needless_probe(self, global_step: int, now: float) -> None:
        """At a probe's start: skip a probe of one thread when other processes used under OTHERS_BUSY_CORES since
        the last probe's start (or the first step). Where that cannot be measured, probe."""
        others = self.others_cpu()
        if self.others_since is not None and self.in_use == self.threads and others is not None:
            since_clock, since_others = self.others_since
            if (
                since_others is not None
                and now > since_clock
                and ((others - since_others) / (now - since_clock) < OTHERS_BUSY_CORES)
            ):
                self.probe_cut_in = (global_step - self.lead) // self.period
        self.others_since = (now, others)

    def _cut_a_hopeless_probe(self, global_step: int, timed_at: int) -> None:
        """Stop a probe of more threads after PROBE_CUT_STEPS steps each over PROBE_CUT_FACTOR times the median in use
        (two threads beside a busy process cost several times a step: the rest of the window is not worth it). A probe
        of one thread is never cut: its first steps in a process are slow for a reason of their own (setup)."""
        probe, in_use = self.durations.get(timed_at), self.durations.get(self.in_use)
        if timed_at <= self.in_use or probe is None or in_use is None or len(probe) < PROBE_CUT_STEPS:
            return
        if min(probe[-PROBE_CUT_STEPS:]) > PROBE_CUT_FACTOR * float(np.median(in_use)):
            self.probe_cut_in = (global_step - self.lead) // self.period
            self.durations = {}

    def restore(self) -> None:
        torch.set_num_threads(self.threads)
