"""Measures the tests (and benchmarks/loader.py) use that the package itself does not need.

    planned_minibatch_rows(sampler)   store rows of each minibatch a BlockShuffleSampler will yield, without reading
    label_mixing(labels, n_labels)    how well a label (e.g. batch) mixes within minibatches, in [0, 1]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from scvi_scale import sampler as sampler_module


def planned_minibatch_rows(sampler) -> Iterator[np.ndarray]:
    """Store rows of each minibatch still to come in the sampler's current epoch, from its plan (no counts read)."""
    buffers, batch_sizes = sampler._plan(sampler.epoch, sampler.batches_done)
    for parts in sampler_module._cut(((rows, len(rows)) for rows in buffers), batch_sizes):
        yield np.concatenate([rows[start:stop] for rows, start, stop in parts])


def label_mixing(minibatch_labels: Iterable[np.ndarray], n_labels: int) -> float:
    """Mean over minibatches of the normalised entropy of a label within each minibatch, in [0, 1].

    0: every minibatch holds one label; 1: every minibatch holds all labels equally. Comparing a sampler's value
    with a fully random sampler's on a store whose labels lie in contiguous runs of rows measures how far block
    shuffling is from a uniform shuffle. Minibatch labels are integer codes in [0, n_labels).
    """
    if n_labels < 2:
        raise ValueError(f"n_labels={n_labels}: label mixing needs at least two labels")
    entropies = []
    for labels in minibatch_labels:
        frequencies = np.bincount(np.asarray(labels), minlength=n_labels) / len(labels)
        present = frequencies[frequencies > 0]
        entropies.append(float(-(present * np.log(present)).sum() / np.log(n_labels)))
    if not entropies:
        raise ValueError("label_mixing needs at least one minibatch")
    return float(np.mean(entropies))
