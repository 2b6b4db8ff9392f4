"""Outputs of a trained model, computed in chunks and written back to Zarr in AnnData's layout.

    OutputsMixin     the SCVI methods (write_latent_representation, get_normalized_expression, ...): mixin.py
    read_output      a finished output as a lazy dask array (refuses incomplete ones): writer.py
    write_obsm       a small in-memory (n_obs, k) result as obsm/<key>: writer.py
    write_uns        a small value (e.g. a DataFrame) as uns/<key>: writer.py
"""

from scvi_scale.outputs.mixin import OutputsMixin, write_table
from scvi_scale.outputs.writer import (
    OutputError,
    OutputIncompleteError,
    output_store,
    read_output,
    write_obsm,
    write_uns,
)

__all__ = [
    "OutputError",
    "OutputIncompleteError",
    "OutputsMixin",
    "output_store",
    "read_output",
    "write_obsm",
    "write_table",
    "write_uns",
]
