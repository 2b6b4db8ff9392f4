"""Time and peak memory of writing count stores, at two atlas sizes: memory must not grow with n_cells.

    .venv/bin/python benchmarks/convert.py                           # 200k and 1M cells x 2000 genes (~5 min, 2 cores)
    .venv/bin/python benchmarks/convert.py --sizes 20000 100000      # quick look

For each size, three steps each run in a fresh subprocess (so each peak RSS is that step's own):
  generate   synthetic_atlas(n_cells) straight to Zarr                               <- measured
  make-h5ad  the atlas copied into an .h5ad, block by block through h5py (set-up for the next step)
  convert    write_store(.h5ad -> Zarr), streamed in row blocks through h5py          <- measured
Peak RSS comes from getrusage (ru_maxrss) at the end of the step; "above start" subtracts the RSS after imports.
Sizes on disk are what `du` would count; "raw" is the uncompressed CSR (data float32 + indices int32 + indptr int64).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ("generate", "make-h5ad", "convert")


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def disk_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def run_step(step: str, n_cells: int, n_genes: int, chunk_rows: int, workdir: Path) -> dict:
    """Run one step in this process (called inside the subprocess) and return its measurements."""
    import anndata
    import h5py
    import zarr

    from scvi_scale.data import CountStore, write_store
    from scvi_scale.datasets import synthetic_atlas

    atlas, h5ad, converted = (
        workdir / f"atlas_{n_cells}.zarr",
        workdir / f"atlas_{n_cells}.h5ad",
        workdir / f"converted_{n_cells}.zarr",
    )
    start_rss = current_rss_mb()
    started = time.perf_counter()
    if step == "generate":
        store = synthetic_atlas(atlas, n_cells, n_genes=n_genes, chunk_rows=chunk_rows, overwrite=True)
        output = atlas
    elif step == "make-h5ad":
        store = CountStore(atlas)
        group = zarr.open_group(str(atlas), mode="r")
        with h5py.File(h5ad, "w") as file:
            file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            for key in ("obs", "var", "uns"):  # small: copied whole; X goes block by block
                anndata.io.write_elem(file, key, anndata.io.read_elem(group[key]))
            bounds = store.block_bounds()
            anndata.io.write_elem(file, "X", store.read_csr(0, int(bounds[1])))
            matrix = anndata.io.sparse_dataset(file["X"])
            for block_start, block_stop in zip(bounds[1:-1].tolist(), bounds[2:].tolist()):
                matrix.append(store.read_csr(block_start, block_stop))
        output = h5ad
    elif step == "convert":
        store = write_store(h5ad, converted, chunk_rows=chunk_rows, overwrite=True)
        output = converted
    else:
        raise ValueError(step)
    seconds = time.perf_counter() - started
    nnz = int(zarr.open_group(str(atlas), mode="r")["X/indptr"][n_cells])
    return {
        "step": step,
        "n_cells": n_cells,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "above_start_mb": peak_rss_mb() - start_rss,
        "disk_mb": disk_mb(output),
        "raw_mb": (nnz * 8 + (n_cells + 1) * 8) / 2**20,
        "nnz": nnz,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, help="where stores go (default: a temporary folder, removed after)")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # internal: run one step, print JSON
    parser.add_argument("--n-cells", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.step:
        print(json.dumps(run_step(args.step, args.n_cells, args.genes, args.chunk_rows, args.workdir)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scvi-scale-convert-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n_cells in args.sizes:
            for step in STEPS:
                command = [
                    sys.executable,
                    __file__,
                    "--step",
                    step,
                    "--n-cells",
                    str(n_cells),
                    "--genes",
                    str(args.genes),
                    "--chunk-rows",
                    str(args.chunk_rows),
                    "--workdir",
                    str(workdir),
                ]
                result = subprocess.run(command, check=True, capture_output=True, text=True)
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                row = rows[-1]
                print(
                    f"  {step:<9} {n_cells:>9,} cells: {row['seconds']:6.1f} s, peak RSS {row['peak_rss_mb']:6.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\nn_genes={args.genes}, chunk_rows={args.chunk_rows}; "
        "Zarr: CSR, Blosc lz4hc-3, data/indices chunks = 1/4 block"
    )
    header = (
        f"{'step':<10}{'cells':>11}{'nnz':>13}{'time s':>9}{'s / 1M':>9}{'peak RSS MB':>13}"
        f"{'above start MB':>16}{'disk MB':>9}{'raw MB':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['step']:<10}{row['n_cells']:>11,}{row['nnz']:>13,}{row['seconds']:>9.1f}"
            f"{row['seconds'] / row['n_cells'] * 1e6:>9.1f}{row['peak_rss_mb']:>13.0f}{row['above_start_mb']:>16.0f}"
            f"{row['disk_mb']:>9.0f}{row['raw_mb']:>9.0f}"
        )


if __name__ == "__main__":
    main()
