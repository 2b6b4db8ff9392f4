"""Where one epoch of a real `SCVI.train` goes: wall time per step by part of the training loop, and CPU time by
thread (the training thread, the loader's threads, torch's OpenMP threads).

    .venv/bin/python benchmarks/profile_epoch.py [--cells 200000] [--batch-size 128] [--threads 2]
        [--warmup-steps 20] [--data-dir /tmp/scvi-scale-bench] [--switch-interval 0.005]

Settings to compare on a quiet machine, one process each: OMP_WAIT_POLICY=PASSIVE or GOMP_SPINCOUNT=N in the
environment (torch's OpenMP workers spin between parallel regions on the cores the loader's threads need),
--threads 1, --switch-interval.

One warm-up run of --warmup-steps steps, then one epoch of `SCVI(store).train(max_epochs=1)` on
`synthetic_atlas(cells)` (benchmarks/train.py's store), as benchmarks/train.py times it. The timers are wrappers this
script installs around the loop's own functions (train.py, threads.py, the sampler, tqdm); without this script none
of them exist, so the default path carries no timing code. Parts (ms per step, wall):
    loader wait        the training thread inside next(stream): waiting on the prefetch queue
    to_tensors         numpy minibatch -> torch tensors
    forward            module.loss (encoder, decoder, likelihood)
    backward           loss.backward()
    optimizer          zero_grad and optimizer.step
    progress bar       tqdm update and set_postfix
    thread tuner       ThreadTuner.step_started (its probes' slower steps show in the other parts)
    checkpoint checks  checkpoint_due and checkpoints during the epoch
    epoch end          end_epoch: metrics, validation, scheduler; the epoch's checkpoint
    rest of the loop   the epoch's wall time less all of the above (loop and step Python, the loss read-back)
Beside each part's wall time, the training thread's CPU time inside it (time.thread_time): under load, wall time
above it is time off the core (preempted, waiting for the GIL or an OpenMP barrier's sleep).
The first minibatch's wait (the first shuffle buffer) is given on its own and left out of "loader wait".
CPU seconds by thread come from /proc/self/task/<tid>/stat over the timed epoch (Linux only).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

PARTS = (
    "loader wait",
    "to_tensors",
    "forward",
    "backward",
    "optimizer",
    "progress bar",
    "thread tuner",
    "checkpoint checks",
    "epoch end",
)


class Timers:
    """Wall seconds per part, and the first minibatch's wait."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)  # the training thread's, inside each part
        self.calls: dict[str, int] = defaultdict(int)
        self.first_wait: float | None = None

    def wrap(self, owner, name: str, part: str) -> None:
        """Replaces owner.name (a function or method) by one that adds its wall time to `part`."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start, cpu_start = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
                self.cpu_seconds[part] += time.thread_time() - cpu_start
                self.calls[part] += 1

        setattr(owner, name, timed)

    def wrap_iteration(self, cls) -> None:
        """cls.__iter__ yields through a generator that times each next() (the loader wait)."""
        original = cls.__iter__
        timers = self

        def timed_iter(stream):
            iterator = original(stream)
            while True:
                start, cpu_start = time.perf_counter(), time.thread_time()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                waited = time.perf_counter() - start
                if timers.first_wait is None:
                    timers.first_wait = waited
                else:
                    timers.seconds["loader wait"] += waited
                    timers.cpu_seconds["loader wait"] += time.thread_time() - cpu_start
                yield item

        cls.__iter__ = timed_iter


def thread_cpu_seconds() -> dict[int, tuple[str, float]]:
    """{tid: (comm, user + system CPU seconds)} of this process's threads."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        found[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / ticks)
    return found


