"""scvi_scale.kernels against float64 references written here from the formulas (scipy for the log-pmfs).

Every check runs on each backend: "torch" (the PyTorch path), "native" (the PyTorch path with the likelihood's terms
from the C kernel built on this machine; float32 only, so its float64 checks run the PyTorch path) and "triton" (the
fused kernels; on a machine without a GPU under TRITON_INTERPRET=1, which is set below before any kernel module can
be imported). Inputs are drawn fresh
for every check from a seed the failing test prints. Tolerances, for float32 inputs against the float64 reference on
the same (rounded) inputs: the norm-wise relative error ||got - want|| / ||want|| of the log-likelihood under 1e-5;
for gradients ||got - want|| under 1e-5 ||magnitude||, the magnitude being the sum of the absolute values of the terms
the gradient is made of (equal to |want| where nothing cancels; where terms cancel, as d/dtheta does near its zero,
no float32 evaluation can do better than eps times it).
"""

from __future__ import annotations

import logging
import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before the Triton modules are imported (they are imported lazily)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.special as sps  # noqa: E402
import scipy.stats as sps_stats  # noqa: E402

from scvi_scale import kernels  # noqa: E402
from scvi_scale.settings import settings  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
FLOAT32_TOL = 1e-5
FLOAT64_TOL = 1e-9


@pytest.fixture(params=["torch", "native", "triton"])
def backend(request, monkeypatch):
    """Runs the test on one backend. On the Triton one every buffer a kernel fills starts as NaN (poisoned), so an
    element a kernel fails to write shows up in the results."""
    if request.param == "native":
        from scvi_scale.kernels import torch_ops

        if ON_GPU:
            pytest.skip("the C kernel is the CPU's")
        if not torch_ops.native_ready():
            pytest.skip("the C kernel cannot be built here (no C compiler or libmvec: see the scvi_scale.kernels log)")
    if request.param == "triton":
        if not ON_GPU and not _kernels_interpreted():
            pytest.skip("the Triton modules were imported without TRITON_INTERPRET=1 before this module")
        from scvi_scale.kernels import launch

        monkeypatch.setattr(launch, "POISON_BUFFERS", True)
    monkeypatch.setattr(settings, "kernel_backend", request.param)
    return request.param


def _kernels_interpreted() -> bool:
    """Whether the Triton kernels were defined for the interpreter (TRITON_INTERPRET=1 when first imported)."""
    from scvi_scale.kernels import count_likelihood
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(count_likelihood._count_log_likelihood_fwd_kernel, InterpretedFunction)


@pytest.fixture
def rng():
    """A generator with a fresh seed, printed so that a failing test (pytest shows its output) can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def rel_err(got: torch.Tensor, want: np.ndarray) -> float:
    got = got.detach().double().cpu().numpy()
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


# ---------------------------------------------------------------------------------------------------------------------
# float64 references from the formulas


def log_prob_reference(x, mu, theta, zi_logits, likelihood):
    """Per-entry log p(x) in float64, (B, G). NB via scipy.stats.nbinom (n = theta, p = theta / (theta + mu))."""
    if likelihood == "poisson":
        return sps_stats.poisson.logpmf(x, mu)
    theta = np.broadcast_to(theta, x.shape)
    log_nb = sps_stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    if likelihood == "nb":
        return log_nb
    log_pi, log_one_minus_pi = -np.logaddexp(0, -zi_logits), -np.logaddexp(0, zi_logits)
    return np.where(x == 0, np.logaddexp(log_pi, log_one_minus_pi + log_nb), log_one_minus_pi + log_nb)


def log_prob_gradients_reference(x, mu, theta, zi_logits, likelihood):
    """d log p / d mu, d theta, d zi_logits per entry in float64, each as (gradient, magnitude), (B, G) arrays
    (None where not a parameter). The magnitude is the sum of the absolute values of the terms the gradient is
    made of: no float32 evaluation can beat eps times it where the terms cancel (d/dtheta crosses zero).

    NB:   d/dmu    = theta (x - mu) / (mu (theta + mu))
          d/dtheta = h + e, h = log1p(v) - v with v = (x - mu) / (theta + mu), e = digamma(x + theta) - digamma(theta)
                     - log1p(x / theta)  (= the textbook digamma(x + theta) - digamma(theta) - log1p(mu / theta)
                     + (mu - x) / (theta + mu), grouped into the two parts that vanish as theta grows)
    ZINB: x > 0: the NB gradients, and d/dz = -sigmoid(z);
          x = 0: with L0 = log NB(0) = -theta log1p(mu / theta) and r = sigmoid(L0 - z), the share of NB(0) in p(0):
                 d/dmu = -r theta / (theta + mu),  d/dtheta = r h,  d/dz = sigmoid(z - L0) - sigmoid(z).
    """
    if likelihood == "poisson":
        return (x / mu - 1, x / mu + 1), None, None
    theta = np.broadcast_to(theta, x.shape)
    v = (x - mu) / (theta + mu)
    h = np.log1p(v) - v
    e = np.where(x > 0, sps.digamma(x + theta) - sps.digamma(theta) - np.log1p(x / theta), 0.0)
    d_mu = theta * (x - mu) / (mu * (theta + mu))
    d_mu_magnitude = theta * (x + mu) / (mu * (theta + mu))  # x - mu cancels where the counts meet their mean
    d_theta, theta_magnitude = h + e, np.abs(h) + np.abs(e)
    if likelihood == "nb":
        return (d_mu, d_mu_magnitude), (d_theta, theta_magnitude), None
    log_nb_zero = -theta * np.log1p(mu / theta)
    r = np.where(x == 0, sps.expit(log_nb_zero - zi_logits), 1.0)
    # sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) - sigmoid(b) sigmoid(-a): no cancellation of two values near 1
    a, b = zi_logits - log_nb_zero, zi_logits
    d_z = np.where(x == 0, sps.expit(a) * sps.expit(-b) - sps.expit(b) * sps.expit(-a), -sps.expit(zi_logits))
    return (r * d_mu, r * d_mu_magnitude), (r * d_theta, r * theta_magnitude), (d_z, np.abs(d_z))


def assert_gradient_close(name, got, want, magnitude, tol):
    """||got - want|| < tol ||magnitude|| + tiny sqrt(n): norm-wise relative error, measured against the terms'
    magnitudes; tiny, the smallest normal number of got's dtype, admits the underflow of unrepresentable values."""
    tiny = torch.finfo(got.dtype).tiny
    got = got.detach().double().cpu().numpy()
    err = np.linalg.norm(got - want)
    bound = tol * np.linalg.norm(magnitude) + tiny * np.sqrt(got.size)
    assert err < bound, f"d/d{name}: error {err:.3g} > bound {bound:.3g} (tol {tol:g} of the gradient's magnitude)"


