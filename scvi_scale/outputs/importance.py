"""Importance-weighted posterior samples of a group of cells: scvi-tools' weights="importance" (Boyeau et al.,
2023), for get_normalized_expression(n_samples_overall=...) and differential_expression.

    >>> rows, numbers = importance_sample(inputs, request, cells, 5000, batch, ImportanceOptions(), rng, 0)
    >>> samples = posterior_scales(inputs, request, rows, batches, numbers=numbers, ...)   # the chosen draws

As scvi-tools does: n_samples_overall // n_cells + 1 draws of z per cell make a pool; each draw gets the weight
of jobs.ImportanceJob against at most max_cells anchor cells of the group (their log p(x) estimated with
n_mc_samples importance samples, n_mc_samples_per_pass at a time), optionally truncated (Ionides 2008); then
n_samples_overall draws are picked from the pool with probabilities proportional to the weights. Draws are keyed
by their number in the pool, so a picked draw decodes to exactly the sample that was weighed; memory holds the
pool's weights, never its expression values. Cost: pool x anchors x genes likelihood terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scvi_scale.module import Minibatch, to_tensors
from scvi_scale.outputs.jobs import Anchors, ImportanceJob
from scvi_scale.outputs.runner import ModelInputs, OutputRequest, request_units, run_units
from scvi_scale.sampler import SequentialSampler


@dataclass(frozen=True)
class ImportanceOptions:
    """scvi-tools' get_importance_weights options (importance_weighting_kwargs), with its defaults."""

    max_cells: int = 1024
    truncation: bool = False
    n_mc_samples: int = 500
    n_mc_samples_per_pass: int = 250


@torch.no_grad()
def gather_anchors(
    inputs: ModelInputs, cells: np.ndarray, options: ImportanceOptions, rng, batch_size: int, seed: int
) -> Anchors:
    """The anchors of a group: its cells, or max_cells of them at random; their counts, q(z | x) and log p(x)
    (marginal_ll draws from torch's generator, forked and seeded with `seed`, so the result is reproducible)."""
    anchors = np.sort(cells if len(cells) <= options.max_cells else rng.choice(cells, options.max_cells, replace=False))
    module = inputs.module.eval()
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("x", "library", "qz_loc", "qz_scale", "log_px")}
    stream = SequentialSampler(inputs.store, anchors, batch_size=batch_size, obs_arrays=inputs.obs_arrays)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for minibatch in stream:
            _add_anchor_block(module, minibatch, to_tensors(minibatch, inputs.device), options, parts)
    return Anchors(**{name: np.concatenate(values).astype(np.float32) for name, values in parts.items()})


def _add_anchor_block(module, minibatch: dict, tensors: Minibatch, options: ImportanceOptions, parts: dict) -> None:
    qz = module.inference(tensors)["qz"]
    parts["x"].append(minibatch["x"])
    parts["library"].append(minibatch["library"])
    parts["qz_loc"].append(qz.loc.cpu().numpy())
    parts["qz_scale"].append(qz.scale.cpu().numpy())
    parts["log_px"].append(
        module.marginal_ll(tensors, options.n_mc_samples, n_mc_samples_per_pass=options.n_mc_samples_per_pass)
        .cpu()
        .numpy()
    )


def importance_sample(
    inputs: ModelInputs,
    request: OutputRequest,
    cells: np.ndarray,
    n_samples_overall: int,
    batch: int,
    options: ImportanceOptions,
    rng: np.random.Generator,
    first_number: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, draw numbers) of n_samples_overall draws of the group `cells`, decoded in `batch`, picked by
    importance weight from a pool of draws numbered first_number, first_number + 1, ... (see the module
    docstring). The numbers key the draws: decode the picked ones with runner.posterior_scales(numbers=...)."""
    cells = np.asarray(cells, dtype=np.int64)
    anchors = gather_anchors(inputs, cells, options, rng, request.batch_size, request.seed)
    per_cell = n_samples_overall // len(cells) + 1
    pool_rows = np.repeat(cells, per_cell)
    pool_numbers = first_number + np.arange(len(pool_rows), dtype=np.int64)
    units = request_units(inputs, request, pool_rows, np.full(len(pool_rows), batch), pool_numbers)
    results = run_units(inputs, ImportanceJob(anchors), units, request, description="importance weights")
    assert results is not None, "no outputs: the results come back"
    log_weights = np.empty(len(pool_rows), dtype=np.float64)
    for result in results:
        log_weights[result["requests"] - first_number] = result["log_weights"]
    if options.truncation:
        tau = np.logaddexp.reduce(log_weights) - np.log(len(log_weights))
        log_weights = np.maximum(log_weights, tau)
    probabilities = np.exp(log_weights - np.logaddexp.reduce(log_weights))
    picked = rng.choice(len(pool_rows), size=n_samples_overall, p=probabilities / probabilities.sum(), replace=True)
    return pool_rows[picked], pool_numbers[picked]
