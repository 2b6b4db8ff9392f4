"""Chunked, resumable outputs in AnnData-Zarr stores: obsm/<key>, layers/<key> (dense or CSR) and uns/<key>; obs
columns (write_obs_column) and result tables (write_table).

    >>> target = output_store("atlas.zarr")                     # or output_store("atlas.zarr", "outputs.zarr")
    >>> out = DenseOutput(target, "layers", "scvi_normalized", n_rows, n_cols, chunk_rows=4096, settings={...})
    >>> for chunk in out.prepare():                             # the chunks still to write (all, or the rest)
    ...     out.write_chunk(chunk, values_of(chunk))            # rows out.bounds(chunk), any order, any process
    >>> out.finish()                                            # marks it complete
    >>> read_output(target, "layers/scvi_normalized")          # lazy dask array; refused while incomplete

Where outputs go. Into the input store (new entries only: X and the entries already there are never modified; an
existing key is refused unless overwrite=True, and only keys of obsm, layers and uns can be written), or into a
separate output store that `output_store` creates as a valid AnnData store: obs and var copied from the input, no
X, empty obsm/layers/uns, so `anndata.read_zarr` opens it.

Staging. An output is built outside the store, in its progress folder (below), and moved into place (one rename
of its folder) only when every chunk is written; so `anndata.read_zarr`, scanpy and any other reader never see an
incomplete output, and a kill at any moment, the final assembly and the move included, leaves either nothing in
the store or the whole output.

Dense outputs (obsm, layers). A float32 array with anndata's encoding attributes, created NaN-filled when the
output starts, rows chunked by `chunk_rows` (columns cut so one Zarr chunk holds at most MAX_CHUNK_VALUES values),
stored uncompressed: computed float32 values have noisy mantissas, and Zarr's default zstd shrank normalized
expression barely, for as much CPU as the model's forward pass (benchmarks/history/issue-06.md).
Each chunk of rows is written whole by a single task, so two tasks never share a Zarr chunk, and writing a chunk
twice (a lost dask worker's task recomputed) rewrites the same bytes.

CSR outputs (layers; mostly-zero samples). Each chunk of rows is saved as a piece (.npz) in the progress folder;
`finish` concatenates the pieces in row order into the layer's data / indices / indptr arrays (staged, then moved),
then deletes them.

Progress and completion. A hidden folder beside the store, `.<store name>.scvi-scale-progress/<group>/<key>/`,
holds record.json (the output's kind, shape, chunking and the settings that produce its values) and one file per
finished chunk: an empty marker for dense outputs, the piece for CSR ones. A rerun with the same record skips the
finished chunks; a different record is refused unless overwrite=True (which starts over). The folder lies outside
the Zarr hierarchy, so zarr and anndata never see it. The entry's attribute `scvi_scale_output` reads
{"complete": false} while it is staged and {"complete": true, <its record>} from before its move into the store;
`read_output` refuses an incomplete output and says how many chunks are missing. When the store has consolidated
metadata (anndata writes it), it is rewritten when an entry is moved into place.

Stores in buckets (s3://, gs://; data.remote). There is no rename, so the progress folder and the staging are kept
on the local disk (under TMPDIR, in a folder named for the store's URL: as large as the output while it is
written), and the move is an upload (`publish`, remote.upload_node) whose last object is the entry's own metadata
file (zarr.json; in Zarr format 2 .zattrs then .zarray / .zgroup), the completion marker: a prefix without it is no
member of its group to zarr nor to anndata, so no reader sees the entry before the marker, and after it the whole
entry. A killed upload leaves only such an invisible prefix, which the rerun deletes before uploading again. A rerun
resumes on the machine that holds the progress folder; elsewhere it starts over. Obs columns (write_obs_column)
are written into local stores only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from scvi_scale.data import remote
from scvi_scale.data.store import CHUNK_ROWS_ATTR, CountStore, StoreError, open_anndata_group
from scvi_scale.data.writer import (
    INT32_INDEX_LIMIT,
    remove_abandoned_siblings,
    scratch_sibling,
    write_atomically,
    write_elem,
)

OUTPUT_ATTR = "scvi_scale_output"
WRITABLE_GROUPS = ("obsm", "layers", "uns")
PROGRESS_SUFFIX = ".scvi-scale-progress"
RECORD_FILE = "record.json"
MAX_CHUNK_VALUES = 1 << 21  # 8 MB of float32 per Zarr chunk of a dense output
CSR_VALUES_CHUNK = 1 << 20  # values per Zarr chunk of a CSR output's data and indices
INDPTR_CHUNK_BLOCKS = 16  # row chunks per Zarr chunk of a CSR output's indptr
_ANNDATA_ENCODINGS = {
    "dense": {"encoding-type": "array", "encoding-version": "0.2.0"},
    "csr": {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"},
    "group": {"encoding-type": "dict", "encoding-version": "0.1.0"},
}


class OutputError(StoreError):
    """An output cannot be written or read as asked (exists already, other settings, unknown key, ...)."""


class OutputIncompleteError(OutputError):
    """The output has chunks still missing: a write is running or was interrupted (rerun it to finish)."""


# --- stores and entries -----------------------------------------------------------------------------------------


def split_entry(entry: str) -> tuple[str, str]:
    """'layers/name' -> ('layers', 'name'), checking the group is writable and the key a plain name."""
    group, _, key = str(entry).partition("/")
    check_key(group, key)
    return group, key


def check_key(group: str, key: str) -> None:
    if group not in WRITABLE_GROUPS:
        raise OutputError(f"outputs go to one of {WRITABLE_GROUPS}, not {group!r} (X is never written)")
    if not isinstance(key, str) or not key or "/" in key or key.startswith("."):
        raise OutputError(f"{group} key {key!r}: must be a non-empty name without '/' that does not start with '.'")


def progress_folder(store: str | os.PathLike, entry: str) -> Path:
    """Where the progress of output `entry` ('group/key') of `store` is kept (outside the Zarr hierarchy): beside a
    local store; on the local disk, under TMPDIR, for a store in a bucket."""
    if remote.is_url(os.fspath(store)):
        return remote.staging_folder(os.fspath(store)) / PROGRESS_SUFFIX.lstrip(".") / entry
    store = Path(store).resolve()
    return store.parent / f".{store.name}{PROGRESS_SUFFIX}" / entry


def _root(store: str, mode: str = "r+") -> zarr.Group:
    """The store's root group, read from the metadata files themselves (consolidated metadata may be stale)."""
    open_anndata_group(store)  # a clear error when it is not an AnnData store
    return zarr.open_group(remote.zarr_store(store, read_only=mode == "r"), mode=mode, use_consolidated=False)


