"""Outputs benchmark: cells/s and peak RSS of each chunked output, in-process and on a 2-worker dask cluster, with
scvi-tools' same calls on the same model as the peer.

    .venv/bin/python benchmarks/outputs.py --peer-python /path/to/peer-venv/bin/python   # 200k and 1M cells
    .venv/bin/python benchmarks/outputs.py --sizes 50000 200000 --outputs latent sample --workers 0

Stores are the loader benchmark's synthetic atlases (benchmarks/loader.py ensure_store: 2000 genes, 16 batches,
8 cell types, CSR), made once in --data-dir and only read here: every output goes to a separate output store in
--work-dir, deleted after each case. The model (scvi-tools' defaults: 128 hidden, 10 latent, ZINB) is trained for
one epoch on a small atlas with the same genes and batches and saved once, also in scvi-tools' format, so the peer
runs the very same weights; throughput does not depend on how well it fits.

Every case runs in its own process, so its peak RSS (ru_maxrss) is its own. With workers, the cluster's processes
are separate: their largest peak is shown beside the coordinator's. Outputs:
    latent     write_latent_representation -> obsm/X_scvi
    normalize  get_normalized_expression(write_to=...) -> dense float32 layer
    sample     posterior_predictive_sample(write_to=...) -> CSR layer
    de         differential_expression(groupby="cell_type"), one-vs-rest over 8 types, vanilla mode, 5000
               samples per group: one pass for the raw statistics, one over the sampled cells
Columns: wall seconds, cells/s (cells of the store over wall seconds; for de only the seconds matter), CPU seconds
of the coordinator and the workers together, cells per CPU second (less sensitive than wall time to other
processes sharing the cores), peak RSS (MiB), and "vs peer": our cells/s over scvi-tools' at its defaults.

The peer (--peer-python, an environment with scvi-tools; keep it out of .venv, see benchmarks/train.py) reads the
store into memory (anndata.read_zarr, timed apart), loads the model with scvi.model.SCVI.load and times the same
call with its default arguments ("scvi-tools": batch_size 128) and with batch_size=1024, our default
("scvi-tools b1024"). It runs at --peer-sizes (default: the smallest size), where it holds the result in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import N_BATCH_LABELS, ensure_store  # noqa: E402  (the loader benchmark's stores)

OUTPUTS = ("latent", "normalize", "sample", "de")
MODEL_TRAIN_CELLS = 4096
PEER_BATCH_SIZE = 1024  # the peer's second run: our default batch size

PEER = r"""
import json, logging, resource, sys, time, warnings, torch, anndata, scvi
warnings.filterwarnings("ignore"); logging.getLogger("scvi").setLevel(logging.ERROR)
store, model_dir, output, batch_size, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
started = time.perf_counter()
adata = anndata.read_zarr(store)
model = scvi.model.SCVI.load(model_dir, adata=adata, accelerator="cpu")
load_seconds = time.perf_counter() - started
options = {} if batch_size == "default" else {"batch_size": int(batch_size)}
calls = {
    "latent": lambda: model.get_latent_representation(**options),
    "normalize": lambda: model.get_normalized_expression(**options),
    "sample": lambda: model.posterior_predictive_sample(**options),
    "de": lambda: model.differential_expression(groupby="cell_type", silent=True, **options),
}
started, cpu_started = time.perf_counter(), time.process_time()
calls[output]()
print(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mib": None, "load_seconds": load_seconds, "version": scvi.__version__}))
"""


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def ensure_model(data_dir: Path) -> Path:
    """A model with the atlases' genes and batches, trained one epoch on a small atlas and saved once, in our
    format (returned) and in scvi-tools' (outputs_model_scvi_tools, for the peer)."""
    from scvi_scale import SCVI
    from scvi_scale.datasets import synthetic_atlas

    model_dir = data_dir / "outputs_model"
    if not ((model_dir / "model.pt").exists() and (data_dir / "outputs_model_scvi_tools" / "model.pt").exists()):
        store = data_dir / "outputs_model_atlas.zarr"
        synthetic_atlas(store, MODEL_TRAIN_CELLS, n_genes=2000, n_batches=N_BATCH_LABELS, seed=0, overwrite=True)
        SCVI.setup_zarr(store, batch_key="batch")
        model = SCVI(store)
        model.train(max_epochs=1, batch_size=128)
        model.save(model_dir, overwrite=True)
        model.save(data_dir / "outputs_model_scvi_tools", format="scvi-tools", overwrite=True)
    return model_dir


# --- one case, in a child process ----------------------------------------------------------------------------------


def run_case(case: dict) -> dict:
    """Run one output on one store, in-process or with a LocalCluster of case["workers"] workers."""
    import torch

    from scvi_scale import SCVI

    torch.set_num_threads(case["threads"])
    # what a written output imports on first use (anndata's writer, dask, zarr) is start-up, not throughput:
    # benchmarks/startup.py times it; imported here so every side's clock starts with it done
    import anndata  # noqa: F401
    import dask.array  # noqa: F401
    import zarr  # noqa: F401

    model = SCVI.load(case["model_dir"], case["store"])
    target = Path(case["work_dir"]) / f"outputs_{case['output']}_{case['workers']}.zarr"
    shutil.rmtree(target, ignore_errors=True)
    options = dict(output_store=str(target), overwrite=True, seed=0)

    def call(client):
        if case["output"] == "latent":
            model.write_latent_representation(**options, client=client)
        elif case["output"] == "normalize":
            model.get_normalized_expression(write_to="scvi_normalized", **options, client=client)
        elif case["output"] == "sample":
            model.posterior_predictive_sample(write_to="scvi_samples", **options, client=client)
        else:
            model.differential_expression(groupby="cell_type", silent=True, write_to="de", **options, client=client)

    worker_peak, worker_cpu = None, 0.0
    if case["workers"]:
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=case["workers"], threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            cpu_before = sum(client.run(time.process_time).values())
            started, cpu_started = time.perf_counter(), time.process_time()
            call(client)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            worker_cpu = sum(client.run(time.process_time).values()) - cpu_before
            worker_peak = max(client.run(peak_rss_mib).values())
    else:
        started, cpu_started = time.perf_counter(), time.process_time()
        call(None)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    shutil.rmtree(target, ignore_errors=True)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu + worker_cpu,
        "peak_rss_mib": peak_rss_mib(),
        "worker_peak_rss_mib": worker_peak,
    }


