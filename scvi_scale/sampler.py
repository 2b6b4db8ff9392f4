"""Minibatch streams over a count store: block-shuffled for training, sequential for inference.

Reading single random rows from a compressed Zarr store is slow (each row decodes a whole chunk), so training does
what annbatch and scDataset do: every epoch it visits contiguous, chunk-aligned row blocks in a random order, fills
a shuffle buffer with `buffer_blocks` of them, shuffles the cells inside the buffer and cuts fixed-size minibatches
(cells left over from one buffer open the next one). Inference (`SequentialSampler`) reads all cells in store order.

Both streams read ahead in background threads and yield one dict of numpy arrays per minibatch of B cells:

    x        (B, G) float32     dense counts
    rows     (B,) int64         store row of each cell
    library  (B,) float32       observed library size: the row sum of x
    x_csr    (indptr (B+1,) int64, indices (nnz,) int64, data (nnz,) float32): the same rows in CSR (return_csr=True;
             with dense=False, x is left out and x_csr is the only form of the counts)
    <key>    obs_arrays[key][rows] for every per-cell array passed in ("batch", "labels", "cat_covs", ...); integer
             codes as int64, whatever their width in obs_arrays

The reader is a `scvi_scale.data.CountStore` or any object with the same `n_obs`, `n_vars`, `chunk_rows`,
`is_sparse`, `read_csr(start, stop)`, `read_dense(start, stop)` and `block_bounds(block_rows)` (where
its blocks start: a collection of stores restarts them at each store), plus `to_dask()` for read_with="dask", and
optionally `is_remote` (its reads wait on a network: more reader threads by default, see Threads).

    >>> train_rows, validation_rows = train_validation_split(store.n_obs, train_size=0.9, seed=0)
    >>> sampler = BlockShuffleSampler(store, train_rows, batch_size=128, obs_arrays={"batch": batch_codes})
    >>> for epoch in range(n_epochs):
    ...     for minibatch in sampler:          # each pass is the next epoch; len(sampler) minibatches
    ...         step(minibatch["x"], minibatch["batch"])
    >>> for minibatch in SequentialSampler(store, batch_size=4096):   # every cell once, in store order
    ...     ...

Reading paths. read_with="direct" (the default) calls the reader's read_csr/read_dense from a pool of threads;
read_with="dask" computes the slice of the reader's dask view (`to_dask()`) for each block, in the same threads with
dask's synchronous scheduler (our threads are the thread pool: dask's threaded scheduler called from several
threads would start a pool per calling thread); it is how any lazy dask array of counts streams in.
benchmarks/loader.py measures both: dask adds a fixed cost to each block, large against a block's read and larger
for small blocks, past the 10% of loader throughput we allow (benchmarks/history/issue-03.md), so direct reading is
the default hot path.

Threads. Zarr's codecs release the GIL while decompressing, so `num_workers` reader threads overlap decoding with
the caller's compute (DEFAULT_NUM_WORKERS of them; REMOTE_NUM_WORKERS for a remote reader, whose threads mostly
wait on requests); at most `prefetch_blocks` block reads are queued or running, and at most `prefetch_batches`
finished minibatches wait in a queue. One producer thread turns blocks into minibatches. Closing the iterator early
(break, an exception, generator close) stops and joins every thread before it returns; a failed block read
surfaces in the consumer as `BlockReadError` naming the row range, with the original error as its cause (a
`StoreError` of the store's own checks, which names the chunk already, passes through as it is).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import queue
import threading
import warnings
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.sparse as sp

from scvi_scale.data.store import StoreError

DEFAULT_TRAIN_BATCH_SIZE = 128  # scvi-tools' default
DEFAULT_INFERENCE_BATCH_SIZE = 4096
# Training defaults chosen from the randomness/speed measurements of benchmarks/loader.py: on a 1M-cell CSR store
# (chunk_rows 4096), 1024-row blocks x 64 per buffer mix batches within minibatches at 0.96 of a fully random order,
# against 0.80 for 4096-row blocks x 16, at the same buffer memory and fewer cells/s (benchmarks/history/issue-03.md).
# CSR data chunks are not row-aligned (our writer cuts about four per chunk_rows block), so a 1024-row block decodes
# little more than it uses; a dense chunk is decoded whole, so dense stores keep their chunk as the block.
DEFAULT_CSR_BLOCK_ROWS = 1024
DEFAULT_BUFFER_CELLS = 65_536  # buffer_blocks defaults to DEFAULT_BUFFER_CELLS // block_rows
DEFAULT_NUM_WORKERS = 2
# Reader threads for a reader whose reads wait on a network (is_remote): each block read spends most of its time
# waiting for its chunk requests (20-50 ms each, two rounds: indices and data), so 8 in flight keep a ~10k cells/s
# training step fed with room to spare (Little's law: blocks in flight = blocks read per second x seconds per block,
# 10 x ~0.1 s), and read a 64-block shuffle buffer in ~8 rounds, not 32.
REMOTE_NUM_WORKERS = 8
DEFAULT_PREFETCH_BATCHES = 8
# A stream over at most KEPT_ROWS cells keeps its decoded blocks (up to KEPT_BYTES) from its second pass on: scvi-tools
# trains such small sets for 400 epochs, and reading a small store's one block was a large share of each epoch
# (benchmarks/history/issue-16.md, small sets).
KEPT_ROWS, KEPT_BYTES = 20_000, 128 << 20
READ_PATHS = ("direct", "dask")
RESERVED_KEYS = frozenset({"x", "x_csr", "rows", "library"})
# A last minibatch smaller than this breaks BatchNorm in training mode (scvi-tools warns below 3 as well).
SMALL_LAST_BATCH = 3
_QUEUE_POLL_SECONDS = 0.05  # how often a producer blocked on a full queue checks whether the consumer left
_END = object()  # the producer's "no more minibatches" marker


class BlockReadError(RuntimeError):
    """Reading a block of rows in a prefetch thread failed; the message names the row range, the cause is chained."""


# --- train/validation split ------------------------------------------------------------------------------------


def train_validation_split(
    n_obs: int, train_size: float = 0.9, validation_size: float | None = None, seed: int = 0, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows 0..n_obs-1 at random into training and validation rows, as scvi-tools' DataSplitter does.

    n_train = ceil(train_size * n_obs); n_validation = n_obs - n_train when validation_size is None, else
    floor(validation_size * n_obs) (rows in neither set are left out, a test set). One seeded permutation of the
    cells decides (the identity with shuffle=False): its first n_validation cells validate, the next n_train
    train. The split depends on nothing but (n_obs, train_size, validation_size, seed, shuffle), so block and
    buffer sizes never change it.

    Returns (train_rows, validation_rows): sorted int64 arrays.
    """
    n_obs = _positive_int(n_obs, "n_obs")
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size={train_size}: must satisfy 0 < train_size <= 1")
    n_train = math.ceil(train_size * n_obs)
    if validation_size is None:
        n_validation = n_obs - n_train
    elif not 0.0 <= validation_size < 1.0:
        raise ValueError(f"validation_size={validation_size}: must satisfy 0 <= validation_size < 1")
    elif train_size + validation_size > 1.0:
        raise ValueError(f"train_size + validation_size = {train_size + validation_size}: must not exceed 1")
    else:
        n_validation = math.floor(validation_size * n_obs)
    # shuffle=False (scvi-tools' shuffle_set_split=False): the first n_validation cells validate, the next train
    permutation = np.random.default_rng(_seed(seed)).permutation(n_obs) if shuffle else np.arange(n_obs)
    validation_rows = np.sort(permutation[:n_validation])
    train_rows = np.sort(permutation[n_validation : n_validation + n_train])
    return train_rows.astype(np.int64, copy=False), validation_rows.astype(np.int64, copy=False)