# ---------------------------------------------------------------------------------------------------------------------
# inputs


def draw_counts(rng, mu):
    """Counts like scRNA-seq: ~90% zeros, the rest Poisson around mu, and a few up to 1e5."""
    counts = rng.poisson(np.minimum(mu, 1e5)) * (rng.random(mu.shape) < 0.1)
    large = rng.random(mu.shape) < 0.002
    counts[large] = rng.integers(1, 100_001, size=int(large.sum()))
    return counts.astype(np.float64)


def draw_theta(rng, n_cells, n_genes, per_cell):
    """Inverse dispersion log-uniform on [1e-4, 1e4], per gene (G,) or per cell and gene (B, G)."""
    shape = (n_cells, n_genes) if per_cell else (n_genes,)
    return np.exp(rng.uniform(np.log(1e-4), np.log(1e4), size=shape))


def draw_count_inputs(rng, n_cells, n_genes, likelihood, theta_per_cell):
    """float64 numpy inputs of count_log_likelihood: x, mu (log-uniform on [e^-6, e^9]), theta, logits in +-30."""
    mu = np.exp(rng.uniform(-6, 9, size=(n_cells, n_genes)))
    x = draw_counts(rng, mu)
    theta = None if likelihood == "poisson" else draw_theta(rng, n_cells, n_genes, theta_per_cell)
    zi_logits = rng.uniform(-30, 30, size=(n_cells, n_genes)) if likelihood == "zinb" else None
    return x, mu, theta, zi_logits


def as_tensors(dtype, *arrays, requires_grad=False):
    return [
        None if a is None else torch.tensor(a, dtype=dtype, device=DEVICE, requires_grad=requires_grad) for a in arrays
    ]


# ---------------------------------------------------------------------------------------------------------------------
# count_log_likelihood


def rounded(array, dtype):
    """The float64 values of `array` after rounding to `dtype`: the reference sees what the function sees."""
    return None if array is None else array.astype(np.float32 if dtype == torch.float32 else np.float64).astype(float)