def in_subprocess(command: list[str]) -> dict:
    """Run `command` in a fresh process and parse the JSON it prints last."""
    env = {**os.environ, "SCVI_SCALE_PROGRESS": "0"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"{command[:2]} {command[-3:]} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- the table -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--outputs", nargs="+", default=list(OUTPUTS), choices=OUTPUTS)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="0: in-process")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each side's process")
    parser.add_argument("--peer-python", help="python of an environment with scvi-tools (omit to skip the peer)")
    parser.add_argument("--peer-sizes", type=int, nargs="+", help="sizes at which the peer runs (default: smallest)")
    parser.add_argument("--data-dir", default="/tmp/scvi-scale-bench")
    parser.add_argument("--work-dir", default="/tmp/scvi-scale-bench-outputs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return 0

    data_dir, work_dir = Path(args.data_dir), Path(args.work_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(data_dir)
    stores = {n_cells: ensure_store(data_dir, n_cells) for n_cells in args.sizes}
    peer_sizes = set(args.peer_sizes or [min(args.sizes)]) if args.peer_python else set()

    header = (
        f"{'output':<10} {'cells':>9} {'runner':<17} {'seconds':>8} {'cells/s':>9} {'CPU s':>8} "
        f"{'cells/CPU-s':>11} {'peak RSS MiB':>13} {'worker peak':>12} {'vs peer':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for output in args.outputs:
        for n_cells, store in stores.items():
            runs = []
            if n_cells in peer_sizes:  # first, so that our rows can show the ratio
                for batch_size in ("default", PEER_BATCH_SIZE) if output != "de" else ("default",):
                    runner = "scvi-tools" if batch_size == "default" else f"scvi-tools b{batch_size}"
                    command = [
                        args.peer_python,
                        "-c",
                        PEER,
                        str(store),
                        str(data_dir / "outputs_model_scvi_tools"),
                        output,
                        str(batch_size),
                        str(args.threads),
                    ]
                    runs.append((runner, command))
            for workers in args.workers:
                case = {
                    "output": output,
                    "store": str(store),
                    "model_dir": str(model_dir),
                    "workers": workers,
                    "work_dir": str(work_dir),
                    "threads": args.threads,
                }
                runs.append(
                    (
                        f"{workers} workers" if workers else "in-process",
                        [sys.executable, __file__, "--child", json.dumps(case)],
                    )
                )
            peer_seconds = None
            for runner, command in runs:
                result = in_subprocess(command)
                if runner == "scvi-tools":
                    peer_seconds = result["seconds"]
                worker_peak = result["worker_peak_rss_mib"]
                ratio = (
                    ""
                    if peer_seconds is None or runner.startswith("scvi-tools")
                    else f"{peer_seconds / result['seconds']:.2f}x"
                )
                print(
                    f"{output:<10} {n_cells:>9} {runner:<17} {result['seconds']:>8.1f} "
                    f"{n_cells / result['seconds']:>9.0f} {result['cpu_seconds']:>8.1f} "
                    f"{n_cells / result['cpu_seconds']:>11.0f} {result['peak_rss_mib']:>13.0f} "
                    f"{'' if worker_peak is None else f'{worker_peak:.0f}':>12} {ratio:>8}",
                    flush=True,
                )
                rows.append({"output": output, "cells": n_cells, "runner": runner, **result})
    print(
        f"\nload average at the end: {' '.join(f'{value:.1f}' for value in os.getloadavg())} "
        f"({os.cpu_count()} cores; other processes share them, so compare cells/CPU-s across runs)"
    )
    versions = {row["version"] for row in rows if "version" in row}
    if versions:
        print(
            f"peer: scvi-tools {', '.join(sorted(versions))}; its seconds exclude reading the store into memory "
            f"(load_seconds in the JSON)"
        )
    print("\n" + json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
