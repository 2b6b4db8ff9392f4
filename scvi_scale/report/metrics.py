"""scIB integration metrics (scib-metrics) of a latent space, beside an uncorrected PCA baseline scored the same way.

The recipe is scib-metrics' `Benchmarker` (0.5.x), on the cells of one seeded subsample:
- one k-nearest-neighbour search per embedding, k = 90, itself included (exact up to 20k cells, pynndescent as
  the Benchmarker's above: `nearest_neighbors`): LISI uses all 90 neighbours, kBET 50, graph connectivity 15;
- every score is scaled to [0, 1], higher is better;
- the aggregate of a category is the mean of its scores; Total = 0.4 batch correction + 0.6 bio conservation
  (Luecken et al., Nature Methods 2022), computed only when both categories are.
The baseline is the PCA of log1p counts per 10k, with as many components as the latent has dimensions, so both
embeddings are compared in the same dimension; it is also the pre-integration embedding of PCR comparison (which
is 0 for the baseline itself).

Metrics follow the labels that exist: without labels only the label-free ones (iLISI, kBET, PCR comparison);
without two batches no batch-correction score; without two labels no bio-conservation score. LEFT_OUT says which
Benchmarker defaults are not computed, and why.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.threads import torch_threads

N_NEIGHBORS = 90
EXACT_NEIGHBORS_MAX_CELLS = 20_000
KBET_NEIGHBORS = 50
GRAPH_NEIGHBORS = 15
TARGET_SUM = 1e4
EMBEDDING_TITLES = {"scvi": "scVI latent", "pca": "PCA baseline (uncorrected)"}
BATCH_CORRECTION = ("Silhouette batch", "iLISI", "kBET", "Graph connectivity", "PCR comparison")
BIO_CONSERVATION = ("Silhouette label", "cLISI", "KMeans NMI", "KMeans ARI")
AGGREGATES = ("Batch correction", "Bio conservation", "Total")
LEFT_OUT = {
    "kBET per label": "a diffusion map and an approximate kNN search per label (3 min at 50k cells on 2 cores, "
    "and a 30 s numba compilation); graph connectivity stands in. Without labels, kBET is computed on all cells",
    "Isolated labels": "a silhouette over all cells (2 min at 50k cells on 2 cores)",
    "BRAS": "the Benchmarker's other batch silhouette since scib-metrics 0.5.6; scIB's silhouette batch is kept",
}


def subsample_rows(n_cells: int, max_cells: int, seed: int) -> np.ndarray:
    """Sorted int64 rows of a uniform random subsample of at most `max_cells` of `n_cells` cells (all of them when
    there are no more), drawn from numpy's default generator seeded with `seed`."""
    if max_cells < 1:
        raise ValueError(f"max_cells={max_cells}: must be at least 1")
    if n_cells <= max_cells:
        return np.arange(n_cells, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_cells, size=max_cells, replace=False)).astype(np.int64)


