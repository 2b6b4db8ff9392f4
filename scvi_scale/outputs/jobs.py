"""What one chunk of cells computes for each output: the jobs, small picklable objects run by runner.py.

A job's `compute(module, minibatch, unit, seed, batch_size, device)` turns a unit's minibatch (the sampler's dict of
numpy arrays, all its cells; see runner.Unit) into a dict of named results, cells on the first axis (or, for
`ScaleSampleJob`, one row per requested cell). It runs the module on sub-batches of `batch_size` cells to bound
memory, and asks the decoder only for the heads it reads (each (B, G) head costs as much as the softmax).

Randomness: a job draws its noise with `noise.CellNoise(seed, keys)`, keys being the cells' store rows (the
requests' numbers for ScaleSampleJob), one stream per purpose below, and hands it to the module's own draw
(`VAE.inference(noise=...)`, `VAE.draw_latent`). A cell's values are therefore the same whatever chunk size,
batch size, process or resumed run computed them: written in chunks equals computed at once. Within a stream, the
draws of a cell come in a fixed order: (n_draws, ...) first, then what each draw needs.

Batches to decode in are category codes, OWN_BATCH (-1) meaning each cell's observed batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scvi_scale import kernels
from scvi_scale.module import Minibatch, to_tensors
from scvi_scale.outputs.de import GroupStatistics
from scvi_scale.outputs.noise import CellNoise, invert_counts

OWN_BATCH = -1  # decode each cell in its observed batch
LN_MEAN_BLOCK_VALUES = 1 << 22  # latent values per block of draws when averaging softmax(z) for "ln"
LIKELIHOOD_OUTPUTS = ("px_rate", "theta", "zi_logits")  # what likelihood parameters and samples decode
# Noise streams of a cell (shifted by stream_offset(transform batch), so each batch gets its own draws).
STREAM_Z, STREAM_LIBRARY, STREAM_COUNTS, N_STREAMS = 0, 1, 2, 3
STREAM_DENOISED = 1 << 20  # the gamma draws of get_feature_correlation_matrix, far from any batch's streams
LIKELIHOOD_BLOCK_VALUES = 1 << 22  # (requests x anchors x genes) entries per block of importance likelihoods


# --- the module's posterior and decoder, with our own draws --------------------------------------------------------


def sub_batches(minibatch: dict, noise: CellNoise, batch_size: int, device):
    """(module inputs as tensors on `device`, their cells' noise) for consecutive slices of batch_size cells.

    When the minibatch has the counts in CSR too (a CSR store, or a job with needs_csr), the slices carry them as
    "x_csr": the module then runs the encoder's first layer on the non-zeros only (about a tenth of the entries).
    """
    for start in range(0, len(minibatch["rows"]), batch_size):
        cells = slice(start, start + batch_size)
        yield to_tensors(minibatch, device, cells), noise.subset(cells)


def select(minibatch: dict, positions: np.ndarray) -> dict:
    """The minibatch restricted to (possibly repeated) cell positions."""
    return {key: value[positions] for key, value in minibatch.items() if isinstance(value, np.ndarray)}


def _normal(noise: CellNoise, stream: int, shape: tuple, device) -> torch.Tensor:
    """(S, B, *shape[1:]) standard normals on `device` from per-cell draws of shape (S, *shape[1:])."""
    return torch.from_numpy(noise.normal(stream, shape)).to(device).transpose(0, 1)


def stream_offset(transform_batch: int) -> int:
    """Where the noise streams of draws decoded in a batch start: each batch has its own, OWN_BATCH the first; so
    averaging over batches [a, b] averages exactly what decoding in a, then in b, gives."""
    return N_STREAMS * (int(transform_batch) + 1)


def posterior_draws(module, tensors: Minibatch, noise: CellNoise, n_draws: int, transform_batch: int = OWN_BATCH):
    """n_draws draws of (z, log library) per cell from q, to be decoded in `transform_batch`: z (S, B, L)
    transformed as the decoder sees it ("ln": softmax), library (S, B, 1): the observed one, or draws of q(l | x)."""
    offset = stream_offset(transform_batch)
    device = next(module.parameters()).device
    draws = {"z": _normal(noise, STREAM_Z + offset, (n_draws, module.n_latent), device)}
    if not module.use_observed_lib_size:
        draws["library"] = _normal(noise, STREAM_LIBRARY + offset, (n_draws, 1), device)
    inference = module.inference(tensors, n_samples=n_draws, noise=draws)
    if n_draws == 1:
        return inference["z"][None], inference["library"][None]
    return inference["z"], inference["library"]


def decode(module, z: torch.Tensor, library: torch.Tensor, tensors: Minibatch, transform_batch: int, outputs: tuple):
    """The decoder's `outputs` for S draws at once: px_scale, px_rate, zi_logits (S, B, G); theta (G,) or
    (S, B, G).

    The draws are stacked along the cell axis (each input tensor repeated S times) for one generative call.
    """
    n_draws, n_cells = z.shape[:2]
    decoded = module.generative(
        z.reshape(n_draws * n_cells, -1),
        library.reshape(n_draws * n_cells, 1),
        tensors.repeated(n_draws),  # without the counts: the decoder does not read them
        transform_batch=None if transform_batch == OWN_BATCH else int(transform_batch),
        outputs=outputs,
    )
    return {
        key: value if value is None or value.dim() == 1 else value.reshape(n_draws, n_cells, *value.shape[1:])
        for key, value in decoded.items()
        if key in outputs
    }


def concatenate(parts: list[torch.Tensor]) -> np.ndarray:
    """The sub-batches' results as one numpy array on the CPU (one part is not copied)."""
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).cpu().numpy()


