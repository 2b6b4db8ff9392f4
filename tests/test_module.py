"""Tests of scvi_scale.nn and scvi_scale.module (scVI's VAE).

References are written here from the formulas in float64: the Gaussian KL terms, the ZINB / NB / Poisson
log-likelihoods, one covariate-injected block, and a cell-type-blind NB baseline for the learning check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scvi_scale.kernels import csr_linear
from torch import nn

from scvi_scale.module import DISPERSIONS, GENE_LIKELIHOODS, VAE, Minibatch, to_tensors
from scvi_scale.nn import FCLayers
from scvi_scale.settings import settings

N_GENES = 40

# torch warns once per process that CSR support is in beta; the CSR path is checked against the dense one here.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which on a loaded machine costs
    ~20x (measured: 8 ms against 150-400 ms per training step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tensors(
    n_cells=32, n_genes=N_GENES, n_batch=0, n_labels=0, n_cats_per_cov=(), n_cont=0, seed=0, size_factor=False
):
    """A minibatch dict of random counts (~70% zeros) and covariates drawn in their valid ranges."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.rand(n_cells, n_genes, generator=generator) * 4
    counts = torch.poisson(means, generator=generator) * (torch.rand(n_cells, n_genes, generator=generator) < 0.4)
    counts[:, 0] += 1  # every cell has a positive library
    tensors = {"x": counts}
    if n_batch:
        tensors["batch"] = torch.randint(0, n_batch, (n_cells, 1), generator=generator)
    if n_labels:
        tensors["labels"] = torch.randint(0, n_labels, (n_cells,), generator=generator)
    if n_cats_per_cov:
        tensors["cat_covs"] = torch.stack(
            [torch.randint(0, n, (n_cells,), generator=generator) for n in n_cats_per_cov], dim=1
        )
    if n_cont:
        tensors["cont_covs"] = torch.randn(n_cells, n_cont, generator=generator)
    if size_factor:
        tensors["size_factor"] = torch.rand(n_cells, generator=generator) * 100 + 10
    return tensors


def library_prior(n_batch):
    """Per-batch log-library means and variances, as a registry would compute them."""
    n = max(n_batch, 1)
    return np.linspace(3.0, 4.0, n), np.linspace(0.5, 1.5, n)


def f64(tensor):
    return tensor.detach().double().numpy()


def seeded(function, seed=123):
    """Runs function() right after seeding torch, so that two calls draw the same z and l."""
    torch.manual_seed(seed)
    return function()


# ------------------------------------------------------------------------------------ float64 references


def kl_normal_reference(q_mean, q_var, p_mean, p_var):
    """KL(N(q_mean, q_var) || N(p_mean, p_var)) elementwise, float64 numpy."""
    return 0.5 * (np.log(p_var / q_var) + (q_var + (q_mean - p_mean) ** 2) / p_var - 1.0)


def log_likelihood_reference(x, mu, theta, zi_logits, likelihood):
    """Per-cell sum over genes of log p(x), float64, from the textbook formulas."""
    x, mu = x.double(), mu.double()
    if likelihood == "poisson":
        return (x * torch.log(mu) - mu - torch.lgamma(x + 1)).sum(-1)
    theta = theta.double().expand_as(mu)
    if likelihood == "normal":  # scvi-tools' Normal(px_rate, theta): theta is the standard deviation
        return (-0.5 * math.log(2 * math.pi) - torch.log(theta) - (x - mu) ** 2 / (2 * theta**2)).sum(-1)
    log_nb = (
        torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
        + theta * torch.log(theta / (theta + mu))
        + x * torch.log(mu / (theta + mu))
    )
    if likelihood == "nb":
        return log_nb.sum(-1)
    pi = torch.sigmoid(zi_logits.double())
    log_zinb = torch.where(x == 0, torch.log(pi + (1 - pi) * torch.exp(log_nb)), torch.log(1 - pi) + log_nb)
    return log_zinb.sum(-1)


# ------------------------------------------------------------------------------------------------ tests


