"""Tests of scvi_scale.sampler: splits, exactly-once epochs, sharding, resume, contents, randomness, threads.

Order properties (exactly once, sharding, resume) run on the sampler's plan (helpers.planned_minibatch_rows, no
reading) over many sizes with hypothesis, and on real iteration over an in-memory reader that records its reads;
contents are checked against direct reads of real Zarr stores written by scvi_scale.data.write_store.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import label_mixing, planned_minibatch_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from scvi_scale import sampler as sampler_module
from scvi_scale.data import write_store
from scvi_scale.sampler import BlockReadError, BlockShuffleSampler, SequentialSampler, train_validation_split

N_GENES = 12


class MemoryReader:
    """In-memory stand-in for CountStore (same read interface) that records every row range it is asked for."""

    def __init__(self, matrix, chunk_rows: int, fail_rows: tuple[int, int] | None = None):
        self.matrix = matrix
        self.is_sparse = sp.issparse(matrix)
        self.n_obs, self.n_vars = matrix.shape
        self.chunk_rows = chunk_rows
        self.fail_rows = fail_rows
        self.reads: list[tuple[int, int]] = []

    def _rows(self, start, stop):
        self.reads.append((start, stop))
        if self.fail_rows is not None and start <= self.fail_rows[0] < stop:
            raise OSError("simulated damaged chunk")
        return self.matrix[start:stop]

    def read_csr(self, start, stop):
        return sp.csr_matrix(self._rows(start, stop), dtype=np.float32)

    def read_dense(self, start, stop):
        rows = self._rows(start, stop)
        return (rows.toarray() if self.is_sparse else rows).astype(np.float32)

    def block_bounds(self, block_rows):
        return np.append(np.arange(0, self.n_obs, block_rows), self.n_obs)


def random_counts(n_obs: int, seed: int = 0) -> sp.csr_matrix:
    """(n_obs, N_GENES) CSR counts whose row r holds r + 1 in its first column, so every row is distinct."""
    counts = sp.random(n_obs, N_GENES, density=0.3, format="lil", random_state=seed, dtype=np.float32)
    counts[:, 0] = np.arange(1, n_obs + 1, dtype=np.float32)[:, None]
    counts = counts.tocsr()
    counts.data = np.ceil(counts.data * 9)
    return counts


def loader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("scvi-scale")]


def assert_exactly_once(batches: list[np.ndarray], expected_rows: np.ndarray) -> None:
    emitted = np.concatenate(batches)
    assert len(emitted) == len(expected_rows)
    np.testing.assert_array_equal(np.sort(emitted), np.sort(expected_rows))


@pytest.fixture(scope="module")
def csr_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "csr.zarr"
    return write_store(random_counts(3000, seed=1), path, chunk_rows=256)


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "dense.zarr"
    return write_store(random_counts(1000, seed=2).toarray(), path, chunk_rows=128, sparse=False)


# --- train/validation split ------------------------------------------------------------------------------------


@given(n_obs=st.integers(1, 5000), train_size=st.floats(0.05, 1.0), seed=st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_split_sizes_follow_scvi_tools_rounding_and_partition_the_cells(n_obs, train_size, seed):
    train, validation = train_validation_split(n_obs, train_size=train_size, seed=seed)
    assert len(train) == math.ceil(train_size * n_obs)
    assert len(train) + len(validation) == n_obs
    np.testing.assert_array_equal(np.sort(np.concatenate([train, validation])), np.arange(n_obs))
    assert train.dtype == validation.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(validation) > 0)


def test_split_with_validation_size_leaves_a_test_set_and_is_seeded():
    train, validation = train_validation_split(1001, train_size=0.7, validation_size=0.2, seed=3)
    assert (len(train), len(validation)) == (math.ceil(0.7 * 1001), math.floor(0.2 * 1001))
    assert not np.intersect1d(train, validation).size
    again = train_validation_split(1001, train_size=0.7, validation_size=0.2, seed=3)
    other = train_validation_split(1001, train_size=0.7, validation_size=0.2, seed=4)
    np.testing.assert_array_equal(train, again[0])
    assert not np.array_equal(train, other[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_size": 0.0}, "train_size"),
        ({"train_size": 1.2}, "train_size"),
        ({"validation_size": 1.0}, "validation_size"),
        ({"train_size": 0.8, "validation_size": 0.3}, "must not exceed 1"),
        ({"seed": -1}, "seed"),
    ],
)
def test_split_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_validation_split(100, **kwargs)


# --- epoch plans: exactly once, sharding, balance --------------------------------------------------------------


@given(
    n_obs=st.integers(1, 3000),
    keep_fraction=st.floats(0.2, 1.0),
    block_rows=st.integers(1, 400),
    batch_size=st.integers(1, 300),
    buffer_blocks=st.integers(1, 6),
    world_size=st.integers(1, 4),
    drop_last=st.booleans(),
    epoch=st.integers(0, 5),
)
@settings(max_examples=150, deadline=None)
@pytest.mark.filterwarnings("ignore:the last minibatch")
def test_every_row_once_per_epoch_across_ranks_with_equal_batch_counts(
    n_obs, keep_fraction, block_rows, batch_size, buffer_blocks, world_size, drop_last, epoch
):
    rows = np.flatnonzero(np.random.default_rng(n_obs).random(n_obs) < keep_fraction)
    per_rank = len(rows) // world_size
    if per_rank == 0 or (drop_last and per_rank < batch_size):
        with pytest.raises(ValueError):
            BlockShuffleSampler(
                MemoryReader(sp.csr_matrix((n_obs, 1)), 64),
                rows,
                batch_size=batch_size,
                world_size=world_size,
                drop_last=drop_last,
            )
        return
    reader = MemoryReader(sp.csr_matrix((n_obs, 1)), chunk_rows=64)
    per_rank_batches = []
    for rank in range(world_size):
        sampler = BlockShuffleSampler(
            reader,
            rows,
            batch_size=batch_size,
            block_rows=block_rows,
            buffer_blocks=buffer_blocks,
            world_size=world_size,
            rank=rank,
            drop_last=drop_last,
            seed=7,
        )
        sampler.set_epoch(epoch)
        batches = list(planned_minibatch_rows(sampler))
        assert len(batches) == len(sampler)
        sizes = [len(batch) for batch in batches]
        assert all(size == batch_size for size in sizes[:-1])
        largest = batch_size if drop_last else batch_size + 2 + (world_size > 1)  # 1-2 leftover cells join it
        assert 1 <= sizes[-1] <= largest
        assert len(sizes) == 1 or sizes[-1] >= min(3, batch_size)  # never a minibatch too small for BatchNorm
        per_rank_batches.append(batches)
    assert len({len(batches) for batches in per_rank_batches}) == 1  # DDP needs equal counts
    emitted = np.concatenate([np.concatenate(batches) for batches in per_rank_batches])
    assert len(np.unique(emitted)) == len(emitted)
    assert np.isin(emitted, rows).all()
    if drop_last:
        assert len(emitted) == world_size * len(per_rank_batches[0]) * batch_size
    else:
        assert len(emitted) == len(rows)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_iteration_reads_every_training_row_once_and_no_validation_row(world_size):
    counts = random_counts(2000)
    train, validation = train_validation_split(2000, seed=5)
    per_rank = []
    for rank in range(world_size):
        reader = MemoryReader(counts, chunk_rows=128)
        sampler = BlockShuffleSampler(
            reader, train, batch_size=50, buffer_blocks=3, rank=rank, world_size=world_size, seed=11
        )
        batches = [minibatch["rows"] for minibatch in sampler]
        assert len(batches) == len(sampler)
        expected = list(
            planned_minibatch_rows(
                BlockShuffleSampler(
                    reader, train, batch_size=50, buffer_blocks=3, rank=rank, world_size=world_size, seed=11
                )
            )
        )
        for got, planned in zip(batches, expected, strict=True):
            np.testing.assert_array_equal(got, planned)
        assert not np.isin(np.concatenate(batches), validation).any()
        per_rank.append(batches)
    assert len({len(batches) for batches in per_rank}) == 1
    assert_exactly_once([np.concatenate(batches) for batches in per_rank], train)


def test_csr_only_minibatches_leave_x_out(csr_store):
    with_x = list(SequentialSampler(csr_store, batch_size=100, return_csr=True))
    without = list(SequentialSampler(csr_store, batch_size=100, return_csr=True, dense=False))
    for full, lean in zip(with_x, without, strict=True):
        assert "x" not in lean and sorted(lean) == sorted(set(full) - {"x"})
        np.testing.assert_array_equal(lean["library"], full["library"])
        for a, b in zip(lean["x_csr"], full["x_csr"], strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="return_csr=True"):
        SequentialSampler(csr_store, dense=False)


@pytest.mark.parametrize("store_name", ["csr_store", "dense_store"])
def test_minibatch_contents_equal_direct_reads_of_the_store(store_name, request):
    store = request.getfixturevalue(store_name)
    labels = np.arange(store.n_obs) % 7
    covariates = np.random.default_rng(0).normal(size=(store.n_obs, 2))
    train, _ = train_validation_split(store.n_obs, seed=0)
    sampler = BlockShuffleSampler(
        store,
        train,
        batch_size=64,
        buffer_blocks=2,
        return_csr=True,
        obs_arrays={"labels": labels, "cont_covs": covariates},
    )
    rows, xs = [], []
    for minibatch in sampler:
        x = minibatch["x"]
        assert x.dtype == np.float32 and x.shape == (len(minibatch["rows"]), store.n_vars)
        indptr, indices, data = minibatch["x_csr"]
        np.testing.assert_array_equal(sp.csr_matrix((data, indices, indptr), shape=x.shape).toarray(), x)
        np.testing.assert_array_equal(minibatch["library"], x.astype(np.float64).sum(axis=1))
        np.testing.assert_array_equal(minibatch["labels"], labels[minibatch["rows"]])
        np.testing.assert_array_equal(minibatch["cont_covs"], covariates[minibatch["rows"]])
        first = int(minibatch["rows"][0])
        np.testing.assert_array_equal(x[0], store.read_dense(first, first + 1)[0])  # one direct single-row read
        rows.append(minibatch["rows"])
        xs.append(x)
    rows, xs = np.concatenate(rows), np.concatenate(xs)
    whole = store.read_dense(0, store.n_obs)  # small store: one direct read of everything
    np.testing.assert_array_equal(xs[np.argsort(rows)], whole[train])


@pytest.mark.parametrize("kept_blocks", [7, 2])  # room for every block; for two of the seven (KEPT_BYTES)
def test_a_small_set_is_read_twice_then_kept_and_its_minibatches_stay_those_of_reading(monkeypatch, kept_blocks):
    counts = random_counts(700)
    kinds = {"reading": MemoryReader(counts, chunk_rows=100), "kept": MemoryReader(counts, chunk_rows=100)}
    monkeypatch.setattr(sampler_module, "KEPT_ROWS", 0)  # the reference reads every block every epoch
    reading = BlockShuffleSampler(kinds["reading"], batch_size=64, block_rows=100, return_csr=True, seed=3)
    monkeypatch.setattr(sampler_module, "KEPT_ROWS", 700)
    block_bytes = max(
        c.data.nbytes + c.indices.nbytes + c.indptr.nbytes
        for c in (sp.csr_matrix(counts[k : k + 100], dtype=np.float32) for k in range(0, 700, 100))
    )
    monkeypatch.setattr(sampler_module, "KEPT_BYTES", kept_blocks * block_bytes)
    kept = BlockShuffleSampler(kinds["kept"], batch_size=64, block_rows=100, return_csr=True, seed=3)
    reads_per_epoch = []
    for _ in range(4):
        reads_before = len(kinds["kept"].reads)
        for got, want in zip(kept, reading, strict=True):
            np.testing.assert_array_equal(got["rows"], want["rows"])
            np.testing.assert_array_equal(got["x"], want["x"])
            for got_part, want_part in zip(got["x_csr"], want["x_csr"]):
                np.testing.assert_array_equal(got_part, want_part)
            got["x"][:] = -1  # a consumer writing into its minibatch changes no later epoch
            got["x_csr"][2][:] = -1
        reads_per_epoch.append(len(kinds["kept"].reads) - reads_before)
    assert reads_per_epoch == [7, 7, 7 - kept_blocks, 7 - kept_blocks]
    # in store order the minibatches are slices of the blocks: writing into one must not reach the kept block
    sequential_reader = MemoryReader(counts, chunk_rows=100)
    sequential = SequentialSampler(sequential_reader, batch_size=50, block_rows=100, return_csr=True)
    for _ in range(4):
        got = np.concatenate([minibatch["x"] for minibatch in sequential])
        np.testing.assert_array_equal(got, counts.toarray())
        for minibatch in sequential:
            minibatch["x_csr"][2][:] = -1
    assert len(sequential_reader.reads) == 8 * 7 - 6 * kept_blocks  # 8 passes; from the third on, kept blocks


@pytest.mark.parametrize(("block_rows", "buffer_blocks"), [(50, 3), (1, 8)], ids=["buffers", "minibatch-spans-8"])
def test_reused_buffer_storage_never_changes_a_minibatch_handed_out(block_rows, buffer_blocks):
    counts = random_counts(600)
    sampler = BlockShuffleSampler(
        MemoryReader(counts, chunk_rows=50),
        batch_size=64,
        block_rows=block_rows,
        buffer_blocks=buffer_blocks,
        return_csr=True,
        seed=4,
    )
    held, copies = [], []
    for _ in range(3):  # epochs: buffers' storage is reused within and across them
        for minibatch in sampler:
            indptr, indices, data = minibatch["x_csr"]
            got = sp.csr_matrix((data, indices, indptr), shape=(len(minibatch["rows"]), N_GENES))
            np.testing.assert_array_equal(got.toarray(), counts[minibatch["rows"]].toarray())
            np.testing.assert_array_equal(minibatch["library"], counts[minibatch["rows"]].sum(axis=1).A1)
            held.append(minibatch)
            copies.append({key: minibatch[key].copy() for key in ("x", "library")})
    for minibatch, copy in zip(held, copies, strict=True):  # later buffers wrote nothing into earlier minibatches
        np.testing.assert_array_equal(minibatch["x"], copy["x"])
        np.testing.assert_array_equal(minibatch["library"], copy["library"])
    # storages: one per buffer alive at once (two, or the eight-plus buffers one minibatch spans), not per buffer
    assert 1 <= len(sampler._storages) <= (2 if block_rows == 50 else 64 // buffer_blocks + 2)


def test_dask_reading_gives_the_same_minibatches_as_direct_reading(csr_store):
    rows = np.arange(0, csr_store.n_obs, 3)
    direct = list(BlockShuffleSampler(csr_store, rows, batch_size=100, buffer_blocks=2, seed=2))
    via_dask = list(BlockShuffleSampler(csr_store, rows, batch_size=100, buffer_blocks=2, seed=2, read_with="dask"))
    assert len(direct) == len(via_dask)
    for one, other in zip(direct, via_dask):
        np.testing.assert_array_equal(one["rows"], other["rows"])
        np.testing.assert_array_equal(one["x"], other["x"])


# --- determinism and resume ------------------------------------------------------------------------------------


def epoch_rows(sampler) -> np.ndarray:
    return np.concatenate(list(planned_minibatch_rows(sampler)))


def test_order_depends_on_seed_and_epoch_only():
    reader = MemoryReader(sp.csr_matrix((5000, 1)), chunk_rows=100)

    def order(seed, epoch, **kwargs):
        sampler = BlockShuffleSampler(reader, seed=seed, batch_size=64, buffer_blocks=4, **kwargs)
        sampler.set_epoch(epoch)
        return epoch_rows(sampler)

    np.testing.assert_array_equal(order(1, 0), order(1, 0))
    np.testing.assert_array_equal(order(1, 3), order(1, 3, num_workers=1, prefetch_blocks=1))
    assert not np.array_equal(order(1, 0), order(2, 0))
    assert not np.array_equal(order(1, 0), order(1, 1))


def test_iterating_again_runs_the_next_epoch():
    reader = MemoryReader(random_counts(600), chunk_rows=50)
    sampler = BlockShuffleSampler(reader, batch_size=32, buffer_blocks=2, seed=4)
    first = np.concatenate([m["rows"] for m in sampler])
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["batches_done"] == 0
    second = np.concatenate([m["rows"] for m in sampler])
    reference = BlockShuffleSampler(reader, batch_size=32, buffer_blocks=2, seed=4)
    reference.set_epoch(1)
    np.testing.assert_array_equal(second, epoch_rows(reference))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("stop_after", [0, 1, 7, 13, 22, 23])  # 23: a whole epoch of each of 3 ranks
def test_resume_mid_epoch_yields_the_remaining_minibatches_and_skips_finished_buffers(world_size, stop_after):
    counts = random_counts(3000)
    train, _ = train_validation_split(3000, seed=1)
    options = dict(batch_size=40, block_rows=100, buffer_blocks=3, seed=9, world_size=world_size)
    for rank in range(world_size):
        uninterrupted = BlockShuffleSampler(MemoryReader(counts, 100), train, rank=rank, **options)
        uninterrupted.set_epoch(2)
        full_epoch = list(planned_minibatch_rows(uninterrupted))

        interrupted = BlockShuffleSampler(MemoryReader(counts, 100), train, rank=rank, **options)
        interrupted.set_epoch(2)
        minibatches = iter(interrupted)
        before = [next(minibatches)["rows"] for _ in range(stop_after)]
        minibatches.close()  # an interrupted run: the minibatches handed out count as done
        state = interrupted.state_dict()
        assert (state["epoch"], state["batches_done"]) == (2, stop_after)

        reader = MemoryReader(counts, 100)
        resumed = BlockShuffleSampler(reader, train, rank=rank, **options)
        resumed.load_state_dict(state)
        minibatches = list(resumed)
        after = [minibatch["rows"] for minibatch in minibatches]
        for got, planned in zip(before + after, full_epoch, strict=True):
            np.testing.assert_array_equal(got, planned)
        for minibatch in minibatches:
            np.testing.assert_array_equal(minibatch["x"], counts[minibatch["rows"]].toarray())
        # Only blocks that hold cells still to emit were read.
        emitted_blocks = np.unique(np.concatenate(after) // 100) if after else np.array([], dtype=np.int64)
        read_blocks = np.unique([start // 100 for start, _ in reader.reads])
        np.testing.assert_array_equal(read_blocks, emitted_blocks)
        assert resumed.state_dict()["epoch"] == 3


def test_load_state_dict_refuses_a_state_from_other_settings():
    reader = MemoryReader(sp.csr_matrix((1000, 1)), chunk_rows=100)
    state = BlockShuffleSampler(reader, batch_size=32, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed saved 1, here 2"):
        BlockShuffleSampler(reader, batch_size=32, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batches_done"):
        BlockShuffleSampler(reader, batch_size=32, seed=1).load_state_dict({**state, "batches_done": 999})


# --- randomness ------------------------------------------------------------------------------------------------


def test_block_shuffle_mixes_contiguous_batches_nearly_as_well_as_a_fully_random_order():
    """A store of 16 batches in contiguous runs (as atlases are concatenated); the defaults' block/buffer sizes."""
    n_obs, n_batches, batch_size = 200_000, 16, 128
    batch_labels = np.arange(n_obs) * n_batches // n_obs
    reader = MemoryReader(sp.csr_matrix((n_obs, 1)), chunk_rows=4096)
    fully_random = np.random.default_rng(0).permutation(n_obs)
    random_mixing = label_mixing(
        (batch_labels[fully_random[start : start + batch_size]] for start in range(0, n_obs, batch_size)), n_batches
    )
    block_shuffled = BlockShuffleSampler(reader, batch_size=batch_size, seed=0)
    mixing = label_mixing((batch_labels[rows] for rows in planned_minibatch_rows(block_shuffled)), n_batches)
    one_block_buffers = BlockShuffleSampler(reader, batch_size=batch_size, buffer_blocks=1, seed=0)
    unmixed = label_mixing((batch_labels[rows] for rows in planned_minibatch_rows(one_block_buffers)), n_batches)
    assert mixing / random_mixing > 0.9
    assert unmixed / random_mixing < 0.2  # the measure does tell block order from a real shuffle


