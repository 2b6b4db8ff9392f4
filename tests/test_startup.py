"""What a fresh process compiles before and during its first jobs: counted, not timed (timings live in
benchmarks/startup.py).

Where the C kernel builds (kernels/native.py), training (training and validation minibatches, the short last one,
CSR counts from a store and dense counts from an AnnData), the outputs and a thread-count change compile no torch
graph at all, and each C kernel is built once into the cache directory it is given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from scvi_scale.kernels import torch_ops

from scvi_scale.datasets import synthetic_atlas

pytestmark = pytest.mark.skipif(
    not torch_ops.native_ready(), reason="the C kernel cannot be built here (no C compiler or libmvec)"
)

FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import anndata, numpy as np, torch
    import torch._dynamo.utils as dynamo_utils
    from scvi_scale import SCVI
    from scvi_scale.datasets import synthetic_atlas
    from scvi_scale.kernels import native

    store = sys.argv[1]
    # 700 cells x 300 genes: a batch-128 minibatch has 38,400 entries, over torch_ops.COMPILE_MIN_ENTRIES (the
    # size from which the PyTorch path would compile); 630 training cells end on a short minibatch of 118
    synthetic_atlas(store, n_cells=700, n_genes=300, seed=0)
    counts = {}
    SCVI.setup_zarr(store, batch_key="batch")
    model = SCVI(store, n_latent=4)
    model.train(max_epochs=2, batch_size=128, check_val_every_n_epoch=1, train_size=0.9)
    counts["train (store, CSR)"] = dynamo_utils.counters["stats"]["unique_graphs"]
    model.get_latent_representation()
    model.get_normalized_expression()
    model.get_elbo()
    counts["outputs"] = dynamo_utils.counters["stats"]["unique_graphs"]
    torch.set_num_threads(1)  # what the thread tuner's probe does
    model.train(max_epochs=1, batch_size=128)
    counts["train at one thread"] = dynamo_utils.counters["stats"]["unique_graphs"]
    adata = anndata.read_zarr(store)
    adata.X = adata.X.toarray()
    SCVI.setup_anndata(adata, batch_key="batch")
    dense = SCVI(adata, n_latent=4)
    dense.train(max_epochs=1, batch_size=128)
    counts["train (AnnData, dense)"] = dynamo_utils.counters["stats"]["unique_graphs"]
    print(json.dumps({"graphs": counts, "library": native._state["library"]._name}))
""")


def test_a_fresh_process_compiles_no_graph_and_builds_the_kernel_once(tmp_path):
    environment = dict(os.environ, SCVI_SCALE_CACHE_DIR=str(tmp_path / "cache"), SCVI_SCALE_PROGRESS="0")
    environment.pop("SCVI_SCALE_KERNELS", None)
    runs = []
    for run in range(2):
        result = subprocess.run(
            [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / f"atlas{run}.zarr")],
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    for counts in runs:
        assert counts["graphs"] == {
            "train (store, CSR)": 0,
            "outputs": 0,
            "train at one thread": 0,
            "train (AnnData, dense)": 0,
        }
    built = sorted(p.name for p in (tmp_path / "cache").iterdir())
    # one library per C source (the likelihood's terms, the first layer on CSR), no partial build left
    assert [name.split("-")[0] for name in built] == ["count_terms", "csr_linear"]
    assert all(name.endswith(".so") for name in built)
    assert runs[0]["library"] == runs[1]["library"] == str(tmp_path / "cache" / built[0])  # the second reused it


def test_processes_starting_at_once_share_one_build(tmp_path):
    """Four processes build into an empty cache at the same time: each loads a whole library, one file remains."""
    script = (
        "from scvi_scale.kernels import native, torch_ops\n"
        "assert torch_ops.native_ready()\n"
        "print(native.library()._name)"
    )
    environment = dict(os.environ, SCVI_SCALE_CACHE_DIR=str(tmp_path / "cache"))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-2000:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [os.path.basename(outputs[0][0].strip())]


def test_an_unbuildable_kernel_falls_back_to_the_pytorch_path(tmp_path):
    """No C compiler: the kernel is None, the reason logged, and the likelihood still computes (PyTorch path)."""
    script = textwrap.dedent("""
        import logging, torch
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from scvi_scale import kernels
        from scvi_scale.kernels import torch_ops
        assert not torch_ops.native_ready()
        x = torch.tensor([[0.0, 2.0, 1.0]]); mu = torch.tensor([[0.5, 1.5, 2.0]]); theta = torch.tensor([1.0, 2.0, 3.0])
        print(float(kernels.count_log_likelihood(x, mu, theta, likelihood="nb")))
    """)
    environment = dict(os.environ, SCVI_SCALE_CACHE_DIR=str(tmp_path / "cache"), CC=str(tmp_path / "no-such-cc"))
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "native likelihood kernel unavailable" in result.stderr
    import scipy.stats

    want = sum(scipy.stats.nbinom.logpmf(k, n, n / (n + m)) for k, m, n in ((0, 0.5, 1), (2, 1.5, 2), (1, 2.0, 3)))
    assert abs(float(result.stdout.strip()) - want) < 1e-5


NOT_IMPORTED = ("torch._dynamo", "sympy", "anndata", "dask", "h5py", "matplotlib", "sklearn")
TRAIN_AND_OUTPUTS = textwrap.dedent("""
    import atexit, gc, json, sys
    from scvi_scale import SCVI

    store = sys.argv[1]
    SCVI.setup_zarr(store, batch_key="batch")
    model = SCVI(store, n_latent=4)
    model.train(max_epochs=2, batch_size=128, check_val_every_n_epoch=1, train_size=0.9, early_stopping=True)
    model.get_latent_representation()
    model.get_normalized_expression()
    imported = [name for name in json.loads(sys.argv[2]) if name in sys.modules]
    atexit._run_exitfuncs()  # what exit runs first: train's handler freezes the objects (no collection at exit)
    frozen = gc.get_freeze_count()
    print(json.dumps({"imported": imported, "history": sorted(model.history_), "frozen": frozen}))
""")


def test_a_fresh_process_training_from_a_store_imports_neither_torch_dynamo_nor_anndata(tmp_path):
    """What a store's training (with validation and early stopping) and its first outputs import: not torch._dynamo
    (torch.optim's optimizers import it on first use: seconds), nor sympy (a backward given a gradient tensor imports
    it: ~0.3 s), nor anndata and dask, h5py, matplotlib, sklearn (~1 s together; needed only for AnnData, written
    outputs, .h5ad, figures). Counted in sys.modules, not timed;
    and that exit will not walk the objects with the garbage collector (gc.freeze, counted)."""
    store = tmp_path / "atlas.zarr"
    synthetic_atlas(store, n_cells=400, n_genes=100, seed=0)
    environment = dict(os.environ, SCVI_SCALE_CACHE_DIR=str(tmp_path / "cache"), SCVI_SCALE_PROGRESS="0")
    environment.pop("SCVI_SCALE_KERNELS", None)
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_OUTPUTS, str(store), json.dumps(NOT_IMPORTED)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert "elbo_validation" in seen["history"]  # validation ran
    assert seen["imported"] == []
    assert seen["frozen"] > 100_000  # exit skips the collector's walk over every object the imports made
