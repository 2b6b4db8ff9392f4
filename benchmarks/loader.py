"""Loader benchmark: cells/s and peak RSS of scvi_scale.sampler on synthetic atlases, plus randomness vs speed.

    .venv/bin/python benchmarks/loader.py                          # 200k and 1M cells x 2000 genes
    .venv/bin/python benchmarks/loader.py --sizes 50000 --seconds 4

Stores come from scvi_scale.datasets.synthetic_atlas (16 batches in contiguous runs of rows, CSR, chunk_rows 4096)
and are made once into --data-dir (default /tmp/scvi-scale-bench); later runs reuse them.

Every timed case runs in its own subprocess, so its peak RSS (ru_maxrss) is its own: the interpreter and imports,
the opened store and the loader's buffers. A case iterates minibatches, touching nothing but their size, until the
epoch ends or --seconds pass. Columns: cells/s over the steady part (from the first minibatch on), the seconds
until the first minibatch (filling the first shuffle buffer), RSS after opening the store and peak RSS (MiB).

Tables printed:
1. Orders: sequential (inference, 4096-cell minibatches), block-shuffled (training defaults, 128-cell
   minibatches) and fully random rows (block_rows=1: each cell read on its own), each read directly and through
   the store's dask view, at every store size.
2. Dask's per-block overhead: read_csr(start, stop) against computing the dask view's slice, same blocks.
3. Randomness vs speed for block_rows x buffer_blocks: batch-label mixing within minibatches (normalised entropy,
   see tests/helpers.py label_mixing) relative to a fully random order, against cells/s and peak RSS.
4. The peer loader annbatch, when it installs in this environment (it needs Python >= 3.12).
5. What training consumes: cells/s of the scVI training step (scvi_scale.module.VAE with scvi-tools' defaults,
   128-cell minibatches of this store, Adam) with 1 and 2 torch threads, against the block-shuffled loader:
   the loader must deliver at least 3x, so the model never waits on data.
6. CPU per cell by stage (--cpu-only runs just this table): the training stream as training uses it (CSR
   minibatches of 128, block-shuffled defaults, one reader thread) over one epoch, on our store and on the same
   cells written by anndata (a store by others, read through zarr; --foreign-cells), plus --extra-stores.
   CPU time, not wall time, so the figures hold on a machine shared with other jobs: process_time of the whole
   pass with its threads, then the same epoch's stages replayed one by one in one thread (process_time each:
   zarr decodes in threads of its own): block reads, stacking a buffer's blocks, gathering minibatches (the
   sampler's _assemble). The peer
   scDataset 0.3, when installed, over the same stores (total only; see scdataset_cpu for its settings).
   Run it with another checkout's interpreter (--baseline-python) to compare with that code in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the measures the tests share with us

TRAIN_BATCH_SIZE = 128
INFERENCE_BATCH_SIZE = 4096
N_BATCH_LABELS = 16
# (block_rows, buffer_blocks) pairs for table 3
SWEEP = [(4096, 4), (4096, 16), (4096, 32), (2048, 32), (1024, 16), (1024, 32), (1024, 64)]
DASK_OVERHEAD_BLOCKS = 40


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- stores ----------------------------------------------------------------------------------------------------


def ensure_store(data_dir: Path, n_cells: int) -> Path:
    """The synthetic atlas of n_cells in data_dir, generated on first use."""
    from scvi_scale.data import CountStore, StoreError
    from scvi_scale.datasets import synthetic_atlas

    path = data_dir / f"atlas_{n_cells}.zarr"
    try:
        CountStore(path)
    except StoreError:
        started = time.perf_counter()
        print(f"generating {path} ({n_cells} cells x 2000 genes) ...", flush=True)
        synthetic_atlas(path, n_cells, n_genes=2000, n_batches=N_BATCH_LABELS, seed=0, overwrite=True)
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return path


# --- one case, in a child process ------------------------------------------------------------------------------


def make_sampler(store, case: dict):
    from scvi_scale.sampler import BlockShuffleSampler, SequentialSampler

    read_with = case.get("read_with", "direct")
    if case["order"] == "sequential":
        return SequentialSampler(store, batch_size=INFERENCE_BATCH_SIZE, read_with=read_with)
    if case["order"] == "random":
        # Blocks of one row, as many per buffer as a minibatch holds: a uniform random order, each row read alone.
        return BlockShuffleSampler(
            store, batch_size=TRAIN_BATCH_SIZE, block_rows=1, buffer_blocks=TRAIN_BATCH_SIZE, read_with=read_with
        )
    return BlockShuffleSampler(
        store,
        batch_size=TRAIN_BATCH_SIZE,
        read_with=read_with,
        **{key: case[key] for key in ("block_rows", "buffer_blocks") if key in case},
    )


def run_case(case: dict) -> dict:
    from scvi_scale.data import CountStore

    store = CountStore(case["store"])
    rss_open = current_rss_mib()
    sampler = make_sampler(store, case)
    started = time.perf_counter()
    first_at = None
    n_cells = n_first = 0
    for minibatch in sampler:
        n_cells += len(minibatch["rows"])
        now = time.perf_counter()
        if first_at is None:
            first_at, n_first = now, n_cells
        if now - started > case["seconds"]:
            break
    steady_seconds = time.perf_counter() - first_at
    return {
        "cells": n_cells,
        "cells_per_s": (n_cells - n_first) / steady_seconds if steady_seconds > 0 else float("nan"),
        "first_batch_s": first_at - started,
        "rss_open_mib": rss_open,
        "peak_rss_mib": peak_rss_mib(),
    }


def dask_overhead(store_path: str) -> dict:
    """ms per block for read_csr and for the dask view's slice, over the same random chunk-aligned blocks."""
    from scvi_scale.data import CountStore

    store = CountStore(store_path)
    lazy = store.to_dask()
    bounds = store.block_bounds()
    picks = np.random.default_rng(0).choice(
        len(bounds) - 1, size=min(DASK_OVERHEAD_BLOCKS, len(bounds) - 1), replace=False
    )
    timings = {}
    for name, read in [
        ("direct", lambda start, stop: store.read_csr(start, stop)),
        ("dask_sync", lambda start, stop: lazy[start:stop].compute(scheduler="sync")),
        ("dask_threads", lambda start, stop: lazy[start:stop].compute(scheduler="threads")),
    ]:
        read(int(bounds[picks[0]]), int(bounds[picks[0] + 1]))  # warm the metadata
        started = time.perf_counter()
        for pick in picks:
            read(int(bounds[pick]), int(bounds[pick + 1]))
        timings[name] = (time.perf_counter() - started) / len(picks) * 1e3
    return {"block_rows": store.chunk_rows, "ms_per_block": timings}


