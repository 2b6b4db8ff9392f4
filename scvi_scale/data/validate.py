"""Count validation: values must be finite, non-negative and integer-valued (integers stored as floats are fine),
and within float32's range, the dtype counts are read and stored in (a float64 1e39 would become inf).

The check runs one row block at a time, so memory is bounded by the block, and reports the first offending value
in row order: the problem, the row range of the block, the row and cell name, the gene and the value.
`find_bad_count` is the single check; the writer calls it on every block it streams and `validate_counts` on
every block of an existing store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from scvi_scale.data.store import CountStore, CountValidationError

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_PROBLEM = f"at most {FLOAT32_MAX:.8g} (the largest float32, the dtype counts are read in)"


@dataclass(frozen=True)
class BadCount:
    """The first invalid value of a block, in row order; rows and columns are block-local."""

    row: int
    column: int
    value: float
    problem: str  # "finite", "non-negative", "integer-valued" or FLOAT32_PROBLEM: what the value fails to be
    n_bad: int  # how many values of the block are invalid


def find_bad_count(block: sp.spmatrix | np.ndarray) -> BadCount | None:
    """Return the first value of `block` (CSR or dense, any numeric dtype) that is not a valid count, else None."""
    if sp.issparse(block):
        block = sp.csr_matrix(block)
        values = block.data
    else:
        values = np.asarray(block)
    if values.dtype.kind in "bu":  # booleans and unsigned integers are always valid counts
        return None
    if values.dtype.kind not in "if":
        raise CountValidationError(f"counts must be numeric, got dtype {values.dtype}")
    if values.dtype.kind == "i":
        bad = values < 0
    else:
        # Written so that NaN counts as bad: NaN fails every comparison.
        bad = ~(np.isfinite(values) & (values >= 0) & (values == np.floor(values)))
        if values.dtype.itemsize > 4:  # wider than float32: a finite value may still not fit
            bad |= values > FLOAT32_MAX
    n_bad = int(np.count_nonzero(bad))
    if n_bad == 0:
        return None
    position = int(np.argmax(bad))
    if sp.issparse(block):
        # scipy is untyped here, so issparse does not narrow `block` to the CSR it is
        row = int(np.searchsorted(block.indptr, position, side="right") - 1)  # type: ignore[call-overload, union-attr]
        column = int(block.indices[position])  # type: ignore[union-attr]
    else:
        row, column = map(int, np.unravel_index(position, values.shape))
    value = values.flat[position]
    if not np.isfinite(value):
        problem = "finite"
    elif value < 0:
        problem = "non-negative"
    elif value > FLOAT32_MAX:
        problem = FLOAT32_PROBLEM
    else:
        problem = "integer-valued"
    return BadCount(int(row), int(column), float(value), problem, n_bad)


def count_error(bad: BadCount, start: int, stop: int, cell_name, gene_name, where: str) -> CountValidationError:
    """The error for `bad` found in the block of rows [start, stop); `where` names the store or source."""
    return CountValidationError(
        f"{where}: counts must be {bad.problem}, but row {start + bad.row} (cell {cell_name!r}) has value "
        f"{bad.value!r} at gene {gene_name!r}; first offending row range [{start}, {stop}), "
        f"{bad.n_bad} invalid value(s) in that range"
    )


def check_counts(block, start: int, cell_names, gene_names, where: str) -> None:
    """Raise CountValidationError if `block` (rows [start, start + len)) holds a value that is not a count.

    cell_names: the block's own obs names (length = rows of block); gene_names: all var names.
    """
    bad = find_bad_count(block)
    if bad is not None:
        raise count_error(bad, start, start + block.shape[0], cell_names[bad.row], gene_names[bad.column], where)


def checked_blocks(
    store: CountStore, block_rows: int | None = None
) -> Iterator[tuple[int, int, sp.csr_matrix | np.ndarray]]:
    """Yield (start, stop, block in the stored dtype) over the whole store, validating each block first."""
    bounds = store.block_bounds(block_rows)
    where = store.path if store.layer is None else f"{store.path} (layer {store.layer!r})"
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        block = store.read_raw(start, stop)
        bad = find_bad_count(block)
        if bad is not None:
            cell_name = store.obs_names[start + bad.row]
            raise count_error(bad, start, stop, cell_name, store.var_names[bad.column], where)
        yield start, stop, block


def validate_counts(store: CountStore | str, block_rows: int | None = None, layer: str | None = None) -> None:
    """Check every count of a store block by block (bounded memory); raise CountValidationError on the first bad one.

    store: a CountStore or a path (opened with `layer`). block_rows: rows read at once (default the store's
    chunk_rows). Layout problems (missing layer, obs length, duplicated var names, empty) raise StoreError on opening.
    """
    if not isinstance(store, CountStore):
        store = CountStore(store, layer=layer)
    for _ in checked_blocks(store, block_rows):
        pass