def test_kl_terms_match_the_closed_form():
    n_batch = 3
    means, variances = library_prior(n_batch)
    module = VAE(
        N_GENES, n_batch=n_batch, use_observed_lib_size=False, library_log_means=means, library_log_vars=variances
    ).eval()
    tensors = make_tensors(n_batch=n_batch)
    inference = seeded(lambda: module.inference(tensors))
    losses = seeded(lambda: module.loss(tensors, kl_weight=0.3))

    qz, ql = inference["qz"], inference["ql"]
    q_mean, q_var = f64(qz.loc), f64(qz.scale) ** 2
    kl_z = kl_normal_reference(q_mean, q_var, 0.0, 1.0).sum(-1)
    batch = tensors["batch"].numpy().ravel()
    l_mean, l_var = f64(ql.loc)[:, 0], f64(ql.scale)[:, 0] ** 2
    kl_l = kl_normal_reference(l_mean, l_var, means[batch], variances[batch])

    np.testing.assert_allclose(losses["kl_z"].detach().numpy(), kl_z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses["kl_l"].detach().numpy(), kl_l, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses["kl_local"].detach().numpy(), kl_z + kl_l, rtol=1e-5, atol=1e-6)
    # The warm-up weight applies to the z term only.
    reconstruction = f64(losses["reconstruction_loss"])
    expected_loss = np.mean(reconstruction + 0.3 * kl_z + kl_l)
    assert losses["loss"].item() == pytest.approx(expected_loss, rel=1e-5)


def test_encoder_reads_log1p_counts_and_floors_the_variance():
    module = VAE(N_GENES).eval()
    tensors = make_tensors()
    seen = []
    module.z_encoder.encoder.fc_layers[0][0].register_forward_pre_hook(lambda layer, inputs: seen.append(inputs[0]))
    inference = module.inference(tensors)
    torch.testing.assert_close(seen[0], torch.log1p(tensors["x"]))
    assert inference["ql"] is None
    # A variance head driven far negative leaves exactly the floor var_eps.
    with torch.no_grad():
        module.z_encoder.var_encoder.bias.fill_(-100.0)
    floored = module.inference(tensors)["qz"].scale ** 2
    torch.testing.assert_close(floored, torch.full_like(floored, module.z_encoder.var_eps))
    torch.testing.assert_close(inference["library"], torch.log(tensors["x"].sum(1, keepdim=True)))
    with_size_factor = make_tensors(size_factor=True)
    torch.testing.assert_close(
        module.inference(with_size_factor)["library"][:, 0], torch.log(with_size_factor["size_factor"])
    )


@pytest.mark.parametrize("likelihood", GENE_LIKELIHOODS)
@pytest.mark.parametrize("dispersion", DISPERSIONS)
def test_reconstruction_loss_matches_the_likelihood_formula(dispersion, likelihood):
    n_batch, n_labels = 2, 3
    module = VAE(N_GENES, n_batch=n_batch, n_labels=n_labels, dispersion=dispersion, gene_likelihood=likelihood).eval()
    tensors = make_tensors(n_batch=n_batch, n_labels=n_labels, seed=1)
    inference = seeded(lambda: module.inference(tensors))
    generative = module.generative(inference["z"], inference["library"], tensors)
    losses = seeded(lambda: module.loss(tensors))

    expected = -log_likelihood_reference(
        tensors["x"], generative["px_rate"], generative["theta"], generative["zi_logits"], likelihood
    )
    torch.testing.assert_close(losses["reconstruction_loss"].double(), expected, rtol=1e-5, atol=1e-3)

    # theta's shape and source for each dispersion.
    theta = generative["theta"]
    if likelihood == "poisson":
        assert theta is None and not hasattr(module, "px_r")
    elif dispersion == "gene":
        torch.testing.assert_close(theta, torch.exp(module.px_r))
    elif dispersion == "gene-batch":
        batch = tensors["batch"].ravel()
        torch.testing.assert_close(theta, torch.exp(module.px_r[:, batch].t()))
    elif dispersion == "gene-label":
        torch.testing.assert_close(theta, torch.exp(module.px_r[:, tensors["labels"]].t()))
    else:
        torch.testing.assert_close(theta, torch.exp(module.decoder.px_r_decoder(generative["hidden"])))
    assert (generative["zi_logits"] is not None) == (likelihood == "zinb")


