"""The parameter descriptions `SCVI`'s methods share, written once, and `fill`, which puts them into a method's
numpydoc docstring where a line holds only `{name}`.

    >>> @fill
    ... def get_elbo(self, adata=None, indices=None, return_mean: bool = True):
    ...     '''The ELBO.
    ...
    ...     Parameters
    ...     ----------
    ...     {adata}
    ...     {indices}
    ...     return_mean
    ...         Return the mean over cells.
    ...     '''

help(SCVI.get_elbo) and inspect.getdoc then show the whole entry ("adata" and its description). Lines indented
below a placeholder continue its description with what holds for that method alone.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

FunctionT = TypeVar("FunctionT", bound=Callable)
DESCRIPTION_WIDTH = 108  # a description's columns, help()'s and the source's 120 less the indent
PLACEHOLDER = re.compile(r"^(?P<indent>[ ]*)\{(?P<name>\w+)\}[ ]*$", re.MULTILINE)

OUTPUT_OPTIONS = """\
scvi-tools' data-loader arguments (accepted and ignored with a warning; any other unknown name is a TypeError)
and our output options:
output_store: where store outputs go, None for the input store or the path of a separate AnnData store;
overwrite: replace an existing output of that key (otherwise refused); client: a dask.distributed Client, over
whose workers the chunks fan out (each loads the model once); model_dir: where the workers load the model from
(default: it is saved to a temporary folder); seed: seeds every random draw, keyed by cell (same seed, same
values); chunk_rows: cells per chunk and per written row chunk (default: the store's chunk_rows)."""

PARAMETERS = {  # name -> (the name line of its numpydoc entry, its description)
    "adata": ("adata", "An AnnData or a store with the model's genes (None: the model's own data)."),
    "indices": ("indices", "Cell positions or a boolean mask (None: all cells); results come in their order."),
    "batch_size": ("batch_size", "Cells per forward pass (None: the default)."),
    "dataloader": ("dataloader", "scvi-tools' own data loader: refused (it would change what is computed)."),
    "datamodule": ("datamodule", "scvi-tools' datamodule: refused (the cells come from the model's data)."),
    "data_loader_kwargs": ("data_loader_kwargs", "scvi-tools' data-loader arguments: ignored with a warning."),
    "loader_kwargs": ("**kwargs", "scvi-tools' data-loader arguments: ignored with a warning."),
    "output_kwargs": ("**kwargs", OUTPUT_OPTIONS),
    "write_to": (
        "write_to",
        "A key to write the output to: into the store, chunk by chunk and resumable, or into the AnnData's obsm / "
        "layers; None returns it, as scvi-tools.",
    ),
    "return_mean": ("return_mean", "Return the mean over cells (False: one value per cell)."),
    "silent": ("silent", "No progress bar."),
    "transform_batch": (
        "transform_batch",
        "None (each cell's own batch), a category, or a list of them (averaged, one draw per batch).",
    ),
    "gene_list": ("gene_list", "The genes (None: all)."),
    "n_samples": ("n_samples", "Posterior draws per cell."),
    "accelerator": ("accelerator", 'Where the module goes: "auto", "cpu", "gpu" or "cuda".'),
    "device": ("device", '"auto" or a device index.'),
    "layer": ("layer", "The layer of raw counts (None: X)."),
    "obs_keys": (
        "batch_key, labels_key, size_factor_key, categorical_covariate_keys, continuous_covariate_keys",
        "The obs columns registered (None: none).",
    ),
}


def entry(name: str, indent: str) -> str:
    """The numpydoc entry of shared parameter `name`, at `indent` (its description 4 spaces deeper, rewrapped to
    DESCRIPTION_WIDTH columns)."""
    heading, description = PARAMETERS[name]
    lines = textwrap.wrap(" ".join(description.split()), DESCRIPTION_WIDTH)
    return "\n".join([indent + heading] + [f"{indent}    {line}" for line in lines])


def fill(function: FunctionT) -> FunctionT:
    """`function` with each `{name}` line of its docstring replaced by the shared entry of that name (KeyError,
    naming the function, for a name without one). The function itself, its signature included, is unchanged."""

    def replace(match: re.Match) -> str:
        if match["name"] not in PARAMETERS:
            raise KeyError(f"{function.__qualname__}'s docstring names {{{match['name']}}}, which docs.py lacks")
        return entry(match["name"], match["indent"])

    function.__doc__ = PLACEHOLDER.sub(replace, function.__doc__ or "")
    return function
