"""Converters: write a count store from an AnnData, an .h5ad file, a 10x folder, an AnnData Zarr store or a matrix.

    >>> from scvi_scale.data import write_store
    >>> store = write_store("pbmc.h5ad", "pbmc.zarr")                   # X holds the counts
    >>> store = write_store(adata, "atlas.zarr", layer="counts")        # counts from adata.layers["counts"]
    >>> store = write_store("filtered_feature_bc_matrix/", "pbmc.zarr") # 10x Matrix Market folder
    >>> store = write_store(csr_matrix, "m.zarr", obs=obs_frame, var=var_frame)

Every source is read in row blocks of `chunk_rows` cells and streamed through one `StoreWriter`, which validates
each block as it goes (no second pass); the output keeps the counts in X (float32), obs, var and uns.
Memory: an .h5ad file is read through h5py one row block at a time, X and obs alike (var and uns whole);
a 10x matrix.mtx is streamed in bounded pieces (see `_tenx_blocks`); an existing Zarr store is re-blocked (useful to
rechunk a store written by others). An in-memory AnnData or matrix is, of course, already in memory.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.data import remote
from scvi_scale.data.store import CountStore, StoreError, open_anndata_group
from scvi_scale.data.validate import CountValidationError
from scvi_scale.data.writer import DEFAULT_CHUNK_ROWS, DEFAULT_ZARR_FORMAT, StoreWriter, scratch_sibling

# imported where used: importing anndata (which imports dask) and h5py costs ~1 s of a process's start
if TYPE_CHECKING:
    import anndata
    import h5py

MTX_ENTRIES_PER_READ = 2_000_000  # Matrix Market entries parsed at once (~50 MB of parser memory)
# One non-zero of a 10x matrix, as kept in the per-block bucket files: 1-based cell and gene, value as read.
_MTX_ENTRY = np.dtype([("cell", np.int64), ("gene", np.int64), ("value", np.float64)])


@dataclass
class _Source:
    """A count source seen as row blocks: blocks(block_rows) yields (counts, obs) of consecutive rows."""

    blocks: Callable[[int], Iterator[tuple[object, pd.DataFrame]]]
    var: pd.DataFrame
    is_sparse: bool
    where: str
    uns: dict = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)  # the source's layers, named when X turns out not to be counts


def write_store(
    source,
    path,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    layer: str | None = None,
    *,
    obs: pd.DataFrame | None = None,
    var: pd.DataFrame | None = None,
    sparse: bool | None = None,
    validate: bool = True,
    zarr_format: int = DEFAULT_ZARR_FORMAT,
    overwrite: bool = False,
) -> CountStore:
    """Convert `source` into an AnnData Zarr count store at `path` and return it opened as a CountStore.

    source: an AnnData (in memory or backed); a path to an .h5ad file, to a 10x Matrix Market folder
        (matrix.mtx[.gz] genes x cells, barcodes.tsv[.gz], features.tsv[.gz] or genes.tsv[.gz]) or to an AnnData
        Zarr store; a CountStore; or a scipy sparse matrix / numpy array (cells x genes) with optional `obs` and
        `var` DataFrames (default names "0", "1", ...).
    chunk_rows: cells per row block, both for reading the source and for the store's chunks (see StoreWriter).
    layer: take the counts from this layer of the source instead of X (AnnData, .h5ad or Zarr sources);
        the output always holds them in X.
    sparse: write X as CSR (True) or dense (False); default: as the source is.
    validate: check every count (finite, non-negative, integer-valued) while streaming; CountValidationError names
        the first bad value, its cell and the row range. zarr_format: 3 (default: every chunk checksummed) or 2
        (for readers still on zarr-python 2; no checksums).
    A damaged source (an AnnData Zarr store with a chunk absent, damaged or out of structure) is refused with the
    StoreError of CountStore; whenever the conversion fails, nothing is left at `path` (or next to it).
    overwrite: replace an existing store; the old one stays in place until the new one is complete.
    """
    if isinstance(source, (sp.spmatrix, sp.sparray, np.ndarray)):
        obs_rows = None if obs is None else _ObsRows.of_frame(obs)
        source_context: contextlib.AbstractContextManager[_Source] = contextlib.nullcontext(
            _matrix_source(source, obs_rows, var, {}, "the matrix")
        )
    else:
        if obs is not None or var is not None:
            raise TypeError("obs= and var= are only for a matrix source; other sources carry their own")
        source_context = _open_source(source, layer, path)
    with source_context as counts_source:
        try:
            with StoreWriter(
                path,
                counts_source.var,
                sparse=counts_source.is_sparse if sparse is None else sparse,
                chunk_rows=chunk_rows,
                validate=validate,
                zarr_format=zarr_format,
                overwrite=overwrite,
                where=counts_source.where,
            ) as writer:
                for counts, obs_block in counts_source.blocks(int(chunk_rows)):
                    writer.append(counts, obs_block)
                writer.close(uns=counts_source.uns)
        except CountValidationError as error:
            if layer is not None or not counts_source.layers:
                raise
            hint = _layer_hint(counts_source)
            raise CountValidationError(f"{error}. X is not raw counts (log-normalized?); {hint}") from error
    return CountStore(path)


def _layer_hint(source: _Source) -> str:
    """Where the counts may be instead of X: the source's layers, and the option that takes one."""
    name = "counts" if "counts" in source.layers else source.layers[0]
    has = f"{source.where} has a {name!r} layer" if name == "counts" else f"{source.where} has layers {source.layers}"
    return f"{has}: `--layer {name}` (write_store(..., layer={name!r})) takes the counts from it"