def expression_outputs(library_size: float | str) -> tuple[str]:
    """The decoder output `scaled_expression` reads."""
    return ("px_rate",) if library_size == "latent" else ("px_scale",)


def scaled_expression(outputs: dict, library_size: float | str) -> torch.Tensor:
    """px_scale * library_size, or px_rate for library_size="latent" (scvi-tools' get_normalized_expression)."""
    if library_size == "latent":
        return outputs["px_rate"]
    return outputs["px_scale"] if library_size == 1 else outputs["px_scale"] * library_size


# --- jobs -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentJob:
    """{"latent": (n, L)} the mean of q(z | x) (give_mean; for "ln" the mean of softmax(z) over mc_samples draws)
    or one draw; with return_dist also {"variance": (n, L)}, the variance of q(z | x)."""

    give_mean: bool = True
    mc_samples: int = 5000
    return_dist: bool = False

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        latent, variance = [], []
        for tensors, noise in sub_batches(minibatch, CellNoise(seed, unit.rows), batch_size, device):
            if not (self.return_dist or self.give_mean):
                latent.append(posterior_draws(module, tensors, noise, 1)[0][0])
                continue
            qz = module.inference(tensors)["qz"]
            if self.return_dist:
                latent.append(qz.loc)
                variance.append(qz.scale.square())
            elif module.latent_distribution == "ln":
                latent.append(self._ln_mean(module, qz, noise))
            else:
                latent.append(qz.loc)
        result = {"latent": concatenate(latent)}
        if self.return_dist:
            result["variance"] = concatenate(variance)
        return result

    def _ln_mean(self, module, qz, noise: CellNoise) -> torch.Tensor:
        """Mean of softmax(z) over mc_samples draws, transformed in blocks of draws that bound memory."""
        draws = _normal(noise, STREAM_Z, (self.mc_samples, qz.loc.shape[1]), qz.loc.device)
        block = max(1, LN_MEAN_BLOCK_VALUES // qz.loc.numel())
        total = torch.zeros_like(qz.loc)
        for start in range(0, self.mc_samples, block):
            total += module.draw_latent(qz, draws[start : start + block]).sum(0)
        return total / self.mc_samples


@dataclass(frozen=True)
class LibraryJob:
    """{"library": (n, 1)}: the mean of the log-normal q(l | x) (give_mean, latent library only) or exp(l), the
    observed library or a draw of q(l | x)."""

    give_mean: bool = True

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        parts = []
        for tensors, noise in sub_batches(minibatch, CellNoise(seed, unit.rows), batch_size, device):
            if self.give_mean:
                ql = module.inference(tensors)["ql"]
                parts.append(torch.exp(ql.loc + 0.5 * ql.scale.square()))
            else:
                parts.append(torch.exp(posterior_draws(module, tensors, noise, 1)[1][0]))
        return {"library": concatenate(parts)}


@dataclass(frozen=True)
class ExpressionJob:
    """{"expression": (n, G') or (n, S, G')}: px_scale * library_size (px_rate for library_size="latent") over the
    genes `genes` (None: all), averaged over the batches of transform_batches (OWN_BATCH: the observed batch; one
    draw of z per batch, as scvi-tools re-runs inference for each), and over the S = n_samples draws when
    return_mean."""

    transform_batches: tuple = (OWN_BATCH,)
    genes: tuple | None = None
    library_size: float | str = 1.0
    n_samples: int = 1
    return_mean: bool = True

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        parts = []
        for tensors, noise in sub_batches(minibatch, CellNoise(seed, unit.rows), batch_size, device):
            total: torch.Tensor | float = 0.0
            for batch in self.transform_batches:
                z, library = posterior_draws(module, tensors, noise, self.n_samples, batch)
                outputs = decode(module, z, library, tensors, batch, expression_outputs(self.library_size))
                values = scaled_expression(outputs, self.library_size)
                total = total + (values if self.genes is None else values[..., list(self.genes)])
            assert isinstance(total, torch.Tensor), "transform_batches is never empty"
            expression = total / len(self.transform_batches)  # (S, B, G')
            if self.n_samples == 1:
                parts.append(expression[0])
            elif self.return_mean:
                parts.append(expression.mean(0))
            else:
                parts.append(expression.transpose(0, 1))
        return {"expression": concatenate(parts)}


@dataclass(frozen=True)
class LikelihoodJob:
    """{"mean": px_rate, "dispersions": theta (not for Poisson), "dropout": sigmoid(zi_logits) (ZINB only)}, each
    (n, G), or (n, S, G) for n_samples > 1 without give_mean (give_mean averages over the draws)."""

    n_samples: int = 1
    give_mean: bool = False

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        parts: dict[str, list] = {}
        for tensors, noise in sub_batches(minibatch, CellNoise(seed, unit.rows), batch_size, device):
            z, library = posterior_draws(module, tensors, noise, self.n_samples)
            outputs = decode(module, z, library, tensors, OWN_BATCH, LIKELIHOOD_OUTPUTS)
            values = {"mean": outputs["px_rate"]}
            if outputs["theta"] is not None:
                values["dispersions"] = outputs["theta"].expand_as(outputs["px_rate"])
            if outputs["zi_logits"] is not None:
                values["dropout"] = torch.sigmoid(outputs["zi_logits"])
            for name, value in values.items():
                value = value.mean(0) if self.give_mean or self.n_samples == 1 else value.transpose(0, 1)
                parts.setdefault(name, []).append(value)
        return {name: concatenate(value) for name, value in parts.items()}


@dataclass(frozen=True)
class PosteriorPredictiveJob:
    """{"sample_0", ..., "sample_{S-1}"}: (n, G') float32 CSR counts drawn from the fitted likelihood (NB, ZINB or
    Poisson; noise.invert_counts) given one draw of q(z, l | x) each, over the genes `genes` (None: all; a gene's
    draws do not depend on the selection); with several transform_batches the draws of the batches are averaged,
    as scvi-tools does."""

    transform_batches: tuple = (OWN_BATCH,)
    genes: tuple | None = None
    n_samples: int = 1

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        parts: list[list[sp.csr_matrix]] = [[] for _ in range(self.n_samples)]
        genes = slice(None) if self.genes is None else list(self.genes)
        for tensors, noise in sub_batches(minibatch, CellNoise(seed, unit.rows), batch_size, device):
            n_cells, n_genes = len(noise.keys), module.n_input
            total: sp.csr_matrix = 0  # the sum of the batches' CSR counts
            for batch in self.transform_batches:
                z, library = posterior_draws(module, tensors, noise, self.n_samples, batch)
                outputs = decode(module, z, library, tensors, batch, LIKELIHOOD_OUTPUTS)

                def stacked(value):  # (S, B, G) -> (S * B, G') on the CPU, draws one after the other
                    return (
                        value[..., genes].reshape(-1, value.shape[-1] if self.genes is None else len(self.genes)).cpu()
                    )

                uniforms = noise.uniform(STREAM_COUNTS + stream_offset(batch), self.n_samples * n_genes)
                uniforms = uniforms.reshape(n_cells, self.n_samples, n_genes)[..., genes].transpose(1, 0, 2)
                theta = outputs["theta"]
                if theta is not None:
                    theta = theta[genes].cpu() if theta.dim() == 1 else stacked(theta)
                zi_logits = outputs["zi_logits"]
                total = total + invert_counts(
                    np.ascontiguousarray(uniforms).reshape(self.n_samples * n_cells, -1),
                    stacked(outputs["px_rate"]),
                    theta,
                    None if zi_logits is None else torch.sigmoid(stacked(zi_logits)),
                )
            if len(self.transform_batches) > 1:
                total = total / len(self.transform_batches)
            for draw in range(self.n_samples):
                parts[draw].append(total[draw * n_cells : (draw + 1) * n_cells])
        return {f"sample_{draw}": sp.vstack(part, format="csr") for draw, part in enumerate(parts)}


@dataclass(frozen=True)
class RawStatsJob:
    """{"stats": GroupStatistics} of the unit's raw counts; the unit's payload holds its cells' group codes."""

    n_groups: int
    needs_csr = True  # sparse sums are ~10x cheaper than dense ones at ~10% non-zeros
    needs_counts = True  # raw statistics read the counts, even for a minified model

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        n_cells, n_genes = len(minibatch["rows"]), module.n_input
        indptr, indices, data = minibatch["x_csr"]
        statistics = GroupStatistics(self.n_groups, n_genes)
        statistics.add(sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes)), unit.payload)
        return {"stats": statistics}


