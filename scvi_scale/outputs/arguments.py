"""scvi-tools' output arguments turned into what the jobs take: batch codes, gene positions, cell masks.

Each function checks its argument against the registry or the genes and raises a ValueError naming the bad value
and the valid ones, before any work.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from scvi_scale.outputs.jobs import OWN_BATCH


def batch_codes(batch_categories: list, transform_batch) -> tuple[int, ...]:
    """scvi-tools' _get_batch_code_from_category: a batch category, a list of them, or None (each cell's observed
    batch) -> category codes, OWN_BATCH for None."""
    values = [transform_batch] if transform_batch is None or isinstance(transform_batch, str) else transform_batch
    values = list(values) if isinstance(values, Iterable) else [values]
    categories = list(batch_categories)
    codes = []
    for value in values:
        if value is not None and value not in categories:
            raise ValueError(f'"{value}" not a valid batch category; the batches are {categories[:20]}')
        codes.append(OWN_BATCH if value is None else categories.index(value))
    return tuple(codes)


def gene_positions(var_names: pd.Index, gene_list) -> tuple[int, ...] | None:
    """Positions (in var order) of the genes of gene_list; None for all genes."""
    if gene_list is None:
        return None
    gene_list = [gene_list] if isinstance(gene_list, str) else list(gene_list)
    known = pd.Index(var_names)
    unknown = [gene for gene in gene_list if gene not in known]
    if unknown:
        raise ValueError(f"gene_list holds {len(unknown)} gene(s) not in the model: {unknown[:10]}")
    return tuple(np.flatnonzero(known.isin(gene_list)).tolist())


def cell_mask(store, selection, name: str) -> np.ndarray:
    """A boolean (n_obs,) mask from a boolean mask, integer cell positions, or a pandas query string over obs."""
    n_obs = store.n_obs
    if isinstance(selection, str):
        obs = pd.DataFrame({key: store.obs_column(key) for key in store.obs_keys()})
        return obs.index.isin(obs.query(selection).index)
    selection = np.asarray(selection).ravel()
    if selection.dtype == bool:
        if len(selection) != n_obs:
            raise ValueError(f"{name} is a mask of {len(selection)} entries; the store has {n_obs} cells")
        return selection
    if not np.issubdtype(selection.dtype, np.integer) or (
        selection.size and (selection.min() < -n_obs or selection.max() >= n_obs)
    ):
        raise ValueError(f"{name} must be a boolean mask, integer cell positions in [0, {n_obs}) or a query")
    mask = np.zeros(n_obs, dtype=bool)
    mask[selection] = True
    return mask