def training_step(case: dict) -> dict:
    """cells/s of loss + backward + Adam step on real minibatches already in memory (no loading in the timing)."""
    import torch

    from scvi_scale.data import CountStore
    from scvi_scale.module import VAE
    from scvi_scale.sampler import BlockShuffleSampler
    from scvi_scale.train import to_tensors

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    store = CountStore(case["store"])
    batch = store.obs_column("batch").cat.codes.to_numpy().astype(np.int64)
    sampler = BlockShuffleSampler(store, batch_size=TRAIN_BATCH_SIZE, obs_arrays={"batch": batch})
    minibatches = [to_tensors(minibatch, torch.device("cpu")) for minibatch, _ in zip(sampler, range(8))]
    module = VAE(store.n_vars, n_batch=int(batch.max()) + 1)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

    def step(tensors) -> None:
        loss = module.loss(tensors, kl_weight=1.0)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for tensors in minibatches[:2]:  # warm up allocators and kernels
        step(tensors)
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < case["seconds"]:
        step(minibatches[steps % len(minibatches)])
        steps += 1
    return {"cells_per_s": steps * TRAIN_BATCH_SIZE / (time.perf_counter() - started)}


def ensure_foreign_store(data_dir: Path, source: Path, n_cells: int) -> Path:
    """The first n_cells of `source` written by anndata.write_zarr (its own chunking and codecs, no checksums)."""
    import anndata

    from scvi_scale.data import CountStore, StoreError

    path = data_dir / f"anndata_{n_cells}.zarr"
    try:
        CountStore(path)
    except StoreError:
        store = CountStore(source)
        adata = anndata.AnnData(X=store.read_raw(0, n_cells), obs=store.obs_column("batch").iloc[:n_cells].to_frame())
        adata.obs_names = [str(index) for index in range(n_cells)]
        adata.var_names = store.var_names
        adata.write_zarr(path)
    return path