def test_default_blocks_are_1024_rows_for_csr_and_the_chunk_for_dense_with_65536_cell_buffers():
    csr = BlockShuffleSampler(MemoryReader(sp.csr_matrix((10, 1)), chunk_rows=4096))
    dense = BlockShuffleSampler(MemoryReader(np.zeros((10, 1)), chunk_rows=4096))
    small_chunks = BlockShuffleSampler(MemoryReader(sp.csr_matrix((10, 1)), chunk_rows=500))
    assert (csr.block_rows, csr.buffer_blocks) == (1024, 64)
    assert (dense.block_rows, dense.buffer_blocks) == (4096, 16)
    assert (small_chunks.block_rows, small_chunks.buffer_blocks) == (500, 131)


def test_label_mixing_is_zero_for_one_label_and_one_for_uniform_labels():
    assert label_mixing([np.zeros(10, dtype=int)], 4) == 0.0
    assert label_mixing([np.arange(8) % 4], 4) == pytest.approx(1.0)


# --- sequential stream -----------------------------------------------------------------------------------------


def test_sequential_stream_covers_all_rows_in_store_order(csr_store):
    minibatches = list(SequentialSampler(csr_store, batch_size=700, block_rows=256, obs_arrays={"r": np.arange(3000)}))
    assert len(minibatches) == math.ceil(3000 / 700)
    assert [len(m["rows"]) for m in minibatches] == [700, 700, 700, 700, 200]
    np.testing.assert_array_equal(np.concatenate([m["rows"] for m in minibatches]), np.arange(3000))
    np.testing.assert_array_equal(np.concatenate([m["r"] for m in minibatches]), np.arange(3000))
    np.testing.assert_array_equal(np.concatenate([m["x"] for m in minibatches]), csr_store.read_dense(0, 3000))


