"""`OutputsMixin`: scvi-tools' output methods for SCVI over Zarr stores, computed in chunks and written back.

    >>> model.write_latent_representation()                        # obsm/X_scvi in the store
    >>> model.get_normalized_expression(write_to="scvi_normalized")  # layers/scvi_normalized, dense float32
    >>> model.get_normalized_expression(indices=range(100))          # in memory: a DataFrame, as scvi-tools
    >>> model.differential_expression(groupby="cell_type", write_to="de_cell_type", table_path="de.parquet")
    >>> model.posterior_predictive_sample(write_to="scvi_samples")   # layers/scvi_samples, CSR counts
    >>> model.get_normalized_expression(write_to="norm", client=Client(), output_store="outputs.zarr")

Names, arguments and defaults are scvi-tools' (RNASeqMixin, DifferentialComputation); each method adds:
    write_to      key of the output (None: compute in memory and return it, as scvi-tools)
    output_store  where outputs go: None for the input store, or the path of a separate AnnData store
    overwrite     replace an existing output of that key (otherwise refused)
    client        a dask.distributed Client: chunks fan out over its workers (each loads the model once)
    model_dir     where the workers load the model from (default: the model is saved to a temporary folder)
    seed          seeds every random draw, chunk by chunk (see chunks.py): same seed, same values
    chunk_rows    cells per chunk and per written row chunk (default: the store's chunk_rows, the sampler's block)
Written outputs come back as lazy dask arrays over the Zarr (writer.read_output); a write that stopped half way
resumes where it stopped when called again with the same arguments (writer.py).

The mixin uses these attributes of the model: module (the VAE), store (CountStore), registry, obs_arrays (the
per-cell encoded obs fields the sampler hands out), device, var_names, save(dir) and the class method load(dir,
store) (dask workers only). It reads cells with sampler.SequentialSampler over the store, in store order.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.outputs import de, writer
from scvi_scale.outputs.chunks import (
    ExpressionJob,
    LatentJob,
    LibraryJob,
    LikelihoodJob,
    ModelReference,
    PosteriorPredictiveJob,
    RawStatsJob,
    ScaleSampleJob,
    Unit,
    cut_units,
    model_digest,
    run_units,
)
from scvi_scale.outputs.noise import NOISE_VERSION
from scvi_scale.outputs.writer import CsrOutput, DenseOutput, OutputError, read_output, write_uns

logger = logging.getLogger("scvi_scale.outputs")

DEFAULT_BATCH_SIZE = 1024  # cells per forward pass (scvi-tools' 128: 1.3-1.6x slower on 2 cores, 200k cells)
DE_SAMPLE_BYTES = 512 << 20  # posterior samples of px_scale held at once by differential_expression


class OutputsMixin:
    """Chunked outputs of a trained SCVI; see the module docstring for the arguments every method shares."""

    # --- argument handling ---------------------------------------------------------------------------------------

    def _batch_codes(self, transform_batch) -> tuple:
        """scvi-tools' _get_batch_code_from_category: batch categories (or None, the observed batch) -> codes."""
        values = [transform_batch] if transform_batch is None or isinstance(transform_batch, str) else transform_batch
        values = list(values) if isinstance(values, Iterable) else [values]
        categories = list(self.registry.batch_categories)
        codes = []
        for value in values:
            if value is not None and value not in categories:
                raise ValueError(f'"{value}" not a valid batch category; the batches are {categories[:20]}')
            codes.append(None if value is None else categories.index(value))
        return tuple(codes)

    def _gene_indices(self, gene_list) -> tuple | None:
        """Positions (in var order) of the genes of gene_list; None for all genes."""
        if gene_list is None:
            return None
        gene_list = [gene_list] if isinstance(gene_list, str) else list(gene_list)
        known = pd.Index(self.var_names)
        unknown = [gene for gene in gene_list if gene not in known]
        if unknown:
            raise ValueError(f"gene_list holds {len(unknown)} gene(s) not in the model: {unknown[:10]}")
        return tuple(np.flatnonzero(known.isin(gene_list)).tolist())

    def _chunk_rows(self, chunk_rows: int | None) -> int:
        chunk_rows = int(chunk_rows or self.store.chunk_rows)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows}: must be positive")
        return chunk_rows

    @contextlib.contextmanager
    def _worker_reference(self, client, model_dir):
        """The ModelReference dask workers load the model from (None without a client); saves the model to a
        temporary folder, deleted afterwards, when no model_dir is given."""
        if client is None:
            yield None
            return
        digest = model_digest(self.module)
        if model_dir is not None:
            yield ModelReference(type(self), str(Path(model_dir).resolve()), self.store.path, digest)
            return
        folder = tempfile.mkdtemp(prefix="scvi-scale-model-")
        try:
            self.save(folder, overwrite=True)
            yield ModelReference(type(self), folder, self.store.path, digest)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # --- the two ways to run a job: in memory, or written to the store -------------------------------------------

    def _in_memory(self, job, *, indices, batch_size, seed, chunk_rows, client, model_dir, silent, description):
        """Run `job` over the cells of `indices` (None: all) and return {name: values}, cells in the order of
        `indices` on the first axis (numpy arrays or CSR matrices)."""
        if indices is None:
            rows, restore = np.arange(self.store.n_obs), None
        else:
            indices = np.asarray(indices)
            if indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
                raise ValueError(f"indices must be a non-empty 1-D array of integer cell positions, got {indices!r}")
            order = np.argsort(indices, kind="stable")
            rows, restore = indices[order].astype(np.int64), np.argsort(order)
        units = cut_units(rows, self._chunk_rows(chunk_rows))
        with self._worker_reference(client, model_dir) as reference:
            results = run_units(
                self, job, units, seed=seed, batch_size=batch_size or DEFAULT_BATCH_SIZE, client=client,
                reference=reference, description=description, silent=silent,
            )
        joined = {}
        for name in results[0]:
            parts = [result[name] for result in results]
            values = sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)
            joined[name] = values if restore is None else values[restore]
        return joined

    def _written(
        self, job, outputs: dict[str, tuple[str, str, str, int]], arguments: dict, *, indices, batch_size, seed,
        chunk_rows, client, model_dir, output_store, overwrite, silent, description,
    ) -> dict:
        """Run `job` over all cells, writing result `name` to outputs[name] = (group, key, "dense" | "csr",
        n_columns) chunk by chunk (resuming an unfinished write with the same arguments); returns the outputs
        read back lazily."""
        if indices is not None:
            raise OutputError("outputs written to a store cover every cell: pass indices=None with write_to")
        batch_size = batch_size or DEFAULT_BATCH_SIZE
        chunk_rows = self._chunk_rows(chunk_rows)
        target = writer.output_store(self.store.path, output_store)
        settings = {**arguments, "seed": seed, "batch_size": batch_size, "model": model_digest(self.module),
                    "noise": NOISE_VERSION}  # a resume under other random streams would mix two sets of draws
        chunked = {
            name: (DenseOutput if kind == "dense" else CsrOutput)(
                target, group, key, self.store.n_obs, n_columns, chunk_rows, settings
            )
            for name, (group, key, kind, n_columns) in outputs.items()
        }
        todo = sorted(set().union(*(output.prepare(overwrite=overwrite) for output in chunked.values())))
        first_output = next(iter(chunked.values()))
        logger.info("%s: %d of %d chunks to compute", description, len(todo), first_output.n_chunks)
        if todo:
            units = [Unit(chunk, np.arange(*first_output.bounds(chunk))) for chunk in todo]
            with self._worker_reference(client, model_dir) as reference:
                run_units(
                    self, job, units, seed=seed, batch_size=batch_size, outputs=chunked, client=client,
                    reference=reference, description=description, silent=silent,
                )
        for output in chunked.values():
            output.finish()
        return {name: read_output(target, output.entry) for name, output in chunked.items()}

    # --- latent space ------------------------------------------------------------------------------------------

    def write_latent_representation(
        self,
        key: str = "X_scvi",
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        *,
        output_store=None,
        overwrite: bool = False,
        client=None,
        model_dir=None,
        seed: int = 0,
        chunk_rows: int | None = None,
        silent: bool = True,
    ):
        """get_latent_representation written as obsm/<key> (n_obs, n_latent) float32, and with return_dist the
        variance of q(z | x) as obsm/<key>_var. Returns the lazy array(s): latent, or (latent, variance)."""
        job = LatentJob(give_mean=give_mean, mc_samples=mc_samples, return_dist=return_dist)
        n_latent = self.module.n_latent
        outputs = {"latent": ("obsm", key, "dense", n_latent)}
        if return_dist:
            outputs["variance"] = ("obsm", f"{key}_var", "dense", n_latent)
        written = self._written(
            job, outputs, {"method": "get_latent_representation", "give_mean": give_mean, "mc_samples": mc_samples,
                           "return_dist": return_dist},
            indices=None, batch_size=batch_size, seed=seed, chunk_rows=chunk_rows, client=client,
            model_dir=model_dir, output_store=output_store, overwrite=overwrite, silent=silent,
            description="latent",
        )
        return (written["latent"], written["variance"]) if return_dist else written["latent"]

    def get_latent_library_size(
        self,
        indices=None,
        give_mean: bool = True,
        batch_size: int | None = None,
        *,
        write_to: str | None = None,
        output_store=None,
        overwrite: bool = False,
        client=None,
        model_dir=None,
        seed: int = 0,
        chunk_rows: int | None = None,
        silent: bool = True,
    ):
        """The library size l_n per cell, (n_cells, 1): the mean of q(l | x) (give_mean) or exp of the observed or
        sampled log library. write_to: obsm/<key>."""
        if give_mean and self.module.use_observed_lib_size:
            raise RuntimeError(
                "The module for this model does not compute the posterior distribution for the library size. Set "
                "`give_mean` to False to use the observed library size instead."
            )
        job = LibraryJob(give_mean=give_mean)
        options = dict(batch_size=batch_size, seed=seed, chunk_rows=chunk_rows, client=client, model_dir=model_dir,
                       silent=silent, description="library size")
        if write_to is None:
            return self._in_memory(job, indices=indices, **options)["library"]
        return self._written(
            job, {"library": ("obsm", write_to, "dense", 1)},
            {"method": "get_latent_library_size", "give_mean": give_mean},
            indices=indices, output_store=output_store, overwrite=overwrite, **options,
        )["library"]

    # --- expression --------------------------------------------------------------------------------------------

    def get_normalized_expression(
        self,
        indices=None,
        transform_batch=None,
        gene_list=None,
        library_size: float | str = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        *,
        write_to: str | None = None,
        output_store=None,
        overwrite: bool = False,
        client=None,
        model_dir=None,
        seed: int = 0,
        chunk_rows: int | None = None,
    ):
        """The decoded expression rho_n: px_scale scaled to library_size (library_size="latent": px_rate).

        transform_batch: None (each cell's own batch), a batch category, or a list of them (the expression is
        averaged over the batches, one posterior draw per batch, as scvi-tools does). Returns, as scvi-tools: a
        DataFrame (cells x genes) unless return_numpy, or an (n_samples, n_cells, n_genes) array for n_samples > 1
        without return_mean; with n_samples_overall, (n_samples_overall, n_genes) draws for cells picked uniformly
        at random (with replacement) among `indices` (scvi-tools draws n_samples_overall // n_cells + 1 per cell
        and keeps n_samples_overall of them at random: the same distribution, at a fraction of the cost).
        write_to: layers/<key>, dense float32 (n_obs x n_vars; needs all genes and one value per cell).
        """
        transform = self._batch_codes(transform_batch)
        genes = self._gene_indices(gene_list)
        if not (library_size == "latent" or (isinstance(library_size, (int, float)) and library_size > 0)):
            raise ValueError(f"library_size={library_size!r}: expected a positive number or 'latent'")
        if n_samples_overall is not None:
            if n_samples != 1:
                raise ValueError("pass either n_samples or n_samples_overall, not both")
            if write_to is not None:
                raise OutputError("n_samples_overall draws are not per cell, so they cannot be written as a layer")
            rows = np.arange(self.store.n_obs) if indices is None else np.asarray(indices)
            picked = np.random.default_rng(seed).choice(rows, size=n_samples_overall, replace=True)
            scales = self._posterior_scales(
                np.tile(picked, len(transform)), np.repeat([-1 if b is None else b for b in transform], len(picked)),
                genes=genes, library_size=library_size, seed=seed, batch_size=batch_size, chunk_rows=chunk_rows,
                client=client, model_dir=model_dir, silent=silent,
            )
            return scales.reshape(len(transform), n_samples_overall, -1).mean(0)
        job = ExpressionJob(transform_batches=transform, genes=genes, library_size=library_size,
                            n_samples=n_samples, return_mean=return_mean)
        options = dict(batch_size=batch_size, seed=seed, chunk_rows=chunk_rows, client=client, model_dir=model_dir,
                       silent=silent, description="normalized expression")
        if write_to is not None:
            if genes is not None:
                raise OutputError("a layer holds every gene: write without gene_list (select genes when reading)")
            if n_samples > 1 and not return_mean:
                raise OutputError("a layer holds one value per cell and gene: use return_mean=True to write")
            arguments = {"method": "get_normalized_expression", "transform_batch": list(transform),
                         "library_size": library_size, "n_samples": n_samples}
            return self._written(
                job, {"expression": ("layers", write_to, "dense", self.store.n_vars)}, arguments,
                indices=indices, output_store=output_store, overwrite=overwrite, **options,
            )["expression"]
        expression = self._in_memory(job, indices=indices, **options)["expression"]
        if n_samples > 1 and not return_mean:
            return np.moveaxis(expression, 1, 0)
        if return_numpy:
            return expression
        names = self.store.obs_names if indices is None else self.store.obs_names[np.asarray(indices)]
        columns = pd.Index(self.var_names) if genes is None else pd.Index(self.var_names)[list(genes)]
        return pd.DataFrame(expression, index=names, columns=columns)

    def get_likelihood_parameters(
        self,
        indices=None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
        *,
        write_to: str | None = None,
        output_store=None,
        overwrite: bool = False,
        client=None,
        model_dir=None,
        seed: int = 0,
        chunk_rows: int | None = None,
        silent: bool = True,
    ) -> dict:
        """The likelihood's parameters per cell and gene: {"mean": px_rate, "dispersions": theta (NB, ZINB),
        "dropout": sigmoid(zi_logits) (ZINB)}, (n_cells, n_genes) each, or (n_samples, n_cells, n_genes) for
        n_samples > 1 without give_mean. write_to: layers/<key>_mean, <key>_dispersions, <key>_dropout."""
        job = LikelihoodJob(n_samples=n_samples, give_mean=give_mean)
        options = dict(batch_size=batch_size, seed=seed, chunk_rows=chunk_rows, client=client, model_dir=model_dir,
                       silent=silent, description="likelihood parameters")
        names = ["mean"]
        if self.module.gene_likelihood != "poisson":
            names.append("dispersions")
        if self.module.gene_likelihood == "zinb":
            names.append("dropout")
        if write_to is not None:
            if n_samples > 1 and not give_mean:
                raise OutputError("a layer holds one value per cell and gene: use give_mean=True to write")
            outputs = {name: ("layers", f"{write_to}_{name}", "dense", self.store.n_vars) for name in names}
            arguments = {"method": "get_likelihood_parameters", "n_samples": n_samples, "give_mean": give_mean}
            return self._written(job, outputs, arguments, indices=indices, output_store=output_store,
                                 overwrite=overwrite, **options)
        values = self._in_memory(job, indices=indices, **options)
        if n_samples > 1 and not give_mean:
            values = {name: np.moveaxis(value, 1, 0) for name, value in values.items()}
        return values

    def posterior_predictive_sample(
        self,
        indices=None,
        transform_batch=None,
        n_samples: int = 1,
        gene_list=None,
        batch_size: int | None = None,
        silent: bool = True,
        *,
        write_to: str | None = None,
        output_store=None,
        overwrite: bool = False,
        client=None,
        model_dir=None,
        seed: int = 0,
        chunk_rows: int | None = None,
    ):
        """Counts drawn from the posterior predictive p(x_hat | x): a draw of q(z, l | x), then of the fitted
        NB / ZINB / Poisson. Returns a float32 CSR (n_cells, n_genes) for n_samples=1, else a list of n_samples
        of them (scvi-tools returns one (n_cells, n_genes, n_samples) sparse array). write_to: layers/<key>
        (n_samples=1) or layers/<key>_0 ... <key>_{n_samples-1}, CSR."""
        transform = self._batch_codes(transform_batch)
        genes = self._gene_indices(gene_list)
        job = PosteriorPredictiveJob(transform_batches=transform, genes=genes, n_samples=n_samples)
        names = [f"sample_{draw}" for draw in range(n_samples)]
        options = dict(batch_size=batch_size, seed=seed, chunk_rows=chunk_rows, client=client, model_dir=model_dir,
                       silent=silent, description="posterior predictive")
        if write_to is not None:
            if genes is not None:
                raise OutputError("a layer holds every gene: write without gene_list (select genes when reading)")
            keys = [write_to] if n_samples == 1 else [f"{write_to}_{draw}" for draw in range(n_samples)]
            outputs = {name: ("layers", key, "csr", self.store.n_vars) for name, key in zip(names, keys)}
            arguments = {"method": "posterior_predictive_sample", "transform_batch": list(transform),
                         "n_samples": n_samples}
            written = self._written(job, outputs, arguments, indices=indices, output_store=output_store,
                                    overwrite=overwrite, **options)
            return written[names[0]] if n_samples == 1 else [written[name] for name in names]
        values = self._in_memory(job, indices=indices, **options)
        return values[names[0]] if n_samples == 1 else [values[name] for name in names]

    def _posterior_scales(
        self, rows: np.ndarray, batches: np.ndarray, *, genes, library_size, seed, batch_size, chunk_rows, client,
        model_dir, silent, first_request: int = 0, description: str = "posterior samples",
    ) -> np.ndarray:
        """One posterior draw of px_scale * library_size per request (rows[i] decoded in batches[i], -1: its own
        batch), keyed by its number first_request + i; returns (len(rows), G') float32 in request order. One pass
        over the requested cells' chunks."""
        rows = np.asarray(rows, dtype=np.int64)
        batches = np.asarray(batches, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        cells = np.unique(rows)
        sorted_rows = rows[order]
        units = []
        for unit in cut_units(cells, self._chunk_rows(chunk_rows)):
            first = np.searchsorted(sorted_rows, unit.rows[0], side="left")
            last = np.searchsorted(sorted_rows, unit.rows[-1], side="right")
            requests = order[first:last]
            positions = np.searchsorted(unit.rows, rows[requests])
            units.append(Unit(unit.index, unit.rows, (positions, batches[requests], requests + first_request)))
        job = ScaleSampleJob(genes=genes, library_size=library_size)
        with self._worker_reference(client, model_dir) as reference:
            results = run_units(
                self, job, units, seed=seed, batch_size=batch_size or DEFAULT_BATCH_SIZE, client=client,
                reference=reference, description=description, silent=silent,
            )
        n_genes = self.store.n_vars if genes is None else len(genes)
        scales = np.empty((len(rows), n_genes), dtype=np.float32)
        for result in results:
            scales[result["requests"] - first_request] = result["scales"]
        return scales

    # --- differential expression -------------------------------------------------------------------------------

    def differential_expression(
        self,
        groupby: str | None = None,
        group1=None,
        group2=None,
        idx1=None,
        idx2=None,
        mode: str = "vanilla",
        delta: float | None = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1=None,
        batchid2=None,
        fdr_target: float = 0.05,
        silent: bool = False,
        *,
        n_samples_overall: int = 5000,
        use_permutation: bool = False,
        m_permutation: int = 10000,
        pseudocounts: float | None = None,
        threshold_counts: float = 0.01,
        test_mode: str = "three",
        write_to: str | None = None,
        table_path=None,
        output_store=None,
        overwrite: bool = False,
        client=None,
        model_dir=None,
        seed: int = 0,
        chunk_rows: int | None = None,
        max_sample_bytes: int = DE_SAMPLE_BYTES,
    ) -> pd.DataFrame:
        """scVI's Bayesian differential expression (vanilla: Lopez et al. 2018; change: Boyeau et al. 2019), as
        scvi-tools' differential_expression with its get_bayes_factors options, columns and row order.

        Groups: obs[groupby] values group1 (default: every value with cells, one-vs-rest) against group2 (default:
        all other cells, "Rest"); or cells idx1 against idx2 (boolean masks, integer positions or an obs query
        string; idx2 None: all other cells). Per group and batch condition (its observed batch, or with
        batch_correction each of batchid1 / batchid2, default all batches), n_samples_overall / n_conditions cells
        are drawn at random with replacement and decoded once each (px_scale). The raw-count columns come from
        one streaming pass over all cells, whatever the number of groups. Results are one DataFrame (index: gene
        names, one block of rows per comparison); write_to also writes it as uns/<key>, table_path as a parquet
        file (csv when pyarrow is missing). Memory: at most max_sample_bytes of posterior samples at once
        (comparisons are grouped into passes over their cells), plus one chunk of counts.
        """
        if mode not in de.MODES:
            raise ValueError(f"mode={mode!r}: expected one of {de.MODES}")
        if test_mode not in de.TEST_MODES:
            raise ValueError(f"test_mode={test_mode!r}: expected one of {de.TEST_MODES}")
        if mode == "change" and delta is None and importlib.util.find_spec("sklearn") is None:
            raise ImportError("delta=None estimates delta with scikit-learn, which is not installed; pass a delta")
        use_observed_batches = not batch_correction
        if use_observed_batches and (batchid1 is not None or batchid2 is not None):
            raise ValueError("batchid1 / batchid2 choose the batches to decode in: they need batch_correction=True")
        target = None if write_to is None else writer.output_store(self.store.path, output_store)
        if target is not None:
            writer.check_uns_key(target, write_to, overwrite)  # before the work, not after
        codes, names, comparisons, label_rows = self._de_groups(groupby, group1, group2, idx1, idx2)
        chunk_rows = self._chunk_rows(chunk_rows)
        common = dict(batch_size=batch_size, chunk_rows=chunk_rows, client=client, model_dir=model_dir, silent=silent)

        statistics = None
        if all_stats or (mode == "change" and pseudocounts is None):
            statistics = self._group_statistics(codes, len(names), **common)

        conditions = {}
        for side, batchid in ((1, batchid1), (2, batchid2)):
            if use_observed_batches:
                conditions[side] = (-1,)
            else:
                codes_of_side = self._batch_codes(self.registry.batch_categories if batchid is None else batchid)
                conditions[side] = tuple(int(code) for code in codes_of_side)
        n_per_condition = {side: int(n_samples_overall / len(conditions[side])) for side in (1, 2)}
        for side in (1, 2):
            if n_per_condition[side] == 0:
                warnings.warn("very small sample size, please consider increasing `n_samples_overall`", UserWarning,
                              stacklevel=2)
                n_per_condition[side] = 2

        # Cells are picked, and (with use_permutation) paired, by their own generators, and the draws are keyed
        # by request number: how the comparisons are grouped into passes does not change the result.
        pick_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
        pair_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        n_requests = 0
        bytes_per_comparison = (
            sum(len(conditions[side]) * n_per_condition[side] for side in (1, 2)) * self.store.n_vars * 4
        )
        per_pass = max(1, int(max_sample_bytes // bytes_per_comparison))
        frames = []
        for first in range(0, len(comparisons), per_pass):
            batch_of_comparisons = comparisons[first : first + per_pass]
            rows, batches, blocks = [], [], []
            offset = 0
            for group1_code, group2_code in batch_of_comparisons:
                sides = {1: np.flatnonzero(codes == group1_code)}
                sides[2] = np.flatnonzero(codes != group1_code) if group2_code is None else np.flatnonzero(
                    codes == group2_code)
                for side in (1, 2):
                    for condition in conditions[side]:
                        picked = pick_rng.choice(sides[side], size=n_per_condition[side], replace=True)
                        rows.append(picked)
                        batches.append(np.full(len(picked), condition))
                        blocks.append((side, condition, offset, offset + len(picked)))
                        offset += len(picked)
            samples = self._posterior_scales(
                np.concatenate(rows), np.concatenate(batches), genes=None, library_size=1.0, seed=seed,
                first_request=n_requests, description="DE posterior samples", **common,
            )
            n_requests += offset
            per_comparison = len(blocks) // len(batch_of_comparisons)
            for number, (group1_code, group2_code) in enumerate(batch_of_comparisons):
                own = blocks[number * per_comparison : (number + 1) * per_comparison]
                frames.append(self._de_frame(
                    samples, own, group1_code, group2_code, names, label_rows, statistics, mode=mode, delta=delta,
                    pseudocounts=pseudocounts, threshold_counts=threshold_counts, test_mode=test_mode,
                    fdr_target=fdr_target, all_stats=all_stats, use_observed_batches=use_observed_batches,
                    use_permutation=use_permutation, m_permutation=m_permutation, rng=pair_rng,
                ))
            del samples
        result = pd.concat(frames, axis=0)
        if target is not None:
            write_uns(target, write_to, result, overwrite=overwrite)
        if table_path is not None:
            write_table(result, table_path)
        return result

    def _de_groups(self, groupby, group1, group2, idx1, idx2):
        """(codes (n_obs,) int64 with -1 for cells in no group, group names, [(group1 code, group2 code or None)],
        whether rows get comparison/group1/group2 columns) as scvi-tools' _de_core defines the comparisons."""
        n_obs = self.store.n_obs
        if idx1 is not None:
            codes = np.full(n_obs, -1, dtype=np.int64)
            codes[self._cell_mask(idx1, "idx1")] = 0
            if idx2 is not None:
                codes[self._cell_mask(idx2, "idx2")] = 1
            if not (codes == 0).any() or (idx2 is not None and not (codes == 1).any()):
                raise ValueError("One of idx1 or idx2 has size zero.")
            return codes, ["one", "two"], [(0, None if idx2 is None else 1)], False
        if groupby is None:
            raise ValueError("pass groupby (an obs column) or idx1 to choose the cells to compare")
        column = pd.Categorical(self.store.obs_column(groupby).to_numpy())
        categories = list(column.categories)
        codes = column.codes.astype(np.int64)
        sizes = np.bincount(codes[codes >= 0], minlength=len(categories))
        if group1 is None:
            group1 = [category for category, size in zip(categories, sizes) if size > 0]
            if len(group1) == 1:
                raise ValueError("Only a single group in the data. Can't run DE on a single group.")
        elif isinstance(group1, str) or not isinstance(group1, Iterable):
            group1 = [group1]
        for value in [*group1, *([] if group2 is None else [group2])]:
            if value not in categories:
                raise ValueError(f"{value!r} is not a value of obs[{groupby!r}]; its values are {categories[:20]}")
            if sizes[categories.index(value)] == 0:
                raise ValueError(f"group {value!r} of obs[{groupby!r}] has no cells")
        comparisons = [
            (categories.index(value), None if group2 is None else categories.index(group2)) for value in group1
        ]
        return codes, [str(category) for category in categories], comparisons, True

    def _cell_mask(self, selection, name: str) -> np.ndarray:
        """A boolean (n_obs,) mask from a mask, integer positions, or a pandas query string over obs."""
        n_obs = self.store.n_obs
        if isinstance(selection, str):
            obs = pd.DataFrame({key: self.store.obs_column(key) for key in self.store.obs_keys()})
            return obs.index.isin(obs.query(selection).index)
        selection = np.asarray(selection).ravel()
        if selection.dtype == bool:
            if len(selection) != n_obs:
                raise ValueError(f"{name} is a mask of {len(selection)} entries; the store has {n_obs} cells")
            return selection
        if not np.issubdtype(selection.dtype, np.integer) or (selection.size and (
                selection.min() < -n_obs or selection.max() >= n_obs)):
            raise ValueError(f"{name} must be a boolean mask, integer cell positions in [0, {n_obs}) or a query")
        mask = np.zeros(n_obs, dtype=bool)
        mask[selection] = True
        return mask

    def _group_statistics(self, codes, n_groups, *, batch_size, chunk_rows, client, model_dir, silent):
        """GroupStatistics of every group in one streaming pass over all cells."""
        units = [
            Unit(unit.index, unit.rows, codes[unit.rows])
            for unit in cut_units(np.arange(self.store.n_obs), chunk_rows)
        ]
        with self._worker_reference(client, model_dir) as reference:
            results = run_units(
                self, RawStatsJob(n_groups), units, seed=0, batch_size=batch_size or DEFAULT_BATCH_SIZE,
                client=client, reference=reference, description="DE raw statistics", silent=silent,
            )
        statistics = de.GroupStatistics(n_groups, self.store.n_vars)
        for result in results:
            statistics.merge(result["stats"])
        return statistics

    def _de_frame(
        self, samples, blocks, group1_code, group2_code, names, label_rows, statistics, *, mode, delta,
        pseudocounts, threshold_counts, test_mode, fdr_target, all_stats, use_observed_batches, use_permutation,
        m_permutation, rng,
    ) -> pd.DataFrame:
        """The result rows of one comparison from its blocks of samples [(side, batch, start, stop)]."""
        sides = {}
        for side in (1, 2):
            own = [(batch, start, stop) for block_side, batch, start, stop in blocks if block_side == side]
            scales = np.concatenate([samples[start:stop] for _, start, stop in own])
            batches = np.concatenate([np.full(stop - start, batch) for batch, start, stop in own])
            sides[side] = (scales, batches)
        scales1, scales2 = de.pair_samples(
            *sides[1], *sides[2], use_observed_batches=use_observed_batches, use_permutation=use_permutation,
            m_permutation=m_permutation, rng=rng,
        )
        raw = None if statistics is None else statistics.properties(group1_code, group2_code)
        where_zero = {}
        if raw is not None:
            where_zero = {"where_zero1": raw["raw_mean1"] < threshold_counts,
                          "where_zero2": raw["raw_mean2"] < threshold_counts}
        columns = de.bayes_factors(
            scales1, scales2, sides[1][0].mean(0), sides[2][0].mean(0), mode=mode, delta=delta,
            pseudocounts=pseudocounts, test_mode=test_mode, **where_zero,
        )
        if all_stats:
            columns.update(raw)
        frame = pd.DataFrame(columns, index=pd.Index(self.var_names))
        frame = frame.sort_values(by="proba_de" if mode == "change" else "bayes_factor", ascending=False,
                                  kind="stable")
        if mode == "change":
            frame[f"is_de_fdr_{fdr_target}"] = de.fdr_de_prediction(frame["proba_de"].to_numpy(), fdr=fdr_target)
        if label_rows:
            group1_name = names[group1_code]
            group2_name = "Rest" if group2_code is None else names[group2_code]
            frame["comparison"] = f"{group1_name} vs {group2_name}"
            frame["group1"] = group1_name
            frame["group2"] = group2_name
        return frame


def write_table(frame: pd.DataFrame, path) -> Path:
    """Write a result table as parquet when pyarrow is installed, else as csv (the suffix is set to match).
    Returns the path written."""
    path = Path(path)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        path = path.with_suffix(".csv")
        frame.to_csv(path)
    else:
        path = path.with_suffix(".parquet")
        frame.to_parquet(path)
    return path
