"""An atlas through every stage: a synthetic store of --cells cells (default 10M x 2000 genes, ~235 non-zeros per
cell, so 2.35e9 > 2^31 non-zeros in all and an int64 indptr) and a 100k-cell query, then each stage timed in its
own process.

    .venv/bin/python benchmarks/atlas.py --data-dir /big/disk/atlas          # 10M cells; records in RESULTS.md
    .venv/bin/python benchmarks/atlas.py --cells 200000 --record ''          # a few minutes; prints the table only
    .venv/bin/python benchmarks/atlas.py --cells 10000000 --max-steps 5000   # a timed share of each epoch

Stages, in order, each in a fresh process (so its peak RSS, ru_maxrss, is its own); a failed stage is recorded
with its error and the others still run:
  build        synthetic_atlas(--cells, 20 cell types, 16 batches, median library 3000), only when --data-dir
               does not hold it yet
  build-query  the query: 100k cells of another seed with 18 batches (batch_16 and batch_17 are new), likewise
  setup        SCVI.setup_zarr(batch_key="batch", labels_key="cell_type"): the streaming count check and library
               statistics; the registry is saved for the stages that follow
  train-128    SCVI(...).train(max_epochs=1, batch_size=128): one epoch (90% train, 10% validation), or
               --max-steps steps of it; the model is saved for the outputs
  train-1024   the same at batch 1024 (its model is not kept)
  latent       write_latent_representation() -> obsm/X_scvi
  de           differential_expression(groupby="cell_type"): one-vs-rest over the 20 types -> uns/de_cell_type
  normalize    get_normalized_expression(gene_list=<200 genes, evenly spaced>, write_to="scvi_normalized_200")
  sample       posterior_predictive_sample(indices=<1M cells, evenly spaced>) in memory; when that is every cell
               (--cells <= 1M), write_to="scvi_samples" instead
  query        SCVI.load_query_data(query, model) (the query's count pass) + train(max_epochs=1) on it
Outputs go into the input store (the default of the API, overwrite=True), so a reused store is left as a rerun
leaves it. Columns: cells the stage handled, wall seconds, cells/s, peak RSS (MiB, the stage's process), disk
written (MiB on disk of what the stage created: the store, obsm/layers/uns entries, the model), CPU seconds (user +
system of the stage's process; less sensitive than wall time to other jobs on the machine).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

N_GENES = 2000
N_CELL_TYPES = 20
N_BATCHES = 16
LIBRARY_MEDIAN = 3000.0  # ~235 non-zeros per cell at 2000 genes (~200 at synthetic_atlas' default 2000)
QUERY_CELLS = 100_000
QUERY_BATCHES = 18  # two batches more than the reference: batch_16, batch_17 are new to it
QUERY_SEED = 1
SAMPLE_CELLS = 1_000_000
GENE_LIST_SIZE = 200
STAGES = ("build", "build-query", "setup", "train-128", "train-1024", "latent", "de", "normalize", "sample", "query")


class Paths:
    """Where one configuration's stores, registry and model live under --data-dir."""

    def __init__(self, args):
        root = Path(args.data_dir)
        shape = f"x{N_GENES}_t{N_CELL_TYPES}_l{LIBRARY_MEDIAN:.0f}"
        self.atlas = root / f"atlas_{args.cells}{shape}_b{N_BATCHES}_s{args.seed}.zarr"
        self.query = root / f"query_{QUERY_CELLS}{shape}_b{QUERY_BATCHES}_s{QUERY_SEED}.zarr"
        self.registry = root / f"registry_{self.atlas.stem}.json"
        self.model = root / f"model_{self.atlas.stem}"