@dataclass(frozen=True)
class ScaleSampleJob:
    """Posterior samples of px_scale * library_size (px_rate for "latent") for requested cells of the unit.

    The payload is (positions, batches, requests): per request, the cell's position in the unit (a cell may be
    requested many times), the batch to decode it in (OWN_BATCH: its observed batch) and the request's number,
    which keys its draw and says where the sample goes. Returns {"requests": (m,), "scales": (m, G') float32} over
    `genes`.
    """

    genes: tuple | None = None
    library_size: float | str = 1.0
    needs_dense = True  # requested cells are selected (and repeated) from the dense counts

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        positions, batches, requests = unit.payload
        order = np.argsort(batches, kind="stable")
        scales = []
        for batch in np.unique(batches):
            chosen = order[batches[order] == batch]
            selected = select(minibatch, positions[chosen])
            for tensors, noise in sub_batches(selected, CellNoise(seed, requests[chosen]), batch_size, device):
                z, library = posterior_draws(module, tensors, noise, 1, batch)
                outputs = decode(module, z, library, tensors, batch, expression_outputs(self.library_size))
                values = scaled_expression(outputs, self.library_size)
                scales.append(values[0] if self.genes is None else values[0][:, list(self.genes)])
        return {"requests": requests[order], "scales": concatenate(scales)}


