"""Fault injection: a damaged store is refused, by name, before its counts are used.

Each damage is done to a store our writer made (format 3, crc32c per chunk) and to one anndata wrote itself
(format 2, no checksums), both a few hundred cells in many small chunks. For every damage, `Registry.build` (what
SCVI.setup_zarr runs), a CountStore reading every block and `write_store` must raise StoreError naming the store,
the array and the chunk key, and `write_store` must leave nothing behind; and every command (train, latent,
normalize, de, sample, convert) must stop with exit code 2 and one line naming them, having written nothing.

`damaged_store(folder, writer, damage)` builds one such store, for other test files (train, output commands) to
reuse: it returns the store's path and what the error must name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from scvi_scale.data import CountStore, Registry, StoreError, write_store
from scvi_scale.data import writer as store_writer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*zarr v2 data will no longer be the default.*", "ignore:.*autosharding.*"
)

N_OBS, N_VARS = 300, 40
CHUNK_ROWS = 32  # our writer's row block; data/indices chunks of ~CHUNK_ROWS * nnz per row / 4 values
ANNDATA_CHUNK = 100  # anndata's chunk length for each of data, indices, indptr
DAMAGED_CHUNK = 1  # which chunk of an array is damaged: the second, so opening the store does not touch it

WRITERS = ("ours", "anndata")
DAMAGES = (
    *(f"delete {name}" for name in ("data", "indices", "indptr")),
    *(f"garbage {name}" for name in ("data", "indices", "indptr")),
    *(f"truncate {name}" for name in ("data", "indices", "indptr")),
    "indptr decreases",
    "column out of range",
    "X deleted, still listed",
)


def counts_adata(seed: int = 0) -> ad.AnnData:
    """N_OBS x N_VARS integer counts (about 8 non-zeros per cell), a categorical batch, cell and gene names."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.3, (N_OBS, N_VARS)).astype(np.float32)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["b0", "b1"], N_OBS))}, index=[f"cell_{i}" for i in range(N_OBS)]
    )
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"gene_{i}" for i in range(N_VARS)]))


def write_intact(path: Path, writer: str) -> Path:
    """An intact store of counts_adata(): by our writer (small chunks) or by anndata's own encoder."""
    adata = counts_adata()
    if writer == "ours":
        # Small chunks, so each array has several: the floors that keep real stores from tiny chunk files, lowered.
        with (
            mock.patch.object(store_writer, "MIN_NNZ_CHUNK", 1),
            mock.patch.object(store_writer, "INDPTR_CHUNK_BLOCKS", 1),
        ):
            write_store(adata, path, chunk_rows=CHUNK_ROWS)
    else:
        adata.write_zarr(path)
        root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        ad.io.write_elem(root, "X", adata.X, dataset_kwargs={"chunks": (ANNDATA_CHUNK,)})
        zarr.consolidate_metadata(str(path))
    return path


@dataclass
class Damage:
    path: Path  # the damaged store
    array: str  # the array named in the error, e.g. "X/indices"
    chunk_key: str | None  # the chunk named in the error, e.g. "X/indices/c/1"; None when X is gone altogether


def _chunk_key(path: Path, name: str, index: int) -> str:
    array = zarr.open_group(str(path), mode="r", use_consolidated=False)["X"][name]
    return f"X/{name}/{array.metadata.encode_chunk_key((index,))}"