def _group(root: zarr.Group, name: str) -> zarr.Group:
    """root[name], created as an empty anndata dict when a store lacks it."""
    if name not in root:
        root.create_group(name).attrs.update(_ANNDATA_ENCODINGS["group"])
    return root[name]


def reconsolidate(store: str, always: bool = False) -> None:
    """Rewrite the consolidated metadata of a store that has it (or always), so readers that use it see new
    entries."""
    if not always and zarr.open_group(remote.zarr_store(store), mode="r").metadata.consolidated_metadata is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zarr: consolidated metadata is not in the v3 spec yet
        zarr.consolidate_metadata(remote.zarr_store(store, read_only=False))


def store_exists(path) -> bool:
    """Whether a Zarr group is at `path` (a local path or a URL)."""
    path = os.fspath(path)
    return remote.group_exists(path) if remote.is_url(path) else Path(path).exists()


def remove_store(path) -> None:
    """Delete the store at `path` (an output store this call created)."""
    path = os.fspath(path)
    remote.remove_node(path) if remote.is_url(path) else shutil.rmtree(path, ignore_errors=True)


def publish(node: Path, store: str, entry: str) -> None:
    """Move the finished local Zarr node `node` (a folder) to `entry` ('' for the root) of `store`: a rename for a
    local store; into a bucket, an upload whose last object is the node's metadata (remote.upload_node)."""
    if remote.is_url(store):
        remote.upload_node(node, f"{store}/{entry}".rstrip("/"))
        shutil.rmtree(node)
    else:
        os.replace(node, Path(store) / entry)


def _index(group: zarr.Group) -> pd.Index:
    import anndata

    return pd.Index(anndata.io.read_elem(group[group.attrs.get("_index", "_index")]))


# what a killed write_obs_column leaves in a local obs folder (_rename_obs_column_into_place's hidden names)
_UNFINISHED_COLUMNS = shutil.ignore_patterns(".*.partial-*", ".*.replaced-*")