@dataclass(frozen=True)
class DenoisedJob:
    """{"denoised": (n, S, G)}: scvi-tools' adjusted posterior predictive for feature correlations (its
    _get_denoised_samples): per draw of z decoded in `transform_batch`, Gamma(shape theta, mean rna_size_factor *
    px_scale) per gene. The gamma draws come from a numpy generator keyed by (seed, stream, cell), so a cell's
    values do not depend on its company."""

    n_samples: int = 25
    rna_size_factor: float = 1000.0
    transform_batch: int = OWN_BATCH

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        parts = []
        for tensors, noise in sub_batches(minibatch, CellNoise(seed, unit.rows), batch_size, device):
            z, library = posterior_draws(module, tensors, noise, self.n_samples, self.transform_batch)
            outputs = decode(module, z, library, tensors, self.transform_batch, ("px_scale", "theta"))
            rate = (self.rna_size_factor * outputs["px_scale"]).transpose(0, 1).cpu().numpy()  # (B, S, G)
            theta = outputs["theta"]
            theta = (theta if theta.dim() == 1 else theta.transpose(0, 1)).cpu().numpy()
            theta = np.broadcast_to(theta, rate.shape)
            draws = np.empty(rate.shape, dtype=np.float32)
            for row, key in enumerate(noise.keys):
                generator = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(STREAM_DENOISED, int(key))))
                draws[row] = generator.standard_gamma(theta[row]) * (rate[row] / theta[row])
            parts.append(draws)
        return {"denoised": np.concatenate(parts)}