def stage_cpu(case: dict) -> dict:
    """CPU microseconds per cell of one epoch of the training stream, whole and by stage (see table 6)."""
    from numcodecs import blosc

    from scvi_scale.data import CountStore
    from scvi_scale.sampler import BlockShuffleSampler, _Buffer, _cut

    store = CountStore(case["store"])
    sampler = BlockShuffleSampler(store, batch_size=TRAIN_BATCH_SIZE, return_csr=True, dense=False, num_workers=1)
    next(iter(sampler))  # warm-up (imports, first allocations); the epoch below is the next one
    n_cells, started = 0, time.process_time()
    for minibatch in sampler:
        n_cells += len(minibatch["rows"])
    result = {"cells": n_cells, "total": (time.process_time() - started) / n_cells * 1e6}

    # The same epoch's stages replayed in this thread, each timed on its own: the sampler's own loading (block
    # reads, then stacking: the rest of loading) and assembly, with its reads run at once instead of in threads.
    # process_time, not thread_time: zarr decodes in threads of its own. Blosc decodes in one thread, as it does
    # in reader threads.
    blosc.use_threads = False
    spent = dict.fromkeys(("block reads", "loading", "gathering"), 0.0)
    buffer_rows, batch_sizes = sampler._plan(sampler.epoch - 1, 0)
    read = sampler._read

    def timed_read(*args):
        started = time.process_time()
        block = read(*args)
        spent["block reads"] += time.process_time() - started
        return block

    sampler._read = timed_read

    def timed_loading():
        buffers = (_Buffer(rows, sampler.block_bounds) for rows in buffer_rows)
        reused = (sampler._storages,) if hasattr(sampler, "_storages") else ()  # none in a checkout before them
        loads = sampler._load(InThisThread(), buffers, *reused)
        while True:
            started = time.process_time()
            loaded = next(loads, None)
            spent["loading"] += time.process_time() - started
            if loaded is None:
                return
            yield loaded

    replayed = 0
    for parts in _cut(timed_loading(), batch_sizes):
        started = time.process_time()
        replayed += len(sampler._assemble(parts)["rows"])
        spent["gathering"] += time.process_time() - started
    spent["stacking"] = spent.pop("loading") - spent["block reads"]
    return {**result, **{stage: seconds / replayed * 1e6 for stage, seconds in spent.items()}}


def scdataset_cpu(case: dict) -> dict:
    """CPU microseconds per cell of one epoch of scDataset 0.3 over the same store (see table 6), set up like our
    stream: blocks of 1,024 consecutive cells shuffled, 65,536 cells fetched at once (fetch_factor 512) and
    shuffled, minibatches of 128 (scipy CSR); X read through anndata's sparse dataset over zarr, as scDataset's
    examples do."""
    import anndata
    import zarr
    from scdataset import BlockShuffling, scDataset

    class Rows:  # scDataset asks its collection for len() and rows by index array
        def __init__(self, matrix):
            self.matrix = matrix

        def __len__(self):
            return self.matrix.shape[0]

        def __getitem__(self, rows):
            return self.matrix[rows]

    collection = Rows(anndata.io.sparse_dataset(zarr.open_group(case["store"], mode="r")["X"]))
    dataset = scDataset(
        collection, BlockShuffling(block_size=1024), batch_size=TRAIN_BATCH_SIZE, fetch_factor=512, seed=0
    )
    next(iter(dataset))  # warm-up, as for ours
    n_cells, started = 0, time.process_time()
    for minibatch in dataset:
        n_cells += minibatch.shape[0]
    return {"cells": n_cells, "total": (time.process_time() - started) / n_cells * 1e6}


