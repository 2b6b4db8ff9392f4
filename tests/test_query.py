"""prepare_query_anndata / prepare_query_zarr against scvi-tools' recorded behaviour (tests/fixtures/scvi_tools/query,
made by benchmarks/make_query_fixture.py with scvi-tools 1.5.1): queries that lack reference genes, have genes of
their own, have them in another order or share none, in place and with inplace=False, the reference given as a
directory and as a model. scvi-tools is not needed to run these tests."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_scale import SCVI
from scvi_scale.data import write_store

FIXTURE = Path(__file__).parent / "fixtures" / "scvi_tools"
RECORDED = json.loads((FIXTURE / "query" / "cases.json").read_text())
ARRAYS = dict(np.load(FIXTURE / "query" / "arrays.npz"))
CALLS = [(case, call) for case, entry in RECORDED["cases"].items() for call in entry["calls"]]
PADDED = [
    case for case, entry in RECORDED["cases"].items() if entry["calls"]["inplace.directory"]["returned"] != "error"
]


@pytest.fixture(scope="module")
def references():
    return {
        "directory": FIXTURE / "model",
        "model": SCVI.load(FIXTURE / "model", anndata.read_h5ad(FIXTURE / "data.h5ad"), accelerator="cpu"),
    }


def recorded_input(case: str) -> anndata.AnnData:
    """The query scvi-tools was given (the recording script's make_query, rebuilt from the recorded arrays)."""
    entry = RECORDED["cases"][case]
    names = entry["var_names"]
    counts = ARRAYS[f"{case}.input.X"]
    x = counts if entry["dense"] else sp.csr_matrix(counts)
    n_cells = counts.shape[0]
    return anndata.AnnData(
        X=x.copy(),
        layers={"counts": x.copy()},
        obs=pd.DataFrame({"batch": ["query_lab"] * n_cells}, index=[f"q{i}" for i in range(n_cells)]),
        var=pd.DataFrame({"symbol": [name.upper() for name in names]}, index=names),
        obsm={"X_pca": ARRAYS[f"{case}.input.obsm"]},
        uns={"lab": "another"},
    )


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def assert_matches(adata, recorded: dict, arrays_key: str):
    """`adata` has what scvi-tools' object had: genes in order, shape, X and counts, obs and obsm, var's column."""
    assert list(adata.var_names) == recorded["var_names"]
    assert list(adata.shape) == recorded["shape"] and list(adata.obs_names) == recorded["obs_names"]
    np.testing.assert_array_equal(dense(adata.X), ARRAYS[f"{arrays_key}.X"])
    np.testing.assert_array_equal(dense(adata.layers["counts"]), ARRAYS[f"{arrays_key}.counts"])
    assert list(adata.obs.columns) == recorded["obs_keys"] and sorted(adata.obsm) == recorded["obsm_keys"]
    symbol = [None if pd.isna(value) else str(value) for value in adata.var["symbol"]]
    assert symbol == recorded["var_symbol"]


@pytest.mark.parametrize("case, call", CALLS)
def test_prepare_query_anndata_does_what_scvi_tools_does(references, case, call):
    mode, kind = call.split(".")
    record = RECORDED["cases"][case]["calls"][call]
    adata = recorded_input(case)
    given = recorded_input(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if "error" in record:
            with pytest.raises(ValueError) as error:
                SCVI.prepare_query_anndata(adata, references[kind], inplace=mode == "inplace")
            assert type(error.value).__name__ == record["error"][0] and record["error"][1] in str(error.value)
            returned = None
        else:
            returned = SCVI.prepare_query_anndata(adata, references[kind], inplace=mode == "inplace")
    ours = [str(w.message) for w in caught if w.category is UserWarning]
    assert len(ours) == len(record["warnings"])
    for (_, message), text in zip(record["warnings"], ours):
        assert text.startswith(message)
        n_missing = (
            record["caller"]["var_symbol"].count(None)
            if mode == "inplace"
            else record["result"]["var_symbol"].count(None)
        )
        assert f"{n_missing} of the reference's 100 genes are missing" in text  # the numbers scvi-tools leaves out
    key = f"{case}.{call}"
    if "error" in record or mode == "inplace":
        assert returned is None and record["returned"] in ("none", "error")
        assert_matches(adata, record["caller"], f"{key}.caller")
    else:
        # inplace=False: always a new AnnData, the caller's untouched. scvi-tools returns the caller itself when no
        # gene is missing, reordered in place (recorded: "same", caller changed for a reorder); ours does not
        assert returned is not adata and record["returned"] in ("new", "same")
        assert record["caller_changed"] == (record["returned"] == "same" and case != "identical")
        assert_matches(returned, record["result"], f"{key}.result")
        assert_untouched(adata, given)
    if "error" not in record:
        prepared = adata if returned is None else returned
        # our deliberate differences: each matrix keeps its format and dtype, uns stays (scvi-tools' padding
        # makes CSR float64 and drops uns)
        assert prepared.X.dtype == np.float32 and sp.issparse(prepared.X) != RECORDED["cases"][case]["dense"]
        assert prepared.uns["lab"] == "another"


def assert_untouched(adata, given):
    """`adata` is as the caller gave it (`given`: a second copy of the same input)."""
    assert list(adata.var_names) == list(given.var_names) and adata.shape == given.shape
    np.testing.assert_array_equal(dense(adata.X), dense(given.X))
    np.testing.assert_array_equal(dense(adata.layers["counts"]), dense(given.layers["counts"]))
    pd.testing.assert_frame_equal(adata.var, given.var)
    assert adata.uns == given.uns and sorted(adata.obsm) == sorted(given.obsm)


@pytest.mark.parametrize("kind", ["directory", "model"])
def test_return_reference_var_names_returns_the_recorded_index(references, kind):
    adata = recorded_input("lacks_many")
    names = SCVI.prepare_query_anndata(adata, references[kind], return_reference_var_names=True)
    recorded = RECORDED["reference_var_names"][kind]
    assert type(names).__name__ == recorded["type"] and list(names) == recorded["values"]
    assert list(adata.var_names) == RECORDED["cases"]["lacks_many"]["var_names"]  # nothing touched


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("case", PADDED)
def test_a_query_store_reads_as_scvi_tools_pads_the_anndata(tmp_path, case):
    """The same queries as stores: prepare_query_zarr reads what scvi-tools' in-place padding leaves in the
    AnnData, names the missing count in a warning, and leaves the store as it was."""
    adata = recorded_input(case)
    store = write_store(adata, tmp_path / "query.zarr")
    before = _tree_digest(tmp_path / "query.zarr")
    record = RECORDED["cases"][case]["calls"]["inplace.directory"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aligned = SCVI.prepare_query_zarr(store.path, FIXTURE / "model")
    n_missing = record["caller"]["var_symbol"].count(None)
    messages = [str(w.message) for w in caught if w.category is UserWarning]
    if n_missing:
        assert any(
            f"{n_missing} of the reference's 100 genes are missing from the query and read as zeros" in m
            for m in messages
        )
    assert (
        all(m.split(": ", 1)[1].startswith(record["warnings"][0][1]) for m in messages)
        if record["warnings"]
        else not any("less than 80%" in m for m in messages)
    )
    assert list(aligned.var_names) == record["caller"]["var_names"]
    np.testing.assert_array_equal(aligned.read_dense(0, aligned.n_obs), ARRAYS[f"{case}.inplace.directory.caller.X"])
    assert _tree_digest(tmp_path / "query.zarr") == before


def test_a_query_store_sharing_no_gene_is_refused(tmp_path):
    store = write_store(recorded_input("no_shared"), tmp_path / "query.zarr")
    with pytest.raises(ValueError, match="none of its 5 genes is among the reference's 100 genes"):
        SCVI.prepare_query_zarr(store.path, FIXTURE / "model")


def test_load_query_data_says_what_is_wrong_with_an_unprepared_query(references):
    adata = recorded_input("lacks_few_own_shuffled")
    adata.obs["batch"] = "batch_0"
    with pytest.raises(
        ValueError,
        match=r"it has 93 genes, 90 of the reference's 100\): call "
        r"SCVI.prepare_query_anndata",
    ):
        SCVI.load_query_data(adata, references["directory"])