def test_output_shapes():
    n_cells, n_latent, n_hidden = 16, 5, 24
    module = VAE(N_GENES, n_batch=2, n_hidden=n_hidden, n_latent=n_latent, dispersion="gene-batch").eval()
    tensors = make_tensors(n_cells=n_cells, n_batch=2)
    inference = module.inference(tensors)
    assert inference["qz"].loc.shape == inference["qz"].scale.shape == (n_cells, n_latent)
    assert inference["z"].shape == (n_cells, n_latent)
    assert inference["library"].shape == (n_cells, 1)
    many = module.inference(tensors, n_samples=3)
    assert many["z"].shape == (3, n_cells, n_latent)
    assert many["library"].shape == (3, n_cells, 1)
    generative = module.generative(inference["z"], inference["library"], tensors)
    for key in ("px_scale", "px_rate", "theta", "zi_logits"):
        assert generative[key].shape == (n_cells, N_GENES), key
    assert generative["hidden"].shape == (n_cells, n_hidden)
    torch.testing.assert_close(generative["px_scale"].sum(-1), torch.ones(n_cells))
    torch.testing.assert_close(generative["px_rate"], torch.exp(inference["library"]) * generative["px_scale"])
    losses = module.loss(tensors)
    assert losses["loss"].shape == ()
    for key in ("reconstruction_loss", "kl_local", "kl_z", "kl_l"):
        assert losses[key].shape == (n_cells,), key
    with pytest.raises(ValueError, match="one draw at a time"):
        module.generative(many["z"], many["library"], tensors)
    # asking for some outputs computes those alone, with the same values
    for asked in [("px_scale",), ("px_rate",), ("theta", "zi_logits")]:
        some = module.generative(inference["z"], inference["library"], tensors, outputs=asked)
        assert set(some) == {*asked, "hidden"}
        for key in asked:
            torch.testing.assert_close(some[key], generative[key])
    with pytest.raises(ValueError, match="px_dropout"):
        module.generative(inference["z"], inference["library"], tensors, outputs=("px_dropout",))


def test_several_draws_come_from_q():
    module, tensors = build(CONFIGS["latent-library"])
    module.eval()
    n_samples = 400
    inference = module.inference(tensors, n_samples=n_samples)
    for draws, q in ((inference["z"], inference["qz"]), (inference["library"], inference["ql"])):
        assert draws.shape == (n_samples, *q.loc.shape)
        # Each mean within 5 standard errors of the location.
        assert torch.all((draws.mean(0) - q.loc).abs() < 5 * q.scale / n_samples**0.5)
        torch.testing.assert_close(draws.std(0), q.scale, rtol=0.2, atol=0.0)


def test_logistic_normal_latent():
    module = VAE(N_GENES, latent_distribution="ln").eval()
    tensors = make_tensors()
    inference = seeded(lambda: module.inference(tensors))
    z = inference["z"]
    assert torch.all(z > 0)
    torch.testing.assert_close(z.sum(-1), torch.ones(z.shape[0]))
    # The KL is taken on the untransformed Normal.
    qz = inference["qz"]
    kl_z = kl_normal_reference(f64(qz.loc), f64(qz.scale) ** 2, 0.0, 1.0).sum(-1)
    losses = seeded(lambda: module.loss(tensors))
    np.testing.assert_allclose(losses["kl_z"].detach().numpy(), kl_z, rtol=1e-5, atol=1e-6)