def test_sequential_stream_over_a_subset_sorts_it_and_reads_only_its_blocks():
    counts = random_counts(1000)
    reader = MemoryReader(counts, chunk_rows=100)
    subset = np.array([905, 3, 4, 250, 251, 999, 0])
    minibatches = list(SequentialSampler(reader, subset, batch_size=3))
    np.testing.assert_array_equal(np.concatenate([m["rows"] for m in minibatches]), np.sort(subset))
    np.testing.assert_array_equal(np.concatenate([m["x"] for m in minibatches]), counts[np.sort(subset)].toarray())
    assert sorted(reader.reads) == [(0, 5), (250, 252), (905, 1000)]


# --- threads: bounded read-ahead, errors, early exit -----------------------------------------------------------


def test_read_ahead_is_bounded():
    reader = MemoryReader(random_counts(2000), chunk_rows=100)
    sampler = BlockShuffleSampler(
        reader, batch_size=100, buffer_blocks=1, prefetch_blocks=2, prefetch_batches=1, num_workers=1
    )
    minibatches = iter(sampler)
    next(minibatches)
    time.sleep(0.3)  # let the producer run as far ahead as it may
    # consumer's block + one queued minibatch + one assembled and waiting + prefetch_blocks reads
    assert len(reader.reads) <= 1 + 1 + 1 + 2
    minibatches.close()