class InThisThread:
    """The executor that _MinibatchStream._load expects, running each call at once in the calling thread."""

    def submit(self, function, *args):
        future = Future()
        future.set_result(function(*args))
        return future


def cpu_table(stores: dict[str, str], interpreters: dict[str, str], repeats: int) -> None:
    """Table 6; each (code, store) case runs `repeats` times, interleaved, one row per run."""
    table = Table(
        "6. Loader CPU per cell by stage (us; one epoch, batch 128, CSR, 1 reader thread)",
        ["code", "store", "cells", "total", "block reads", "stacking", "gathering"],
    )
    for _, (code, interpreter), (name, path) in itertools.product(range(repeats), interpreters.items(), stores.items()):
        result = in_subprocess("stage_cpu", {"store": path}, interpreter)
        table.row(
            code, name, result["cells"], result["total"], result["block reads"], result["stacking"], result["gathering"]
        )
    if importlib.util.find_spec("scdataset") is None:
        print("scDataset: not installed (pip install scdataset==0.3.0 for its row)")
        return
    for name, path in stores.items():  # once each: far from ours, its spread does not matter here
        result = in_subprocess("scdataset_cpu", {"store": path})
        table.row("scDataset 0.3", name, result["cells"], result["total"], "-", "-", "-")


def in_subprocess(function: str, argument, interpreter: str = sys.executable) -> dict:
    completed = subprocess.run(
        [interpreter, __file__, "--child", function, json.dumps(argument)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark case {argument} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- randomness (no reading: the sampler's plan) ---------------------------------------------------------------


def relative_mixing(store_path: str, block_rows: int, buffer_blocks: int, seed: int = 0) -> float:
    from helpers import label_mixing, planned_minibatch_rows  # tests/helpers.py, on the path below

    from scvi_scale.data import CountStore
    from scvi_scale.sampler import BlockShuffleSampler

    store = CountStore(store_path)
    labels = store.obs_column("batch").cat.codes.to_numpy()
    n_labels = int(labels.max()) + 1
    shuffled = BlockShuffleSampler(
        store, batch_size=TRAIN_BATCH_SIZE, block_rows=block_rows, buffer_blocks=buffer_blocks, seed=seed
    )
    mixing = label_mixing((labels[rows] for rows in planned_minibatch_rows(shuffled)), n_labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    uniform = label_mixing(
        (labels[order[start : start + TRAIN_BATCH_SIZE]] for start in range(0, len(order), TRAIN_BATCH_SIZE)),
        n_labels,
    )
    return mixing / uniform


# --- peer ------------------------------------------------------------------------------------------------------


def annbatch_note() -> str:
    if importlib.util.find_spec("annbatch") is None:
        return (
            f"annbatch: not installed; it does not install here (every release requires Python >= 3.12, this is "
            f"{sys.version_info.major}.{sys.version_info.minor}), so there is no peer row."
        )
    return "annbatch: installed, but this benchmark has no driver for it yet."


# --- tables ----------------------------------------------------------------------------------------------------


class Table:
    """Fixed-width table printed row by row as cases finish (a full run takes minutes)."""

    def __init__(self, title: str, header: list[str]):
        self.widths = [max(len(name), 9) for name in header]
        print(f"\n{title}\n{self._line(header)}\n{'-+-'.join('-' * width for width in self.widths)}", flush=True)

    def _line(self, values) -> str:
        return " | ".join(str(value).rjust(width) for value, width in zip(values, self.widths))

    def row(self, *values) -> None:
        shown = [
            f"{value:,.0f}"
            if isinstance(value, float) and abs(value) >= 100
            else f"{value:.3g}"
            if isinstance(value, float)
            else value
            for value in values
        ]
        print(self._line(shown), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/scvi-scale-bench"))
    parser.add_argument("--sizes", default="200000,1000000", help="comma-separated store sizes in cells")
    parser.add_argument("--seconds", type=float, default=12.0, help="time cap per case")
    parser.add_argument("--cpu-only", action="store_true", help="only table 6, CPU per cell by stage")
    parser.add_argument("--foreign-cells", type=int, default=50_000, help="cells of the anndata-written store")
    parser.add_argument("--extra-stores", default="", help="more stores for table 6: comma-separated name=path")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each case of table 6, interleaved")
    parser.add_argument("--baseline-python", help="another checkout's interpreter, also run for table 6")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        function, argument = args.child
        functions = {
            "run_case": run_case,
            "dask_overhead": dask_overhead,
            "training_step": training_step,
            "stage_cpu": stage_cpu,
            "scdataset_cpu": scdataset_cpu,
        }
        result = functions[function](json.loads(argument))
        print(json.dumps(result))
        return

    args.data_dir.mkdir(parents=True, exist_ok=True)
    sizes = [int(size) for size in args.sizes.split(",")]
    stores = {size: str(ensure_store(args.data_dir, size)) for size in sizes}
    largest = stores[sizes[-1]]
    foreign = ensure_foreign_store(args.data_dir, Path(stores[sizes[0]]), min(args.foreign_cells, sizes[0]))
    extra = dict(item.split("=", 1) for item in args.extra_stores.split(",") if item)
    cpu_stores = {**{f"ours {size}": path for size, path in stores.items()}, **extra, "anndata": str(foreign)}
    interpreters = {"this": sys.executable, **({"baseline": args.baseline_python} if args.baseline_python else {})}
    if args.cpu_only:
        cpu_table(cpu_stores, interpreters, args.repeats)
        print(annbatch_note())
        return

    shuffled_cells_per_s = {}
    table = Table(
        f"1. Orders ({args.seconds:g} s cap per case, 2 reader threads; RSS in MiB)",
        ["cells", "order", "read", "cells/s", "first s", "cells read", "RSS open", "peak RSS"],
    )
    for size in sizes:
        for order in ("sequential", "block-shuffled", "random"):
            for read_with in ("direct", "dask"):
                case = {"store": stores[size], "order": order, "read_with": read_with, "seconds": args.seconds}
                result = in_subprocess("run_case", case)
                if order == "block-shuffled" and read_with == "direct":
                    shuffled_cells_per_s[size] = result["cells_per_s"]
                table.row(
                    size,
                    order,
                    read_with,
                    result["cells_per_s"],
                    result["first_batch_s"],
                    result["cells"],
                    result["rss_open_mib"],
                    result["peak_rss_mib"],
                )

    overhead = in_subprocess("dask_overhead", largest)
    table = Table(
        f"2. Per-block read cost, {overhead['block_rows']}-row blocks of the {sizes[-1]}-cell store, one thread",
        ["path", "ms/block"],
    )
    for name, milliseconds in overhead["ms_per_block"].items():
        table.row(name, milliseconds)

    table = Table(
        f"3. Randomness vs speed, {sizes[-1]}-cell store (mixing relative to a fully random order)",
        ["block", "blocks/buffer", "buffer cells", "mixing", "cells/s", "first s", "peak RSS"],
    )
    for block_rows, buffer_blocks in SWEEP:
        case = {
            "store": largest,
            "order": "block-shuffled",
            "block_rows": block_rows,
            "buffer_blocks": buffer_blocks,
            "seconds": args.seconds,
        }
        result = in_subprocess("run_case", case)
        table.row(
            block_rows,
            buffer_blocks,
            block_rows * buffer_blocks,
            relative_mixing(largest, block_rows, buffer_blocks),
            result["cells_per_s"],
            result["first_batch_s"],
            result["peak_rss_mib"],
        )

    print("\n4. Peer")
    print(annbatch_note())

    table = Table(
        f"5. Training step vs loader, {sizes[-1]}-cell store",
        ["torch threads", "step cells/s", "loader cells/s", "loader / step"],
    )
    for threads in (1, 2):
        step = in_subprocess("training_step", {"store": largest, "threads": threads, "seconds": args.seconds})
        loader = shuffled_cells_per_s[sizes[-1]]
        table.row(threads, step["cells_per_s"], loader, loader / step["cells_per_s"])

    cpu_table(cpu_stores, interpreters, args.repeats)


if __name__ == "__main__":
    main()