@dataclass(frozen=True)
class Anchors:
    """The cells importance weights are measured against (scvi-tools' anchors, at most max_cells of them):
    dense counts x (A, G), library sizes (A,), q(z | x) loc and scale (A, L), and log p(x) (A,)."""

    x: np.ndarray
    library: np.ndarray
    qz_loc: np.ndarray
    qz_scale: np.ndarray
    log_px: np.ndarray


@dataclass(frozen=True)
class ImportanceJob:
    """Importance log-weights of requested posterior samples (scvi-tools' get_importance_weights, before the
    normalisation over samples): for a sample z_s of a requested cell, decoded in its batch,
        w_s = log p(z_s) - logsumexp_b log q(z_s | x_b) + logsumexp_a [log p(x_a | z_s, l_a) - log p(x_a)]
    over the anchors a, b, where p(x_a | z_s, l_a) is the sample's likelihood (its px_scale at anchor a's library
    size, its dispersion and dropout). The payload is ScaleSampleJob's; the draws are keyed by request number as
    there, so a sample chosen by its weight decodes to the same values. Returns {"requests", "log_weights"}."""

    anchors: Anchors
    needs_dense = True

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        positions, batches, requests = unit.payload
        order = np.argsort(batches, kind="stable")
        anchors = {
            name: torch.from_numpy(np.asarray(getattr(self.anchors, name))).to(device)
            for name in ("x", "library", "qz_loc", "qz_scale", "log_px")
        }
        weights = []
        for batch in np.unique(batches):
            chosen = order[batches[order] == batch]
            selected = select(minibatch, positions[chosen])
            for tensors, noise in sub_batches(selected, CellNoise(seed, requests[chosen]), batch_size, device):
                z, library = posterior_draws(module, tensors, noise, 1, batch)
                outputs = decode(module, z, library, tensors, batch, ("px_scale", "theta", "zi_logits"))
                weights.append(self._log_weights(module, z[0], outputs, anchors))
        return {"requests": requests[order], "log_weights": concatenate(weights)}

    @staticmethod
    def _log_weights(module, z: torch.Tensor, outputs: dict, anchors: dict) -> torch.Tensor:
        n_samples, n_anchors, n_genes = z.shape[0], anchors["x"].shape[0], anchors["x"].shape[1]
        standard_normal = torch.distributions.Normal(0.0, 1.0, validate_args=False)
        log_pz = standard_normal.log_prob(z).sum(-1)  # (s,)
        qz = torch.distributions.Normal(anchors["qz_loc"], anchors["qz_scale"], validate_args=False)
        log_qz = qz.log_prob(z[:, None, :]).sum(-1)  # (s, A)
        scale = outputs["px_scale"][0]  # (s, G)
        theta, zi = outputs["theta"], outputs["zi_logits"]
        block = max(1, LIKELIHOOD_BLOCK_VALUES // max(1, n_anchors * n_genes))
        log_px_z_parts = []
        for start in range(0, n_samples, block):
            rows = slice(start, start + block)
            k = scale[rows].shape[0]
            mu = (scale[rows, None, :] * anchors["library"][None, :, None]).reshape(k * n_anchors, n_genes)
            x = anchors["x"].expand(k, -1, -1).reshape(k * n_anchors, n_genes)

            # called within this iteration only, so the loop variables it reads are this iteration's
            def per_pair(value):  # (s, G) or (G,) -> one row per (sample, anchor) pair, or as it is
                if value is None or value.dim() == 1:
                    return value
                return value[0][rows, None, :].expand(-1, n_anchors, -1).reshape(k * n_anchors, n_genes)  # noqa: B023

            log_px_z_parts.append(
                kernels.count_log_likelihood(x, mu, per_pair(theta), per_pair(zi), module.gene_likelihood).reshape(
                    k, n_anchors
                )
            )
        log_px_z = torch.cat(log_px_z_parts)
        return log_pz - torch.logsumexp(log_qz, 1) + torch.logsumexp(log_px_z - anchors["log_px"][None, :], 1)