def reduce_to(shape, weights, per_entry):
    """sum over cells of weights[:, None] * per_entry (B, G), unless `shape` keeps the cells."""
    weighted = weights[:, None] * per_entry
    return weighted if len(shape) == 2 else weighted.sum(0)


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Counts as the caller passes them: dense, or a sparse CSR tensor of the same matrix."""
    return x.to_sparse_csr() if layout == "csr" else x


def check_count_log_likelihood(rng, n_cells, n_genes, likelihood, theta_per_cell, dtype, tol, layout="dense"):
    x, mu, theta, zi = (rounded(a, dtype) for a in draw_count_inputs(rng, n_cells, n_genes, likelihood, theta_per_cell))
    x_t = as_layout(as_tensors(dtype, x)[0], layout)
    mu_t, theta_t, zi_t = as_tensors(dtype, mu, theta, zi, requires_grad=True)
    out = kernels.count_log_likelihood(x_t, mu_t, theta_t, zi_t, likelihood=likelihood)
    assert out.shape == (n_cells,) and out.dtype == dtype
    want = log_prob_reference(x, mu, theta, zi, likelihood).sum(-1)
    assert rel_err(out, want) < tol, f"log-likelihood, rel err {rel_err(out, want):.2e}"

    cell_weights = rng.normal(size=n_cells)
    out.backward(torch.tensor(cell_weights, dtype=dtype, device=DEVICE))
    gradients = log_prob_gradients_reference(x, mu, theta, zi, likelihood)
    for name, tensor, reference in zip(("mu", "theta", "zi_logits"), (mu_t, theta_t, zi_t), gradients):
        if reference is not None:
            want_grad, magnitude = (
                reduce_to(tensor.shape, w, r) for w, r in zip((cell_weights, np.abs(cell_weights)), reference)
            )
            assert_gradient_close(name, tensor.grad, want_grad, magnitude, tol)


@pytest.mark.parametrize("likelihood", kernels.LIKELIHOODS)
@pytest.mark.parametrize("n_cells,n_genes", [(1, 1), (3, 7), (128, 7), (3, 2000), (128, 2000)])
def test_count_log_likelihood_float32(backend, rng, likelihood, n_cells, n_genes):
    check_count_log_likelihood(rng, n_cells, n_genes, likelihood, False, torch.float32, FLOAT32_TOL)


def test_the_compiled_path_is_chosen_by_size_alone_and_sizes_of_one_stay_eager(rng, monkeypatch):
    """From COMPILE_MIN_ENTRIES entries on (a 50-cell validation minibatch of 1,100 genes) the likelihood runs
    compiled and gives the float64 reference; a single cell of as many entries stays eager (torch.compile would
    specialise size 1 and compile again), as does an input under the threshold."""
    from scvi_scale.kernels import torch_ops

    monkeypatch.setattr(settings, "kernel_backend", "torch")
    assert 50 * 1100 >= torch_ops.COMPILE_MIN_ENTRIES > 15 * 2000
    check_count_log_likelihood(rng, 50, 1100, "zinb", False, torch.float32, FLOAT32_TOL)  # compiles (or reuses)
    compiled_calls = []
    compiled = torch_ops._compiled[torch_ops.all_terms]
    monkeypatch.setitem(
        torch_ops._compiled,
        torch_ops.all_terms,
        lambda *args: (compiled_calls.append(tuple(args[3].shape)), compiled(*args))[1],
    )
    for n_cells, n_genes in ((50, 1100), (1, 40_000), (15, 2000)):
        check_count_log_likelihood(rng, n_cells, n_genes, "zinb", False, torch.float32, FLOAT32_TOL)
    assert compiled_calls == [(50, 1100)]


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_count_log_likelihood_theta_per_cell(backend, rng, likelihood):
    check_count_log_likelihood(rng, 3, 300, likelihood, True, torch.float32, FLOAT32_TOL)


@pytest.mark.parametrize("likelihood", kernels.LIKELIHOODS)
def test_count_log_likelihood_float64(backend, rng, likelihood):
    check_count_log_likelihood(rng, 5, 300, likelihood, False, torch.float64, FLOAT64_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_count_log_likelihood_full_genome(backend, rng, likelihood):
    check_count_log_likelihood(rng, 40, 33538, likelihood, False, torch.float32, FLOAT32_TOL)


def test_count_log_likelihood_only_zeros(backend, rng):
    """A cell without counts: the ZINB log-likelihood is the sum of log(pi + (1 - pi) NB(0))."""
    mu = np.exp(rng.uniform(-3, 3, size=(2, 50)))
    theta = draw_theta(rng, 2, 50, per_cell=False)
    zi = rng.uniform(-30, 30, size=(2, 50))
    x = np.zeros_like(mu)
    out = kernels.count_log_likelihood(*as_tensors(torch.float64, x, mu, theta, zi))
    assert rel_err(out, log_prob_reference(x, mu, theta, zi, "zinb").sum(-1)) < FLOAT64_TOL


@pytest.mark.parametrize("likelihood", kernels.LIKELIHOODS)
def test_csr_counts_with_stored_zeros(backend, rng, likelihood):
    """A CSR tensor may store zeros: they count as zero counts, and the results and gradients are those of the dense
    counts."""
    x, mu, theta, zi = draw_count_inputs(rng, 6, 40, likelihood, theta_per_cell=False)
    stored = (x > 0) | (rng.random(x.shape) < 0.3)  # every non-zero, and some zeros
    rows, cols = np.nonzero(stored)
    crow = np.searchsorted(rows, np.arange(x.shape[0] + 1))
    (x_t,) = as_tensors(torch.float64, x)
    csr = torch.sparse_csr_tensor(torch.tensor(crow), torch.tensor(cols), x_t[rows, cols], x.shape, device=DEVICE)
    results = []
    for counts in (x_t, csr):
        params = as_tensors(torch.float64, mu, theta, zi, requires_grad=True)
        out = kernels.count_log_likelihood(counts, *params, likelihood=likelihood)
        out.sum().backward()
        results.append([out] + [p.grad for p in params if p is not None])
    for dense_result, csr_result in zip(*results):
        torch.testing.assert_close(csr_result, dense_result, rtol=1e-12, atol=0)


def log_prob_gamma_reference(x, mu, theta, zi_logits, likelihood):
    """Per-entry log p(x) in float64 from the gamma-function forms, defined for non-integer x as well (NB with
    lgamma(x + theta) - lgamma(theta) - lgamma(x + 1); Poisson with lgamma(x + 1))."""
    if likelihood == "poisson":
        return sps.xlogy(x, mu) - mu - sps.gammaln(x + 1)
    theta = np.broadcast_to(theta, x.shape)
    log_nb = (
        sps.gammaln(x + theta)
        - sps.gammaln(theta)
        - sps.gammaln(x + 1)
        + theta * np.log(theta / (theta + mu))
        + sps.xlogy(x, mu / (theta + mu))
    )
    if likelihood == "nb":
        return log_nb
    log_pi, log_one_minus_pi = -np.logaddexp(0, -zi_logits), -np.logaddexp(0, zi_logits)
    return np.where(x == 0, np.logaddexp(log_pi, log_one_minus_pi + log_nb), log_one_minus_pi + log_nb)


@pytest.mark.parametrize("likelihood", kernels.LIKELIHOODS)
@pytest.mark.parametrize("n_cells", [3, 64])
def test_count_log_likelihood_non_integer_counts(backend, rng, likelihood, n_cells):
    """Counts with fractional parts (the integer table of Stirling's remainder must not be used for them);
    64 x 2048 entries run compiled on the PyTorch path. Moderate values, where the gamma forms are exact in float64."""
    mu = np.exp(rng.uniform(-3, 5, size=(n_cells, 2048)))
    x = np.where(rng.random(mu.shape) < 0.7, 0.0, rng.poisson(mu) + rng.uniform(0.05, 0.95, size=mu.shape))
    x[0, :8] = np.arange(8) + 0.5  # below and at STIRLING_MIN
    theta = np.exp(rng.uniform(-2, 4, size=2048)) if likelihood != "poisson" else None
    zi = rng.uniform(-5, 5, size=mu.shape) if likelihood == "zinb" else None
    x, mu, theta, zi = (rounded(a, torch.float32) for a in (x, mu, theta, zi))
    out = kernels.count_log_likelihood(*as_tensors(torch.float32, x, mu, theta, zi), likelihood=likelihood)
    want = log_prob_gamma_reference(x, mu, theta, zi, likelihood).sum(-1)
    assert rel_err(out, want) < FLOAT32_TOL, f"rel err {rel_err(out, want):.2e}"


def test_count_log_likelihood_stays_finite_at_extreme_logits(backend):
    """Zero counts where both pi and NB(0) underflow float32 (z = -200, L0 = -1e4): p(0) is clamped at the smallest
    normal number, so the log-likelihood and gradients stay finite (the true value is about max(z, L0))."""
    x = torch.zeros(2, 4, device=DEVICE)
    mu = torch.full((2, 4), 1e4, device=DEVICE, requires_grad=True)
    theta = torch.full((4,), 1e3, device=DEVICE, requires_grad=True)
    zi = torch.full((2, 4), -200.0, device=DEVICE, requires_grad=True)
    out = kernels.count_log_likelihood(x, mu, theta, zi, likelihood="zinb")
    out.sum().backward()
    for tensor in (out, mu.grad, theta.grad, zi.grad):
        assert torch.isfinite(tensor).all()


# ---------------------------------------------------------------------------------------------------------------------
# decoder_log_likelihood


def draw_decoder_inputs(rng, n_cells, n_genes, n_hidden, likelihood, theta_per_cell):
    """float64 inputs of decoder_log_likelihood, scaled like a trained scVI decoder."""
    hidden = np.maximum(rng.normal(size=(n_cells, n_hidden)), 0)  # after ReLU
    scale_weight = rng.normal(scale=2 / np.sqrt(n_hidden), size=(n_genes, n_hidden))
    scale_bias = rng.normal(size=n_genes)
    # Library sizes as in single-cell data: 0.1 to 10 counts per gene on average.
    log_library = np.log(n_genes * rng.uniform(0.1, 10, size=n_cells))
    mu = np.exp(log_library)[:, None] * sps.softmax(hidden @ scale_weight.T + scale_bias, axis=-1)
    x = draw_counts(rng, mu)
    theta = None if likelihood == "poisson" else draw_theta(rng, n_cells, n_genes, theta_per_cell)
    if likelihood == "zinb":
        # Logits within about +-10, as in trained models. (The count tests take logits to +-30 as exact inputs; here
        # they come out of a float32 matmul whose rounding, ~eps * sum_k |h_k w_k|, d/dz inherits 1:1.)
        dropout_weight = rng.normal(scale=2 / np.sqrt(n_hidden), size=(n_genes, n_hidden))
        dropout_bias = rng.uniform(-6, 6, size=n_genes)
    else:
        dropout_weight = dropout_bias = None
    return dict(
        hidden=hidden,
        scale_weight=scale_weight,
        scale_bias=scale_bias,
        log_library=log_library,
        x=x,
        theta=theta,
        dropout_weight=dropout_weight,
        dropout_bias=dropout_bias,
    )


def decoder_reference(inputs, likelihood, cell_weights):
    """float64 per-cell log-likelihood, and the gradients of sum(cell_weights * it) w.r.t. every input as
    {name: (gradient, magnitude)}, the magnitude being the same chain rule applied to absolute values.

    With s = hidden W^T + b, p = softmax(s), mu = exp(l) p, z = hidden Wd^T + bd and a = mu * dlogp/dmu:
    dL/ds = a - p * sum_genes(a) (the softmax's Jacobian), dL/dl = sum_genes(a), and the linear layers' chain rule.
    """
    h, w_scale, log_l = inputs["hidden"], inputs["scale_weight"], inputs["log_library"]
    p = sps.softmax(h @ w_scale.T + inputs["scale_bias"], axis=-1)
    mu = np.exp(log_l)[:, None] * p
    zi = None if likelihood != "zinb" else h @ inputs["dropout_weight"].T + inputs["dropout_bias"]
    out = log_prob_reference(inputs["x"], mu, inputs["theta"], zi, likelihood).sum(-1)
    (d_mu, d_mu_magnitude), d_theta, d_z = log_prob_gradients_reference(
        inputs["x"], mu, inputs["theta"], zi, likelihood
    )
    w, abs_w = cell_weights[:, None], np.abs(cell_weights)[:, None]
    a, a_magnitude = w * mu * d_mu, abs_w * mu * d_mu_magnitude
    d_s = a - p * a.sum(-1, keepdims=True)
    d_s_magnitude = a_magnitude + p * a_magnitude.sum(-1, keepdims=True)
    grads = dict(
        hidden=(d_s @ w_scale, d_s_magnitude @ np.abs(w_scale)),
        scale_weight=(d_s.T @ h, d_s_magnitude.T @ np.abs(h)),
        scale_bias=(d_s.sum(0), d_s_magnitude.sum(0)),
        log_library=(a.sum(-1), a_magnitude.sum(-1)),
    )
    if d_theta is not None:
        grads["theta"] = tuple(
            reduce_to(inputs["theta"].shape, weights, r) for weights, r in zip((cell_weights, abs_w[:, 0]), d_theta)
        )
    if d_z is not None:
        d_z, d_z_magnitude = w * d_z[0], abs_w * d_z[1]
        w_dropout = inputs["dropout_weight"]
        grads["hidden"] = (grads["hidden"][0] + d_z @ w_dropout, grads["hidden"][1] + d_z_magnitude @ np.abs(w_dropout))
        grads["dropout_weight"] = (d_z.T @ h, d_z_magnitude.T @ np.abs(h))
        grads["dropout_bias"] = (d_z.sum(0), d_z_magnitude.sum(0))
    return out, grads


def check_decoder_log_likelihood(
    rng, n_cells, n_genes, n_hidden, likelihood, theta_per_cell, dtype, tol, layout="dense"
):
    inputs = draw_decoder_inputs(rng, n_cells, n_genes, n_hidden, likelihood, theta_per_cell)
    inputs = {name: rounded(value, dtype) for name, value in inputs.items()}
    tensors = {
        name: None if value is None else torch.tensor(value, dtype=dtype, device=DEVICE, requires_grad=name != "x")
        for name, value in inputs.items()
    }
    out = kernels.decoder_log_likelihood(**{**tensors, "x": as_layout(tensors["x"], layout)}, likelihood=likelihood)
    assert out.shape == (n_cells,) and out.dtype == dtype
    cell_weights = rng.normal(size=n_cells)
    want, want_grads = decoder_reference(inputs, likelihood, cell_weights)
    assert rel_err(out, want) < tol, f"log-likelihood, rel err {rel_err(out, want):.2e}"
    out.backward(torch.tensor(cell_weights, dtype=dtype, device=DEVICE))
    for name, (want_grad, magnitude) in want_grads.items():
        assert_gradient_close(name, tensors[name].grad, want_grad, magnitude, tol)


@pytest.mark.parametrize("likelihood", kernels.LIKELIHOODS)
@pytest.mark.parametrize("n_cells,n_genes", [(1, 1), (3, 7), (128, 7), (3, 2000), (128, 2000)])
def test_decoder_log_likelihood_float32(backend, rng, likelihood, n_cells, n_genes):
    """(128, 2000) is a training minibatch: the PyTorch path runs compiled there (COMPILE_MIN_ENTRIES)."""
    check_decoder_log_likelihood(rng, n_cells, n_genes, 24, likelihood, False, torch.float32, FLOAT32_TOL)


@pytest.mark.parametrize("likelihood", kernels.LIKELIHOODS)
@pytest.mark.parametrize("n_cells,n_genes", [(3, 300), (128, 2000)])
def test_csr_counts_match_the_reference(backend, rng, likelihood, n_cells, n_genes):
    """Counts given as a sparse CSR tensor: both ops against the float64 reference, eager and compiled sizes."""
    check_count_log_likelihood(rng, n_cells, n_genes, likelihood, False, torch.float32, FLOAT32_TOL, layout="csr")
    check_decoder_log_likelihood(rng, n_cells, n_genes, 24, likelihood, False, torch.float32, FLOAT32_TOL, layout="csr")


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_decoder_log_likelihood_theta_per_cell(backend, rng, likelihood):
    check_decoder_log_likelihood(rng, 3, 300, 24, likelihood, True, torch.float32, FLOAT32_TOL)


@pytest.mark.parametrize("likelihood", kernels.LIKELIHOODS)
def test_decoder_log_likelihood_float64(backend, rng, likelihood):
    check_decoder_log_likelihood(rng, 5, 300, 10, likelihood, False, torch.float64, FLOAT64_TOL)


@pytest.mark.slow
def test_decoder_log_likelihood_full_genome(backend, rng):
    check_decoder_log_likelihood(rng, 40, 33538, 128, "zinb", False, torch.float32, FLOAT32_TOL)


# ---------------------------------------------------------------------------------------------------------------------
# gradcheck: the backward against finite differences of the forward, in float64


@pytest.mark.parametrize("likelihood", kernels.LIKELIHOODS)
def test_gradcheck_count_log_likelihood(backend, rng, likelihood):
    mu = np.exp(rng.uniform(-2, 4, size=(3, 5)))
    x = np.where(rng.random((3, 5)) < 0.5, 0.0, rng.poisson(mu))
    theta = np.exp(rng.uniform(-2, 4, size=5)) if likelihood != "poisson" else None
    zi = rng.uniform(-3, 3, size=(3, 5)) if likelihood == "zinb" else None
    (x_t,) = as_tensors(torch.float64, x)
    params = as_tensors(torch.float64, mu, theta, zi, requires_grad=True)

    def per_cell(mu, theta, zi):
        return kernels.count_log_likelihood(x_t, mu, theta, zi, likelihood=likelihood)

    # In the interpreter a forward pass costs ~10 ms: there fast mode checks a random projection of the Jacobian.
    assert torch.autograd.gradcheck(per_cell, params, fast_mode=backend == "triton")


@pytest.mark.parametrize("likelihood", kernels.LIKELIHOODS)
def test_gradcheck_decoder_log_likelihood(backend, rng, likelihood):
    inputs = draw_decoder_inputs(rng, 3, 5, 4, likelihood, theta_per_cell=False)
    if likelihood != "poisson":
        inputs["theta"] = np.exp(rng.uniform(-2, 4, size=5))  # away from 1e-4, where finite differences need h << theta
    # draw_counts' rare counts up to 1e5 give a cell log p ~ -1e5, whose float64 rounding over gradcheck's step
    # (2e-16 * 1e5 / 1e-6 = 2e-5) exceeds its atol: extreme counts are checked against decoder_reference instead
    x = torch.tensor(np.minimum(inputs.pop("x"), 1000), dtype=torch.float64, device=DEVICE)
    names = [name for name, value in inputs.items() if value is not None]
    params = as_tensors(torch.float64, *(inputs[name] for name in names), requires_grad=True)

    def per_cell(*values):
        return kernels.decoder_log_likelihood(x=x, **dict(zip(names, values)), likelihood=likelihood)

    # In the interpreter a forward pass costs ~10 ms: there fast mode checks a random projection of the Jacobian.
    assert torch.autograd.gradcheck(per_cell, params, fast_mode=backend == "triton")


# ---------------------------------------------------------------------------------------------------------------------
# decoder_px_scale


@pytest.mark.parametrize("n_genes,gene_chunk", [(1, None), (7, 3), (2000, None), (2000, 300)])
def test_decoder_px_scale(backend, rng, n_genes, gene_chunk):
    hidden = rng.normal(size=(3, 24))
    scale_weight = rng.normal(scale=3, size=(n_genes, 24))
    scale_bias = rng.normal(size=n_genes)
    got = kernels.decoder_px_scale(*as_tensors(torch.float32, hidden, scale_weight, scale_bias), gene_chunk=gene_chunk)
    assert got.dtype == torch.float32 and got.shape == (3, n_genes)
    h, w, b = (a.astype(np.float32).astype(np.float64) for a in (hidden, scale_weight, scale_bias))
    assert rel_err(got, sps.softmax(h @ w.T + b, axis=-1)) < FLOAT32_TOL


# ---------------------------------------------------------------------------------------------------------------------
# the textbook PyTorch forms the benchmarks compare against compute the same thing (float64, moderate counts: in float32
# or at counts of 1e5 they lose digits, which is why neither backend uses them)


@pytest.mark.parametrize("likelihood", kernels.LIKELIHOODS)
def test_reference_forms_match_scipy(rng, likelihood):
    from scvi_scale.kernels.count_likelihood import reference_count_log_likelihood
    from scvi_scale.kernels.decoder_likelihood import reference_decoder_log_likelihood

    x, mu, theta, zi = draw_count_inputs(rng, 4, 50, likelihood, theta_per_cell=False)
    x = np.minimum(x, 1000)
    got = reference_count_log_likelihood(*as_tensors(torch.float64, x, mu, theta, zi), likelihood)
    assert rel_err(got, log_prob_reference(x, mu, theta, zi, likelihood).sum(-1)) < 1e-9

    inputs = draw_decoder_inputs(rng, 4, 50, 8, likelihood, theta_per_cell=False)
    inputs["x"] = np.minimum(inputs["x"], 1000)
    got = reference_decoder_log_likelihood(
        **dict(zip(inputs, as_tensors(torch.float64, *inputs.values()))), likelihood=likelihood
    )
    assert rel_err(got, decoder_reference(inputs, likelihood, np.ones(4))[0]) < 1e-9


# ---------------------------------------------------------------------------------------------------------------------
# dispatch and input checks


def test_backend_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(settings, "kernel_backend", "torch")
    monkeypatch.setattr(kernels, "_backends_logged", set())
    x, mu, theta = as_tensors(torch.float32, np.ones((2, 3)), np.ones((2, 3)), np.ones(3))
    with caplog.at_level(logging.INFO, logger="scvi_scale.kernels"):
        for _ in range(3):
            kernels.count_log_likelihood(x, mu, theta, likelihood="nb")
    assert [r.getMessage() for r in caplog.records if "backend" in r.getMessage()] == [
        f"fused ops run on the torch backend (settings.kernel_backend='torch', {DEVICE} tensors)"
    ]


@pytest.mark.skipif(ON_GPU, reason="checks the CPU refusal of the compiled Triton backend")
def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(settings, "kernel_backend", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, mu, theta = as_tensors(torch.float32, np.ones((2, 3)), np.ones((2, 3)), np.ones(3))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.count_log_likelihood(x, mu, theta, likelihood="nb")


def test_auto_backend_on_cpu_is_native_for_float32_where_it_builds(monkeypatch):
    from scvi_scale.kernels import torch_ops

    monkeypatch.setattr(settings, "kernel_backend", "auto")
    cpu = torch.device("cpu")
    assert kernels._choose_backend(cpu, torch.float32) == ("native" if torch_ops.native_ready() else "torch")
    assert kernels._choose_backend(cpu, torch.float64) == "torch"


def test_torch_path_falls_back_to_eager_when_compile_fails(monkeypatch, caplog, rng):
    """torch.compile needs a C++ toolchain; without one the PyTorch path warns once and computes eagerly."""
    from scvi_scale.kernels import torch_ops

    def failing_compile(function, **options):
        def compiled(*args):
            raise RuntimeError("no C++ compiler")

        return compiled

    monkeypatch.setattr(torch_ops, "COMPILE_MIN_ENTRIES", 0)
    monkeypatch.setattr(torch_ops, "_compiled", {})
    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(settings, "kernel_backend", "torch")
    x, mu, theta, zi = draw_count_inputs(rng, 3, 20, "zinb", theta_per_cell=False)
    x[:, 0] = np.maximum(x[:, 0], 1)  # the compiled path runs from 2 non-zeros on; 60 draws may hold none
    with caplog.at_level(logging.WARNING, logger="scvi_scale.kernels"):
        for _ in range(2):
            out = kernels.count_log_likelihood(*as_tensors(torch.float64, x, mu, theta, zi))
            assert rel_err(out, log_prob_reference(x, mu, theta, zi, "zinb").sum(-1)) < FLOAT64_TOL
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0]  # once: later calls stay eager


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(likelihood="gamma"), "likelihood='gamma'"),
        (dict(mu=torch.ones(2, 4)), r"mu has shape \(2, 4\), expected \(2, 3\)"),
        (dict(theta=torch.ones(2)), r"theta has shape \(2,\), expected \(3,\) per gene or \(2, 3\)"),
        (dict(theta=None), "needs theta"),
        (dict(zi_logits=None), "needs zi_logits"),
        (dict(likelihood="nb"), "zi_logits is used by likelihood='zinb' only"),
        (dict(likelihood="poisson", zi_logits=None), "takes no theta"),
    ],
)
def test_count_log_likelihood_rejects_bad_input(change, message):
    args = dict(
        x=torch.ones(2, 3), mu=torch.ones(2, 3), theta=torch.ones(3), zi_logits=torch.zeros(2, 3), likelihood="zinb"
    )
    with pytest.raises(ValueError, match=message):
        kernels.count_log_likelihood(**{**args, **change})


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(scale_weight=torch.ones(3, 5)), r"scale_weight has shape \(3, 5\), expected \(3, 4\)"),
        (dict(scale_bias=torch.ones(4)), r"scale_bias has shape \(4,\), expected \(3,\)"),
        (dict(log_library=torch.ones(3)), r"log_library has shape \(3,\), expected \(2,\) or \(2, 1\)"),
        (dict(dropout_bias=None), "pass both or neither"),
        (dict(x=torch.ones(3, 3)), r"x has shape \(3, 3\), expected \(2, 3\)"),
        (dict(dropout_weight=torch.ones(4, 4)), r"dropout_weight has shape \(4, 4\), expected \(3, 4\)"),
    ],
)
def test_decoder_log_likelihood_rejects_bad_input(change, message):
    args = dict(
        hidden=torch.ones(2, 4),
        scale_weight=torch.ones(3, 4),
        scale_bias=torch.ones(3),
        log_library=torch.ones(2),
        x=torch.ones(2, 3),
        theta=torch.ones(3),
        dropout_weight=torch.ones(3, 4),
        dropout_bias=torch.ones(3),
        likelihood="zinb",
    )
    with pytest.raises(ValueError, match=message):
        kernels.decoder_log_likelihood(**{**args, **change})


# ---------------------------------------------------------------------------------------------------------------------
# the model trains through the fused ops


@pytest.mark.parametrize(
    "options",
    [dict(), dict(dispersion="gene-cell"), dict(use_observed_lib_size=False)],
    ids=["decoder-op", "count-op", "latent-library"],
)
def test_csr_minibatch_gives_the_loss_and_gradients_of_dense_x(options, monkeypatch):
    """Training on x_csr alone (the likelihood reads the non-zeros, log1p(x) is made dense by a scatter) gives the
    loss and every parameter's gradient that dense x gives, at a training minibatch's size (the compiled path).
    The first layer keeps the dense product here: its C kernel on CSR (csr_linear.py) sums in another order, which
    moves the linear's bias gradient before batch norm (zero up to rounding) by its rounding; that kernel is checked
    against float64 by the csr_linear tests."""
    from scvi_scale.kernels import csr_linear

    from scvi_scale.module import VAE

    monkeypatch.setattr(csr_linear, "ready_for", lambda device, dtype: False)

    generator = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.rand(128, 1024, generator=generator) * 4) * (
        torch.rand(128, 1024, generator=generator) < 0.1
    )
    x[:, 0] += 1
    batch = torch.randint(0, 3, (128,), generator=generator)
    csr = x.to_sparse_csr()
    torch.manual_seed(0)
    module = VAE(1024, n_batch=3, library_log_means=np.full(3, 5.0), library_log_vars=np.ones(3), **options)
    module.train()
    gradients = []
    for tensors in (
        {"x": x, "batch": batch},
        {"x_csr": (csr.crow_indices(), csr.col_indices(), csr.values()), "batch": batch},
    ):
        module.zero_grad()
        torch.manual_seed(1)  # the same dropout mask and draws
        loss = module.loss(tensors, kl_weight=0.5)["loss"]
        loss.backward()
        gradients.append([loss.detach()] + [p.grad.clone() for p in module.parameters()])
    for dense_value, csr_value in zip(*gradients):
        torch.testing.assert_close(csr_value, dense_value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_training_through_fused_ops_matches_pytorch_path(likelihood, monkeypatch):
    """A short training run of the VAE gives the same loss curve on the Triton path as on the PyTorch path, up to
    float32 noise: the same seed, the same minibatches, only the backend differs."""
    if not ON_GPU and not _kernels_interpreted():
        pytest.skip("the Triton modules were imported without TRITON_INTERPRET=1 before this module")
    from scvi_scale.module import VAE

    data = np.random.default_rng(7).negative_binomial(2.0, 0.4, size=(6, 48, 37)).astype(np.float32)
    batches = torch.from_numpy(np.random.default_rng(8).integers(0, 2, size=(6, 48)))

    def loss_curve(backend_name: str) -> list[float]:
        monkeypatch.setattr(settings, "kernel_backend", backend_name)
        torch.manual_seed(0)
        module = VAE(37, n_batch=2, n_hidden=16, n_latent=4, gene_likelihood=likelihood).to(DEVICE)
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-2, eps=0.01)
        curve = []
        for step in range(len(data)):
            tensors = {"x": torch.from_numpy(data[step]).to(DEVICE), "batch": batches[step].to(DEVICE)}
            loss = module.loss(tensors, kl_weight=1.0)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(float(loss.detach()))
        return curve

    unfused, fused = loss_curve("torch"), loss_curve("triton")
    assert unfused[-1] < unfused[0]  # it learns
    np.testing.assert_allclose(fused, unfused, rtol=1e-4)


# --------------------------------------------------------------------------- the first layer on CSR (csr_linear.py)


def _csr_linear_case(rng, n_rows, n_sparse, n_dense, n_out, density, explicit_zeros=0):
    """CSR x (float32, log1p'd counts, some rows empty), dense columns, weight and bias; x as a dense float64 copy."""
    counts = rng.poisson(3.0, size=(n_rows, n_sparse)) * (rng.random((n_rows, n_sparse)) < density)
    x = np.log1p(counts).astype(np.float32)
    crow, cols, values = [0], [], []
    for row in x:
        stored = np.flatnonzero(row)
        zeros = rng.choice(np.flatnonzero(row == 0), size=min(explicit_zeros, int((row == 0).sum())), replace=False)
        stored = np.sort(np.concatenate([stored, zeros])).astype(np.int64)  # explicit zeros stored among them
        cols.extend(stored)
        values.extend(row[stored])
        crow.append(len(cols))
    csr = [torch.tensor(crow, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64), torch.tensor(values)]
    dense = torch.from_numpy(rng.standard_normal((n_rows, n_dense)).astype(np.float32)) if n_dense else None
    weight = torch.from_numpy(rng.standard_normal((n_out, n_sparse + n_dense)).astype(np.float32) / 10)
    bias = torch.from_numpy(rng.standard_normal(n_out).astype(np.float32))
    return csr, dense, weight.requires_grad_(), bias.requires_grad_(), torch.from_numpy(x).double()


def _native_csr_linear():
    from scvi_scale.kernels import csr_linear

    if not csr_linear.ready():
        pytest.skip("the C kernel cannot be built here (no C compiler: see the scvi_scale.kernels log)")
    return csr_linear


@pytest.mark.parametrize(
    "n_rows, n_sparse, n_dense, n_out, density, explicit_zeros",
    [
        (128, 2000, 2, 128, 0.1, 0),  # training's shape: B, G, one-hot batch, H
        (37, 301, 3, 19, 0.3, 2),  # odd sizes, explicit stored zeros
        (9, 50, 0, 7, 0.05, 1),  # no covariates, mostly empty rows
        (6, 40, 2, 5, 0.0, 0),  # an all-zero minibatch: no stored entries
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_csr_linear_matches_a_float64_dense_product(
    rng, n_rows, n_sparse, n_dense, n_out, density, explicit_zeros, with_bias
):
    """Output, weight and bias gradients against [x, dense] @ W^T + b and its gradients in float64, same inputs."""
    csr_linear = _native_csr_linear()
    (crow, cols, values), dense, weight, bias, x64 = _csr_linear_case(
        rng, n_rows, n_sparse, n_dense, n_out, density, explicit_zeros
    )
    bias = bias if with_bias else None
    grad_out = torch.from_numpy(rng.standard_normal((n_rows, n_out)).astype(np.float32))
    out = csr_linear.csr_linear(crow, cols, values, dense, weight, bias)
    out.backward(grad_out)
    inputs = x64 if dense is None else torch.cat([x64, dense.double()], dim=1)
    want = inputs @ weight.detach().double().t() + (0 if bias is None else bias.detach().double())
    want_weight = grad_out.double().t() @ inputs
    # norm-wise, as the likelihood's float32 checks; the magnitude of a sum of products is the sum of |products|
    magnitude = inputs.abs() @ weight.detach().double().abs().t()
    assert float((out.detach().double() - want).norm()) <= FLOAT32_TOL * max(float(magnitude.norm()), 1.0)
    weight_magnitude = grad_out.double().abs().t() @ inputs.abs()
    assert float((weight.grad.double() - want_weight).norm()) <= FLOAT32_TOL * max(float(weight_magnitude.norm()), 1.0)
    if density == 0.0:
        assert torch.equal(weight.grad[:, :n_sparse], torch.zeros(n_out, n_sparse))
    if with_bias:
        bias_error = (bias.grad.double() - grad_out.double().sum(0)).norm()
        assert float(bias_error) <= FLOAT32_TOL * max(float(grad_out.double().abs().sum(0).norm()), 1.0)


def test_first_layer_on_csr_trains_as_the_dense_product(rng):
    """FCLayers' first block with CSR x (the C kernel) and with dense x: the same output and parameter gradients."""
    from scvi_scale.nn import FCLayers

    _native_csr_linear()
    (crow, cols, values), _, _, _, x64 = _csr_linear_case(rng, 64, 500, 0, 1, 0.12)
    torch.manual_seed(0)
    # no batch norm: after one, the linear's bias gradient is zero up to rounding, and rounding is all it would compare
    layers = FCLayers(500, 32, n_cat_list=[3], n_hidden=32, dropout_rate=0.0, use_batch_norm=False)
    batch = torch.from_numpy(rng.integers(0, 3, 64))
    shape = (64, 500)
    sparse_x = torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=True)
    results = []
    for x in (sparse_x, x64.float()):
        layers.zero_grad(set_to_none=True)
        out = layers(x, batch)
        out.pow(2).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in layers.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_csr_linear_refuses_inputs_that_need_a_gradient(rng):
    csr_linear = _native_csr_linear()
    (crow, cols, values), dense, weight, bias, _ = _csr_linear_case(rng, 4, 30, 2, 5, 0.3)
    with pytest.raises(ValueError, match="no gradient for x or the dense columns"):
        csr_linear.csr_linear(crow, cols, values.requires_grad_(), dense, weight, bias)
