"""What proving a store costs: the checks of every block read, the chunk checksums, and the setup_zarr pass.

    .venv/bin/python benchmarks/integrity.py                      # 200k cells x 2000 genes (~3 min after the stores)
    .venv/bin/python benchmarks/integrity.py --cells 50000 --repeats 1    # quick look

Stores (made once in --data-dir, reused): the synthetic atlas in Zarr format 2 as synthetic_atlas writes it by
default (no checksums), the same counts rewritten by write_store in format 3 (our default: Blosc lz4hc + crc32c on
every chunk), and the format-3 X arrays once more without the crc32c codec, to isolate its cost.

1. Per block read (chunk_rows = 4096 rows, blocks in a seeded random order, every variant reads each block in turn,
   the order rotating from block to block, so the variants see the same load):
     unchecked    zarr slices of indptr, indices, data and the CSR built from them: what read_raw did before
     read_raw     CountStore.read_raw: the same plus the proof (absent chunks are errors, indptr non-decreasing in
                  [0, nnz], column indices in range, rows sorted)
   "overhead" is the median, over block reads, of read_raw's time over unchecked's for the same block read back to
   back, minus 1 (paired, so that a busy machine's swings cancel). The format-3 rows show what the checksum costs
   (zarr verifies it while decoding, in both columns), by the same paired median.
   For scale, the last column times a full count validation of the block (validate.find_bad_count), which reads do
   not do (setup_zarr's pass does it once per store).
2. The setup_zarr pass: Registry.build(store, batch_key="batch") with CountStore's reads as they are, against the
   same call with the store's read_raw replaced by the unchecked read (all else equal): one warm-up each, then
   --repeats pairs, the order alternating; overhead = median of the paired ratios minus 1. On both formats.
Times are CPU seconds of this process (time.process_time, all its threads), which other processes' load
disturbs far less than wall time; --clock wall gives wall time. One decoding thread (blosc and zarr's pool) unless
--threads, so that the A/B comparison holds on a busy machine; absolute times mean something only on a quiet one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numcodecs
import numpy as np
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec

from scvi_scale.data import CountStore, Registry, write_store
from scvi_scale.data.validate import find_bad_count
from scvi_scale.data.writer import COMPRESSION_LEVEL, COMPRESSOR_NAME
from scvi_scale.datasets import synthetic_atlas


def make_stores(data_dir: Path, n_cells: int) -> dict[str, Path]:
    """The three stores of the docstring, written if absent."""
    paths = {
        "format 2 (blosc)": data_dir / f"integrity_{n_cells}_v2.zarr",
        "format 3 (blosc + crc32c)": data_dir / f"integrity_{n_cells}_v3.zarr",
        "format 3 (blosc, no crc32c)": data_dir / f"integrity_{n_cells}_v3_plain.zarr",
    }
    v2, v3, plain = paths.values()
    data_dir.mkdir(parents=True, exist_ok=True)
    if not v2.exists():
        print(f"writing {v2} ...", flush=True)
        synthetic_atlas(v2, n_cells, zarr_format=2)
    if not v3.exists():
        print(f"writing {v3} ...", flush=True)
        write_store(v2, v3)
    if not plain.exists():
        print(f"writing {plain} (X arrays only) ...", flush=True)
        source = zarr.open_group(str(v3), mode="r")["X"]
        target = zarr.open_group(str(plain), mode="w", zarr_format=3).create_group("X")
        target.attrs["shape"] = source.attrs["shape"]
        for name in ("data", "indices", "indptr"):
            array = source[name]
            copy = target.create_array(
                name,
                shape=array.shape,
                chunks=array.chunks,
                dtype=array.dtype,
                compressors=[BloscCodec(cname=COMPRESSOR_NAME, clevel=COMPRESSION_LEVEL, shuffle="shuffle")],
            )
            for start in range(0, array.shape[0], array.chunks[0] * 16):
                copy[start : start + array.chunks[0] * 16] = array[start : start + array.chunks[0] * 16]
    return paths


def unchecked_reader(path: Path):
    """read(start, stop): rows as CSR in the stored dtype from the raw arrays of X, with no checks."""
    group = zarr.open_group(str(path), mode="r")["X"]
    data, indices, indptr = group["data"], group["indices"], group["indptr"]
    n_vars = int(group.attrs["shape"][1])

    def read(start: int, stop: int) -> sp.csr_matrix:
        offsets = np.asarray(indptr[start : stop + 1], dtype=np.int64)
        first, last = int(offsets[0]), int(offsets[-1])
        return sp.csr_matrix((data[first:last], indices[first:last], offsets - first), shape=(stop - start, n_vars))

    return read


def time_block_reads(paths: dict[str, Path], repeats: int, seed: int, clock) -> dict[str, dict[str, list[float]]]:
    """Seconds per block read, per (store, variant), every variant reading each block in turn."""
    readers = {}
    for label, path in paths.items():
        readers[(label, "unchecked")] = unchecked_reader(path)
        if "no crc32c" not in label:
            readers[(label, "read_raw")] = CountStore(path).read_raw
    bounds = CountStore(paths["format 2 (blosc)"]).block_bounds()
    blocks = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    order = np.random.default_rng(seed).permutation(len(blocks) * repeats) % len(blocks)
    seconds: dict = {key: [] for key in readers}
    validation: list[float] = []
    keys = list(readers)
    for turn, block_index in enumerate(order):
        start, stop = blocks[block_index]
        for key in keys[turn % len(keys) :] + keys[: turn % len(keys)]:
            began = clock()
            block = readers[key](start, stop)
            seconds[key].append(clock() - began)
        began = clock()
        find_bad_count(block)
        validation.append(clock() - began)
    table: dict[str, dict[str, list[float]]] = {}
    for (label, variant), values in seconds.items():
        table.setdefault(label, {})[variant] = values
    table["validation"] = {"find_bad_count": validation}
    return table


def time_setup_pass(path: Path, repeats: int, clock) -> tuple[list[float], list[float]]:
    """Seconds of Registry.build with proving reads and with unchecked reads: a warm-up each, then `repeats` pairs."""
    times = {"checked": [], "unchecked": []}
    for repeat in range(repeats + 1):
        for variant in ("checked", "unchecked") if repeat % 2 else ("unchecked", "checked"):
            store = CountStore(path)
            if variant == "unchecked":
                store.read_raw = unchecked_reader(path)  # the pass's only read: everything else stays the same
            began = clock()
            Registry.build(store, batch_key="batch")
            if repeat:  # the first pair warms the page cache and the imports
                times[variant].append(clock() - began)
    return times["checked"], times["unchecked"]


def paired_overhead(slower: list[float], faster: list[float]) -> float:
    return float(np.median(np.asarray(slower) / np.asarray(faster))) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/scvi-scale-bench"))
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the blocks; setup passes per variant")
    parser.add_argument("--threads", type=int, default=1, help="decoding threads (blosc and zarr's pool)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    numcodecs.blosc.set_nthreads(args.threads)
    zarr.config.set({"threading.max_workers": args.threads})
    paths = make_stores(args.data_dir, args.cells)

    reads = time_block_reads(paths, args.repeats, args.seed, clock)
    n_reads = len(reads["validation"]["find_bad_count"])
    validation_ms = 1e3 * float(np.median(reads["validation"]["find_bad_count"]))
    print(
        f"\n1. Per block read: {args.cells:,} cells, 4096-row blocks, {n_reads} reads per variant, "
        f"{args.threads} thread(s); median {args.clock} ms per block"
    )
    header = f"{'store':<28} | {'unchecked':>9} | {'read_raw':>9} | {'overhead':>8} | {'full validation':>15}"
    print(header + "\n" + "-" * len(header))
    for label in paths:
        unchecked = reads[label]["unchecked"]
        row = f"{label:<28} | {1e3 * np.median(unchecked):9.2f} | "
        if "read_raw" in reads[label]:
            checked = reads[label]["read_raw"]
            row += f"{1e3 * np.median(checked):9.2f} | {paired_overhead(checked, unchecked):+8.1%} | "
        else:
            row += f"{'':>9} | {'':>8} | "
        print(row + f"{validation_ms:15.2f}")
    unchecked = {label: reads[label]["unchecked"] for label in paths}
    crc, plain = unchecked["format 3 (blosc + crc32c)"], unchecked["format 3 (blosc, no crc32c)"]
    print(
        f"checksum (crc32c) cost: {paired_overhead(crc, plain):+.1%} of an unchecked format-3 read; format 3 + "
        f"crc32c vs format 2, unchecked: {paired_overhead(crc, unchecked['format 2 (blosc)']):+.1%}"
    )

    print(f"\n2. setup_zarr pass (Registry.build, batch_key='batch'), {args.repeats} pairs; {args.clock} seconds")
    header = f"{'store':<28} | {'unchecked':>9} | {'proving':>9} | {'overhead':>8}"
    print(header + "\n" + "-" * len(header))
    for label in ("format 2 (blosc)", "format 3 (blosc + crc32c)"):
        checked, unchecked = time_setup_pass(paths[label], args.repeats, clock)
        print(
            f"{label:<28} | {np.median(unchecked):9.2f} | {np.median(checked):9.2f} | "
            f"{paired_overhead(checked, unchecked):+8.1%}"
        )


if __name__ == "__main__":
    main()