@contextlib.contextmanager
def _open_source(source, layer: str | None, target) -> Iterator[_Source]:
    """Recognise the source and yield it as a _Source (closing any file it opened afterwards). A URL is read as an
    AnnData Zarr store (data.remote); `target`, the store to write, may be one too."""
    import anndata
    import h5py

    if isinstance(source, anndata.AnnData):
        yield _anndata_source(source, layer)
        return
    if isinstance(source, CountStore):
        yield _zarr_source(source.path, source.layer if layer is None else layer)
        return
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"cannot convert a {type(source).__name__}: expected AnnData, CountStore, scipy sparse matrix, numpy "
            "array, or a path to an .h5ad file, a 10x folder or an AnnData Zarr store"
        )
    if remote.is_url(str(source)):
        yield _zarr_source(str(source), layer)
        return
    source = Path(source)
    if not source.exists():
        raise StoreError(f"{source} does not exist")
    if source.is_file() and source.suffix == ".h5ad":
        with h5py.File(source, "r") as h5ad:
            yield _h5ad_source(h5ad, layer, str(source))
        return
    if source.is_dir() and any((source / name).exists() for name in ("matrix.mtx", "matrix.mtx.gz")):
        if layer is not None:
            raise StoreError(f"{source}: a 10x folder has no layers (got layer={layer!r})")
        yield _tenx_source(source, remote.staging_folder(target) if remote.is_url(os.fspath(target)) else Path(target))
        return
    if source.is_dir() and any((source / name).exists() for name in (".zgroup", "zarr.json")):
        yield _zarr_source(str(source), layer)
        return
    raise StoreError(
        f"{source}: not an .h5ad file, a 10x folder (with matrix.mtx[.gz]) or a Zarr store (with .zgroup or zarr.json)"
    )


# --- obs read by row blocks -------------------------------------------------------------------------------------


