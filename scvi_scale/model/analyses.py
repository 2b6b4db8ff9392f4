"""The outputs of `SCVI` that are more than one job over the cells: draws pooled over cells, gene correlations,
differential expression and abundance, the aggregated posterior, minified models' arrays and the report. Each
takes what the method's plan (output_plans.py) decided; SCVI's methods (scvi.py, latent.py, expression.py) document
the arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from scvi_scale.data import CountStore
from scvi_scale.data.anndata_source import AnnDataSource
from scvi_scale.model import sources
from scvi_scale.outputs import differential, jobs, writer
from scvi_scale.outputs.importance import ImportanceOptions, importance_sample
from scvi_scale.outputs.runner import ModelInputs, OutputRequest, posterior_scales, run

OBSERVED_LIBRARY_KEY = "observed_lib_size"  # scvi-tools' obs column of a minified AnnData


def samples_overall(
    inputs: ModelInputs,
    request: OutputRequest,
    n_samples_overall: int,
    transform: Sequence[int],
    genes,
    library_size,
    weights: str | None,
    importance: ImportanceOptions,
) -> np.ndarray:
    """(n_samples_overall, G') draws over the request's cells, averaged over the transform batches: cells
    picked uniformly with replacement (scvi-tools draws n_samples_overall // n_cells + 1 per cell and keeps
    n_samples_overall of them at random: the same distribution), or by importance weight."""
    rows = np.arange(inputs.store.n_obs) if request.indices is None else request.indices
    rng = np.random.default_rng(request.seed)
    if weights == "importance":
        if len(transform) > 1:
            raise NotImplementedError(
                "Importance weights cannot be computed when expression levels are averaged across batches."
            )
        picked, numbers = importance_sample(inputs, request, rows, n_samples_overall, transform[0], importance, rng, 0)
        return posterior_scales(
            inputs,
            request,
            picked,
            np.full(len(picked), transform[0]),
            genes=genes,
            library_size=library_size,
            numbers=numbers,
        )
    picked = rng.choice(rows, size=n_samples_overall, replace=True)
    scales = posterior_scales(
        inputs,
        request,
        np.tile(picked, len(transform)),
        np.repeat(transform, len(picked)),
        genes=genes,
        library_size=library_size,
    )
    return scales.reshape(len(transform), n_samples_overall, -1).mean(0)


def feature_correlation(
    inputs: ModelInputs,
    request: OutputRequest,
    transform: Sequence[int],
    n_samples: int,
    rna_size_factor: int,
    correlation_type: str,
) -> np.ndarray:
    """Gene-gene correlation (G, G) of the denoised samples, per transform batch, averaged over the batches."""
    from scipy.stats import spearmanr

    matrices = []
    for batch in transform:
        job = jobs.DenoisedJob(n_samples=n_samples, rna_size_factor=rna_size_factor, transform_batch=batch)
        denoised = run(inputs, job, request, description="denoised samples")["denoised"]  # (n, S, G)
        flattened = np.transpose(denoised, (1, 0, 2)).reshape(-1, denoised.shape[-1])  # draw after draw
        matrices.append(
            np.corrcoef(flattened, rowvar=False) if correlation_type == "pearson" else spearmanr(flattened)[0]
        )
    return np.mean(matrices, axis=0)


def differential_expression(
    inputs: ModelInputs,
    request: OutputRequest,
    comparison: dict,
    options: differential.DEOptions,
    batch_categories: list,
    var_names: pd.Index,
    write_to: str | None,
    table_path,
) -> pd.DataFrame:
    """The DE table of the groups `comparison` names (groupby, group1, group2, idx1, idx2), also written as uns/<
    write_to> of each store (or of the AnnData) and as the file table_path, both refused before the work when
    they exist (unless request.overwrite)."""
    in_anndata = isinstance(inputs.store, AnnDataSource)
    targets = []
    if write_to is not None and not in_anndata:
        targets = [writer.output_store(path, request.output_store) for path in sources.data_paths(inputs.store)]
        for target in targets:
            writer.check_uns_key(target, write_to, request.overwrite)  # before the work, not after
    if table_path is not None:
        writer.check_table_path(table_path, request.overwrite)
    comparisons = differential.compare_groups(inputs.store, **comparison)
    result = differential.differential_expression(inputs, request, comparisons, options, batch_categories, var_names)
    for target in targets:  # a collection's table goes into each of its stores
        assert write_to is not None, "targets only when written to"
        writer.write_uns(target, write_to, result, overwrite=request.overwrite)
    if write_to is not None and isinstance(inputs.store, AnnDataSource):
        inputs.store.adata.uns[write_to] = result
    if table_path is not None:
        writer.write_table(result, table_path, overwrite=request.overwrite)
    return result


def differential_abundance(
    model, adata, adata_sub, sample_key: str, batch_size: int, num_cells_posterior, dof, seed: int
) -> pd.DataFrame:
    """Log density of every cell of adata_sub under each sample's aggregated posterior: cells x samples."""
    full = model._source(adata)
    sub = full if adata_sub is None else model._source(adata_sub)
    latent_sub = torch.as_tensor(
        model.get_latent_representation(adata_sub if adata_sub is not None else adata, batch_size=batch_size),
        device=model.device,
    )
    samples = full.obs_column(sample_key)
    sub_samples = sub.obs_column(sample_key)
    rng = np.random.default_rng(seed)
    names = list(pd.unique(sub_samples))
    log_probs = np.empty((sub.n_obs, len(names)), dtype=np.float32)
    for column, name in enumerate(names):
        rows = np.flatnonzero((samples == name).to_numpy())
        if num_cells_posterior is not None and num_cells_posterior < len(rows):
            rows = np.sort(rng.choice(rows, num_cells_posterior, replace=False))
        posterior = model.get_aggregated_posterior(adata, rows, batch_size=batch_size, dof=dof)
        with torch.no_grad():
            log_probs[:, column] = (
                torch.cat([posterior.log_prob(block) for block in latent_sub.split(batch_size)]).cpu().numpy()
            )
    frame = pd.DataFrame(log_probs, index=sub.obs_names, columns=names)
    if isinstance(sub, AnnDataSource):
        sub.adata.obsm["da_log_probs"] = frame
    return frame


def aggregated_posterior(
    loc: np.ndarray | torch.Tensor, variance: np.ndarray, dof: float | None, device: torch.device
) -> torch.distributions.Distribution:
    """An equal-weight mixture of the cells' q(z | x) (Student's t with `dof` degrees of freedom, or Normal)."""
    loc = torch.as_tensor(loc, device=device)
    scale = torch.as_tensor(variance, device=device).sqrt()
    components = (
        torch.distributions.Normal(loc, scale) if dof is None else torch.distributions.StudentT(dof, loc, scale)
    )
    return torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.ones(loc.shape[0], device=device)),
        torch.distributions.Independent(components, 1),
    )


