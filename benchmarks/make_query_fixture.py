"""Record scvi-tools' SCVI.prepare_query_anndata on small queries, for tests/test_query.py (run with scvi-tools).

    /work/peer/bin/python benchmarks/make_query_fixture.py

The reference is the interchange fixture's model (tests/fixtures/scvi_tools/model: 100 genes gene_0..gene_99).
Each query has 6 cells, X and layers["counts"] (CSR float32 unless the case says dense), an obs column, an obsm
entry, an uns entry and a var column, so what the call keeps of each is seen. The cases (QUERY_CASES) lack
reference genes, have genes of their own, have them in another order, or share none. Each is called in place
(inplace=True) and with inplace=False, with the reference given as its directory and as a loaded model, and
return_reference_var_names=True once per reference kind. Writes tests/fixtures/scvi_tools/query/:
    cases.json   per case: the input's var names and dense flag; per call (case, mode, reference kind): what
                 was returned ("none", "same" object, "new" object, or the error), whether the caller's
                 object changed, the warnings, and for the caller after the call and for the returned object:
                 var names, shape, obs / obsm / uns / var keys, the var column, sparse or dense, X's dtype
    arrays.npz   the inputs' X and counts layer (dense) and, per call, X and counts of the caller after the
                 call and of the returned object (dense), named <case>.<mode>.<reference>.<which>.<X|counts>
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "scvi_tools"
OUT = FIXTURE / "query"
N_CELLS, N_REFERENCE_GENES = 6, 100
SEED = 0


def query_var_names(rng) -> dict[str, tuple[list[str], bool]]:
    """case -> (the query's var names, X dense)."""
    reference = [f"gene_{g}" for g in range(N_REFERENCE_GENES)]
    order = rng.permutation(N_REFERENCE_GENES)
    return {
        "lacks_few_own_shuffled": ([reference[g] for g in order[10:]] + ["own_0", "own_1", "own_2"], False),
        "lacks_few_dense": ([reference[g] for g in sorted(order[10:])] + ["own_0"], True),
        "lacks_many": (reference[40:][::-1] + ["own_0", "own_1"], False),
        "reordered": ([reference[g] for g in order], False),
        "own_genes": (reference + ["own_0", "own_1", "own_2", "own_3"], False),
        "identical": (reference, False),
        "no_shared": ([f"own_{i}" for i in range(5)], False),
    }


def make_query(names: list[str], dense: bool, rng) -> anndata.AnnData:
    counts = rng.poisson(2.0, (N_CELLS, len(names))).astype(np.float32)
    x = counts if dense else sp.csr_matrix(counts)
    return anndata.AnnData(
        X=x.copy(),
        layers={"counts": x.copy()},
        obs=pd.DataFrame({"batch": ["query_lab"] * N_CELLS}, index=[f"q{i}" for i in range(N_CELLS)]),
        var=pd.DataFrame({"symbol": [name.upper() for name in names]}, index=names),
        obsm={"X_pca": np.arange(N_CELLS * 2, dtype=np.float32).reshape(N_CELLS, 2)},
        uns={"lab": "another"},
    )


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def describe(adata, prefix: str, arrays: dict) -> dict:
    arrays[f"{prefix}.X"] = dense(adata.X)
    if "counts" in adata.layers:
        arrays[f"{prefix}.counts"] = dense(adata.layers["counts"])
    symbol = adata.var["symbol"] if "symbol" in adata.var else None
    return {
        "var_names": list(map(str, adata.var_names)),
        "shape": list(adata.shape),
        "obs_keys": list(adata.obs.columns),
        "obs_names": list(map(str, adata.obs_names)),
        "obsm_keys": sorted(adata.obsm.keys()),
        "uns_keys": sorted(adata.uns.keys()),
        "layers": sorted(adata.layers.keys()),
        "var_symbol": None if symbol is None else [None if pd.isna(v) else str(v) for v in symbol],
        "x_sparse": bool(sp.issparse(adata.X)),
        "x_dtype": str(adata.X.dtype),
        "counts_dtype": str(adata.layers["counts"].dtype) if "counts" in adata.layers else None,
    }


def record_call(case: str, mode: str, reference_kind: str, build, reference, arrays: dict) -> dict:
    adata = build()
    before_names, before_x = list(adata.var_names), dense(adata.X).copy()
    key = f"{case}.{mode}.{reference_kind}"
    record: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            returned = scvi.model.SCVI.prepare_query_anndata(adata, reference, inplace=mode == "inplace")
        except Exception as error:  # noqa: BLE001 (what scvi-tools raises is the record)
            record["error"] = [type(error).__name__, str(error)]
            returned = None
    record["warnings"] = [[w.category.__name__, str(w.message)] for w in caught if w.category is UserWarning]
    record["returned"] = (
        "error" if "error" in record else ("none" if returned is None else ("same" if returned is adata else "new"))
    )
    record["caller_changed"] = list(adata.var_names) != before_names or not np.array_equal(dense(adata.X), before_x)
    record["caller"] = describe(adata, f"{key}.caller", arrays)
    if record["returned"] in ("same", "new"):
        record["result"] = describe(returned, f"{key}.result", arrays)
    return record


def main() -> None:
    scvi.settings.seed = SEED
    rng = np.random.default_rng(SEED)
    cases = query_var_names(rng)
    inputs, arrays = {}, {}
    for case, (names, is_dense) in cases.items():
        inputs[case] = make_query(names, is_dense, rng)
        arrays[f"{case}.input.X"] = dense(inputs[case].X)
        arrays[f"{case}.input.obsm"] = inputs[case].obsm["X_pca"]
    directory = str(FIXTURE / "model")
    model = scvi.model.SCVI.load(directory, adata=anndata.read_h5ad(FIXTURE / "data.h5ad"), accelerator="cpu")
    references = {"directory": directory, "model": model}
    recorded = {
        "scvi_tools_version": scvi.__version__,
        "anndata_version": anndata.__version__,
        "reference_var_names": {},
        "cases": {},
    }
    for kind, reference in references.items():
        var_names = scvi.model.SCVI.prepare_query_anndata(
            inputs["lacks_many"].copy(), reference, return_reference_var_names=True
        )
        recorded["reference_var_names"][kind] = {"type": type(var_names).__name__, "values": list(var_names)}
    for case, (names, is_dense) in cases.items():
        calls = {}
        for mode in ("inplace", "copy"):
            for kind, reference in references.items():
                calls[f"{mode}.{kind}"] = record_call(case, mode, kind, inputs[case].copy, reference, arrays)
        recorded["cases"][case] = {"var_names": names, "dense": is_dense, "calls": calls}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cases.json").write_text(json.dumps(recorded, separators=(",", ":")) + "\n")
    np.savez_compressed(OUT / "arrays.npz", **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    for case, entry in recorded["cases"].items():
        call = entry["calls"]["inplace.directory"]
        copy = entry["calls"]["copy.directory"]
        print(
            f"{case:24s} in place: {call['returned']:5s} changed={call['caller_changed']!s:5s} "
            f"{call['caller']['shape']} | inplace=False: {copy['returned']:5s} changed={copy['caller_changed']!s:5s}"
            f" warnings={len(call['warnings'])} {call.get('error', [''])[0]}"
        )
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