def install(timers: Timers) -> None:
    """The wrappers around the training loop's parts (see the module docstring)."""
    import tqdm.auto

    from scvi_scale import sampler, threads, train

    timers.wrap_iteration(sampler.BlockShuffleSampler)
    timers.wrap(train, "to_tensors", "to_tensors")
    timers.wrap(torch.Tensor, "backward", "backward")
    timers.wrap(threads.ThreadTuner, "step_started", "thread tuner")
    timers.wrap(train._Loop, "checkpoint_due", "checkpoint checks")
    timers.wrap(train._Loop, "end_epoch", "epoch end")
    for name in ("update", "set_postfix"):
        timers.wrap(tqdm.auto.tqdm, name, "progress bar")
    original_init = train._Loop.__init__

    def init(loop, *args, **kwargs):
        original_init(loop, *args, **kwargs)
        timers.wrap(loop, "train_loss", "forward")
        for name in ("step", "zero_grad"):
            timers.wrap(loop.optimizer, name, "optimizer")

    train._Loop.__init__ = init
    # the checkpoints of run_epoch (at max_steps and at the epoch's end) count as epoch end
    timers.wrap(train._Loop, "checkpoint", "epoch end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/scvi-scale-bench"))
    parser.add_argument(
        "--switch-interval",
        type=float,
        help="sys.setswitchinterval for the run (seconds; Python's default 0.005): how long the training thread may "
        "wait for the GIL while a loader thread holds it",
    )
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    from scvi_scale.kernels import csr_linear, torch_ops
    from train import atlas  # the cached synthetic store benchmarks/train.py uses

    from scvi_scale import SCVI, settings

    store = atlas(args.data_dir, args.cells)
    torch.set_num_threads(args.threads)
    settings.progress_bar = True  # as a user's run (tqdm writes to stderr)
    SCVI.setup_zarr(store, batch_key="batch")
    SCVI(store).train(max_epochs=1, batch_size=args.batch_size, max_steps=args.warmup_steps)

    timers = Timers()
    install(timers)
    model = SCVI(store)
    before, cpu_before = thread_cpu_seconds(), os.times()
    started = time.perf_counter()
    model.train(max_epochs=1, batch_size=args.batch_size)
    wall = time.perf_counter() - started
    after, cpu_after = thread_cpu_seconds(), os.times()
    steps = timers.calls["forward"]

    print(
        f"torch {torch.__version__}, {args.threads} threads; one epoch of {len(model.train_indices):,} cells x 2,000 "
        f"genes at batch {args.batch_size} ({steps:,} steps); C kernels: likelihood {torch_ops.native_ready()}, "
        f"first layer {csr_linear.ready()}"
    )
    print(
        f"train() wall {wall:.2f} s, {steps * args.batch_size / wall:,.0f} cells/s; first minibatch's wait "
        f"{timers.first_wait or 0:.3f} s\n"
    )
    print("| part | ms per step | share of the epoch | training thread's CPU ms per step |\n|---|---|---|---|")
    accounted = sum(timers.seconds[part] for part in PARTS) + (timers.first_wait or 0.0)
    rows = [(part, timers.seconds[part], timers.cpu_seconds[part]) for part in PARTS]
    for part, seconds, cpu in rows + [("rest of the loop", wall - accounted, None)]:
        cpu_cell = "" if cpu is None else f"{1e3 * cpu / steps:.3f}"
        print(f"| {part} | {1e3 * seconds / steps:.3f} | {seconds / wall:.1%} | {cpu_cell} |")
    print(
        f"| **all (train() wall less the first wait)** | **{1e3 * (wall - (timers.first_wait or 0)) / steps:.3f}** | |"
    )

    # Python leaves its threads' OS names as the process's, so: the training thread by its id, torch's OpenMP
    # workers as the threads alive before and after, the loader's threads (they end with the epoch) as the rest
    by_thread: dict[str, float] = defaultdict(float)
    main_tid = threading.get_native_id()
    for tid, (comm, seconds) in after.items():
        kind = "training thread" if tid == main_tid else f"other threads alive after the epoch ({comm}: OpenMP)"
        by_thread[kind] += seconds - before.get(tid, (comm, 0.0))[1]
    total_cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    by_thread["threads ended with the epoch (the loader's reader and producer)"] = total_cpu - sum(by_thread.values())
    print("\n| thread (comm) | CPU s | CPU ms per step |\n|---|---|---|")
    for kind, seconds in sorted(by_thread.items(), key=lambda item: -item[1]):
        print(f"| {kind} | {seconds:.2f} | {1e3 * seconds / steps:.3f} |")
    print(f"| **process (os.times)** | **{total_cpu:.2f}** | **{1e3 * total_cpu / steps:.3f}** |")
    settings_used = {key: os.environ[key] for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if key in os.environ}
    print(f"\nOpenMP environment: {settings_used or 'defaults'}; switch interval {sys.getswitchinterval()} s")


if __name__ == "__main__":
    main()
