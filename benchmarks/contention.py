"""Training steps under contention: how much slower the step gets when other busy processes share the cores, for
several thread settings.

    .venv/bin/python benchmarks/contention.py [--busy 1] [--steps 60] [--repeats 3] [--cells 20000]
        [--variants 1 2 2:passive 2:spin1000] [--training] [--data-dir /tmp/scvi-scale-bench]

Each variant is torch.set_num_threads(N), optionally with the OpenMP waiting policy set in the environment before
torch starts (":passive" OMP_WAIT_POLICY=PASSIVE, ":spinK" GOMP_SPINCOUNT=K; GNU OpenMP reads them when it loads;
":fixed" SCVI_SCALE_ADAPTIVE_THREADS=0, training's thread tuner off, for --training).
Every measurement is a fresh process that builds scVI's default VAE on real minibatches of a synthetic store
(benchmarks/profile_step.py's setup, x_csr minibatches), takes 10 warm-up steps, then times --steps steps (wall
clock, median). It runs once on its own ("quiet") and once beside --busy processes that spin a CPU each
(`while True: pass`), started before it and stopped after; the order of variants and conditions is interleaved over
--repeats rounds. The table gives the medians over rounds and busy / quiet: the issue's bar is <= 2x under one busy
process, and no slower than the fastest variant when quiet. --training times whole training instead of the step
alone: `SCVI.train` over --steps steps (benchmarks/train.py's throughput run: the sampler's reader threads beside the
step), reported as ms per step. Run it on an otherwise idle machine: other jobs are contention too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
import profile_step as P
from pathlib import Path
threads, steps, store = int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
torch.set_num_threads(threads)
module, optimizer, sampler = P.setup(store, 128, "csr")
batches = P.collect(sampler, 10 + steps, "csr")
P.step_times(module, optimizer, batches[:10])
print(json.dumps({"ms": 1e3 * statistics.median(P.step_times(module, optimizer, batches[10:]))}))
"""


BATCH_SIZE = 128  # --training's minibatch, as profile_step's setup (the step-alone worker) uses


def parse_variant(text: str) -> tuple[int, dict[str, str]]:
    """'2:passive' -> (2, {"OMP_WAIT_POLICY": "PASSIVE"}); '2:spin1000' -> (2, {"GOMP_SPINCOUNT": "1000"});
    '2:fixed' -> (2, {"SCVI_SCALE_ADAPTIVE_THREADS": "0"}): training without the thread tuner."""
    threads, _, policy = text.partition(":")
    env = {}
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif policy.startswith("spin"):
        env["GOMP_SPINCOUNT"] = policy.removeprefix("spin")
    elif policy == "fixed":
        env["SCVI_SCALE_ADAPTIVE_THREADS"] = "0"
    elif policy:
        raise ValueError(f"variant {text!r}: expected N, N:passive, N:spinK or N:fixed")
    return int(threads), env


def measure(variant: str, store: Path, steps: int, n_busy: int, training: bool) -> float:
    threads, env = parse_variant(variant)
    if training:
        from train import OURS_THROUGHPUT

        command = [sys.executable, "-c", OURS_THROUGHPUT, str(store), str(BATCH_SIZE), str(steps), str(threads)]
    else:
        command = [sys.executable, "-c", WORKER, str(Path(__file__).parent), str(threads), str(steps), str(store)]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n_busy)]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "SCVI_SCALE_PROGRESS": "0", **env}
        )
    finally:
        for process in busy:
            process.kill()
            process.wait()
    if result.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{result.stderr[-3000:]}")
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    return reply["ms"] if not training else 1e3 * BATCH_SIZE / reply["cells_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=1, help="busy processes beside the run")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--variants", nargs="+", default=["1", "2", "2:passive", "2:spin1000"])
    parser.add_argument("--training", action="store_true", help="time SCVI.train, reader threads included")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/scvi-scale-bench"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from train import atlas

    args.data_dir.mkdir(parents=True, exist_ok=True)
    store = atlas(args.data_dir, args.cells)
    print(
        f"cores this process may use: {len(os.sched_getaffinity(0))}; busy processes: {args.busy}; "
        f"batch 128, 2000 genes, x_csr minibatches, {'whole training' if args.training else 'the step alone'}"
    )
    times = {(variant, busy): [] for variant in args.variants for busy in (0, args.busy)}
    for round_index in range(args.repeats):
        order = [(v, b) for v in args.variants for b in (0, args.busy)]
        if round_index % 2:
            order.reverse()
        for variant, busy in order:
            times[variant, busy].append(measure(variant, store, args.steps, busy, args.training))
    print("\n| threads, policy | quiet ms/step | busy ms/step | busy / quiet |\n|---|---|---|---|")
    for variant in args.variants:
        quiet, loaded = (statistics.median(times[variant, b]) for b in (0, args.busy))
        print(f"| {variant} | {quiet:.2f} | {loaded:.2f} | {loaded / quiet:.1f}x |")


if __name__ == "__main__":
    main()