def output_store(input_store: str | os.PathLike, path: str | os.PathLike | None = None) -> str:
    """The store that outputs are written to: `input_store` itself when path is None, else `path`.

    A missing `path` is created (in a hidden sibling folder first, then renamed into place) as an AnnData store
    holding the input's obs and var (a local input's files copied as they are), no X, and empty layers, obsm, varm,
    obsp, varp and uns. An existing one must describe the same cells and genes, in the same order.
    """
    import anndata

    input_store = os.fspath(input_store)
    if path is None or remote.resolved(path) == remote.resolved(input_store):
        check_writable(input_store)
        return input_store
    path = os.fspath(path)
    if remote.is_url(path):  # in the input's bucket: reached with its storage options (data.remote.options_for)
        remote.remember_options(path, remote.options_for(input_store) or None)
    else:
        check_writable(path if Path(path).exists() else Path(path).parent)
    source = open_anndata_group(input_store)
    if store_exists(path):
        target = open_anndata_group(path)
        for axis in ("obs", "var"):
            if not _index(source[axis]).equals(_index(target[axis])):
                raise OutputError(
                    f"{path}: its {axis} names differ from those of {input_store}; an output store must describe "
                    "the input's cells and genes in the same order (choose another path)"
                )
        return path
    # built beside a local store, under TMPDIR for one in a bucket, then published
    staged_at = Path(path) if not remote.is_url(path) else remote.staging_folder(path) / "store"
    staged_at.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_siblings(staged_at)  # a killed earlier attempt's folder
    partial = scratch_sibling(staged_at, "partial")
    try:
        root = zarr.open_group(str(partial), mode="w-", zarr_format=source.metadata.zarr_format)
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        for axis in ("obs", "var"):
            if remote.is_url(input_store):
                write_elem(root, axis, anndata.io.read_elem(source[axis]))
            else:  # the files as they are: decoding and encoding 10M cell names again takes seconds
                shutil.copytree(Path(input_store) / axis, partial / axis, ignore=_UNFINISHED_COLUMNS)
        for name in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
            write_elem(root, name, {})
        reconsolidate(str(partial), always=True)  # as anndata does for the stores it writes
        publish(partial, path, "")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return path


def check_writable(store: str | os.PathLike) -> None:
    """Raise OutputError when this process may not write into the local folder `store` (a read-only store or file
    system): before any work, saying that its outputs can still be had in memory or written elsewhere."""
    if "://" not in os.fspath(store) and Path(store).exists() and not os.access(store, os.W_OK):
        raise OutputError(
            f"{store} is read-only for this process: get the outputs in memory (no write_to), or write "
            "them into another store (output_store=, --output-store)"
        )