@dataclass
class _ObsRows:
    """obs as row blocks: n_rows rows; read(start, stop) gives the DataFrame of rows [start, stop)."""

    n_rows: int
    read: Callable[[int, int], pd.DataFrame]

    @classmethod
    def of_frame(cls, frame: pd.DataFrame) -> _ObsRows:
        return cls(len(frame), lambda start, stop: frame.iloc[start:stop])

    @classmethod
    def of_group(cls, group) -> _ObsRows:
        """An obs group on disk (h5py or zarr) read one row block at a time, so memory does not grow with cells.

        Handles the encodings anndata writes for obs columns: categorical (codes sliced, categories read once),
        numeric array and string-array; a frame with any other column (e.g. nullable integers) is read whole.
        """
        import anndata

        index_key = group.attrs["_index"]
        readers = {}
        for name in [index_key, *group.attrs["column-order"]]:
            element = group[name]
            encoding = element.attrs.get("encoding-type")
            if encoding == "categorical":
                dtype = pd.CategoricalDtype(
                    anndata.io.read_elem(element["categories"]), ordered=bool(element.attrs.get("ordered", False))
                )
                readers[name] = functools.partial(_categorical_rows, element["codes"], dtype)
            elif encoding in ("array", "string-array"):
                readers[name] = functools.partial(_array_rows, element)
            else:
                return cls.of_frame(anndata.io.read_elem(group))
        index_name = None if index_key == "_index" else index_key

        def read(start: int, stop: int) -> pd.DataFrame:
            index = pd.Index(readers[index_key](start, stop), name=index_name)
            columns = {name: rows(start, stop) for name, rows in readers.items() if name != index_key}
            return pd.DataFrame(columns, index=index)

        return cls(int(group[index_key].shape[0]), read)


def _categorical_rows(codes, dtype: pd.CategoricalDtype, start: int, stop: int) -> pd.Categorical:
    return pd.Categorical.from_codes(np.asarray(codes[start:stop]), dtype=dtype)


def _array_rows(element, start: int, stop: int) -> np.ndarray:
    """Rows of a 1-D array; strings come back as an object array of str, as anndata.io.read_elem gives them."""
    import h5py

    if isinstance(element, h5py.Dataset) and h5py.check_string_dtype(element.dtype) is not None:
        return element.asstr()[start:stop]
    values = np.asarray(element[start:stop])
    return values.astype(object) if values.dtype.kind in "TU" else values


# --- in-memory and HDF5 sources ---------------------------------------------------------------------------------


def _matrix_source(matrix, obs: _ObsRows | None, var: pd.DataFrame | None, uns: dict, where: str) -> _Source:
    """Rows of any row-sliceable matrix: scipy sparse, numpy, h5py dataset or anndata's backed sparse dataset."""
    import anndata

    if len(matrix.shape) != 2:
        raise StoreError(f"{where}: counts must be 2-D (cells x genes), got shape {matrix.shape}")
    n_obs, n_vars = matrix.shape
    if isinstance(matrix, (sp.spmatrix, sp.sparray)) and matrix.format != "csr":
        matrix = sp.csr_matrix(matrix)  # CSC/COO in memory: one conversion, not one per row block
    obs = _ObsRows.of_frame(pd.DataFrame(index=pd.RangeIndex(n_obs).astype(str))) if obs is None else obs
    var = pd.DataFrame(index=pd.RangeIndex(n_vars).astype(str)) if var is None else var
    if obs.n_rows != n_obs:
        raise StoreError(f"{where}: obs has {obs.n_rows} rows but the counts have {n_obs} rows (cells)")
    if len(var) != n_vars:
        raise StoreError(f"{where}: var has {len(var)} rows but the counts have {n_vars} columns (genes)")
    is_sparse = isinstance(matrix, (sp.spmatrix, sp.sparray, anndata.abc.CSRDataset, anndata.abc.CSCDataset))

    def blocks(block_rows: int):
        for start in range(0, n_obs, block_rows):
            stop = min(start + block_rows, n_obs)
            yield matrix[start:stop], obs.read(start, stop)

    return _Source(blocks, var, is_sparse, where, dict(uns))


