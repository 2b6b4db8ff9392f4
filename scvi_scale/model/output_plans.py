"""One OutputPlan per output method of `SCVI`: its own arguments checked (before any work) and turned into what to
compute (a job, or a computation of several passes from analyses.py), where it goes (the written entries, when
write_to names a key) and how the result is shaped as scvi-tools returns it. plans.execute runs them; the methods'
docstrings (scvi.py, latent.py, expression.py) say what each argument means.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd

from scvi_scale.data.anndata_source import AnnDataSource
from scvi_scale.model import analyses
from scvi_scale.model.plans import OutputPlan, as_gcxs, pick
from scvi_scale.outputs import arguments, differential, jobs, writer
from scvi_scale.outputs.importance import ImportanceOptions
from scvi_scale.outputs.runner import OutputSpec


def latent(model, give_mean: bool, mc_samples: int, return_dist: bool, write_to: str | None) -> OutputPlan:
    """get_latent_representation: obsm/<write_to> (and <write_to>_var with return_dist), (n, n_latent) each."""
    n_latent = model.module.n_latent
    written = None if write_to is None else {"latent": OutputSpec("obsm", write_to, "dense", n_latent)}
    if written and return_dist:
        written["variance"] = OutputSpec("obsm", f"{write_to}_var", "dense", n_latent)
    return OutputPlan(
        "latent",
        jobs.LatentJob(give_mean=give_mean, mc_samples=mc_samples, return_dist=return_dist),
        written=written,
        record={
            "method": "get_latent_representation",
            "give_mean": give_mean,
            "mc_samples": mc_samples,
            "return_dist": return_dist,
        },
        shape=pick("latent", "variance") if return_dist else pick("latent"),
    )


def library_size(model, give_mean: bool, write_to: str | None) -> OutputPlan:
    """get_latent_library_size: obsm/<write_to>, (n, 1)."""
    if give_mean and model.module.use_observed_lib_size:
        raise RuntimeError(
            "The module for this model does not compute the posterior distribution for the library size. Set "
            "`give_mean` to False to use the observed library size instead."
        )
    return OutputPlan(
        "library size",
        jobs.LibraryJob(give_mean=give_mean),
        shape=pick("library"),
        written=None if write_to is None else {"library": OutputSpec("obsm", write_to, "dense", 1)},
        record={"method": "get_latent_library_size", "give_mean": give_mean},
    )


def normalized_expression(
    model,
    transform_batch,
    gene_list,
    library_size,
    n_samples: int,
    n_samples_overall: int | None,
    weights: str | None,
    return_mean: bool,
    return_numpy: bool | None,
    write_to: str | None,
    dtype: str,
    importance: ImportanceOptions,
) -> OutputPlan:
    """get_normalized_expression: per cell (layers/<write_to>, or obsm/<write_to> for a gene_list), or draws
    pooled over the cells (n_samples_overall)."""
    transform = arguments.batch_codes(model.registry.batch_categories, transform_batch)
    genes = arguments.gene_positions(model.var_names, gene_list)
    if not (library_size == "latent" or (isinstance(library_size, (int, float)) and library_size > 0)):
        raise ValueError(f"library_size={library_size!r}: expected a positive number or 'latent'")
    if weights not in (None, "uniform", "importance"):
        raise ValueError(f"weights={weights!r}: expected None, 'uniform' or 'importance'")
    if n_samples_overall is not None:
        if write_to is not None:
            raise writer.OutputError("n_samples_overall draws are not per cell, so they cannot be written")
        return OutputPlan(
            "samples overall",
            compute=partial(
                analyses.samples_overall,
                n_samples_overall=n_samples_overall,
                transform=transform,
                genes=genes,
                library_size=library_size,
                weights=weights,
                importance=importance,
            ),
            shape=lambda draws, *_: draws,
        )
    if weights == "importance":
        raise ValueError("weights='importance' weighs draws pooled over cells: pass n_samples_overall")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'float16'")
    if write_to is not None and n_samples > 1 and not return_mean:
        raise writer.OutputError("a layer holds one value per cell and gene: use return_mean=True to write")
    columns = model.var_names if genes is None else model.var_names[list(genes)]

    def shape(values, inputs, request):
        expression = values["expression"]
        if write_to is not None:
            return expression
        expression = expression.astype(dtype, copy=False)
        if n_samples > 1 and not return_mean:
            return np.moveaxis(expression, 1, 0)
        if return_numpy:
            return expression
        names = inputs.store.obs_names if request.indices is None else inputs.store.obs_names[request.indices]
        return pd.DataFrame(expression, index=names, columns=columns)

    return OutputPlan(
        "normalized expression",
        jobs.ExpressionJob(
            transform_batches=transform,
            genes=genes,
            n_samples=n_samples,
            library_size=library_size,
            return_mean=return_mean,
        ),
        written=None
        if write_to is None
        else {"expression": OutputSpec("layers" if genes is None else "obsm", write_to, "dense", len(columns), dtype)},
        record={
            "method": "get_normalized_expression",
            "transform_batch": _batch_record(transform),
            "library_size": library_size,
            "n_samples": n_samples,
            "genes": None if genes is None else list(columns),
        },
        shape=shape,
    )


def likelihood_parameters(model, n_samples: int, give_mean: bool, write_to: str | None) -> OutputPlan:
    """get_likelihood_parameters: layers/<write_to>_mean, _dispersions (NB, ZINB), _dropout (ZINB)."""
    likelihood = model.module.gene_likelihood
    names = ["mean", *["dispersions"] * (likelihood != "poisson"), *["dropout"] * (likelihood == "zinb")]
    each_draw = n_samples > 1 and not give_mean
    if write_to is not None and each_draw:
        raise writer.OutputError("a layer holds one value per cell and gene: use give_mean=True to write")
    return OutputPlan(
        "likelihood parameters",
        jobs.LikelihoodJob(n_samples=n_samples, give_mean=give_mean),
        written=None
        if write_to is None
        else {name: OutputSpec("layers", f"{write_to}_{name}", "dense", model.store.n_vars) for name in names},
        record={"method": "get_likelihood_parameters", "n_samples": n_samples, "give_mean": give_mean},
        shape=lambda values, *_: (
            {name: np.moveaxis(value, 1, 0) for name, value in values.items()}
            if write_to is None and each_draw
            else values
        ),
    )


def posterior_predictive(model, transform_batch, n_samples: int, gene_list, write_to: str | None) -> OutputPlan:
    """posterior_predictive_sample: CSR layers/<write_to> (or <write_to>_0 ... for several draws)."""
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r}: the draws per cell, at least 1")
    transform = arguments.batch_codes(model.registry.batch_categories, transform_batch)
    genes = arguments.gene_positions(model.var_names, gene_list)
    if model.module.gene_likelihood == "normal":
        raise NotImplementedError(
            "posterior predictive samples are drawn for count likelihoods (zinb, nb, poisson); this model's is 'normal'"
        )
    if write_to is not None and genes is not None:
        raise writer.OutputError("a layer holds every gene: write without gene_list (select genes when reading)")
    names = [f"sample_{draw}" for draw in range(n_samples)]
    keys = [f"{write_to}"] if n_samples == 1 else [f"{write_to}_{draw}" for draw in range(n_samples)]

    def shape(values, inputs, request):
        if write_to is not None and not isinstance(inputs.store, AnnDataSource):
            return values[names[0]] if n_samples == 1 else [values[name] for name in names]
        return as_gcxs([values[name] for name in names])

    return OutputPlan(
        "posterior predictive",
        jobs.PosteriorPredictiveJob(transform_batches=transform, genes=genes, n_samples=n_samples),
        written=None
        if write_to is None
        else {name: OutputSpec("layers", key, "csr", model.store.n_vars) for name, key in zip(names, keys)},
        record={
            "method": "posterior_predictive_sample",
            "transform_batch": _batch_record(transform),
            "n_samples": n_samples,
        },
        shape=shape,
    )


def feature_correlation(
    model, n_samples: int, rna_size_factor: int, transform_batch, correlation_type: str
) -> OutputPlan:
    """get_feature_correlation_matrix: a genes x genes DataFrame."""
    if correlation_type not in ("spearman", "pearson"):
        raise ValueError("Unknown correlation type. Choose one of 'spearman', 'pearson'.")
    transform = arguments.batch_codes(model.registry.batch_categories, transform_batch)
    return OutputPlan(
        "denoised samples",
        compute=partial(
            analyses.feature_correlation,
            transform=transform,
            n_samples=n_samples,
            rna_size_factor=rna_size_factor,
            correlation_type=correlation_type,
        ),
        shape=lambda matrix, *_: pd.DataFrame(matrix, index=model.var_names, columns=model.var_names),
    )


def differential_expression(
    model, comparison: dict, options: differential.DEOptions, write_to: str | None, table_path
) -> OutputPlan:
    """differential_expression: the table, also as uns/<write_to> and the file table_path."""
    return OutputPlan(
        "differential expression",
        compute=partial(
            analyses.differential_expression,
            comparison=comparison,
            options=options,
            write_to=write_to,
            batch_categories=list(model.registry.batch_categories),
            var_names=model.var_names,
            table_path=table_path,
        ),
        shape=lambda table, *_: table,
    )


def minified(model, qzm_key: str, qzv_key: str) -> OutputPlan:
    """minify_adata's posterior: obsm/<qzm_key> and obsm/<qzv_key>, (n, n_latent) each."""
    n_latent = model.module.n_latent
    return OutputPlan(
        "latent posterior",
        jobs.LatentJob(return_dist=True),
        written={
            "latent": OutputSpec("obsm", qzm_key, "dense", n_latent),
            "variance": OutputSpec("obsm", qzv_key, "dense", n_latent),
        },
        record={"method": "minify_adata", "give_mean": True, "return_dist": True},
    )


def _batch_record(transform: tuple) -> list:
    """The transform batches as recorded with a written output (each cell's own batch as None)."""
    return [None if batch == jobs.OWN_BATCH else batch for batch in transform]
