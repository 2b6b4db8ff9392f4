"""One output call of `SCVI`, as data: what to compute, where it goes and how to shape it (`OutputPlan`), for the
arguments every output method shares (`OutputCall`), run by one executor (`execute`).

    >>> call = OutputCall("get_latent_representation", adata, indices, batch_size, options=kwargs)
    >>> plan = OutputPlan("latent", jobs.LatentJob(), written=None, shape=pick("latent"))
    >>> execute(model, call, plan)

`execute` is the walk each output method shares, done once: the model's inputs over the call's data (checked once,
at the data boundary), the OutputRequest (our options from **kwargs, scvi-tools' data-loader arguments explained
and ignored, a misspelt name refused), the run (in memory; chunk by chunk into a store; or into an AnnData's obsm /
layers), then the method's own shape of the result. The evaluation methods (get_elbo and the like) stream
minibatches instead: `per_cell`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

import numpy as np
import torch

from scvi_scale.data.anndata_source import AnnDataSource
from scvi_scale.model import compat, sources
from scvi_scale.module import Minibatch, to_tensors
from scvi_scale.outputs import writer
from scvi_scale.outputs.runner import ModelInputs, OutputRequest, OutputSpec, run
from scvi_scale.sampler import SequentialSampler

EVALUATION_BATCH_SIZE = 1024  # cells per forward pass of get_elbo and the like, unless batch_size says


@dataclass(frozen=True)
class OutputCall:
    """The arguments every output method shares, as it was called.

    method: the public method (named in errors and warnings); adata: the data (None: the model's own); indices:
    cell positions (None: all), results in their order; batch_size: cells per forward pass (None: the default);
    silent: no progress bar; options: the method's **kwargs: our output options (OutputRequest.OPTIONS) and
    scvi-tools' data-loader arguments (explained and ignored); any other name is a TypeError. dataloader:
    scvi-tools' own data loader, refused when the call is made (it would change what is computed).
    """

    method: str
    adata: object = None
    indices: object = None
    batch_size: int | None = None
    silent: bool = True
    options: dict = field(default_factory=dict)
    dataloader: InitVar[object] = None

    def __post_init__(self, dataloader) -> None:
        compat.refuse(self.method, dataloader=dataloader)

    def request(self, inputs: ModelInputs) -> OutputRequest:
        """The OutputRequest of this call over `inputs`."""
        options = compat.split_known(
            self.options, OutputRequest.OPTIONS, self.method, compat.DATA_LOADER_ARGUMENTS, compat.IGNORED_LOADER
        )
        if isinstance(inputs.store, AnnDataSource) and options.get("client") is not None:
            raise ValueError(
                f"{self.method}: a model over an in-memory AnnData runs here; dask workers need a store "
                "(scvi_scale.data.write_store(adata, 'cells.zarr'))"
            )
        return OutputRequest.of_call(
            indices=sources.cell_positions(self.indices, inputs.store.n_obs),
            batch_size=self.batch_size,
            silent=self.silent,
            **options,
        )


def _values(values: dict, inputs: ModelInputs, request: OutputRequest) -> dict:
    return values


@dataclass(frozen=True)
class OutputPlan:
    """What one output call computes, where it goes and how it is returned.

    description: what the progress bar names; job: what is computed per cell (an outputs.jobs job), or instead
    compute(inputs, request) -> values, for an output made of more than one pass; written: {result name:
    OutputSpec} when the results are written (into the store, or into the AnnData), None to return them;
    record: the call's arguments, recorded with written outputs (a resumed write must match them);
    shape(values, inputs, request): the method's return value from {result name: values}.
    """

    description: str
    job: object = None
    compute: Callable[[ModelInputs, OutputRequest], Any] | None = None  # values of the plan's own shape
    written: dict[str, OutputSpec] | None = None
    record: dict | None = None
    shape: Callable[[dict, ModelInputs, OutputRequest], object] = _values


def execute(model, call: OutputCall, plan: OutputPlan):
    """Run `plan` for `call` on `model` (an SCVI): the shared walk of every output method."""
    inputs = model._inputs(call.adata)
    request = call.request(inputs)
    if plan.compute is not None:
        return plan.shape(plan.compute(inputs, request), inputs, request)
    return plan.shape(deliver(inputs, plan, request), inputs, request)


def deliver(inputs: ModelInputs, plan: OutputPlan, request: OutputRequest) -> dict:
    """Run the plan's job: into the store when written to a store, into the AnnData's obsm / layers when the data
    is an AnnData, else in memory. Returns {name: values} (lazy arrays for a store)."""
    if plan.written is None or not isinstance(inputs.store, AnnDataSource):
        return run(inputs, plan.job, request, plan.written, plan.record, plan.description)
    if request.output_store is not None:
        raise ValueError("output_store= writes a Zarr store's outputs; for an AnnData the outputs go into it")
    values = run(inputs, plan.job, request.replace(indices=None), None, None, plan.description)
    adata = inputs.store.adata
    for name, spec in plan.written.items():
        entries = adata.obsm if spec.group == "obsm" else adata.layers
        if spec.key in entries and not request.overwrite:
            raise writer.OutputError(f"{spec.group}[{spec.key!r}] exists in the AnnData; pass overwrite=True")
        entries[spec.key] = values[name]
    return values


def pick(*names: str) -> Callable[[dict, ModelInputs, OutputRequest], object]:
    """The shape that returns values[name], or a tuple of them for several names."""
    if len(names) == 1:
        return lambda values, inputs, request: values[names[0]]
    return lambda values, inputs, request: tuple(values[name] for name in names)


def as_gcxs(samples: list):
    """Posterior predictive draws (CSR (n, G) each) as scvi-tools returns them: a sparse.GCXS (n, G) for one draw,
    (n, G, S) for several."""
    import sparse

    if len(samples) == 1:
        return sparse.GCXS.from_scipy_sparse(samples[0])
    stacked = sparse.stack([sparse.COO.from_scipy_sparse(draw) for draw in samples], axis=-1)
    return sparse.GCXS(stacked)


@torch.no_grad()
def per_cell(model, call: OutputCall, compute: Callable[[Minibatch], torch.Tensor]) -> np.ndarray:
    """Stack `compute(tensors)` (a (B, ...) tensor per minibatch) over the call's cells, in store order: the walk
    of get_elbo and the like, which read the counts minibatch by minibatch. Their **kwargs are data-loader
    arguments only, all explained and ignored."""
    compat.explain_ignored(call.method, call.options, compat.IGNORED_LOADER)
    if model.minified_data_type is not None:
        raise ValueError(f"{call.method} reads the counts, which a minified model does not hold")
    model.module.eval()
    source = model._source(call.adata)
    rows = sources.cell_positions(call.indices, source.n_obs)
    stream = SequentialSampler(
        source,
        None if rows is None else np.unique(rows),
        batch_size=call.batch_size or EVALUATION_BATCH_SIZE,
        obs_arrays=model._encoded(source),
    )
    parts = [compute(to_tensors(minibatch, model.device)).cpu().numpy() for minibatch in stream]
    return np.concatenate(parts, axis=0)