def disk_mib(*paths: Path) -> float:
    """Bytes on disk (allocated blocks, as du counts) under the paths that exist, in MiB."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_blocks * 512
        elif path.is_dir():
            total += sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())
    return total / 2**20


# --- one stage, in a child process -----------------------------------------------------------------------------


def run_stage(stage: str, args) -> dict:
    """Run `stage` here and return {"cells", "seconds", "note", "outputs"} (outputs: paths whose size it wrote)."""
    import numpy as np
    import torch

    from scvi_scale import SCVI
    from scvi_scale.data import Registry
    from scvi_scale.datasets import synthetic_atlas

    torch.set_num_threads(args.threads)
    paths = Paths(args)
    note, outputs, seconds = "", [], None
    started = time.perf_counter()
    if stage == "build":
        synthetic_atlas(
            paths.atlas,
            args.cells,
            n_genes=N_GENES,
            n_batches=N_BATCHES,
            n_cell_types=N_CELL_TYPES,
            seed=args.seed,
            library_median=LIBRARY_MEDIAN,
        )
        cells, outputs = args.cells, [paths.atlas]
    elif stage == "build-query":
        synthetic_atlas(
            paths.query,
            QUERY_CELLS,
            n_genes=N_GENES,
            n_batches=QUERY_BATCHES,
            n_cell_types=N_CELL_TYPES,
            seed=QUERY_SEED,
            library_median=LIBRARY_MEDIAN,
        )
        cells, outputs = QUERY_CELLS, [paths.query]
    elif stage == "setup":
        registry = SCVI.setup_zarr(paths.atlas, batch_key="batch", labels_key="cell_type")
        paths.registry.write_text(json.dumps(registry.to_dict()))
        cells = args.cells
    elif stage.startswith("train-"):
        batch_size = int(stage.split("-")[1])
        model = SCVI(paths.atlas, registry=Registry.from_dict(json.loads(paths.registry.read_text())))
        model.train(max_epochs=1, batch_size=batch_size, max_steps=args.max_steps)
        seconds = time.perf_counter() - started
        steps = -(-len(model.train_indices) // batch_size)
        if args.max_steps is not None and args.max_steps < steps:
            cells = args.max_steps * batch_size
            note = f"{args.max_steps} of the epoch's {steps} steps (training only)"
        else:
            cells = args.cells
            note = f"1 epoch: {len(model.train_indices):,} cells trained, {len(model.validation_indices):,} validated"
        if batch_size == 128:
            model.save(paths.model, overwrite=True)  # for the output stages; not timed
            outputs = [paths.model]
    elif stage == "query":
        model = SCVI.load_query_data(paths.query, paths.model)
        model.train(max_epochs=1, plan_kwargs={"weight_decay": 0.0})
        cells, note = QUERY_CELLS, "load_query_data (a count pass over the query) + 1 epoch"
    else:
        model = SCVI.load(paths.model, paths.atlas)
        n_obs = model.store.n_obs
        cells = n_obs
        if stage == "latent":
            model.write_latent_representation(overwrite=True)
            outputs = [paths.atlas / "obsm" / "X_scvi"]
        elif stage == "de":
            table = model.differential_expression(
                groupby="cell_type", silent=True, write_to="de_cell_type", overwrite=True
            )
            outputs, note = [paths.atlas / "uns" / "de_cell_type"], f"one-vs-rest, {len(table) // N_GENES} groups"
        elif stage == "normalize":
            genes = list(model.var_names[:: N_GENES // GENE_LIST_SIZE][:GENE_LIST_SIZE])
            model.get_normalized_expression(gene_list=genes, write_to="scvi_normalized_200", overwrite=True)
            outputs, note = [paths.atlas / "obsm" / "scvi_normalized_200"], f"gene_list of {len(genes)} genes (obsm)"
        elif stage == "sample":
            cells = min(SAMPLE_CELLS, n_obs)
            if cells == n_obs:
                model.posterior_predictive_sample(write_to="scvi_samples", overwrite=True)
                outputs, note = [paths.atlas / "layers" / "scvi_samples"], "every cell, written (CSR layer)"
            else:
                rows = np.arange(cells, dtype=np.int64) * n_obs // cells
                samples = model.posterior_predictive_sample(indices=rows)
                note = f"indices: every {n_obs // cells}th cell, in memory ({samples.nnz:,} non-zeros)"
        else:
            raise ValueError(f"unknown stage {stage!r}")
    if seconds is None:
        seconds = time.perf_counter() - started
    return {"cells": cells, "seconds": seconds, "note": note, "outputs": [str(p) for p in outputs]}


def child_main(args) -> None:
    """Run one stage and print its measurements as JSON, the last line of stdout (also when it fails)."""
    try:
        result = run_stage(args.stage, args)
    except Exception as error:  # noqa: BLE001 - recorded in the table; the other stages still run
        traceback.print_exc()
        message = str(error).splitlines()[0] if str(error) else ""
        result = {"cells": None, "seconds": None, "outputs": [], "note": f"failed: {type(error).__name__}: {message}"}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # worker processes, if a stage starts any
    result["peak_rss_mib"] = max(usage.ru_maxrss, children.ru_maxrss) / 1024  # KiB on Linux
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime
    result["disk_mib"] = disk_mib(*map(Path, result["outputs"]))
    print(json.dumps(result))


# --- the runner ------------------------------------------------------------------------------------------------


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    memory_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return (
        f"{platform.node()}: {model}, {os.cpu_count()} cores, {memory_kib / 2**20:.0f} GiB RAM, Python "
        f"{platform.python_version()}, torch {importlib.metadata.version('torch')}"
    )


def store_summary(path: Path) -> str:
    import zarr

    indptr = zarr.open_group(str(path), mode="r")["X/indptr"]
    n_cells = indptr.shape[0] - 1
    nnz = int(indptr[n_cells])
    return (
        f"{n_cells:,} cells x {N_GENES} genes, {nnz:,} non-zeros ({nnz / n_cells:.0f} per cell; indptr "
        f"{indptr.dtype}), {disk_mib(path):,.0f} MiB on disk"
    )


def format_table(rows: list[dict]) -> list[str]:
    lines = [
        "| stage | cells | seconds | cells/s | peak RSS MiB | disk written MiB | CPU s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        done = row["seconds"] is not None
        lines.append(
            f"| {row['stage']} | {row['cells']:,} | {row['seconds']:.1f} | {row['cells'] / row['seconds']:,.0f} | "
            if done
            else f"| {row['stage']} | - | - | - | "
        )
        lines[-1] += f"{row['peak_rss_mib']:,.0f} | {row['disk_mib']:,.1f} | {row['cpu_seconds']:.1f} | {row['note']} |"
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="atlas_benchmark", help="stores, registry and model (kept, reused)")
    parser.add_argument("--max-steps", type=int, help="train a timed share of each epoch instead of all of it")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per stage")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=list(STAGES),
        help="a subset to run (build stages run only when their store is missing)",
    )
    parser.add_argument(
        "--record",
        default=str(Path(__file__).with_name("RESULTS.md")),
        help="markdown file the table is appended to ('' prints it only)",
    )
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage, print JSON
    args = parser.parse_args()
    if args.stage:
        child_main(args)
        return

    paths = Paths(args)
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    stages = [
        stage
        for stage in args.stages
        if not (stage == "build" and paths.atlas.exists()) and not (stage == "build-query" and paths.query.exists())
    ]
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for stage in stages:
        command = [
            sys.executable,
            __file__,
            "--stage",
            stage,
            "--cells",
            str(args.cells),
            "--seed",
            str(args.seed),
            "--data-dir",
            args.data_dir,
            "--threads",
            str(args.threads),
        ]
        if args.max_steps is not None:
            command += ["--max-steps", str(args.max_steps)]
        environment = {**os.environ, "SCVI_SCALE_PROGRESS": "0"}
        completed = subprocess.run(command, capture_output=True, text=True, env=environment)
        try:
            row = json.loads(completed.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):  # killed (e.g. out of memory) before it could report
            row = {
                "cells": None,
                "seconds": None,
                "peak_rss_mib": float("nan"),
                "disk_mib": 0.0,
                "cpu_seconds": float("nan"),
                "note": f"process ended with code {completed.returncode}",
            }
        if completed.returncode or row["seconds"] is None:
            print(completed.stderr[-3000:], file=sys.stderr)
        rows.append({"stage": stage, **row})
        shown = "failed" if row["seconds"] is None else f"{row['seconds']:.1f} s"
        print(
            f"  {stage:<12} {shown:>10}, peak RSS {row['peak_rss_mib']:,.0f} MiB  {row['note']}",
            file=sys.stderr,
            flush=True,
        )

    invocation = " ".join(shlex.quote(part) for part in [Path(sys.executable).name, *sys.argv])
    load_after = os.getloadavg()
    lines = [
        f"## Atlas run: {args.cells:,} cells (issue 15)",
        "",
        f"`{invocation}` — {machine()}; {started:%Y-%m-%d %H:%M} UTC; load average {load_before[0]:.1f} at the start, "
        f"{load_after[0]:.1f} at the end; {args.threads} torch threads per stage.",
        f"Atlas: {store_summary(paths.atlas) if paths.atlas.exists() else 'not built'}. "
        f"Query: {store_summary(paths.query) if paths.query.exists() else 'not built'}.",
        "",
        *format_table(rows),
        "",
    ]
    print("\n".join(lines))
    if args.record:
        with open(args.record, "a") as record:
            record.write("\n" + "\n".join(lines))
        print(f"appended to {args.record}", file=sys.stderr)
    free = shutil.disk_usage(args.data_dir).free / 2**30
    print(
        f"{args.data_dir}: {disk_mib(Path(args.data_dir)) / 1024:.1f} GiB kept (reused by the next run), "
        f"{free:.0f} GiB free",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
