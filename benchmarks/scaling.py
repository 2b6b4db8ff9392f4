"""Scaling benchmark: training cells/s with 1 and 2 data-parallel processes (torch.distributed, gloo, one torch
thread each) and inference cells/s in-process and on 1 and 2 dask workers (one thread each), on a synthetic store.

    .venv/bin/python benchmarks/scaling.py                         # 20k cells x 2000 genes, 3 epochs
    .venv/bin/python benchmarks/scaling.py --cells 100000 --epochs 2

Training: every case is `distributed.launch(..., nproc, threads=1)`, so both run in fresh processes with the same
settings; batch 128 per process (2 processes: 256 cells per optimizer step), no validation. cells/s = store cells
over the mean wall time of the epochs after the first (the first pays for start-up and the first reads).
Inference: the model saved by the 1-process run; each output is written twice into a separate output store and
the second run is timed (the workers have loaded the model by then). "in-process" is the same call without a
client, one torch thread.

Expected limit: this machine has 2 cores, so 2 processes can at best double throughput; the sampler's reader
threads, zarr decompression and (for training) gloo's all-reduce of the gradients every step share those two
cores, and other jobs on a shared machine take their part, so expect well under 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from scvi_scale import SCVI, distributed
from scvi_scale.datasets import synthetic_atlas

BATCH_SIZE = 128
OUTPUTS = ("latent", "normalize")


def ensure_store(data_dir: Path, n_cells: int, n_genes: int) -> Path:
    store = data_dir / f"scaling_{n_cells}x{n_genes}.zarr"
    if not store.exists():
        synthetic_atlas(store, n_cells, n_genes=n_genes, n_batches=4, seed=0)
    return store


def _train_rank(store: str, epochs: int, result: str, model_dir: str) -> None:
    """One rank of a training case: rank 0 writes the epoch times to `result` and saves the model."""
    SCVI.setup_zarr(store, batch_key="batch")
    model = SCVI(store)
    model.train(max_epochs=epochs, batch_size=BATCH_SIZE, train_size=1.0, seed=0)
    seconds = [value for _, value in model.history_["epoch_seconds"]]
    distributed.on_rank_zero(lambda: model.save(model_dir, overwrite=True))
    distributed.on_rank_zero(lambda: Path(result).write_text(json.dumps(seconds)))


def train_case(store: Path, nproc: int, epochs: int, work_dir: Path) -> dict:
    result = work_dir / f"train_{nproc}.json"
    distributed.launch(_train_rank, nproc, str(store), epochs, str(result), str(work_dir / f"model_{nproc}"), threads=1)
    seconds = json.loads(result.read_text())
    steady = seconds[1:] or seconds
    return {"epoch_seconds": sum(steady) / len(steady), "first_epoch_seconds": seconds[0]}


def inference_case(model: SCVI, output: str, workers: int, work_dir: Path, model_dir: Path) -> float:
    """Seconds of the second of two identical writes of `output` (0 workers: in-process)."""
    target = work_dir / f"outputs_{output}_{workers}.zarr"
    options = dict(output_store=str(target), overwrite=True, seed=0, model_dir=model_dir)

    def write(client) -> float:
        started = time.perf_counter()
        if output == "latent":
            model.write_latent_representation(**options, client=client)
        else:
            model.get_normalized_expression(write_to="scvi_normalized", **options, client=client)
        return time.perf_counter() - started

    if workers == 0:
        write(None)
        seconds = write(None)
    else:
        from distributed import Client, LocalCluster

        with (
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            write(client)
            seconds = write(client)
    shutil.rmtree(target, ignore_errors=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", default="/tmp/scvi-scale-bench")
    args = parser.parse_args(argv)
    os.environ.setdefault("SCVI_SCALE_PROGRESS", "0")
    torch.set_num_threads(1)
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    store = ensure_store(data_dir, args.cells, args.genes)
    rows = []
    with tempfile.TemporaryDirectory(dir=data_dir) as work:
        work_dir = Path(work)
        print(f"{args.cells} cells x {args.genes} genes, {os.cpu_count()} cores, one torch thread per process\n")
        header = f"{'case':<34}{'seconds':>10}{'cells/s':>12}{'speed-up':>10}"
        print(header + "\n" + "-" * len(header))
        base = None
        for nproc in (1, 2):
            case = train_case(store, nproc, args.epochs, work_dir)
            rate = args.cells / case["epoch_seconds"]
            base = base or rate
            rows.append({"case": f"train, {nproc} process(es)", **case, "cells_per_second": rate})
            print(
                f"{f'train, {nproc} process(es), per epoch':<34}{case['epoch_seconds']:>10.2f}{rate:>12.0f}"
                f"{rate / base:>9.2f}x",
                flush=True,
            )
        SCVI.setup_zarr(store, batch_key="batch")
        model_dir = work_dir / "model_1"
        model = SCVI.load(model_dir, store)
        for output in OUTPUTS:
            base = None
            for workers in (0, 1, 2):
                seconds = inference_case(model, output, workers, work_dir, model_dir)
                rate = args.cells / seconds
                base = base or rate
                name = f"{output}, " + (f"{workers} dask worker(s)" if workers else "in-process")
                rows.append({"case": name, "seconds": seconds, "cells_per_second": rate})
                print(f"{name:<34}{seconds:>10.2f}{rate:>12.0f}{rate / base:>9.2f}x", flush=True)
    print("\n" + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