def test_covariates_are_injected_one_hot_in_order():
    """A block without norms, in eval mode, equals relu(W [x, onehot(batch), onehot(cat)] + b) computed in
    float64; a covariate with a single category adds no input."""
    n_in, n_out = 6, 5
    layers = FCLayers(n_in, n_out, n_cat_list=[3, 1, 4], n_layers=1, use_batch_norm=False).eval()
    linear = layers.fc_layers[0][0]
    assert linear.in_features == n_in + 3 + 4
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, n_in, generator=generator)
    codes = [torch.randint(0, n, (10, 1), generator=generator) for n in (3, 1, 4)]
    one_hot = [np.eye(n)[c.numpy().ravel()] for n, c in ((3, codes[0]), (4, codes[2]))]
    inputs = np.concatenate([f64(x), *one_hot], axis=1)
    weight, bias = f64(linear.weight), f64(linear.bias)
    expected = np.maximum(inputs @ weight.T + bias, 0.0)
    np.testing.assert_allclose(layers(x, *codes).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("deeply_inject", [True, False])
def test_deep_injection_reaches_later_layers(deeply_inject):
    module = VAE(
        N_GENES, n_batch=3, n_cats_per_cov=[2], n_continuous_cov=2, n_layers=2, deeply_inject_covariates=deeply_inject
    )
    decoder_blocks = module.decoder.px_decoder.fc_layers
    # The continuous covariates join z at the decoder input; the one-hot codes (3 + 2) are injected.
    assert decoder_blocks[0][0].in_features == module.n_latent + 2 + 3 + 2
    assert decoder_blocks[1][0].in_features == 128 + (3 + 2 if deeply_inject else 0)
    # Without encode_covariates the encoder sees the genes only.
    assert module.z_encoder.encoder.fc_layers[0][0].in_features == N_GENES
    assert module.z_encoder.encoder.fc_layers[1][0].in_features == 128


def test_encode_covariates():
    n_batch, cats, n_cont = 3, [2, 4], 2
    encoded = VAE(
        N_GENES, n_batch=n_batch, n_cats_per_cov=cats, n_continuous_cov=n_cont, encode_covariates=True, n_layers=2
    ).eval()
    plain = VAE(N_GENES, n_batch=n_batch, n_cats_per_cov=cats, n_continuous_cov=n_cont).eval()
    first = encoded.z_encoder.encoder.fc_layers
    assert first[0][0].in_features == N_GENES + n_cont + n_batch + sum(cats)
    assert first[1][0].in_features == 128 + n_batch + sum(cats)
    tensors = make_tensors(n_batch=n_batch, n_cats_per_cov=cats, n_cont=n_cont)
    shifted = dict(tensors, batch=(tensors["batch"] + 1) % n_batch, cont_covs=tensors["cont_covs"] + 1.0)
    assert not torch.allclose(encoded.inference(tensors)["qz"].loc, encoded.inference(shifted)["qz"].loc)
    torch.testing.assert_close(plain.inference(tensors)["qz"].loc, plain.inference(shifted)["qz"].loc)


@pytest.mark.parametrize("use_batch_norm", ["none", "encoder", "decoder", "both"])
@pytest.mark.parametrize("use_layer_norm", ["none", "encoder", "decoder", "both"])
def test_norm_placement(use_batch_norm, use_layer_norm):
    module = VAE(N_GENES, use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm)

    def has(network, kind):
        return any(isinstance(m, kind) for m in network.modules())

    for network, side in ((module.z_encoder, "encoder"), (module.decoder, "decoder")):
        assert has(network, nn.BatchNorm1d) == (use_batch_norm in (side, "both"))
        assert has(network, nn.LayerNorm) == (use_layer_norm in (side, "both"))
    for batch_norm in (m for m in module.modules() if isinstance(m, nn.BatchNorm1d)):
        assert batch_norm.momentum == 0.01 and batch_norm.eps == 0.001
    # Dropout sits in the encoder only.
    assert has(module.z_encoder, nn.Dropout) and not has(module.decoder, nn.Dropout)
    assert torch.isfinite(module.loss(make_tensors())["loss"])


CONFIGS = {
    "default": dict(),
    "latent-library": dict(use_observed_lib_size=False, n_batch=2),
    "gene-cell-nb": dict(dispersion="gene-cell", gene_likelihood="nb"),
    "gene-batch-covariates": dict(
        dispersion="gene-batch", n_batch=2, n_cats_per_cov=[3], n_continuous_cov=2, encode_covariates=True, n_layers=2
    ),
    "gene-label-poisson-ln": dict(
        dispersion="gene-label",
        n_labels=2,
        gene_likelihood="poisson",
        latent_distribution="ln",
        use_layer_norm="both",
        use_batch_norm="none",
    ),
}


def build(config):
    options = dict(config)
    if not options.get("use_observed_lib_size", True):
        means, variances = library_prior(options.get("n_batch", 0))
        options.update(library_log_means=means, library_log_vars=variances)
    module = VAE(N_GENES, **options)
    tensors = make_tensors(
        n_batch=options.get("n_batch", 0),
        n_labels=options.get("n_labels", 0),
        n_cats_per_cov=options.get("n_cats_per_cov", ()),
        n_cont=options.get("n_continuous_cov", 0),
    )
    return module, tensors


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_every_parameter(name):
    module, tensors = build(CONFIGS[name])
    module.train()
    module.loss(tensors)["loss"].backward()
    for parameter_name, parameter in module.named_parameters():
        assert parameter.grad is not None, f"{parameter_name} gets no gradient"
        assert torch.all(torch.isfinite(parameter.grad)), parameter_name
        assert parameter.grad.abs().sum() > 0, f"{parameter_name} has an all-zero gradient"


def test_gene_batch_theta_is_learned_per_batch():
    """Cells of batch 0 give no gradient to batch 1's dispersion column."""
    module = VAE(N_GENES, n_batch=2, dispersion="gene-batch")
    tensors = make_tensors(n_batch=2)
    tensors["batch"] = torch.zeros_like(tensors["batch"])
    module.loss(tensors)["loss"].backward()
    assert module.px_r.grad[:, 0].abs().sum() > 0
    assert torch.all(module.px_r.grad[:, 1] == 0)


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
def test_transform_batch_decodes_as_the_chosen_batch(dispersion):
    n_batch = 3
    module = VAE(N_GENES, n_batch=n_batch, dispersion=dispersion, n_cats_per_cov=[2]).eval()
    tensors = make_tensors(n_batch=n_batch, n_cats_per_cov=[2])
    inference = module.inference(tensors)
    z, library = inference["z"], inference["library"]
    for target in range(n_batch):
        transformed = module.generative(z, library, tensors, transform_batch=target)
        relabelled = module.generative(z, library, dict(tensors, batch=torch.full_like(tensors["batch"], target)))
        original = module.generative(z, library, tensors)
        in_target = tensors["batch"].ravel() == target
        for key in ("px_scale", "px_rate", "theta", "zi_logits", "hidden"):
            if transformed[key].dim() == 1:  # theta per gene only: no batch in it
                torch.testing.assert_close(transformed[key], original[key])
                continue
            torch.testing.assert_close(transformed[key], relabelled[key])
            # Cells already in the target batch are unchanged; the others change.
            torch.testing.assert_close(transformed[key][in_target], original[key][in_target])
            assert not torch.allclose(transformed[key][~in_target], original[key][~in_target]), key
    with pytest.raises(ValueError, match="transform_batch"):
        module.generative(z, library, tensors, transform_batch=n_batch)


def with_csr(tensors):
    csr = tensors["x"].to_sparse_csr()
    return dict(tensors, x_csr=(csr.crow_indices(), csr.col_indices(), csr.values()))


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(n_batch=3, n_cats_per_cov=[2], encode_covariates=True, n_layers=2, use_observed_lib_size=False),
        dict(n_batch=3, n_continuous_cov=2, encode_covariates=True),
    ],
    ids=["default", "encoded-categorical", "encoded-continuous"],
)
def test_sparse_first_product_gives_the_dense_result(options):
    module, tensors = build(options)
    module.eval()
    tensors = with_csr(tensors)
    dense = {k: v for k, v in tensors.items() if k != "x_csr"}
    with torch.no_grad():
        sparse_out, dense_out = module.inference(tensors), module.inference(dense)
        torch.testing.assert_close(sparse_out["qz"].loc, dense_out["qz"].loc, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse_out["qz"].scale, dense_out["qz"].scale, rtol=1e-5, atol=1e-5)
        if sparse_out["ql"] is not None:
            torch.testing.assert_close(sparse_out["ql"].loc, dense_out["ql"].loc, rtol=1e-5, atol=1e-5)
        losses = [seeded(lambda: module.loss(t)["loss"]) for t in (tensors, dense)]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(n_batch=3, n_continuous_cov=2, encode_covariates=True, use_observed_lib_size=False)],
    ids=["default", "encoded-continuous"],
)
def test_csr_alone_gives_what_x_gives(options):
    """x may be left out when x_csr is given: the module makes it dense where it must (training, appended
    covariates) and sums the observed library from the CSR values."""
    module, tensors = build(options)
    module.eval()
    tensors = with_csr(tensors)
    csr_only = {k: v for k, v in tensors.items() if k != "x"}
    with torch.no_grad():
        both = [seeded(lambda: module.inference(t)) for t in (csr_only, tensors)]
        torch.testing.assert_close(both[0]["qz"].loc, both[1]["qz"].loc, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(both[0]["library"], both[1]["library"], rtol=1e-5, atol=1e-5)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            losses = [seeded(lambda: module.loss(t)["loss"]) for t in (csr_only, tensors)]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="nor 'x_csr'"):
        module.inference({k: v for k, v in csr_only.items() if k != "x_csr"})