def test_a_failed_block_read_is_raised_in_the_consumer_with_its_row_range():
    reader = MemoryReader(random_counts(1000), chunk_rows=100, fail_rows=(530, 531))
    with pytest.raises(BlockReadError, match=r"rows \[500, 600\)") as raised:
        for _ in SequentialSampler(reader, batch_size=64):
            pass
    assert isinstance(raised.value.__cause__, OSError)
    assert not loader_threads()


def test_stopping_early_leaves_no_thread_running():
    reader = MemoryReader(random_counts(2000), chunk_rows=100)
    sampler = BlockShuffleSampler(reader, batch_size=20, buffer_blocks=2)
    for count, _ in enumerate(sampler):
        if count == 2:
            break
    assert not loader_threads()
    with pytest.raises(ZeroDivisionError):
        for _ in SequentialSampler(reader, batch_size=10):
            raise ZeroDivisionError
    assert not loader_threads()
    minibatches = iter(sampler)
    next(minibatches)
    minibatches.close()
    assert not loader_threads()


# --- bad arguments ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rows": np.array([1, 2, 2])}, "row 2 more than once"),
        ({"rows": np.array([0, 100])}, r"row 100, outside the store's rows \[0, 100\)"),
        ({"rows": np.array([0.5])}, "integer row indices"),
        ({"obs_arrays": {"batch": np.zeros(99)}}, r"obs_arrays\['batch'\] has shape \(99,\)"),
        ({"obs_arrays": {"x": np.zeros(100)}}, "clashes"),
        ({"rank": 2, "world_size": 2}, "rank=2"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"read_with": "zarr"}, "read_with='zarr'"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(kwargs, message):
    reader = MemoryReader(sp.csr_matrix((100, 3)), chunk_rows=10)
    with pytest.raises(ValueError, match=message):
        BlockShuffleSampler(reader, **kwargs)


def test_one_or_two_leftover_cells_join_the_last_minibatch():
    """k * 128 + 1 cells: the leftover cell joins the last full minibatch (a 1-cell minibatch breaks BatchNorm)."""
    for n_cells, sizes in ((129, [129]), (258, [128, 130]), (259, [128, 128, 3])):
        sampler = BlockShuffleSampler(MemoryReader(sp.csr_matrix((n_cells, 3)), chunk_rows=10), batch_size=128)
        assert [len(rows) for rows in planned_minibatch_rows(sampler)] == sizes
    with pytest.warns(UserWarning, match="one minibatch of 2 cell"):
        BlockShuffleSampler(MemoryReader(sp.csr_matrix((2, 3)), chunk_rows=10), batch_size=128)
