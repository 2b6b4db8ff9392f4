"""Label transfer from a reference to a query by weighted k nearest neighbours in the latent space (scArches).

    >>> result = transfer_labels(reference_model, query_model, labels_key="cell_type", k=15)   # obs of the query

The reference's labels go to query cells by the k nearest reference cells in the latent space (Euclidean, exact,
computed in blocks), weighted as scArches' `weighted_knn_transfer` does: with d the k distances and s their
standard deviation, weight = exp(-d / (2 / s)^2), normalised to sum 1; the prediction is the label of largest total
weight p and the uncertainty is 1 - p. Both are written as obs columns of the query store (writer.write_obs_column).
The models are any objects with `store`, `registry` and `get_latent_representation()` (scvi_scale.SCVI).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from scvi_scale.outputs.writer import write_obs_column

KNN_QUERY_BLOCK = 1024  # query cells per distance block
KNN_REFERENCE_BLOCK = 65_536  # reference cells per distance block: a block of distances is 256 MB of float32


def nearest_neighbours(reference: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest reference rows of every query row (Euclidean). reference (N, L), query (M, L).

    Returns distances (M, k) float32 ascending and indices (M, k) int64. Brute force in blocks of
    KNN_QUERY_BLOCK x KNN_REFERENCE_BLOCK distances: memory is bounded, time is O(M N L)."""
    if reference.ndim != 2 or query.ndim != 2 or reference.shape[1] != query.shape[1]:
        raise ValueError(f"reference {reference.shape} and query {query.shape} must be (cells, same latent dims)")
    if not 1 <= k <= len(reference):
        raise ValueError(f"k={k}: must be between 1 and the {len(reference)} reference cells")
    reference_t = torch.as_tensor(reference, dtype=torch.float32)
    distances = np.empty((len(query), k), dtype=np.float32)
    indices = np.empty((len(query), k), dtype=np.int64)
    for start in range(0, len(query), KNN_QUERY_BLOCK):
        block = torch.as_tensor(query[start : start + KNN_QUERY_BLOCK], dtype=torch.float32)
        best_d = torch.full((len(block), 0), float("inf"))
        best_i = torch.empty((len(block), 0), dtype=torch.int64)
        for first in range(0, len(reference_t), KNN_REFERENCE_BLOCK):
            d = torch.cdist(block, reference_t[first : first + KNN_REFERENCE_BLOCK])
            d_k, i_k = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
            merged_d = torch.cat([best_d, d_k], 1)
            merged_i = torch.cat([best_i, i_k + first], 1)
            order = torch.topk(merged_d, min(k, merged_d.shape[1]), dim=1, largest=False).indices
            best_d, best_i = merged_d.gather(1, order), merged_i.gather(1, order)
        distances[start : start + len(block)] = best_d.numpy()
        indices[start : start + len(block)] = best_i.numpy()
    return distances, indices


def weighted_votes(distances: np.ndarray, neighbour_codes: np.ndarray, n_labels: int) -> np.ndarray:
    """Per-cell label probabilities (M, n_labels) from the k neighbours' distances and label codes (M, k).

    scArches' kernel: with s the standard deviation of a cell's k distances, weight = exp(-d / (2 / s)^2),
    normalised over the k neighbours (equal weights when all k distances are equal)."""
    distances = distances.astype(np.float64)
    spread = distances.std(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        bandwidth = (2.0 / spread) ** 2
    weights = np.exp(-distances / bandwidth)
    weights /= weights.sum(axis=1, keepdims=True)
    probabilities = np.zeros((len(distances), n_labels))
    rows = np.repeat(np.arange(len(distances)), distances.shape[1])
    np.add.at(probabilities, (rows, neighbour_codes.ravel()), weights.ravel())
    return probabilities


def transfer_labels(
    reference_model,
    query_model,
    labels_key: str | None = None,
    k: int = 15,
    write_to=None,
    key_added: str | None = None,
    overwrite: bool = False,
    reference_latent: np.ndarray | None = None,
    query_latent: np.ndarray | None = None,
) -> pd.DataFrame:
    """Predict the query cells' `labels_key` from the reference cells' by weighted k-NN on the latent.

    labels_key: an obs column of the reference store (default: the reference registry's labels_key).
    write_to: the query store to write obs columns `key_added` (categorical, the reference's categories) and
        `key_added + "_uncertainty"` (float32, 1 - the winning label's weight) into; default the query model's
        store; False writes nothing. key_added: default "predicted_" + labels_key.
    reference_latent / query_latent: latents already computed (default: get_latent_representation()).
    Returns a DataFrame (query cells) with the two columns.
    """
    labels_key = labels_key or reference_model.registry.labels_key
    if labels_key is None:
        raise ValueError("no labels_key given and the reference registered none: which obs column to transfer?")
    key_added = key_added or f"predicted_{labels_key}"
    labels = reference_model.store.obs_column(labels_key)
    categorical = labels.astype("category") if not isinstance(labels.dtype, pd.CategoricalDtype) else labels
    known = categorical.notna().to_numpy()
    if not known.any():
        raise ValueError(f"{reference_model.store.path}: obs column {labels_key!r} has no labels to transfer")
    if reference_latent is None:
        reference_latent = reference_model.get_latent_representation()
    if query_latent is None:
        query_latent = query_model.get_latent_representation()
    reference_codes = categorical.cat.codes.to_numpy()[known]
    distances, neighbours = nearest_neighbours(np.asarray(reference_latent)[known], np.asarray(query_latent), k)
    categories = categorical.cat.categories
    probabilities = weighted_votes(distances, reference_codes[neighbours], len(categories))
    winner = probabilities.argmax(axis=1)
    result = pd.DataFrame(
        {
            key_added: pd.Categorical.from_codes(winner, categories=categories),
            f"{key_added}_uncertainty": np.clip(1.0 - probabilities.max(axis=1), 0.0, 1.0).astype(np.float32),
        },
        index=query_model.store.obs_names,
    )
    if write_to is not False:
        target = query_model.store.path if write_to is None else str(write_to)
        for column in result.columns:
            write_obs_column(target, column, result[column], overwrite=overwrite)
    return result
