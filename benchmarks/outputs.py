"""Outputs benchmark: cells/s and peak RSS of each chunked output, in-process and on a 2-worker dask cluster.

    .venv/bin/python benchmarks/outputs.py                        # 200k and 1M cells x 2000 genes
    .venv/bin/python benchmarks/outputs.py --sizes 50000 200000 --outputs latent sample

Stores are the loader benchmark's synthetic atlases (benchmarks/loader.py ensure_store: 16 batches, 8 cell types,
CSR), made once in --data-dir and only read here: every output goes to a separate output store in --work-dir,
deleted after each case. The model (scvi-tools' defaults: 128 hidden, 10 latent, ZINB) is trained for one epoch on
a small atlas with the same genes and batches and saved once; throughput does not depend on how well it fits.

Every case runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. With workers, the cluster's
processes are separate: their largest peak is shown beside the coordinator's. Outputs:
    latent     write_latent_representation -> obsm/X_scvi
    normalize  get_normalized_expression(write_to=...) -> dense float32 layer
    sample     posterior_predictive_sample(write_to=...) -> CSR layer
    de         differential_expression(groupby="cell_type"), one-vs-rest over 8 types, vanilla mode, 5000
               samples per group: one pass for the raw statistics, one over the sampled cells
Columns: wall seconds, cells/s (cells of the store over wall seconds; for de only the seconds matter), CPU seconds
of the coordinator and the workers together, cells per CPU second (less sensitive than wall time to other
processes sharing the cores; on an idle machine, cells/s approaches it times the cores in use), peak RSS (MiB).

The peer, scvi-tools' same calls on the store read into memory, runs only when scvi-tools is importable here; it is
not installed in this project's environment (issue 6 lists its numbers measured on this machine).
"""

from __future__ import annotations

import argparse
import importlib.util
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
SCVI_TOOLS_ISSUE_NUMBERS = (
    "scvi-tools 1.5.1 on this machine, 100k cells x 2000 genes (issue 6): get_latent_representation 47k cells/s, "
    "get_normalized_expression 11k cells/s (peak RSS 3.1 GB, result held in memory), differential_expression "
    "one-vs-rest 7.5 s (peak RSS 3.1 GB), posterior_predictive_sample 2.2k cells/s"
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def ensure_model(data_dir: Path) -> Path:
    """A model with the atlases' genes and batches, trained one epoch on a small atlas and saved once."""
    from scvi_scale import SCVI
    from scvi_scale.datasets import synthetic_atlas

    model_dir = data_dir / "outputs_model"
    if not (model_dir / "model.pt").exists():
        store = data_dir / "outputs_model_atlas.zarr"
        synthetic_atlas(store, MODEL_TRAIN_CELLS, n_genes=2000, n_batches=N_BATCH_LABELS, seed=0, overwrite=True)
        SCVI.setup_zarr(store, batch_key="batch")
        model = SCVI(store)
        model.train(max_epochs=1, batch_size=128)
        model.save(model_dir, overwrite=True)
    return model_dir


# --- one case, in a child process ----------------------------------------------------------------------------------


def run_case(case: dict) -> dict:
    """Run one output on one store, in-process or with a LocalCluster of case["workers"] workers."""
    import torch

    from scvi_scale import SCVI

    torch.set_num_threads(2)
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

        with LocalCluster(n_workers=case["workers"], threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
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
    return {"seconds": seconds, "cpu_seconds": cpu + worker_cpu, "peak_rss_mib": peak_rss_mib(),
            "worker_peak_rss_mib": worker_peak}


def run_peer(case: dict) -> dict:
    """scvi-tools' same calls on the store read into memory (only when scvi-tools is importable)."""
    import anndata
    import scvi

    adata = anndata.read_zarr(case["store"])
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata)
    model.train(max_epochs=1, train_size=min(1.0, MODEL_TRAIN_CELLS / adata.n_obs), batch_size=128)
    started, cpu_started = time.perf_counter(), time.process_time()
    if case["output"] == "latent":
        model.get_latent_representation(batch_size=1024)
    elif case["output"] == "normalize":
        model.get_normalized_expression(batch_size=1024)
    elif case["output"] == "sample":
        model.posterior_predictive_sample(batch_size=1024)
    else:
        model.differential_expression(groupby="cell_type", silent=True)
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
            "peak_rss_mib": peak_rss_mib(), "worker_peak_rss_mib": None}


def in_subprocess(function: str, case: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--child", function, json.dumps(case)], capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{function}({case}) failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- the table -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--outputs", nargs="+", default=list(OUTPUTS), choices=OUTPUTS)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="0: in-process")
    parser.add_argument("--data-dir", default="/tmp/scvi-scale-bench")
    parser.add_argument("--work-dir", default="/tmp/scvi-scale-bench-outputs")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        function, case = args.child
        print(json.dumps({"run_case": run_case, "run_peer": run_peer}[function](json.loads(case))))
        return 0

    data_dir, work_dir = Path(args.data_dir), Path(args.work_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(data_dir)
    stores = {n_cells: ensure_store(data_dir, n_cells) for n_cells in args.sizes}
    peer = importlib.util.find_spec("scvi") is not None

    header = (f"{'output':<10} {'cells':>9} {'runner':<12} {'seconds':>8} {'cells/s':>9} {'CPU s':>8} "
              f"{'cells/CPU-s':>11} {'peak RSS MiB':>13} {'worker peak':>12}")
    print(header)
    print("-" * len(header))
    rows = []
    for output in args.outputs:
        for n_cells, store in stores.items():
            runs = [(f"{n} workers" if n else "in-process", "run_case", n) for n in args.workers]
            if peer:
                runs.append(("scvi-tools", "run_peer", 0))
            for runner, function, workers in runs:
                case = {"output": output, "store": str(store), "model_dir": str(model_dir), "workers": workers,
                        "work_dir": str(work_dir)}
                result = in_subprocess(function, case)
                worker_peak = result["worker_peak_rss_mib"]
                print(
                    f"{output:<10} {n_cells:>9} {runner:<12} {result['seconds']:>8.1f} "
                    f"{n_cells / result['seconds']:>9.0f} {result['cpu_seconds']:>8.1f} "
                    f"{n_cells / result['cpu_seconds']:>11.0f} {result['peak_rss_mib']:>13.0f} "
                    f"{'' if worker_peak is None else f'{worker_peak:.0f}':>12}",
                    flush=True,
                )
                rows.append({"output": output, "cells": n_cells, "runner": runner, **result})
    print(f"\nload average at the end: {' '.join(f'{value:.1f}' for value in os.getloadavg())} "
          f"({os.cpu_count()} cores; other processes share them, so compare cells/CPU-s across runs)")
    if not peer:
        print(f"\nscvi-tools is not installed in this environment, so no peer run; for reference, "
              f"{SCVI_TOOLS_ISSUE_NUMBERS}.")
    print("\n" + json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
