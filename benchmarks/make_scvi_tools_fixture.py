"""Make the scvi-tools interchange fixture under tests/fixtures/scvi_tools/ (run with a Python that has scvi-tools).

    /work/peer-venv/bin/python benchmarks/make_scvi_tools_fixture.py [--check-only]

Writes, from a tiny synthetic data set (200 cells x 100 genes, 3 batches, 4 labels, negative-binomial counts):
    data.h5ad        the counts (X, int counts as float32 CSR) and obs "batch", "cell_type"
    model/model.pt   scvi-tools' SCVI.save of a model trained a few epochs on it (ZINB, gene dispersion,
                     use_observed_lib_size=False so the library prior buffers are exercised, 2 layers)
    expected.npz     scvi-tools' own outputs on those cells, float32:
                     latent (n_cells, n_latent)   get_latent_representation() (posterior mean of z)
                     px_rate (n_cells, n_genes)   the generative model's px_rate at z = posterior mean and
                                                  library = ql's mean (eval mode, no sampling)
                     px_scale, theta (n_genes,), zi_logits (n_cells, n_genes) from the same pass
                     normalized (n_cells, n_genes) get_normalized_expression(library_size=1) with its mean z
With --outputs it records, with the scvi-tools it runs (1.5.1 here), on the fixture model's very weights:
    outputs.npz      normalized expression averaged over 400 draws of z (uniform) and over importance-weighted
                     draws of a group (weights="importance", n_samples_overall=4000), likelihood parameters
                     averaged over 200 draws, the latent library size, raw-count DE statistics and Bayes
                     factors of type_0 against the rest (arrays named de_<column>)
    options/<name>/  models trained with the module options scvi-scale maps (batch embedding,
                     log_variational=False, a softplus var_activation, extra encoder/decoder kwargs, the
                     normal likelihood) and expected.npz of each: latent means and px_rate at them
Then it checks the other direction once: the main environment (.venv, scvi-scale without scvi-tools) loads the
fixture and writes it back in scvi-tools' format (SCVI.save(format="scvi-tools")) into a temporary folder,
scvi-tools loads that, and the script prints how far the two latents are apart (it fails above 1e-5).
--check-only skips making the fixture.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "scvi_tools"
MAIN_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
N_CELLS, N_GENES, N_BATCHES, N_TYPES = 200, 100, 3, 4
SEED = 0


def synthetic_anndata() -> anndata.AnnData:
    """Cells of N_TYPES types with type-specific gene profiles and a per-batch gene effect, NB counts."""
    rng = np.random.default_rng(SEED)
    cell_type = rng.integers(0, N_TYPES, N_CELLS)
    batch = np.arange(N_CELLS) * N_BATCHES // N_CELLS
    type_logits = rng.normal(0.0, 1.5, (N_TYPES, N_GENES))
    batch_logits = rng.normal(0.0, 0.3, (N_BATCHES, N_GENES))
    logits = type_logits[cell_type] + batch_logits[batch]
    profile = np.exp(logits - logits.max(axis=1, keepdims=True))
    profile /= profile.sum(axis=1, keepdims=True)
    library = np.exp(rng.normal(np.log(800.0), 0.3, N_CELLS))
    mean = library[:, None] * profile
    theta = 2.0
    counts = rng.negative_binomial(theta, theta / (theta + mean)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
            "cell_type": pd.Categorical([f"type_{t}" for t in cell_type]),
        },
        index=[f"cell_{i}" for i in range(N_CELLS)],
    )
    var = pd.DataFrame(index=[f"gene_{g}" for g in range(N_GENES)])
    return anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


def make_fixture() -> None:
    scvi.settings.seed = SEED
    adata = synthetic_anndata()
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = scvi.model.SCVI(adata, n_hidden=32, n_latent=5, n_layers=2, use_observed_lib_size=False)
    model.train(max_epochs=20, batch_size=64, accelerator="cpu", enable_progress_bar=False)
    FIXTURE.mkdir(parents=True, exist_ok=True)
    adata_plain = anndata.AnnData(X=adata.X.copy(), obs=adata.obs[["batch", "cell_type"]].copy(), var=adata.var[[]])
    adata_plain.write_h5ad(FIXTURE / "data.h5ad", compression="gzip")
    model.save(FIXTURE / "model", overwrite=True)

    module = model.module.eval()
    x = torch.as_tensor(adata.X.toarray())
    batch_index = torch.as_tensor(adata.obs["batch"].cat.codes.to_numpy(), dtype=torch.long)[:, None]
    labels = torch.as_tensor(adata.obs["cell_type"].cat.codes.to_numpy(), dtype=torch.long)[:, None]
    with torch.no_grad():
        inference = module.inference(x, batch_index)
        z_mean = inference["qz"].loc
        library_mean = inference["ql"].loc
        generative = module.generative(z_mean, library_mean, batch_index, y=labels)
        px = generative["px"]
    latent = model.get_latent_representation()
    np.testing.assert_allclose(latent, z_mean.numpy(), rtol=1e-5, atol=1e-6)
    normalized = model.get_normalized_expression(library_size=1.0, return_numpy=True, n_samples=1)
    np.savez_compressed(
        FIXTURE / "expected.npz",
        latent=latent.astype(np.float32),
        library_mean=library_mean.numpy().astype(np.float32),
        px_rate=px.mu.numpy().astype(np.float32),
        px_scale=generative["px"].scale.numpy().astype(np.float32),
        theta=px.theta.numpy().astype(np.float32),
        zi_logits=px.zi_logits.numpy().astype(np.float32),
        normalized_one_sample=np.asarray(normalized, dtype=np.float32),
    )
    print(f"fixture written to {FIXTURE}: latent {latent.shape}, px_rate {tuple(px.mu.shape)}")


# Run by the main environment (scvi-scale, no scvi-tools): load the fixture, write it back in scvi-tools' format.
SCVI_SCALE_SIDE = """
import sys, numpy as np
from scvi_scale import SCVI
from scvi_scale.data import write_store
fixture, work = sys.argv[1], sys.argv[2]
store = write_store(fixture + "/data.h5ad", work + "/cells.zarr")
model = SCVI.load(fixture + "/model", store)
model.save(work + "/roundtrip", format="scvi-tools")
np.save(work + "/scvi_scale_latent.npy", model.get_latent_representation())
"""


OPTION_MODELS = {
    "embedding": dict(batch_representation="embedding", encode_covariates=True),
    "log_variational_false": dict(log_variational=False),
    "softplus_variance": dict(var_activation=torch.nn.functional.softplus),
    "extra_kwargs": dict(extra_encoder_kwargs={"var_eps": 1e-3}, extra_decoder_kwargs={"bias": False}),
    "normal": dict(gene_likelihood="normal"),
}


def importance_weights_case(model, adata, group, n_samples: int = 10) -> dict:
    """scvi-tools' get_importance_weights on draws of the group's cells, with every input it used: the draws zs
    (S, B, L), their px (scale, theta, zi_logits), q(z | x) of the cells (the anchors), their counts and log p(x),
    so the weights can be recomputed from the same numbers (importance_*)."""
    loader = model._make_data_loader(adata=adata, indices=group, batch_size=len(group))
    tensors = next(iter(loader))
    with torch.no_grad():
        inference, generative = model.module.forward(
            tensors, inference_kwargs={"n_samples": n_samples}, compute_loss=False
        )
    qz, px, zs = inference["qz"], generative["px"], inference["z"]
    scvi.settings.seed = SEED
    probabilities = model.get_importance_weights(adata, group, qz=qz, px=px, zs=zs)
    scvi.settings.seed = SEED
    log_px = model.get_marginal_ll(adata, indices=group, return_mean=False, n_mc_samples=500, n_mc_samples_per_pass=250)
    return {
        "importance_zs": zs.numpy(),
        "importance_scale": px.scale.numpy(),
        "importance_zi_logits": px.zi_logits.numpy(),
        "importance_theta": px.theta.numpy(),
        "importance_qz_loc": qz.loc.numpy(),
        "importance_qz_scale": qz.scale.numpy(),
        "importance_x": tensors["X"].numpy(),
        "importance_log_px": log_px.numpy(),
        "importance_probabilities": probabilities,
    }


def record_outputs() -> None:
    """scvi-tools' outputs of the fixture model (see the module docstring), and the option models."""
    adata = anndata.read_h5ad(FIXTURE / "data.h5ad")
    model = scvi.model.SCVI.load(str(FIXTURE / "model"), adata=adata, accelerator="cpu")
    scvi.settings.seed = SEED
    group = np.flatnonzero(adata.obs["cell_type"].to_numpy() == "type_0")
    recorded = {
        "normalized_mean": model.get_normalized_expression(n_samples=400, return_numpy=True),
        "group": group,
        "importance_mean": model.get_normalized_expression(
            indices=group, n_samples_overall=4000, weights="importance", return_numpy=True
        ).mean(0),
        "uniform_group_mean": model.get_normalized_expression(
            indices=group, n_samples_overall=4000, return_numpy=True
        ).mean(0),
        "library_mean": model.get_latent_library_size(give_mean=True),
    }
    recorded.update(importance_weights_case(model, adata, group))
    for name, values in model.get_likelihood_parameters(n_samples=200, give_mean=True).items():
        recorded[f"likelihood_{name}"] = values
    vanilla = model.differential_expression(groupby="cell_type", group1="type_0", n_samples_overall=20000)
    vanilla = vanilla.loc[adata.var_names]  # gene order, so the arrays line up with var
    for column in (
        "proba_m1",
        "bayes_factor",
        "scale1",
        "scale2",
        "raw_mean1",
        "raw_mean2",
        "non_zeros_proportion1",
        "non_zeros_proportion2",
        "raw_normalized_mean1",
        "raw_normalized_mean2",
    ):
        recorded[f"de_{column}"] = vanilla[column].to_numpy()
    change = model.differential_expression(
        groupby="cell_type", group1="type_0", mode="change", n_samples_overall=20000
    ).loc[adata.var_names]
    for column in ("proba_de", "lfc_mean", "lfc_median"):
        recorded[f"de_change_{column}"] = change[column].to_numpy()
    np.savez_compressed(
        FIXTURE / "outputs.npz",
        scvi_tools_version=np.array(scvi.__version__),
        **{k: np.asarray(v, dtype=np.float32 if k != "group" else np.int64) for k, v in recorded.items()},
    )
    for name, options in OPTION_MODELS.items():
        scvi.settings.seed = SEED
        data = anndata.read_h5ad(FIXTURE / "data.h5ad")
        if options.get("gene_likelihood") == "normal":
            data.X = data.X.log1p()  # a normal likelihood is for continuous data
        scvi.model.SCVI.setup_anndata(data, batch_key="batch")
        option_model = scvi.model.SCVI(data, n_hidden=32, n_latent=5, **options)
        option_model.train(max_epochs=5, batch_size=64, accelerator="cpu", enable_progress_bar=False)
        folder = FIXTURE / "options" / name
        option_model.save(str(folder), overwrite=True)
        if options.get("gene_likelihood") == "normal":
            data.write_h5ad(folder / "data.h5ad", compression="gzip")
        module = option_model.module.eval()
        tensors = next(iter(option_model._make_data_loader(data, batch_size=data.n_obs)))
        with torch.no_grad():
            inference = module.inference(tensors["X"], tensors["batch"])
            generative = module.generative(
                inference["qz"].loc, inference["library"], tensors["batch"], y=tensors["labels"]
            )
        np.savez_compressed(
            folder / "expected.npz",
            latent=option_model.get_latent_representation(),
            px_rate=generative["px"].mu.numpy() if name != "normal" else generative["px"].loc.numpy(),
        )
    print(f"outputs of scvi-tools {scvi.__version__} recorded in {FIXTURE}")