def _anndata_source(adata: anndata.AnnData, layer: str | None) -> _Source:
    if layer is None:
        if adata.X is None:
            raise StoreError(f"the AnnData has no X; pass layer= one of {list(adata.layers.keys())}")
        counts = adata.X
    elif layer in adata.layers:
        counts = adata.layers[layer]
    else:
        raise StoreError(f"the AnnData has no layer {layer!r}; its layers are {list(adata.layers.keys())}")
    source = _matrix_source(counts, _ObsRows.of_frame(adata.obs), adata.var, dict(adata.uns), "the AnnData")
    source.layers = list(adata.layers.keys())
    return source


def _h5ad_source(h5ad: h5py.File, layer: str | None, where: str) -> _Source:
    """An .h5ad file read lazily through h5py: X (or the layer) and obs by row blocks, var and uns whole."""
    import anndata
    import h5py

    if "obs" not in h5ad or "var" not in h5ad:
        raise StoreError(f"{where}: not an AnnData file (no obs/var groups; members {sorted(h5ad.keys())})")
    layers = sorted(h5ad["layers"].keys()) if "layers" in h5ad else []
    if layer is None:
        if "X" not in h5ad:
            raise StoreError(f"{where}: the file has no X; pass layer= one of {layers}")
        element = h5ad["X"]
    elif layer in layers:
        element = h5ad["layers"][layer]
    else:
        raise StoreError(f"{where}: no layer {layer!r}; the file's layers are {layers}")
    matrix = anndata.io.sparse_dataset(element) if isinstance(element, h5py.Group) else element
    uns = anndata.io.read_elem(h5ad["uns"]) if "uns" in h5ad else {}
    source = _matrix_source(matrix, _ObsRows.of_group(h5ad["obs"]), anndata.io.read_elem(h5ad["var"]), uns, where)
    source.layers = layers
    return source


def _zarr_source(path: str, layer: str | None) -> _Source:
    """An existing AnnData Zarr store, re-blocked (e.g. to rechunk a store written by others)."""
    import anndata

    store = CountStore(path, layer)
    root = open_anndata_group(path)
    obs = _ObsRows.of_group(root["obs"])
    uns = anndata.io.read_elem(root["uns"]) if "uns" in root else {}

    def blocks(block_rows: int):
        bounds = store.block_bounds(block_rows)
        for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            yield store.read_raw(start, stop), obs.read(start, stop)

    layers = sorted(root["layers"].keys()) if "layers" in root else []
    return _Source(blocks, store.var_frame(), store.is_sparse, store.path, uns, layers)


# --- 10x Matrix Market folders ----------------------------------------------------------------------------------


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).exists():
            return folder / name
    found = sorted(path.name for path in folder.iterdir())
    raise StoreError(f"{folder}: a 10x folder needs one of {list(names)}; found {found}")


def _read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)