def log_normalize(counts, target_sum: float = TARGET_SUM):
    """log1p(counts / cell total * target_sum) as float32, CSR in CSR out (dense in, dense out); a cell without
    counts stays at 0. counts: (n_cells, n_genes)."""
    if sp.issparse(counts):
        counts = sp.csr_matrix(counts, dtype=np.float32)
        totals = np.asarray(counts.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        normalized = sp.diags(scale.astype(np.float32)) @ counts
        normalized.data = np.log1p(normalized.data)
        return normalized.tocsr()
    counts = np.asarray(counts, dtype=np.float32)
    totals = counts.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(counts * scale)


def pca_baseline(log_counts, n_components: int, seed: int) -> np.ndarray:
    """(n_cells, n_components) float32 principal components of the centred `log_counts` (dense or sparse; a
    sparse matrix is centred implicitly, never densified), by ARPACK as scanpy's default."""
    from sklearn.decomposition import PCA

    n_components = min(n_components, min(log_counts.shape) - 1)
    pca = PCA(n_components=n_components, svd_solver="arpack", random_state=seed)
    return pca.fit_transform(log_counts).astype(np.float32)


def neighbor_search(n_cells: int) -> str:
    """How `nearest_neighbors` searches among `n_cells` cells, in words."""
    return "exact (scikit-learn)" if n_cells <= EXACT_NEIGHBORS_MAX_CELLS else "approximate (pynndescent)"


@torch_threads()  # numba's pool (pynndescent, umap-learn) would leave torch at every core
def nearest_neighbors(embedding: np.ndarray, n_neighbors: int = N_NEIGHBORS, seed: int = 0):
    """scib-metrics' NeighborsResults of the `n_neighbors` nearest cells of every cell (itself first), Euclidean.

    Exact (scikit-learn's k-d tree) up to EXACT_NEIGHBORS_MAX_CELLS cells; above, pynndescent as the Benchmarker
    runs it, seeded: the k-d tree is exact, but its time varies widely with the points' shape and grows faster with
    the cells than pynndescent's (recall 1.00 where compared; a numba compilation once per process). The figures:
    benchmarks/history/from-code.md."""
    from scib_metrics.nearest_neighbors import NeighborsResults, pynndescent
    from sklearn.neighbors import NearestNeighbors

    if len(embedding) > EXACT_NEIGHBORS_MAX_CELLS:
        return pynndescent(embedding, n_neighbors=n_neighbors, random_state=seed, n_jobs=-1)
    distances, indices = NearestNeighbors(n_neighbors=n_neighbors).fit(embedding).kneighbors(embedding)
    return NeighborsResults(indices=indices, distances=distances.astype(np.float32))


def category_codes(values) -> np.ndarray:
    """Integer codes of a column's categories; missing values (NaN) get a code of their own."""
    codes = pd.Categorical(values).codes.astype(np.int64)
    return np.where(codes < 0, codes.max(initial=-1) + 1, codes)


@torch_threads()  # numba's pool (pynndescent, umap-learn) would leave torch at every core
def scib_scores(
    embedding: np.ndarray, neighbors, pre_integration: np.ndarray, batches: np.ndarray | None, labels: np.ndarray | None
) -> dict[str, float]:
    """The metrics of the module docstring for one embedding (n_cells, n_dims), with its `nearest_neighbors`,
    the baseline PCA as `pre_integration`, and integer batch and label codes (n_cells,) or None."""
    import scib_metrics

    scores: dict[str, float] = {}
    if batches is not None and len(np.unique(batches)) > 1:
        scores["iLISI"] = scib_metrics.ilisi_knn(neighbors, batches)
        scores["PCR comparison"] = scib_metrics.pcr_comparison(pre_integration, embedding, batches, categorical=True)
        if labels is None:
            scores["kBET"] = scib_metrics.kbet(neighbors.subset_neighbors(KBET_NEIGHBORS), batches)[0]
        else:
            if any(len(np.unique(batches[labels == label])) > 1 for label in np.unique(labels)):
                # scIB's silhouette batch is within labels: undefined when every label lies in one batch
                scores["Silhouette batch"] = scib_metrics.silhouette_batch(embedding, labels, batches)
            scores["Graph connectivity"] = scib_metrics.graph_connectivity(
                neighbors.subset_neighbors(GRAPH_NEIGHBORS), labels
            )
    if labels is not None and len(np.unique(labels)) > 1:
        scores["cLISI"] = scib_metrics.clisi_knn(neighbors, labels)
        scores["Silhouette label"] = scib_metrics.silhouette_label(embedding, labels)
        clustering = scib_metrics.nmi_ari_cluster_labels_kmeans(embedding, labels)
        scores["KMeans NMI"], scores["KMeans ARI"] = clustering["nmi"], clustering["ari"]
    return {name: float(value) for name, value in scores.items()}


def aggregate_scores(scores: dict[str, float]) -> dict[str, float]:
    """{"Batch correction", "Bio conservation", "Total"}: the mean of each category's finite scores, and the
    weighted total when both categories have one (the Benchmarker's `get_results(min_max_scale=False)`)."""
    aggregate = {}
    for category, names in (("Batch correction", BATCH_CORRECTION), ("Bio conservation", BIO_CONSERVATION)):
        values = [scores[name] for name in names if name in scores and math.isfinite(scores[name])]
        if values:
            aggregate[category] = float(np.mean(values))
    if len(aggregate) == 2:
        aggregate["Total"] = 0.4 * aggregate["Batch correction"] + 0.6 * aggregate["Bio conservation"]
    return aggregate