# --- argument checks -------------------------------------------------------------------------------------------


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")
    return int(value)


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative integer")
    return int(seed)


def _sorted_rows(rows, n_obs: int, name: str, keep_range: bool = False) -> np.ndarray | range:
    """`rows` as a sorted int64 array after checking it is 1-D, integer, non-empty, unique and within [0, n_obs).
    Rows already increasing and int64 are kept as given (read-only), not copied: an atlas' row index is large.
    None means every row; with keep_range, None and consecutive ranges stay ranges (no row array at all)."""
    if rows is None:
        rows = range(n_obs)
    if isinstance(rows, range) and rows.step == 1 and len(rows):
        if rows.start < 0 or rows.stop > n_obs:
            bad = rows.start if rows.start < 0 else rows.stop - 1
            raise ValueError(f"{name} holds row {bad}, outside the store's rows [0, {n_obs})")
        return rows if keep_range else np.arange(rows.start, rows.stop, dtype=np.int64)
    rows = np.asarray(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integer row indices, got shape {rows.shape} {rows.dtype}")
    if rows.size == 0:
        raise ValueError(f"{name} is empty: there are no cells to read")
    if np.all(rows[1:] > rows[:-1]):
        rows = rows.astype(np.int64, copy=False).view()
        rows.flags.writeable = False
    else:
        rows = np.sort(rows).astype(np.int64, copy=False)
        repeated = rows[1:][rows[1:] == rows[:-1]]
        if repeated.size:
            raise ValueError(f"{name} holds row {repeated[0]} more than once ({repeated.size} repeats in all)")
    if rows[0] < 0 or rows[-1] >= n_obs:
        bad = rows[0] if rows[0] < 0 else rows[-1]
        raise ValueError(f"{name} holds row {bad}, outside the store's rows [0, {n_obs})")
    return rows


def _checked_obs_arrays(obs_arrays: Mapping[str, np.ndarray] | None, n_obs: int) -> dict[str, np.ndarray]:
    checked = {}
    for key, values in (obs_arrays or {}).items():
        if key in RESERVED_KEYS:
            raise ValueError(
                f"obs_arrays key {key!r} clashes with a minibatch entry; reserved: {sorted(RESERVED_KEYS)}"
            )
        values = np.asarray(values)
        if values.ndim == 0 or values.shape[0] != n_obs:
            raise ValueError(
                f"obs_arrays[{key!r}] has shape {values.shape}; its first axis must have one entry per store row "
                f"({n_obs})"
            )
        checked[key] = values
    return checked


def _block_runs(rows: np.ndarray, block_bounds: np.ndarray) -> np.ndarray:
    """Where each block's rows begin in `rows` (sorted), for the blocks holding any, then len(rows): rows
    [runs[b], runs[b + 1]) lie in one block, blocks being [block_bounds[k], block_bounds[k + 1]): the reader's own
    bounds, so a collection's blocks restart at each of its stores and never straddle two. No per-row array."""
    edges = np.searchsorted(rows, block_bounds)
    return np.unique(edges)


def _concatenated_ranges(firsts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices firsts[0]..firsts[0]+lengths[0]-1, then firsts[1].., ... as one int64 array, without a Python loop."""
    starts_in_output = np.cumsum(lengths) - lengths
    return np.repeat(firsts - starts_in_output, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


# --- row gathering (scipy's vstack and fancy row indexing cost several times more on these sizes) -------------


def _take_rows(counts, rows: np.ndarray):
    """Rows of a dense array or CSR matrix, selected by an index array; CSR is gathered with numpy."""
    if isinstance(counts, np.ndarray):
        return counts[rows]
    indptr = counts.indptr
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    at = _concatenated_ranges(starts, lengths)
    new_indptr = np.concatenate([[0], np.cumsum(lengths)])
    return sp.csr_matrix((counts.data[at], counts.indices[at], new_indptr), shape=(len(rows), counts.shape[1]))


def stack_rows(parts: list):
    """Dense arrays or CSR matrices (all of one kind, same columns) stacked row-wise into one result allocated
    up front, each part dropped from `parts` once it is copied (the list is consumed): the peak is the result and
    one part, not twice the result (1M cells' posterior samples are ~2 GB)."""
    if len(parts) == 1:
        return parts[0]
    n_rows = sum(part.shape[0] for part in parts)
    if isinstance(parts[0], np.ndarray):
        stacked = np.empty((n_rows, *parts[0].shape[1:]), dtype=parts[0].dtype)
        row = 0
        for k, part in enumerate(parts):
            stacked[row : row + len(part)] = part
            row, parts[k] = row + len(part), None
        return stacked
    nnz, n_columns = sum(part.nnz for part in parts), parts[0].shape[1]
    index_dtype = np.int32 if max(nnz, n_columns) < 2**31 else np.int64
    data = np.empty(nnz, dtype=parts[0].dtype)
    indices = np.empty(nnz, dtype=index_dtype)
    indptr = np.zeros(n_rows + 1, dtype=index_dtype)
    row = entry = 0
    for k, part in enumerate(parts):
        data[entry : entry + part.nnz] = part.data[: part.nnz]
        indices[entry : entry + part.nnz] = part.indices[: part.nnz]
        indptr[row + 1 : row + part.shape[0] + 1] = part.indptr[1:] + entry
        row, entry, parts[k] = row + part.shape[0], entry + part.nnz, None
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_columns))


class _PairedCsr:
    """A shuffle buffer's CSR counts with each stored value beside its column: pairs[k] holds value k's float32
    bits in its low half and its column (int32) in its high half, so a minibatch gathers both with one take.

    indptr: (n_rows + 1,) int64; pairs: (nnz,) uint64; shape: (n_rows, n_columns). Both arrays are views of kept
    storage (see _Storage): valid until the storage is handed to another buffer.
    """

    def __init__(self, indptr: np.ndarray, pairs: np.ndarray, shape: tuple[int, int]):
        self.indptr, self.pairs, self.shape = indptr, pairs, shape


class _Storage:
    """The arrays one shuffle buffer's CSR blocks are paired into, kept and reused buffer after buffer. Why: a
    buffer's arrays are ~100 MB, which the allocator maps fresh (and the kernel zero-fills page by page) on every
    buffer; refilling kept pages costs only the copy. `owner` is the buffer whose counts they hold now."""

    def __init__(self):
        self.owner: _Buffer | None = None
        self._indptr = np.empty(0, dtype=np.int64)
        self._pairs = np.empty(0, dtype=np.uint64)

    def pair(self, blocks: list[sp.csr_matrix]) -> _PairedCsr:
        """The CSR blocks (float32 values, same columns) stacked row-wise as one _PairedCsr; `blocks` is consumed."""
        n_rows, nnz = sum(block.shape[0] for block in blocks), sum(block.nnz for block in blocks)
        n_columns = blocks[0].shape[1]
        if len(self._indptr) < n_rows + 1:
            self._indptr = np.empty(n_rows + 1, dtype=np.int64)
        if len(self._pairs) < nnz:
            self._pairs = np.empty(nnz, dtype=np.uint64)
        indptr, pairs = self._indptr[: n_rows + 1], self._pairs[:nnz]
        halves = pairs.view(np.int32).reshape(nnz, 2)  # little-endian: [:, 0] the low half, [:, 1] the high
        indptr[0] = row = entry = 0
        for k, block in enumerate(blocks):
            halves[entry : entry + block.nnz, 0] = np.asarray(block.data[: block.nnz], np.float32).view(np.int32)
            halves[entry : entry + block.nnz, 1] = block.indices[: block.nnz]
            indptr[row + 1 : row + block.shape[0] + 1] = block.indptr[1:] + entry
            row, entry, blocks[k] = row + block.shape[0], entry + block.nnz, None
        return _PairedCsr(indptr, pairs, (n_rows, n_columns))


def _gather_csr(parts: list[tuple[_Buffer, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The cells of a minibatch's (buffer, start, stop) parts, gathered from the buffers' paired CSR counts into
    new arrays: (indptr (B+1,) int64, indices (nnz,) int64, data (nnz,) float32, library (B,) float32, the row
    sums). One numpy take per part: no Python per row, no scipy matrices."""
    row_starts, row_lengths = [], []
    for buffer, start, stop in parts:
        indptr = buffer.counts.indptr
        positions = np.arange(start, stop) if buffer.positions is None else buffer.positions[start:stop]
        row_starts.append(indptr[positions])
        row_lengths.append(indptr[positions + 1] - row_starts[-1])
    lengths = np.concatenate(row_lengths)
    out_indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_indptr[1:])
    nnz = int(out_indptr[-1])
    pairs = np.empty(nnz, dtype=np.uint64)
    entry = 0
    for (buffer, _, _), starts, part_lengths in zip(parts, row_starts, row_lengths):
        at = _concatenated_ranges(starts, part_lengths)
        np.take(buffer.counts.pairs, at, out=pairs[entry : entry + len(at)])
        entry += len(at)
    halves = pairs.view(np.int32).reshape(nnz, 2)
    data = np.empty(nnz + 1, dtype=np.float32)  # one zero past the end: reduceat below may start a row there
    data[:nnz] = halves[:, 0].view(np.float32)
    data[nnz] = 0
    indices = halves[:, 1].astype(np.int64)
    # Exact in float32: every partial sum of integer counts stays below 2^24 for any real cell.
    library = np.add.reduceat(data, out_indptr[:-1])
    library[lengths == 0] = 0  # reduceat gives an empty row the value at its start
    return out_indptr, indices, data[:nnz], library


# --- shuffle buffers and minibatch cutting ---------------------------------------------------------------------


class _Buffer:
    """The cells of one shuffle buffer: `rows` in the order they are emitted, read as contiguous runs per block.

    reads: one (start, stop, local) per block touched, in store order; the block read covers rows [start, stop)
        and `local` picks the wanted rows among them (None when all are wanted).
    counts: after loading, the wanted rows in store order (CSR or dense); `positions` maps emission order into
        them (None when emission order is store order).
    """

    def __init__(self, rows: np.ndarray, block_bounds: np.ndarray):
        self.rows = rows
        if np.all(rows[1:] > rows[:-1]):
            sorted_rows, self.positions = rows, None
        else:
            order = np.argsort(rows)
            sorted_rows = rows[order]
            self.positions = np.empty_like(order)
            self.positions[order] = np.arange(len(order))
        runs = _block_runs(sorted_rows, block_bounds)
        self.reads = []
        for wanted in np.split(sorted_rows, runs[1:-1]):
            start, stop = int(wanted[0]), int(wanted[-1]) + 1
            self.reads.append((start, stop, None if len(wanted) == stop - start else wanted - start))
        self.counts: Any = None  # _PairedCsr or a dense array, once loaded
        self.released = False  # every cell gathered into a minibatch: its counts' storage may be reused

    def take(self, start: int, stop: int) -> np.ndarray:
        """Dense counts of the cells emitted at positions [start, stop) of this buffer (CSR: see _gather_csr)."""
        return self.counts[start:stop] if self.positions is None else self.counts[self.positions[start:stop]]


def _cut(pieces: Iterable[tuple[_Buffer, int]], batch_sizes: np.ndarray) -> Iterator[list[tuple[_Buffer, int, int]]]:
    """Cut the cells of consecutive pieces into minibatches of the given sizes, carrying leftovers forward.

    pieces: (piece, n_cells) pairs in emission order, holding exactly sum(batch_sizes) cells in all.
    Yields, per minibatch, the list of (piece, start, stop) cell ranges that fill it, in order.
    """
    sizes = iter(batch_sizes.tolist())
    need = next(sizes, None)
    parts, have = [], 0
    for piece, n_cells in pieces:
        offset = 0
        while offset < n_cells and need is not None:
            take = min(need - have, n_cells - offset)
            parts.append((piece, offset, offset + take))
            offset += take
            have += take
            if have == need:
                yield parts
                parts, have, need = [], 0, next(sizes, None)


class _MinibatchStream:
    """What both streams share: argument checks, block reading in threads, minibatch assembly."""

    _keeps_ranges = False  # whether self.rows may be a range (rows=None or consecutive rows) instead of an array

    def __init__(
        self,
        reader,
        rows,
        *,
        batch_size: int,
        block_rows: int | None,
        obs_arrays: Mapping[str, np.ndarray] | None,
        return_csr: bool,
        read_with: str,
        num_workers: int | None,
        prefetch_blocks: int | None,
        prefetch_batches: int,
        minimum_prefetch_blocks: int,
        dense: bool = True,
    ):
        self.reader = reader
        self.n_obs = int(reader.n_obs)
        self.rows = _sorted_rows(rows, self.n_obs, "rows", keep_range=self._keeps_ranges)
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.block_rows = _positive_int(reader.chunk_rows if block_rows is None else block_rows, "block_rows")
        self.block_bounds = reader.block_bounds(self.block_rows)
        self.obs_arrays = _checked_obs_arrays(obs_arrays, self.n_obs)
        self.return_csr = bool(return_csr)
        self.dense = bool(dense)
        if not (self.dense or self.return_csr):
            raise ValueError("dense=False leaves x out: it needs return_csr=True, the counts' only form then")
        if read_with not in READ_PATHS:
            raise ValueError(f"read_with={read_with!r}: expected one of {READ_PATHS}")
        self.read_with = read_with
        self._lazy = reader.to_dask() if read_with == "dask" else None
        if num_workers is None:
            num_workers = REMOTE_NUM_WORKERS if getattr(reader, "is_remote", False) else DEFAULT_NUM_WORKERS
        self.num_workers = _positive_int(num_workers, "num_workers")
        if prefetch_blocks is None:
            prefetch_blocks = max(minimum_prefetch_blocks, 2 * self.num_workers)
        self.prefetch_blocks = _positive_int(prefetch_blocks, "prefetch_blocks")
        self.prefetch_batches = _positive_int(prefetch_batches, "prefetch_batches")
        self._is_sparse = bool(reader.is_sparse)
        self._passes = 0  # iterations started: blocks are kept from the second on (see KEPT_ROWS)
        self._kept: dict | None = {} if len(self.rows) <= KEPT_ROWS else None  # (start, stop, local) -> block
        self._kept_bytes = 0
        self._kept_lock = threading.Lock()
        self._storages: list[_Storage] = []  # kept between passes; a pass takes them all (see _produce)

    # --- worker threads: one block read each

    def _read(self, start: int, stop: int, local: np.ndarray | None):
        """Rows [start, stop) of the store (float32 CSR or dense), narrowed to `local` when given; a kept block is
        copied (the minibatches may share memory with what this returns)."""
        key = (start, stop, None if local is None else local.tobytes())
        if self._kept is not None:
            with self._kept_lock:
                kept = self._kept.get(key)
            if kept is not None:
                return kept.copy()
        block = self._read_from_store(start, stop, local)
        if self._kept is not None and self._passes >= 2:
            size = block.data.nbytes + block.indices.nbytes + block.indptr.nbytes if self._is_sparse else block.nbytes
            with self._kept_lock:
                if self._kept_bytes + size <= KEPT_BYTES:
                    self._kept[key], self._kept_bytes = block, self._kept_bytes + size
                    block = block.copy()
        return block

    def _read_from_store(self, start: int, stop: int, local: np.ndarray | None):
        try:
            if self._lazy is None:
                read = self.reader.read_csr if self._is_sparse else self.reader.read_dense
                block = read(start, stop)
            else:
                block = self._lazy[start:stop].compute(scheduler="sync")
        except StoreError:
            raise  # it names the store, the array, the chunk and its rows already
        except Exception as error:
            raise BlockReadError(
                f"reading rows [{start}, {stop}) of {self.reader!r} failed: {type(error).__name__}: {error}"
            ) from error
        return block if local is None else _take_rows(block, local)

    # --- producer thread: blocks to buffers to minibatches

    def _load(
        self, executor: ThreadPoolExecutor, buffers: Iterator[_Buffer], storages: list[_Storage]
    ) -> Iterator[tuple[_Buffer, int]]:
        """Yield (buffer, n_cells) with buffer.counts loaded, keeping up to prefetch_blocks block reads submitted.
        A CSR buffer of several blocks is stacked into a storage of `storages` that no unreleased buffer holds."""
        reads = ((buffer, read) for buffer in buffers for read in buffer.reads)
        in_flight: deque = deque()

        def submit_more():
            for buffer, (start, stop, local) in itertools.islice(reads, self.prefetch_blocks - len(in_flight)):
                in_flight.append((buffer, executor.submit(self._read, start, stop, local)))

        submit_more()
        blocks = []
        while in_flight:
            buffer, future = in_flight.popleft()
            blocks.append(future.result())
            submit_more()
            if len(blocks) == len(buffer.reads):
                if self._is_sparse:
                    storage = next((kept for kept in storages if kept.owner is None or kept.owner.released), None)
                    if storage is None:
                        storage = _Storage()
                        storages.append(storage)
                    storage.owner = buffer
                    buffer.counts = storage.pair(blocks)
                else:
                    buffer.counts = stack_rows(blocks)
                blocks = []
                yield buffer, len(buffer.rows)

    def _assemble(self, parts: list[tuple[_Buffer, int, int]]) -> dict:
        """One minibatch dict (see the module docstring) from its (buffer, start, stop) cell ranges."""
        rows = np.concatenate([buffer.rows[start:stop] for buffer, start, stop in parts])
        minibatch: dict[str, Any] = {"rows": rows}
        if self._is_sparse:  # gathered into new arrays: nothing handed out shares memory with a buffer
            indptr, indices, data, minibatch["library"] = _gather_csr(parts)
            if self.dense:
                shape = (len(rows), parts[0][0].counts.shape[1])
                minibatch["x"] = sp.csr_matrix((data, indices, indptr), shape=shape).toarray()
            if self.return_csr:
                minibatch["x_csr"] = (indptr, indices, data)
        else:
            x = np.ascontiguousarray(stack_rows([buffer.take(start, stop) for buffer, start, stop in parts]))
            if self.dense:
                minibatch["x"] = x
            if self.return_csr:
                csr = sp.csr_matrix(x)
                minibatch["x_csr"] = (csr.indptr.astype(np.int64), csr.indices.astype(np.int64), csr.data)
            minibatch["library"] = x.sum(axis=1)  # exact in float32 for integer counts (see _gather_csr)
        for buffer, _, stop in parts:
            buffer.released = buffer.released or stop == len(buffer.rows)
        for key, values in self.obs_arrays.items():
            taken = values[rows]  # codes kept narrow per cell (Registry.encode) are int64 in a minibatch
            minibatch[key] = taken.astype(np.int64) if taken.dtype.kind in "iu" else taken
        return minibatch

    def _produce(self, buffer_rows: Iterator[np.ndarray], batch_sizes: np.ndarray, out: queue.Queue, stop):
        """Producer thread body: read, assemble and queue minibatches, then _END; an error is queued instead."""

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=_QUEUE_POLL_SECONDS)
                    return True
                except queue.Full:
                    continue
            return False

        executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="scvi-scale-read")
        # This pass's storages: those of the passes before (all finished: their buffers are gone), or new ones if
        # another pass holds them; handed back at the end.
        storages, self._storages = self._storages, []
        for storage in storages:
            storage.owner = None
        try:
            buffers = (_Buffer(rows, self.block_bounds) for rows in buffer_rows)
            for parts in _cut(self._load(executor, buffers, storages), batch_sizes):
                if not put(self._assemble(parts)):
                    return
            put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            put(error)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            self._storages = storages

    def _stream(self, buffer_rows: Iterator[np.ndarray], batch_sizes: np.ndarray) -> Generator[dict, None, None]:
        """Minibatches of the given sizes over the buffers' cells, prepared by a producer thread."""
        self._passes += 1
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, args=(buffer_rows, batch_sizes, ready, stop), name="scvi-scale-loader", daemon=True
        )
        producer.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            producer.join()


# --- training stream -------------------------------------------------------------------------------------------


class BlockShuffleSampler(_MinibatchStream):
    """Block-shuffled training minibatches over `rows` (default: all cells), sharded across ranks, resumable.

    Each epoch:
    1. The store is cut into blocks of `block_rows` rows (default: the store's chunk_rows for dense stores,
       min(chunk_rows, 1024) for CSR; blocks start at multiples of block_rows, so they align with chunks);
       blocks holding none of `rows` are dropped; the rest are put in a random order drawn from (seed, epoch).
    2. Sharding: that order, read as one sequence of N cells, is cut into `world_size` consecutive pieces of
       N // world_size or N // world_size + 1 cells; rank r takes piece r. Every rank computes the same order, so
       the pieces are disjoint and together hold every cell once; at most world_size - 1 blocks are split
       between two neighbouring ranks (each reads its own part).
    3. A rank fills buffers with `buffer_blocks` consecutive blocks of its piece (default: 65,536 cells' worth),
       shuffles each buffer's cells (seeded by seed, epoch, rank and buffer index) and cuts minibatches of
       `batch_size`; cells left over at the end of a buffer start the next minibatch.
    Balance for DistributedDataParallel: every rank yields the same number K of minibatches, because pieces differ
    by at most one cell. With drop_last=False, K = ceil((N // world_size) / batch_size): every minibatch holds
    batch_size cells except each rank's last, which holds the rest of its piece (batch_size + 1 cells in the rare case
    that N // world_size is a multiple of batch_size and the rank holds one of the N % world_size extra cells); when
    that rest would be 1 or 2 cells, too few for BatchNorm in training (the k * batch_size + 1 cells case), they join
    the last full minibatch instead: K is one less and the last holds up to batch_size + 3. With drop_last=True, K = (N
    // world_size) // batch_size minibatches of exactly batch_size cells; a rank's cells past K * batch_size (the tail
    of its block order) are skipped and never read.

    State: (epoch, minibatches done). Iterating runs the rest of the current epoch and then moves to the next
    epoch (epoch + 1, 0 done); breaking off keeps the position, so the next iteration resumes there. A minibatch
    counts as done once it has been handed out. `state_dict()` / `load_state_dict()` save and restore the state;
    a restored sampler yields exactly the minibatches the original would have yielded, and reads only the blocks
    that still hold cells to emit (the buffers before the resume point are skipped unread).

    len(sampler) is K, the minibatches per epoch. One iteration at a time per sampler.
    """

    def __init__(
        self,
        reader,
        rows=None,
        *,
        batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
        block_rows: int | None = None,
        buffer_blocks: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        obs_arrays: Mapping[str, np.ndarray] | None = None,
        return_csr: bool = False,
        read_with: str = "direct",
        num_workers: int | None = None,
        prefetch_blocks: int | None = None,
        prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
        dense: bool = True,
    ):
        """Arguments beyond those in the class docstring: prefetch_blocks (block reads queued or running; default
        max(buffer_blocks, 2 * num_workers), i.e. the next buffer is read while the current one is consumed),
        prefetch_batches (finished minibatches waiting), num_workers (reader threads; default DEFAULT_NUM_WORKERS,
        REMOTE_NUM_WORKERS for a remote reader), read_with and dense (see the module docstring)."""
        if block_rows is None:
            block_rows = min(reader.chunk_rows, DEFAULT_CSR_BLOCK_ROWS) if reader.is_sparse else reader.chunk_rows
        block_rows = _positive_int(block_rows, "block_rows")
        if buffer_blocks is None:
            buffer_blocks = max(1, DEFAULT_BUFFER_CELLS // block_rows)
        self.buffer_blocks = _positive_int(buffer_blocks, "buffer_blocks")
        super().__init__(
            reader,
            rows,
            batch_size=batch_size,
            block_rows=block_rows,
            obs_arrays=obs_arrays,
            return_csr=return_csr,
            read_with=read_with,
            num_workers=num_workers,
            prefetch_blocks=prefetch_blocks,
            prefetch_batches=prefetch_batches,
            minimum_prefetch_blocks=self.buffer_blocks,
            dense=dense,
        )
        self.seed = _seed(seed)
        self.drop_last = bool(drop_last)
        self.world_size = _positive_int(world_size, "world_size")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank!r}: must be an integer in [0, world_size={self.world_size})")
        self.rank = int(rank)

        # The blocks that hold any of the rows: block_first[b] indexes self.rows, block_cells[b] counts them.
        runs = _block_runs(self.rows, self.block_bounds)  # type: ignore[arg-type]  # an array: no _keeps_ranges
        self._block_first, self._block_cells = runs[:-1], np.diff(runs)

        self._batch_sizes = self._plan_this_rank()
        self.epoch = 0
        self.batches_done = 0

    def _plan_this_rank(self) -> np.ndarray:
        """The sizes of this rank's minibatches in an epoch (int64): the ranks share the rows (their first
        self._rank_start, cells emitted self._n_emit, both set here); drop_last drops the short last minibatch,
        else 1 or 2 leftover cells join the last full one. Warns of an epoch of one minibatch too small for
        BatchNorm."""
        n_cells = len(self.rows)
        per_rank, extra = divmod(n_cells, self.world_size)
        if per_rank == 0:
            raise ValueError(f"{n_cells} rows cannot give each of world_size={self.world_size} ranks a cell")
        self._rank_start = self.rank * per_rank + min(self.rank, extra)
        if self.drop_last:
            n_batches = per_rank // self.batch_size
            if n_batches == 0:
                raise ValueError(
                    f"drop_last=True with batch_size={self.batch_size} leaves no minibatch: each rank holds "
                    f"{per_rank} cells"
                )
            self._n_emit = n_batches * self.batch_size
        else:
            n_batches = math.ceil(per_rank / self.batch_size)
            tail = per_rank % self.batch_size
            if n_batches > 1 and 0 < tail < SMALL_LAST_BATCH:
                n_batches -= 1  # 1 or 2 leftover cells join the last full minibatch (the same on every rank)
            self._n_emit = per_rank + (self.rank < extra)
        batch_sizes = np.full(n_batches, self.batch_size, dtype=np.int64)
        batch_sizes[-1] = self._n_emit - (n_batches - 1) * self.batch_size
        if batch_sizes[-1] < SMALL_LAST_BATCH:
            warnings.warn(
                f"every epoch is one minibatch of {batch_sizes[-1]} cell(s), too few for BatchNorm in "
                "training; train on more cells",
                UserWarning,
                stacklevel=3,
            )
        return batch_sizes

    def __len__(self) -> int:
        return len(self._batch_sizes)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first minibatch at the next iteration."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch={epoch!r}: must be a non-negative integer")
        self.epoch, self.batches_done = int(epoch), 0

    def _settings(self) -> dict:
        """What must match for a saved state to mean the same minibatches."""
        return {
            "seed": self.seed,
            "n_rows": len(self.rows),
            "batch_size": self.batch_size,
            "block_rows": self.block_rows,
            "buffer_blocks": self.buffer_blocks,
            "drop_last": self.drop_last,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict:
        """{"epoch", "batches_done"} plus the settings the order depends on (checked by load_state_dict)."""
        return {"epoch": self.epoch, "batches_done": self.batches_done, **self._settings()}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from `state` (from state_dict()): the next iteration continues that epoch after its done batches."""
        mismatched = {key: (state.get(key), mine) for key, mine in self._settings().items() if state.get(key) != mine}
        if mismatched:
            raise ValueError(
                "the saved sampler state was made with other settings, so it would not resume the same order: "
                + ", ".join(f"{key} saved {saved!r}, here {mine!r}" for key, (saved, mine) in mismatched.items())
            )
        epoch, done = state["epoch"], state["batches_done"]
        if not 0 <= done <= len(self):
            raise ValueError(f"batches_done={done} is outside [0, {len(self)}], the minibatches per epoch")
        self.set_epoch(epoch)
        self.batches_done = int(done)

    def _rank_blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of the epoch, in order: (first, n_cells) per block part, indexing self.rows."""
        order = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(epoch, 0))).permutation(
            len(self._block_cells)
        )
        cells = self._block_cells[order]
        ends = np.cumsum(cells)
        begins = ends - cells
        low, high = self._rank_start, self._rank_start + self._n_emit
        mine = slice(np.searchsorted(ends, low, side="right"), np.searchsorted(begins, high, side="left"))
        part_begins = np.maximum(begins[mine], low)
        part_ends = np.minimum(ends[mine], high)
        return self._block_first[order[mine]] + (part_begins - begins[mine]), part_ends - part_begins

    def _plan(self, epoch: int, batches_done: int) -> tuple[Iterator[np.ndarray], np.ndarray]:
        """(rows of each buffer in emission order, sizes of the minibatches) from minibatch `batches_done` on."""
        firsts, n_cells = self._rank_blocks(epoch)
        buffer_starts = np.arange(0, len(firsts), self.buffer_blocks)
        buffer_ends = np.cumsum(np.add.reduceat(n_cells, buffer_starts))
        skipped = batches_done * self.batch_size  # every minibatch before the last holds batch_size cells
        first_buffer = int(np.searchsorted(buffer_ends, skipped, side="right"))

        def buffer_rows() -> Iterator[np.ndarray]:
            for index in range(first_buffer, len(buffer_starts)):
                blocks = slice(buffer_starts[index], buffer_starts[index] + self.buffer_blocks)
                rows = self.rows[_concatenated_ranges(firsts[blocks], n_cells[blocks])]
                seed = np.random.SeedSequence(self.seed, spawn_key=(epoch, 1, self.rank, index))
                rows = np.random.default_rng(seed).permutation(rows)
                if index == first_buffer:
                    rows = rows[skipped - (buffer_ends[index] - len(rows)) :]
                yield rows

        return buffer_rows(), self._batch_sizes[batches_done:]

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        with contextlib.closing(self._stream(*self._plan(epoch, self.batches_done))) as minibatches:
            for minibatch in minibatches:
                self.batches_done += 1
                yield minibatch
        self.epoch, self.batches_done = epoch + 1, 0


# --- inference stream ------------------------------------------------------------------------------------------


class SequentialSampler(_MinibatchStream):
    """Every cell of `rows` (default: all) once, in store order, in minibatches of batch_size (the last may be
    smaller), read ahead in blocks of `block_rows` rows (default: the store's chunk_rows). Stateless: every
    iteration starts from the first cell. len(sampler) = ceil(len(rows) / batch_size). Consecutive rows (None,
    or a range) are never made an array: a written output of an atlas holds no row index."""

    _keeps_ranges = True

    def __init__(
        self,
        reader,
        rows=None,
        *,
        batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
        block_rows: int | None = None,
        obs_arrays: Mapping[str, np.ndarray] | None = None,
        return_csr: bool = False,
        read_with: str = "direct",
        num_workers: int | None = None,
        prefetch_blocks: int | None = None,
        prefetch_batches: int = 2,
        dense: bool = True,
    ):
        super().__init__(
            reader,
            rows,
            batch_size=batch_size,
            block_rows=block_rows,
            obs_arrays=obs_arrays,
            return_csr=return_csr,
            read_with=read_with,
            num_workers=num_workers,
            prefetch_blocks=prefetch_blocks,
            prefetch_batches=prefetch_batches,
            minimum_prefetch_blocks=1,
            dense=dense,
        )

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        if isinstance(self.rows, range):
            edges = np.unique(np.clip(self.block_bounds, self.rows.start, self.rows.stop))
            buffer_rows: Iterator[np.ndarray] = (
                np.arange(start, stop, dtype=np.int64) for start, stop in zip(edges[:-1], edges[1:])
            )
        else:
            buffer_rows = iter(np.split(self.rows, _block_runs(self.rows, self.block_bounds)[1:-1]))
        batch_sizes = np.full(len(self), self.batch_size, dtype=np.int64)
        batch_sizes[-1] = len(self.rows) - (len(self) - 1) * self.batch_size
        return self._stream(buffer_rows, batch_sizes)