def write_observed_library(store: CountStore, minified_data_type: str) -> None:
    """Every cell's observed library size as obs["observed_lib_size"] (into each store, or the AnnData, which
    also gets scvi-tools' uns["_scvi_adata_minify_type"])."""
    bounds = store.block_bounds()
    library = np.concatenate(
        [
            np.asarray(store.read_raw(start, stop).sum(axis=1), dtype=np.float32).ravel()
            for start, stop in zip(bounds[:-1], bounds[1:])
        ]
    )
    if isinstance(store, AnnDataSource):
        store.adata.obs[OBSERVED_LIBRARY_KEY] = library
        store.adata.uns["_scvi_adata_minify_type"] = minified_data_type
        return
    offsets = getattr(store, "offsets", [0, store.n_obs])
    for path, first, last in zip(sources.data_paths(store), offsets[:-1], offsets[1:]):
        writer.write_obs_column(path, OBSERVED_LIBRARY_KEY, pd.Series(library[first:last]), overwrite=True)


def cached_posterior(source: CountStore, qzm_key: str, qzv_key: str) -> dict[str, np.ndarray]:
    """The minified per-cell arrays of `source`: qzm, qzv (n, L) and observed_lib_size (n,)."""
    if isinstance(source, AnnDataSource):
        qzm, qzv = source.adata.obsm[qzm_key], source.adata.obsm[qzv_key]
    else:
        paths = sources.data_paths(source)
        qzm = np.concatenate([np.asarray(writer.read_output(path, f"obsm/{qzm_key}")) for path in paths])
        qzv = np.concatenate([np.asarray(writer.read_output(path, f"obsm/{qzv_key}")) for path in paths])
    library = source.obs_column(OBSERVED_LIBRARY_KEY).to_numpy()
    return {
        "qzm": np.asarray(qzm, dtype=np.float32),
        "qzv": np.asarray(qzv, dtype=np.float32),
        "observed_lib_size": np.asarray(library, dtype=np.float32),
    }


def report(model, out_dir, adata, labels_key: str | None, max_cells: int, seed: int, overwrite: bool) -> dict:
    """SCVI.report's work: a seeded subsample's counts, obs and latent, handed to report.build_report."""
    from scvi_scale.report import build_report, check_report_dir, log_normalize, require_extra, subsample_rows

    require_extra()  # before the work
    check_report_dir(out_dir, overwrite)
    source = model._source(adata)
    labels_key = labels_key or model.registry.labels_key
    rows = subsample_rows(source.n_obs, max_cells, seed)
    counts = _rows_of(source, rows)
    obs = pd.DataFrame({"library_size": np.asarray(counts.sum(axis=1)).ravel()})
    for key in {model.registry.batch_key, labels_key} - {None}:
        obs[key] = source.obs_column(key).to_numpy()[rows]
    outputs = (
        []
        if isinstance(source, AnnDataSource)
        else [output for path in sources.data_paths(source) for output in writer.describe_outputs(path)]
    )
    return build_report(
        out_dir,
        latent=model.get_latent_representation(adata, indices=rows, seed=seed),
        obs=obs,
        batch_key=model.registry.batch_key,
        labels_key=labels_key,
        history=model.history_,
        run={**model.run_info, "cells_in_data": source.n_obs},
        outputs=outputs,
        counts_for_baseline=log_normalize(counts),
        max_cells=len(rows),
        seed=seed,
        overwrite=overwrite,
    )


def _rows_of(source: CountStore, rows: np.ndarray):
    """CSR counts (len(rows), G) of the sorted `rows`, reading only the blocks that hold them."""
    import scipy.sparse as sp

    bounds = source.block_bounds()
    parts = []
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        inside = rows[(rows >= start) & (rows < stop)]
        if len(inside):
            parts.append(source.read_csr(start, stop)[inside - start])
    return sp.vstack(parts, format="csr")