def check_roundtrip() -> None:
    """scvi-tools loads a model directory that scvi-scale's scvi-tools-format save wrote, with the same latent."""
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([str(MAIN_PYTHON), "-c", SCVI_SCALE_SIDE, str(FIXTURE), work], check=True)
        adata = anndata.read_h5ad(FIXTURE / "data.h5ad")
        model = scvi.model.SCVI.load(str(Path(work) / "roundtrip"), adata=adata, accelerator="cpu")
        ours = np.load(Path(work) / "scvi_scale_latent.npy")
        theirs = model.get_latent_representation()
        expected = np.load(FIXTURE / "expected.npz")["latent"]
    difference = float(np.abs(ours - theirs).max())
    print(f"scvi-tools loaded scvi-scale's scvi-tools-format save output: max |latent difference| = {difference:.2e}")
    original_difference = float(np.abs(expected - theirs).max())
    print(f"  (scvi-tools' latent of the original model vs the round trip: {original_difference:.2e})")
    if difference > 1e-5:
        raise SystemExit("round trip FAILED: latents differ")
    print("round trip OK")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-only", action="store_true", help="only check the scvi-scale -> scvi-tools direction")
    parser.add_argument("--outputs", action="store_true", help="only record scvi-tools' outputs and option models")
    arguments = parser.parse_args()
    if arguments.outputs:
        record_outputs()
        sys.exit(0)
    if not arguments.check_only:
        make_fixture()
    check_roundtrip()
    sys.exit(0)