def damage_store(path: Path, damage: str, seed: int = 0) -> Damage:
    """Do `damage` (one of DAMAGES) to the store at `path`, in place."""
    if damage == "X deleted, still listed":
        shutil.rmtree(path / "X")
        return Damage(path, "X", None)
    if damage in ("indptr decreases", "column out of range"):
        # Rewritten through zarr, so the chunk is well formed (and its checksum right): only the structure is wrong.
        name = "indptr" if damage == "indptr decreases" else "indices"
        array = zarr.open_group(str(path), mode="r+", use_consolidated=False)["X"][name]
        position = DAMAGED_CHUNK * array.chunks[0] + 3
        array[position] = array[position - 1] - 1 if name == "indptr" else N_VARS + 5
        return Damage(path, f"X/{name}", _chunk_key(path, name, DAMAGED_CHUNK))
    kind, name = damage.split()
    key = _chunk_key(path, name, DAMAGED_CHUNK)
    chunk_file = path / key
    if kind == "delete":
        chunk_file.unlink()
    elif kind == "truncate":
        raw = chunk_file.read_bytes()
        chunk_file.write_bytes(raw[: len(raw) // 2])
    else:  # 64 garbage bytes over the middle of the chunk
        raw = bytearray(chunk_file.read_bytes())
        middle = max(0, len(raw) // 2 - 32)
        raw[middle : middle + 64] = np.random.default_rng(seed).integers(0, 256, 64, dtype=np.uint8).tobytes()
        chunk_file.write_bytes(bytes(raw))
    return Damage(path, f"X/{name}", key)


def damaged_store(folder: Path, writer: str, damage: str) -> Damage:
    """Build a store with `writer` (one of WRITERS) in `folder` and do `damage` (one of DAMAGES) to it."""
    return damage_store(write_intact(Path(folder) / f"{writer}.zarr", writer), damage)


def assert_names_the_damage(raised: pytest.ExceptionInfo, damage: Damage) -> None:
    message = str(raised.value)
    assert str(damage.path) in message and damage.array in message
    if damage.chunk_key is not None:
        assert damage.chunk_key in message


def read_every_block(path: Path) -> None:
    store = CountStore(path)
    for start, stop in zip(store.block_bounds()[:-1], store.block_bounds()[1:]):
        store.read_csr(int(start), int(stop))


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("writer", WRITERS)
def test_damaged_store_is_refused_naming_the_chunk_and_nothing_is_written(tmp_path, writer, damage):
    damaged = damaged_store(tmp_path, writer, damage)
    with pytest.raises(StoreError) as raised:
        Registry.build(damaged.path, batch_key="batch")
    assert_names_the_damage(raised, damaged)
    with pytest.raises(StoreError) as raised:
        read_every_block(damaged.path)
    assert_names_the_damage(raised, damaged)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StoreError) as raised:
        write_store(damaged.path, out / "copy.zarr", chunk_rows=CHUNK_ROWS)
    assert_names_the_damage(raised, damaged)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("writer", WRITERS)
def test_intact_stores_pass_and_read_exactly(tmp_path, writer, caplog):
    path = write_intact(tmp_path / "s.zarr", writer)
    expected = counts_adata().X.toarray()
    with caplog.at_level("INFO", logger="scvi_scale.data"):
        registry = Registry.build(path, batch_key="batch")
        store = CountStore(path)
    assert registry.n_obs == N_OBS
    assert store.checksummed == (writer == "ours")
    said = [record.getMessage() for record in caplog.records if "no chunk checksums" in record.getMessage()]
    assert len(said) == (0 if writer == "ours" else 1)  # said once, though the store was opened twice
    np.testing.assert_array_equal(store.read_dense(0, N_OBS), expected)
    np.testing.assert_array_equal(store.read_csr(37, 141).toarray(), expected[37:141])


@pytest.mark.parametrize("name", ["data", "indices", "indptr"])
def test_garbage_anywhere_in_a_chunk_of_ours_fails_its_checksum(tmp_path, name):
    """64 garbage bytes at 8 random places of a chunk: each is caught by the chunk's crc32c, whatever it decodes to."""
    intact = write_intact(tmp_path / "intact.zarr", "ours")
    key = _chunk_key(intact, name, DAMAGED_CHUNK)
    rng = np.random.default_rng(1)
    for trial in range(8):
        path = tmp_path / f"trial{trial}.zarr"
        shutil.copytree(intact, path)
        raw = bytearray((path / key).read_bytes())
        at = int(rng.integers(0, max(1, len(raw) - 64)))
        raw[at : at + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        (path / key).write_bytes(bytes(raw))
        with pytest.raises(StoreError, match=rf"chunk {key} of X/{name} fails its crc32c checksum"):
            read_every_block(path)


def test_unsorted_columns_are_said_once_and_sorted_on_read(tmp_path, caplog):
    adata = counts_adata()
    reversed_rows = adata.X.copy()
    for row in range(N_OBS):  # the same matrix, each row's columns stored in reverse order
        start, stop = reversed_rows.indptr[row], reversed_rows.indptr[row + 1]
        reversed_rows.indices[start:stop] = reversed_rows.indices[start:stop][::-1].copy()
        reversed_rows.data[start:stop] = reversed_rows.data[start:stop][::-1].copy()
    reversed_rows.has_sorted_indices = False
    adata.X = reversed_rows
    adata.write_zarr(tmp_path / "s.zarr")
    store = CountStore(tmp_path / "s.zarr")
    with caplog.at_level("WARNING", logger="scvi_scale.data"):
        first, second = store.read_csr(0, 150), store.read_csr(150, N_OBS)
    assert first.has_sorted_indices and second.has_sorted_indices
    np.testing.assert_array_equal(sp.vstack([first, second]).toarray(), counts_adata().X.toarray())
    assert sum("not sorted within rows" in record.getMessage() for record in caplog.records) == 1


def test_dense_absent_chunk_is_an_error_in_ours_and_counted_in_others(tmp_path, caplog):
    adata = counts_adata()
    adata.X = adata.X.toarray()
    adata.X[64:128] = 0  # one whole row chunk of zeros: zarr does not write it unless told to
    write_store(adata, tmp_path / "ours.zarr", chunk_rows=CHUNK_ROWS, sparse=False)
    (tmp_path / "ours.zarr" / "X" / "c" / "1" / "0").unlink()
    with pytest.raises(StoreError, match=r"chunk X/c/1/0 of X is missing from the store.*rows \[32, 64\)"):
        read_every_block(tmp_path / "ours.zarr")
    root = zarr.open_group(str(tmp_path / "anndata.zarr"), mode="w", zarr_format=3)
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    for key in ("obs", "var"):
        ad.io.write_elem(root, key, getattr(adata, key))
    ad.io.write_elem(root, "X", adata.X, dataset_kwargs={"chunks": (CHUNK_ROWS, N_VARS)})
    with caplog.at_level("WARNING", logger="scvi_scale.data"):
        store = CountStore(tmp_path / "anndata.zarr")
    assert "2 of the 10 chunks of X are not on disk and read as zeros" in caplog.text
    np.testing.assert_array_equal(store.read_dense(0, N_OBS), adata.X)


def test_write_store_leaves_nothing_when_the_damage_is_found_late(tmp_path):
    """The damaged chunk is in the last row block: blocks before it are written, then everything is removed."""
    path = write_intact(tmp_path / "s.zarr", "ours")
    last = zarr.open_group(str(path), mode="r")["X"]["data"].nchunks - 1
    (path / _chunk_key(path, "data", last)).unlink()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StoreError, match=rf"chunk {_chunk_key(path, 'data', last)} of X/data is missing"):
        write_store(path, out / "copy.zarr", chunk_rows=CHUNK_ROWS)
    assert list(out.iterdir()) == []


# --- the commands -----------------------------------------------------------------------------------------------
# Every command a damaged store can be given: run in-process through scvi_scale.cli.main (what `scvi-scale` runs),
# each must end with exit code 2 and one line on stderr naming the store, the array and the chunk, having written
# nothing: no model or checkpoint in --out, no obsm/layers/uns entry or progress folder, no output or converted store.


def command_lines(store: Path, model: Path, scratch: Path) -> dict[str, list[str]]:
    """The argv of each command over `store`; everything they could write goes below `scratch`."""
    output_options = ["--model", str(model), "--chunk-rows", str(CHUNK_ROWS)]
    return {
        "train": ["train", str(store), "--batch-key", "batch", "--out", str(scratch / "model"), "--max-epochs", "1"],
        "latent": ["latent", str(store), *output_options, "--return-dist"],
        "normalize": ["normalize", str(store), *output_options],
        "de": ["de", str(store), *output_options, "--groupby", "batch", "--table", str(scratch / "de.csv")],
        "sample": ["sample", str(store), *output_options, "--n-samples", "2"],
        "sample to another store": [
            "sample",
            str(store),
            *output_options,
            "--output-store",
            str(scratch / "outputs.zarr"),
        ],
        "convert": ["convert", str(store), str(scratch / "converted.zarr")],
    }


def files_below(folder: Path) -> dict[str, bytes]:
    """Every file and folder below `folder`, with its bytes (None for a folder)."""
    return {
        str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A model trained (briefly) on an intact store of counts_adata(), through the command line."""
    from scvi_scale.cli import main

    folder = tmp_path_factory.mktemp("intact")
    store = write_intact(folder / "ours.zarr", "ours")
    assert (
        main(
            [
                "train",
                str(store),
                "--batch-key",
                "batch",
                "--out",
                str(folder / "model"),
                "--max-epochs",
                "1",
                "--n-hidden",
                "16",
                "--n-latent",
                "4",
            ]
        )
        == 0
    )
    return folder / "model"


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("writer", WRITERS)
def test_every_command_refuses_a_damaged_store_in_one_line_and_writes_nothing(
    tmp_path, writer, damage, trained_model, capsys
):
    from scvi_scale.cli import main

    damaged = damaged_store(tmp_path / "store", writer, damage)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = files_below(tmp_path)
    capsys.readouterr()
    for name, argv in command_lines(damaged.path, trained_model, scratch).items():
        code = main(argv)
        said = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(said) == 1, f"{name}: exit code {code}, stderr {said}"
        assert said[0].startswith(f"scvi-scale {argv[0]}: error: "), f"{name}: {said[0]}"
        message = said[0]
        assert str(damaged.path) in message and damaged.array in message, f"{name}: {message}"
        if damaged.chunk_key is not None:
            assert damaged.chunk_key in message, f"{name}: {message}"
        assert files_below(tmp_path) == before, f"{name} wrote or changed files"


def test_the_installed_command_exits_with_code_2_and_one_line(tmp_path):
    """The real `python -m scvi_scale.cli` process, once: sys.exit carries main's code, stderr holds one line."""
    damaged = damaged_store(tmp_path, "ours", "garbage indices")
    done = subprocess.run(
        [sys.executable, "-m", "scvi_scale.cli", "convert", str(damaged.path), str(tmp_path / "converted.zarr")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SCVI_SCALE_PROGRESS": "0"},
    )
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and damaged.chunk_key in done.stderr
    assert not (tmp_path / "converted.zarr").exists()