def test_sparse_first_product_runs_without_gradients_and_in_training_where_the_c_kernel_runs(monkeypatch):
    """CSR values that disagree with x show which input the encoder read: the CSR without gradients; with them the
    CSR where the C kernel runs (kernels/csr_linear.py), x under kernel_backend "torch"."""
    module, tensors = build(dict())
    module.eval()
    tensors = with_csr(tensors)
    crow_indices, col_indices, values = tensors["x_csr"]
    wrong = dict(tensors, x_csr=(crow_indices, col_indices, values * 2))
    with torch.no_grad():
        assert not torch.allclose(module.inference(wrong)["qz"].loc, module.inference(tensors)["qz"].loc)
    read_csr = not torch.allclose(module.inference(wrong)["qz"].loc, module.inference(tensors)["qz"].loc)
    assert read_csr == csr_linear.ready_for(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(settings, "kernel_backend", "torch")
    torch.testing.assert_close(module.inference(wrong)["qz"].loc, module.inference(tensors)["qz"].loc)


def test_eval_mode_is_deterministic():
    module, tensors = build(CONFIGS["latent-library"])
    module.eval()
    first, second = module.inference(tensors), module.inference(tensors)
    torch.testing.assert_close(first["qz"].loc, second["qz"].loc, rtol=0, atol=0)
    torch.testing.assert_close(first["ql"].scale, second["ql"].scale, rtol=0, atol=0)
    generative = [module.generative(first["qz"].loc, first["library"], tensors)["px_rate"] for _ in range(2)]
    torch.testing.assert_close(generative[0], generative[1], rtol=0, atol=0)
    losses = [seeded(lambda: module.loss(tensors))["loss"] for _ in range(2)]
    assert losses[0].item() == losses[1].item()
    # In training mode, dropout makes the encoder stochastic.
    module.train()
    assert not torch.equal(module.inference(tensors)["qz"].loc, module.inference(tensors)["qz"].loc)


def synthetic_two_type_dataset(n_cells=256, n_genes=60, seed=0):
    """Counts from two cell types with different expression profiles and log-normal libraries."""
    rng = np.random.default_rng(seed)
    profiles = rng.dirichlet(np.full(n_genes, 0.5), size=2)
    cell_type = rng.integers(0, 2, n_cells)
    library = np.exp(rng.normal(np.log(300), 0.3, n_cells))
    counts = rng.negative_binomial(5, 5 / (5 + library[:, None] * profiles[cell_type]))
    return torch.tensor(counts, dtype=torch.float32)


def cell_type_blind_nb_baseline(counts):
    """Mean over cells of -log p(x) under NB(library * pooled gene fractions, theta_g), with each gene's theta
    the best on a grid: a model fitted to these very counts that ignores cell identity."""
    x = counts.double().t()  # (G, cells): the reference then sums over cells
    mu = x.sum(0, keepdim=True) * (x.sum(1, keepdim=True) / x.sum())
    per_gene = torch.stack(
        [log_likelihood_reference(x, mu, torch.full_like(mu, theta), None, "nb") for theta in np.logspace(-2, 3, 100)]
    )
    return -per_gene.max(dim=0).values.sum().item() / counts.shape[0]


def test_a_few_hundred_adam_steps_learn_the_data():
    torch.manual_seed(0)
    counts = synthetic_two_type_dataset()
    tensors = {"x": counts}
    module = VAE(counts.shape[1], n_hidden=32, n_latent=4)

    def mean_negative_elbo():
        module.eval()
        with torch.no_grad():
            value = np.mean([seeded(lambda: module.loss(tensors)["loss"].item(), seed) for seed in range(5)])
        module.train()
        return value

    before = mean_negative_elbo()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2, eps=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        rows = torch.randperm(counts.shape[0], generator=generator)[:64]
        optimizer.zero_grad()
        module.loss({"x": counts[rows]})["loss"].backward()
        optimizer.step()
    after = mean_negative_elbo()
    assert after < 0.75 * before
    # The ELBO bounds log p(x) from below, so beating the best cell-type-blind model, which the untrained
    # module does not, means it learned the cell types.
    baseline = cell_type_blind_nb_baseline(counts)
    assert before > baseline > after


def test_marginal_ll_is_above_the_elbo():
    module, tensors = build(CONFIGS["latent-library"])
    module.eval()
    torch.manual_seed(0)
    log_px = module.marginal_ll(tensors, n_mc_samples=200)
    assert log_px.shape == (tensors["x"].shape[0],)
    with torch.no_grad():
        elbo = np.mean([-module.loss(tensors)["loss"].item() for _ in range(50)])
    assert log_px.mean().item() > elbo
    # A single importance sample is an ELBO estimate: on average it cannot beat many.
    single = np.mean([module.marginal_ll(tensors, n_mc_samples=1).mean().item() for _ in range(50)])
    assert single == pytest.approx(elbo, rel=0.05)
    assert log_px.mean().item() > single


def test_bad_inputs_get_clear_errors():
    module = VAE(N_GENES, n_batch=3, n_cats_per_cov=[2])
    tensors = make_tensors(n_batch=3, n_cats_per_cov=[2])
    with pytest.raises(ValueError, match="no 'batch'"):
        module.loss({k: v for k, v in tensors.items() if k != "batch"})
    with pytest.raises(ValueError, match=r"tensors\['batch'\] has codes in \[0, 3\]"):
        module.check_inputs(dict(tensors, batch=tensors["batch"].clamp(max=0) + 3 * (tensors["batch"] == 2)))
    with pytest.raises(ValueError, match=r"cat_covs\[:, 0\]"):
        module.check_inputs(dict(tensors, cat_covs=tensors["cat_covs"] + 2))
    with pytest.raises(ValueError, match="no 'cat_covs'"):
        module.loss({k: v for k, v in tensors.items() if k != "cat_covs"})
    with pytest.raises(ValueError, match="n_continuous_cov=0"):
        module.loss(dict(tensors, cont_covs=torch.zeros(32, 1)))
    with pytest.raises(ValueError, match=r"shape \(32, 7\)"):
        module.loss(dict(tensors, x=tensors["x"][:, :7]))
    with pytest.raises(ValueError, match="needs library_log_means"):
        VAE(N_GENES, use_observed_lib_size=False)
    means, variances = library_prior(2)
    with pytest.raises(ValueError, match="expected 3"):
        VAE(N_GENES, n_batch=3, use_observed_lib_size=False, library_log_means=means, library_log_vars=variances)
    latent = VAE(N_GENES, use_observed_lib_size=False, library_log_means=[3.0], library_log_vars=[1.0])
    with pytest.raises(ValueError, match="use_observed_lib_size=False"):
        latent.loss(make_tensors(size_factor=True))
    with pytest.raises(ValueError, match="x_csr"):
        module.loss(dict(tensors, x_csr=(torch.zeros(5, dtype=torch.long),) * 3))
    crow_indices, col_indices, values = with_csr(tensors)["x_csr"]
    with torch.no_grad(), pytest.raises(ValueError, match="not a valid CSR"):
        module.check_inputs(dict(tensors, x_csr=(crow_indices, col_indices + N_GENES, values)))
    with pytest.raises(ValueError, match="no 'labels'"):
        VAE(N_GENES, n_labels=2, dispersion="gene-label").loss(make_tensors())
    with pytest.raises(ValueError, match="dispersion='gene-batch' needs n_batch"):
        VAE(N_GENES, dispersion="gene-batch")
    with pytest.raises(ValueError, match="gene_likelihood='gamma'"):
        VAE(N_GENES, gene_likelihood="gamma")
    with pytest.raises(ValueError, match=r"extra_encoder_kwargs \['dropout'\]"):
        VAE(N_GENES, extra_encoder_kwargs={"dropout": 0.5})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_training_step_reads_no_value_back_to_the_host(name, monkeypatch):
    """A device sync happens where a tensor's value is read on the host: .item(), .tolist(), int(), float(),
    bool() (an `if tensor:`), .numpy(). On a GPU each costs a sync per step; counted here on the CPU, where the
    same Python calls would be made, for the loss, its backward and inference with CSR counts."""
    module, tensors = build(CONFIGS[name])
    csr = with_csr(tensors)
    reads = []
    for method in ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            reads.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    module.train()
    module.loss(tensors, kl_weight=0.5)["loss"].backward()
    module.eval()
    with torch.no_grad():
        module.inference({k: v for k, v in csr.items() if k != "x"})
        module.loss(csr)
    assert reads == []


def test_a_minibatch_from_a_sampler_is_typed_and_gives_what_its_dict_form_gives():
    """to_tensors builds the Minibatch once at the data boundary; the dict form (scvi-tools' way, and the tests')
    is converted at the module's entry, to the same values."""
    tensors = make_tensors(n_batch=3, n_cats_per_cov=(2,), n_cont=2)
    sampler_minibatch = {key: value.numpy() for key, value in tensors.items()} | {"rows": np.arange(32)}
    csr = sp.csr_matrix(sampler_minibatch["x"])
    sampler_minibatch["x_csr"] = (csr.indptr.astype(np.int64), csr.indices.astype(np.int64), csr.data)
    minibatch = to_tensors(sampler_minibatch, "cpu", slice(4, 20))
    assert isinstance(minibatch, Minibatch) and minibatch.labels is None and minibatch.qzm is None
    torch.testing.assert_close(minibatch.x, tensors["x"][4:20])
    crow_indices, col_indices, values = minibatch.x_csr
    dense = torch.sparse_csr_tensor(crow_indices, col_indices, values, (16, N_GENES), check_invariants=True).to_dense()
    torch.testing.assert_close(dense, tensors["x"][4:20])
    module = VAE(N_GENES, n_batch=3, n_cats_per_cov=[2], n_continuous_cov=2).eval()
    as_dict = {key: value[4:20] for key, value in tensors.items()} | {"unused": torch.zeros(1)}
    assert Minibatch.of(as_dict) == Minibatch(**{key: as_dict[key] for key in ("x", "batch", "cat_covs", "cont_covs")})
    assert Minibatch.of(minibatch) is minibatch
    with torch.no_grad():
        from_sampler = seeded(lambda: module.loss(minibatch)["loss"])
        from_dict = seeded(lambda: module.loss(dict(as_dict, x_csr=minibatch.x_csr))["loss"])
    torch.testing.assert_close(from_sampler, from_dict)


@pytest.mark.parametrize("k", [1, 3])
def test_a_repeated_minibatch_tiles_every_per_cell_field_and_drops_the_counts(k):
    tensors = make_tensors(n_cells=5, n_batch=2, n_labels=2, n_cont=1, size_factor=True)
    repeated = Minibatch.of(tensors).repeated(k)
    assert repeated.x is None and repeated.x_csr is None
    for key in ("batch", "labels", "cont_covs", "size_factor"):
        torch.testing.assert_close(getattr(repeated, key), torch.cat([tensors[key]] * k))
