"""Outputs of a trained model, computed in chunks and written back to Zarr in AnnData's layout.

    jobs.py          what one chunk of cells computes for each output (latent, expression, samples, ...)
    runner.py        how chunks run (in-process threads or dask workers) and come back or get written
    differential.py  differential expression over a store; de.py its statistics; noise.py draws keyed by cell
    labels.py        k-NN label transfer from a reference to a query (scArches)
    writer.py        resumable dense/CSR outputs, uns entries, obs columns, result tables; read_output
    arguments.py     scvi-tools' output arguments as batch codes, gene positions, cell masks

The public methods are `scvi_scale.SCVI`'s; these are the functions they call, and what readers of the outputs use:
"""

from scvi_scale.outputs.writer import (
    OutputError,
    OutputIncompleteError,
    describe_outputs,
    output_store,
    read_output,
    write_obs_column,
    write_obsm,
    write_table,
    write_uns,
)

__all__ = [
    "OutputError",
    "OutputIncompleteError",
    "describe_outputs",
    "output_store",
    "read_output",
    "write_obs_column",
    "write_obsm",
    "write_table",
    "write_uns",
]