def _mtx_header(path: Path) -> tuple[int, int, int, int, str]:
    """(n_genes, n_cells, n_entries, lines before the entries, field) of a Matrix Market coordinate file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        banner = handle.readline().split()
        if len(banner) != 5 or banner[0] != "%%MatrixMarket" or banner[1:3] != ["matrix", "coordinate"]:
            raise StoreError(f"{path}: not a Matrix Market coordinate file (first line {' '.join(banner)!r})")
        field_kind, symmetry = banner[3], banner[4]
        if field_kind not in ("integer", "real") or symmetry != "general":
            raise StoreError(f"{path}: expected an 'integer' or 'real' 'general' matrix, got {field_kind} {symmetry}")
        n_header_lines = 1
        line = handle.readline()
        while line.startswith("%"):
            n_header_lines += 1
            line = handle.readline()
        n_genes, n_cells, n_entries = (int(token) for token in line.split())
    return n_genes, n_cells, n_entries, n_header_lines + 1, field_kind


def _tenx_source(folder: Path, target: Path) -> _Source:
    """A 10x folder: barcodes become obs names; gene ids become var names (symbols and types become var columns)."""
    matrix_path = _first_existing(folder, ("matrix.mtx.gz", "matrix.mtx"))
    barcodes_path = _first_existing(folder, ("barcodes.tsv.gz", "barcodes.tsv"))
    features_path = _first_existing(folder, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    barcodes = _read_tsv(barcodes_path)[0]
    features = _read_tsv(features_path)
    var = pd.DataFrame(index=pd.Index(features[0].to_numpy(), name=None))
    for column, name in ((1, "gene_symbols"), (2, "feature_types")):
        if column in features.columns:
            var[name] = features[column].to_numpy()
    obs = pd.DataFrame(index=pd.Index(barcodes.to_numpy(), name=None))
    n_genes, n_cells, n_entries, n_header_lines, _ = _mtx_header(matrix_path)
    if (n_genes, n_cells) != (len(var), len(obs)):
        raise StoreError(
            f"{matrix_path}: the matrix is {n_genes} genes x {n_cells} cells but {features_path.name} lists "
            f"{len(var)} genes and {barcodes_path.name} {len(obs)} cells"
        )

    def blocks(block_rows: int):
        yield from _tenx_blocks(matrix_path, n_header_lines, n_genes, n_cells, n_entries, obs, block_rows, target)

    return _Source(blocks, var, True, str(folder))


def _tenx_blocks(matrix_path, n_header_lines, n_genes, n_cells, n_entries, obs, block_rows, target):
    """Cell blocks of a genes x cells Matrix Market file as cells x genes CSR, in bounded memory.

    Matrix Market entries may come in any order (10x writes them cell by cell, scipy.io.mmwrite gene by gene),
    so one pass parses the file MTX_ENTRIES_PER_READ entries at a time and appends each entry to a bucket file of
    its cell block, in a scratch folder next to the output `target` (16 bytes per non-zero, deleted afterwards, or by
    the next writer of `target` if this process is killed); then each bucket becomes one CSR block. Memory: one parse
    chunk, then one block.
    """
    n_blocks = -(-n_cells // block_rows)
    scratch = scratch_sibling(target, "buckets")
    scratch.mkdir()
    try:
        buckets = [scratch / f"block-{index}.bin" for index in range(n_blocks)]
        n_read = 0
        reader = pd.read_csv(
            matrix_path,
            sep=r"\s+",
            header=None,
            names=["gene", "cell", "value"],
            skiprows=n_header_lines,
            dtype={"gene": np.int64, "cell": np.int64, "value": np.float64},
            chunksize=MTX_ENTRIES_PER_READ,
        )
        for piece in reader:
            entries = np.empty(len(piece), dtype=_MTX_ENTRY)
            entries["cell"], entries["gene"], entries["value"] = piece["cell"], piece["gene"], piece["value"]
            for axis, size in (("gene", n_genes), ("cell", n_cells)):
                out_of_range = (entries[axis] < 1) | (entries[axis] > size)
                if out_of_range.any():
                    line = n_header_lines + n_read + int(np.argmax(out_of_range)) + 1
                    raise StoreError(f"{matrix_path}: line {line} has {axis} index outside [1, {size}]")
            n_read += len(entries)
            block_of_entry = (entries["cell"] - 1) // block_rows
            order = np.argsort(block_of_entry, kind="stable")
            block_ids, starts = np.unique(block_of_entry[order], return_index=True)
            for block_id, part in zip(block_ids.tolist(), np.split(entries[order], starts[1:])):
                with open(buckets[block_id], "ab") as bucket_file:
                    part.tofile(bucket_file)
        if n_read != n_entries:
            raise StoreError(f"{matrix_path}: the header announces {n_entries} entries but the file has {n_read}")
        for block_id, bucket in enumerate(buckets):
            start = block_id * block_rows
            stop = min(start + block_rows, n_cells)
            entries = np.fromfile(bucket, dtype=_MTX_ENTRY) if bucket.exists() else np.empty(0, dtype=_MTX_ENTRY)
            counts = sp.csr_matrix(
                (entries["value"], (entries["cell"] - 1 - start, entries["gene"] - 1)), shape=(stop - start, n_genes)
            )
            bucket.unlink(missing_ok=True)
            yield counts, obs.iloc[start:stop]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