@contextlib.contextmanager
def exclusive_writer(store: str | os.PathLike):
    """Hold the claim of this process on writing outputs into the local store `store`: an flock on its folder, which
    the OS releases when the process ends, however it ends. A second writer meanwhile is refused (OutputError) at
    once, so two writers of one output never mix (each would otherwise pass the checks made before its work)."""
    if "://" in os.fspath(store):  # a remote store has no folder to lock
        yield
        return
    descriptor = os.open(store, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{store}: another process is writing outputs into it; run again when it has ended (an "
                "unfinished output with the same settings resumes)"
            ) from None
        yield
    finally:
        os.close(descriptor)


def _remove_progress(store: str, entry: str) -> None:
    """Delete an output's progress folder, and the folders above it that it leaves empty."""
    folder = progress_folder(store, entry)
    shutil.rmtree(folder, ignore_errors=True)
    top = progress_folder(store, "")
    for parent in (folder.parent, top):
        try:
            parent.rmdir()
        except FileNotFoundError:  # removed already, by a run killed before it removed the folder above
            continue
        except OSError:  # not empty: other outputs in progress
            break


# --- chunked outputs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChunkedOutput:
    """An output of n_rows x n_cols written in chunks of chunk_rows rows; see the module docstring.

    settings: JSON-serialisable description of what produces the values (method, arguments, model digest); a
    rerun resumes only when it is the same.
    """

    store: str
    group: str
    key: str
    n_rows: int
    n_cols: int
    chunk_rows: int
    settings: dict = field(default_factory=dict)
    dtype: str = "float32"  # dense outputs may be "float16": half the disk of a normalized-expression layer

    kind = ""  # "dense" or "csr"

    def __post_init__(self):
        check_key(self.group, self.key)
        if self.group == "uns":
            raise OutputError("chunked outputs go to obsm or layers; uns holds small tables (write_uns)")
        if self.n_rows < 1 or self.n_cols < 1 or self.chunk_rows < 1:
            raise OutputError(
                f"{self.entry}: shape ({self.n_rows}, {self.n_cols}) and chunk_rows {self.chunk_rows} must be positive"
            )

    @property
    def entry(self) -> str:
        return f"{self.group}/{self.key}"

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    @property
    def progress(self) -> Path:
        return progress_folder(self.store, self.entry)

    @property
    def staging(self) -> Path:
        """Where the output is built before it is moved into the store (inside the progress folder)."""
        return self.progress / "staging"

    def complete_as_recorded(self) -> bool:
        """Whether the entry is in the store, complete, made with this record (a rerun of a call that finished)."""
        group = _group(_root(self.store), self.group)
        if self.key not in group:
            return False
        state = group[self.key].attrs.get(OUTPUT_ATTR) or {}
        return bool(state.get("complete")) and _json_round_trip(
            {k: v for k, v in state.items() if k != "complete"}
        ) == _json_round_trip(self.record())

    def bounds(self, chunk: int) -> tuple[int, int]:
        """Rows [start, stop) of chunk `chunk`."""
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def record(self) -> dict:
        return {
            "kind": self.kind,
            "dtype": self.dtype,
            "shape": [self.n_rows, self.n_cols],
            "chunk_rows": self.chunk_rows,
            "settings": self.settings,
        }

    # --- the coordinator's side: prepare and finish

    def prepare(self, overwrite: bool = False) -> list[int]:
        """Create (or find) the output and return the chunks still to write, in order.

        Refuses an entry that exists and is complete or not ours, and an unfinished one made with another record,
        unless overwrite=True, which deletes them and starts over.
        """
        root = _root(self.store)
        group = _group(root, self.group)
        record_path = self.progress / RECORD_FILE
        if overwrite:
            if self.key in group:
                del group[self.key]
                reconsolidate(self.store)
            _remove_progress(self.store, self.entry)
        exists = self.key in group
        if exists:
            state = group[self.key].attrs.get(OUTPUT_ATTR)
            if state is None or state.get("complete"):
                if state is not None:  # ours: finish its last steps, in case a kill came after its move
                    self.tidy()
                raise OutputError(f"{self.store}: {self.entry} already exists; pass overwrite=True to replace it")
        saved = json.loads(record_path.read_text()) if record_path.exists() else None
        if saved is None and exists:
            raise OutputError(
                f"{self.store}: {self.entry} is an unfinished output whose progress record "
                f"({self.progress}) is gone; pass overwrite=True to write it again"
            )
        if saved is not None and saved != _json_round_trip(self.record()):
            raise OutputError(
                f"{self.store}: {self.entry} is an unfinished output started with other settings "
                f"(saved {saved}, now {self.record()}); rerun with the same settings to finish it, or pass "
                "overwrite=True to start over"
            )
        if saved is None:
            self.progress.mkdir(parents=True, exist_ok=True)
            write_atomically(record_path, lambda path: path.write_text(json.dumps(self.record())))
        if not exists and not self.staging.exists():  # created under a scratch name: a kill leaves none half made
            remove_abandoned_siblings(self.staging)
            scratch = scratch_sibling(self.staging, "partial")
            self._create(zarr.open_group(str(scratch), mode="w", zarr_format=root.metadata.zarr_format))
            os.replace(scratch, self.staging)
        done = self.done_chunks()
        return [chunk for chunk in range(self.n_chunks) if chunk not in done]

    def done_chunks(self) -> set[int]:
        suffix = self._piece_suffix
        if not self.progress.is_dir():
            return set()
        return {int(name.removesuffix(suffix)) for name in os.listdir(self.progress) if name.endswith(suffix)}

    def finish(self) -> None:
        """Assemble the output (a CSR one from its pieces), mark it complete and move it into the store, then `tidy`;
        raises OutputIncompleteError if chunks miss. Marked before the move, so what is in the store is complete."""
        if self.key not in _group(_root(self.store), self.group):  # else moved already, by a run killed after it
            missing = self.n_chunks - len(self.done_chunks())
            if missing:
                raise OutputIncompleteError(
                    f"{self.store}: {self.entry} has {missing} of {self.n_chunks} chunks still to write"
                )
            staged = zarr.open_group(str(self.staging), mode="r+")
            self._assemble(staged)
            staged[self.key].attrs.update({OUTPUT_ATTR: {"complete": True, **self.record()}})
            publish(self.staging / self.key, self.store, self.entry)
        self.tidy()

    def abandon(self) -> None:
        """Delete an unfinished output's progress folder (record, pieces, staging): the call stops, leaving nothing."""
        _remove_progress(self.store, self.entry)

    def tidy(self) -> None:
        """Finish's last steps once the output is in the store: list it in the consolidated metadata (which anndata
        reads) and delete its progress folder. Reruns repeat them, in case a kill came in between."""
        reconsolidate(self.store)
        _remove_progress(self.store, self.entry)

    # --- what dense and CSR outputs do differently

    _piece_suffix = ""

    def _create(self, staged: zarr.Group) -> None:
        raise NotImplementedError

    def write_chunk(self, chunk: int, values) -> None:
        raise NotImplementedError

    def _assemble(self, staged: zarr.Group) -> None:
        """Make staged[key] the whole output (CSR: from its pieces), ready to be moved into the store."""
        raise NotImplementedError

    def _piece(self, chunk: int) -> Path:
        return self.progress / f"{chunk}{self._piece_suffix}"

    def _check_chunk(self, chunk: int, values) -> None:
        start, stop = self.bounds(chunk)
        if not 0 <= chunk < self.n_chunks or tuple(values.shape) != (stop - start, self.n_cols):
            raise OutputError(
                f"{self.entry}: chunk {chunk} must hold rows [{start}, {stop}) x {self.n_cols} columns, "
                f"got shape {tuple(values.shape)}"
            )


@dataclass(frozen=True)
class DenseOutput(_ChunkedOutput):
    """A float32 (or float16) (n_rows, n_cols) output in obsm or layers, written chunk by chunk."""

    kind = "dense"
    _piece_suffix = ".done"

    def _create(self, staged: zarr.Group) -> None:
        column_chunk = int(max(1, min(self.n_cols, MAX_CHUNK_VALUES // self.chunk_rows)))
        array = staged.create_array(
            self.key,
            shape=(self.n_rows, self.n_cols),
            chunks=(self.chunk_rows, column_chunk),
            dtype=self.dtype,
            fill_value=np.nan,
            compressors=None,
        )
        array.attrs.update({**_ANNDATA_ENCODINGS["dense"], OUTPUT_ATTR: {"complete": False}})

    def write_chunk(self, chunk: int, values) -> None:
        """Write rows bounds(chunk) (may run in any process), then leave the chunk's done marker."""
        values = np.asarray(values, dtype=self.dtype)
        self._check_chunk(chunk, values)
        start, stop = self.bounds(chunk)
        # write_empty_chunks: else zarr first compares every chunk with the fill value (NaN), to skip storing it
        try:
            array = zarr.open_array(str(self.staging), path=self.key, mode="r+", config={"write_empty_chunks": True})
            array[start:stop] = values
            self._piece(chunk).touch()
        except FileNotFoundError as error:
            raise OutputError(
                f"{self.store}: {self.entry} was finished or removed by another writer while this one "
                "was writing it; run one writer of an output at a time"
            ) from error

    def _assemble(self, staged: zarr.Group) -> None:
        """The array is whole once its chunks are written."""


@dataclass(frozen=True)
class CsrOutput(_ChunkedOutput):
    """A float32 CSR (n_rows, n_cols) output in layers: pieces per chunk, assembled by `finish`."""

    kind = "csr"
    _piece_suffix = ".npz"

    def __post_init__(self):
        super().__post_init__()
        if self.group != "layers":
            raise OutputError(f"CSR outputs go to layers, not {self.group}")

    def _create(self, staged: zarr.Group) -> None:
        """Nothing yet: the layer is assembled from the pieces by finish."""

    def write_chunk(self, chunk: int, values) -> None:
        """Save rows bounds(chunk) as a CSR piece (may run in any process)."""
        values = sp.csr_matrix(values, dtype=np.float32)
        self._check_chunk(chunk, values)

        def save(path: Path) -> None:
            with path.open("wb") as file:  # a file object: given a name, numpy would append ".npz" to it
                sp.save_npz(file, values, compressed=False)

        write_atomically(self._piece(chunk), save)

    def _assemble(self, staged: zarr.Group) -> None:
        """Concatenate the pieces in row order into the staged layer (replacing a half-assembled one)."""
        group = staged
        if self.key in group:
            del group[self.key]
        pieces = [self._piece(chunk) for chunk in range(self.n_chunks)]
        nnz = [int(np.load(piece)["indptr"][-1]) for piece in pieces]
        offsets = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
        # int32 indptr below 2^31 non-zeros, as scipy and anndata make it (see scvi_scale.data.writer: scipy copies
        # all int32 indices to int64 on every row selection when indptr is int64)
        indptr_dtype = np.int32 if offsets[-1] <= INT32_INDEX_LIMIT else np.int64
        layer = group.create_group(self.key)
        arrays = {
            "data": layer.create_array("data", shape=(offsets[-1],), chunks=(CSR_VALUES_CHUNK,), dtype="float32"),
            "indices": layer.create_array("indices", shape=(offsets[-1],), chunks=(CSR_VALUES_CHUNK,), dtype="int32"),
            "indptr": layer.create_array(
                "indptr",
                shape=(self.n_rows + 1,),
                chunks=(self.chunk_rows * INDPTR_CHUNK_BLOCKS,),
                dtype=indptr_dtype,
            ),
        }
        filled = {name: _ChunkFiller(array) for name, array in arrays.items()}
        filled["indptr"].append(np.zeros(1, dtype=indptr_dtype))
        for chunk, piece in enumerate(pieces):
            values = sp.load_npz(piece)
            filled["data"].append(values.data.astype(np.float32, copy=False))
            filled["indices"].append(values.indices.astype(np.int32, copy=False))
            filled["indptr"].append((values.indptr[1:] + offsets[chunk]).astype(indptr_dtype))  # offsets: int64
        for filler in filled.values():
            filler.close()
        layer.attrs.update(
            {**_ANNDATA_ENCODINGS["csr"], "shape": [self.n_rows, self.n_cols], CHUNK_ROWS_ATTR: self.chunk_rows}
        )


class _ChunkFiller:
    """Fills a 1-D Zarr array from its start, in order, writing whole chunks only: a write to part of a chunk reads
    and rewrites all of it, so writing each CSR piece where it goes rewrote a chunk once per piece in it (finish of a
    1000 x 50 layer in 32-row pieces: 1.24 s that way, 0.22 s this way, interleaved A/B at one torch thread). Holds
    under a chunk plus the last values appended."""

    def __init__(self, array: zarr.Array):
        self.held: list[np.ndarray]
        self.array, self.written, self.held, self.n_held = array, 0, [], 0

    def append(self, values: np.ndarray) -> None:
        self.held.append(values)
        self.n_held += len(values)
        chunk = self.array.chunks[0]
        self._write((self.written + self.n_held) // chunk * chunk - self.written)

    def close(self) -> None:
        self._write(self.n_held)

    def _write(self, count: int) -> None:
        if count <= 0:
            return
        values = np.concatenate(self.held)
        self.array[self.written : self.written + count] = values[:count]
        self.written += count
        self.held, self.n_held = [values[count:]], len(values) - count


def _json_round_trip(value):
    """`value` as it reads back from JSON (tuples become lists), for comparing with a saved record."""
    return json.loads(json.dumps(value))


# --- reading ---------------------------------------------------------------------------------------------------


def read_output(store: str | os.PathLike, entry: str):
    """A finished output of `store`: 'obsm/<key>' or 'layers/<key>' as a lazy dask array (CSR layers: chunks of
    scipy CSR), 'uns/<key>' as what anndata reads (e.g. a DataFrame).

    Raises OutputIncompleteError, naming the missing chunks' count, while the output is being written or after an
    interrupted write, and OutputError when there is no such entry.
    """
    import anndata
    import dask.array as da

    store = os.fspath(store)
    group_name, key = split_entry(entry)
    root = _root(store, mode="r")
    record_path = progress_folder(store, entry) / RECORD_FILE
    group = root[group_name] if group_name in root else None
    node = group[key] if group is not None and key in group else None
    state = None if node is None else node.attrs.get(OUTPUT_ATTR)
    unfinished = (node is None or (state is not None and not state.get("complete"))) and record_path.exists()
    if unfinished:
        record = json.loads(record_path.read_text())
        output_class = DenseOutput if record["kind"] == "dense" else CsrOutput
        n_rows, n_cols = record["shape"]
        output = output_class(
            store,
            group_name,
            key,
            n_rows,
            n_cols,
            record["chunk_rows"],
            record["settings"],
            **({"dtype": record.get("dtype", "float32")} if output_class is DenseOutput else {}),
        )
        done = len(output.done_chunks())
        raise OutputIncompleteError(
            f"{store}: {entry} is incomplete: {done} of {output.n_chunks} chunks are written; a write is running "
            "or was interrupted (rerun it with the same settings to finish)"
        )
    if node is None:
        available = sorted(group.keys()) if group is not None else []
        raise OutputError(f"{store}: no {entry}; {group_name} holds {available}")
    if state is not None and not state.get("complete"):
        raise OutputIncompleteError(f"{store}: {entry} is incomplete and its progress record is gone; write it again")
    if group_name == "uns":
        return anndata.io.read_elem(node)
    if isinstance(node, zarr.Array):
        return da.from_zarr(node)
    if node.attrs.get("encoding-type") == "csr_matrix" and group_name == "layers":
        return CountStore(store, layer=key).to_dask()
    encoding = node.attrs.get("encoding-type")
    raise OutputError(f"{store}: {entry} has encoding {encoding!r}, which read_output cannot read")


# --- small in-memory results -----------------------------------------------------------------------------------


def write_obsm(
    store: str | os.PathLike, key: str, values, overwrite: bool = False, chunk_rows: int | None = None
) -> None:
    """Write a small in-memory (n_obs, k) result as obsm/<key> of `store` (float32, chunked like a dense output)."""
    store = os.fspath(store)
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 1:
        values = values[:, None]
    n_obs = len(_index(_root(store, mode="r")["obs"]))
    if values.ndim != 2 or values.shape[0] != n_obs:
        raise OutputError(f"obsm/{key}: values of shape {values.shape} need one row per cell of {store} ({n_obs})")
    chunk_rows = int(chunk_rows or min(n_obs, 4096))
    output = DenseOutput(store, "obsm", key, n_obs, values.shape[1], chunk_rows, {"source": "write_obsm"})
    output.prepare(overwrite=overwrite)
    for chunk in range(output.n_chunks):  # all of them: a leftover unfinished write_obsm held other values
        start, stop = output.bounds(chunk)
        output.write_chunk(chunk, values[start:stop])
    output.finish()


def check_uns_key(store: str | os.PathLike, key: str, overwrite: bool = False) -> None:
    """Raise OutputError if uns/<key> of `store` cannot be written (a bad name, or it exists and not overwrite)."""
    check_key("uns", key)
    root = _root(os.fspath(store), mode="r")
    if not overwrite and "uns" in root and key in root["uns"]:
        raise OutputError(f"{store}: uns/{key} already exists; pass overwrite=True to replace it")


def write_uns(store: str | os.PathLike, key: str, value, overwrite: bool = False) -> None:
    """Write a small value (a DataFrame, dict, array) as uns/<key> of `store` with anndata's encoder."""
    store = os.fspath(store)
    with exclusive_writer(store):
        check_uns_key(store, key, overwrite)  # again, now that no other writer can come in between
        uns = _group(_root(store), "uns")
        if key in uns:
            del uns[key]
        if remote.is_url(store):  # encoded on the local disk, then published with its marker last (module docstring)
            scratch = progress_folder(store, f"uns/{key}") / "staging"
            shutil.rmtree(scratch, ignore_errors=True)
            write_elem(zarr.open_group(str(scratch), mode="w", zarr_format=uns.metadata.zarr_format), key, value)
            publish(scratch / key, store, f"uns/{key}")
            _remove_progress(store, f"uns/{key}")
        else:
            write_elem(uns, key, value)
        reconsolidate(store)


def write_obs_column(store, key: str, values: pd.Series, overwrite: bool = False) -> None:
    """Add (or with overwrite=True replace) obs/<key> of an AnnData-Zarr store, in anndata's encoding.

    X and the other columns are never touched. The column is listed in obs' column-order (what anndata reads) and
    in the consolidated metadata only once it is whole, so a crash at any point leaves a store that anndata reads
    with or without the new column: in a local store it is encoded into a hidden sibling name and renamed into
    place; into a bucket it is encoded under TMPDIR and uploaded with its metadata last, and a column it replaces
    leaves column-order before it is deleted.
    """
    store = os.fspath(store)
    in_bucket = remote.is_url(store)
    if not in_bucket and not (Path(store) / "obs").is_dir():
        raise StoreError(f"{store}: no obs folder; obs columns are written into AnnData-Zarr stores")
    with exclusive_writer(store):
        obs = _root(store)["obs"]
        index_name = obs.attrs.get("_index", "_index")
        n_obs = obs[index_name].shape[0]
        if key == index_name or "/" in key or key.startswith("."):
            raise ValueError(f"obs column name {key!r} is not allowed (the index, or a path)")
        if len(values) != n_obs:
            raise ValueError(f"obs/{key}: {len(values)} values for the store's {n_obs} cells")
        if key in obs and not overwrite:
            raise FileExistsError(f"{store}: obs/{key} exists; pass overwrite=True to replace it")
        encoded = values.array if isinstance(values.dtype, pd.CategoricalDtype) else values.to_numpy()
        if in_bucket:
            _upload_obs_column(store, obs, key, encoded)
        else:
            _rename_obs_column_into_place(Path(store) / "obs", obs, key, encoded)
        order = list(obs.attrs.get("column-order", []))
        if key not in order:
            obs.attrs["column-order"] = order + [key]
        reconsolidate(store)


def _rename_obs_column_into_place(folder: Path, obs: zarr.Group, key: str, encoded) -> None:
    """write_obs_column in a local store: encoded as a hidden sibling of obs/<key>, then renamed over it."""
    token = uuid.uuid4().hex[:12]
    partial = f".{key}.partial-{token}"
    write_elem(obs, partial, encoded)
    if key in obs:
        replaced = folder / f".{key}.replaced-{token}"
        os.replace(folder / key, replaced)
        os.replace(folder / partial, folder / key)
        shutil.rmtree(replaced)
    else:
        os.replace(folder / partial, folder / key)


def _upload_obs_column(store: str, obs: zarr.Group, key: str, encoded) -> None:
    """write_obs_column into a bucket: a column being replaced first leaves column-order (readers see the store
    without it), then the new one is encoded under TMPDIR and uploaded, its metadata last (publish deletes the old
    one's objects first)."""
    order = list(obs.attrs.get("column-order", []))
    if key in order:
        obs.attrs["column-order"] = [name for name in order if name != key]
        reconsolidate(store)
    scratch = progress_folder(store, f"obs/{key}") / "staging"
    shutil.rmtree(scratch, ignore_errors=True)
    write_elem(zarr.open_group(str(scratch), mode="w", zarr_format=obs.metadata.zarr_format), key, encoded)
    publish(scratch / key, store, f"obs/{key}")
    _remove_progress(store, f"obs/{key}")


TABLE_FORMATS = (".csv", ".parquet")  # a result table's format is its path's suffix


def check_table_path(path, overwrite: bool = False) -> Path:
    """Raise OutputError unless a result table can be written to exactly `path`: a suffix of TABLE_FORMATS (parquet
    needs pyarrow), and no file there unless overwrite=True. Returns the path."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_FORMATS:
        raise OutputError(
            f"{path}: a table is written as {' or '.join(TABLE_FORMATS)}, chosen by the path's suffix "
            f"(not {path.suffix or 'none'!r})"
        )
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise OutputError(f"{path}: writing parquet needs pyarrow (pip install pyarrow), or name a .csv") from None
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass overwrite (--overwrite) to replace it, or choose another path")
    return path


def write_table(frame: pd.DataFrame, path, overwrite: bool = False) -> Path:
    """Write a result table to exactly `path`, atomically, as csv or parquet by its suffix (check_table_path says
    what is refused). Returns the path."""
    path = check_table_path(path, overwrite)
    if path.suffix.lower() == ".csv":
        return write_atomically(path, frame.to_csv)
    return write_atomically(path, frame.to_parquet)


def _stored_bytes(store: str, entry: str) -> int:
    if remote.is_url(store):
        fs, root = remote.filesystem(store)
        return int(fs.du(f"{root}/{entry}"))
    folder = Path(store) / entry
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.exists() else 0


def describe_outputs(store: str | os.PathLike) -> list[dict]:
    """What a store holds in obsm, layers and uns: [{"entry", "kind", "shape", "bytes", "complete"}] (bytes on
    disk; complete: False for an output of ours still being written, None for entries we did not write)."""
    store = os.fspath(store)
    root = _root(store, mode="r")
    described = []
    for group_name in WRITABLE_GROUPS:
        if group_name not in root:
            continue
        for key in sorted(root[group_name].keys()):
            node = root[group_name][key]
            size = _stored_bytes(store, f"{group_name}/{key}")
            state = node.attrs.get(OUTPUT_ATTR)
            described.append(
                {
                    "entry": f"{group_name}/{key}",
                    "kind": node.attrs.get("encoding-type", "array" if isinstance(node, zarr.Array) else "group"),
                    "shape": list(node.shape) if isinstance(node, zarr.Array) else node.attrs.get("shape"),
                    "bytes": size,
                    "complete": None if state is None else bool(state.get("complete")),
                }
            )
    return described
