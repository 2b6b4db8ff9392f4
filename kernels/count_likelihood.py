"""Fused count log-likelihood (ZINB, NB, Poisson) in Triton: kernels, launchers, autograd Function, and the textbook
PyTorch form it replaces.

Forward: a grid of (cell blocks, gene splits) programs; each walks its gene tiles, evaluates log p per entry
(tl_math.count_log_prob) and sums it per cell, so what is written is one float per cell and split (summed over the
splits afterwards). Backward: a grid of (gene blocks, cell splits) programs; each walks its cell tiles once, reading
x, mu, theta, the logits and the incoming per-cell gradient, and writes d/dmu and d/dlogits per entry, and d/dtheta
per entry (theta per cell) or summed over its cells in registers (theta per gene), so nothing from the forward but
the inputs is kept. Shapes: B cells, G genes; x, mu, logits (B, G); theta (G,) or (B, G). Tensors are contiguous
and of one dtype (float32, or float64), as scvi_scale.kernels hands them over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from scvi_scale.kernels import launch
from scvi_scale.kernels.tl_math import LIKELIHOOD_CODES, POISSON, ZINB, count_log_prob, count_log_prob_grads

GPU_TILE = (8, 256)  # (cells, genes) per tile on a GPU
NUM_WARPS = 8  # 8 entries per thread: the special functions keep many temporaries live


@triton.jit
def _load_count_tile(
    x_ptr, mu_ptr, theta_ptr, zi_ptr, cells, genes, n_genes, theta_cell_stride, mask, LIKELIHOOD: tl.constexpr
):
    """x, mu, theta, zi_logits of a (cells, genes) tile; masked entries get values that keep the math finite."""
    offsets = cells[:, None].to(tl.int64) * n_genes + genes[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    mu = tl.load(mu_ptr + offsets, mask=mask, other=1.0)
    theta = mu
    zi_logits = mu
    if LIKELIHOOD != POISSON:
        theta_offsets = cells[:, None].to(tl.int64) * theta_cell_stride + genes[None, :]
        theta = tl.load(theta_ptr + theta_offsets, mask=mask, other=1.0)
    if LIKELIHOOD == ZINB:
        zi_logits = tl.load(zi_ptr + offsets, mask=mask, other=0.0)
    return offsets, x, mu, theta, zi_logits


@triton.jit
def _count_log_likelihood_fwd_kernel(
    x_ptr,
    mu_ptr,
    theta_ptr,
    zi_ptr,
    partial_ptr,  # partial: (n_splits, B)
    n_cells,
    n_genes,
    theta_cell_stride,
    n_splits,
    LIKELIHOOD: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
    BLOCK_GENES: tl.constexpr,
):
    split = tl.program_id(1)
    cells = tl.program_id(0) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    cell_mask = cells < n_cells
    per_cell = tl.zeros((BLOCK_CELLS,), dtype=partial_ptr.dtype.element_ty)
    for gene_tile in range(split, tl.cdiv(n_genes, BLOCK_GENES), n_splits):
        genes = gene_tile * BLOCK_GENES + tl.arange(0, BLOCK_GENES)
        mask = cell_mask[:, None] & (genes < n_genes)[None, :]
        _, x, mu, theta, zi_logits = _load_count_tile(
            x_ptr, mu_ptr, theta_ptr, zi_ptr, cells, genes, n_genes, theta_cell_stride, mask, LIKELIHOOD
        )
        log_p = count_log_prob(x, mu, theta, zi_logits, LIKELIHOOD)
        per_cell += tl.sum(tl.where(mask, log_p, 0.0), axis=1)
    tl.store(partial_ptr + split * n_cells + cells, per_cell, mask=cell_mask)


@triton.jit
def _count_log_likelihood_bwd_kernel(
    x_ptr,
    mu_ptr,
    theta_ptr,
    zi_ptr,
    grad_out_ptr,
    grad_mu_ptr,
    grad_theta_ptr,
    grad_zi_ptr,  # grad_theta: (B, G), or (n_splits, G) partial sums if THETA_PER_GENE
    n_cells,
    n_genes,
    theta_cell_stride,
    n_splits,
    LIKELIHOOD: tl.constexpr,
    THETA_PER_GENE: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
    BLOCK_GENES: tl.constexpr,
):
    split = tl.program_id(1)
    genes = tl.program_id(0) * BLOCK_GENES + tl.arange(0, BLOCK_GENES)
    gene_mask = genes < n_genes
    theta_per_gene = tl.zeros((BLOCK_GENES,), dtype=grad_mu_ptr.dtype.element_ty)
    for cell_tile in range(split, tl.cdiv(n_cells, BLOCK_CELLS), n_splits):
        cells = cell_tile * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
        cell_mask = cells < n_cells
        mask = cell_mask[:, None] & gene_mask[None, :]
        offsets, x, mu, theta, zi_logits = _load_count_tile(
            x_ptr, mu_ptr, theta_ptr, zi_ptr, cells, genes, n_genes, theta_cell_stride, mask, LIKELIHOOD
        )
        grad_out = tl.load(grad_out_ptr + cells, mask=cell_mask, other=0.0)[:, None]
        d_log_mu, d_theta, d_zi = count_log_prob_grads(x, mu, theta, zi_logits, LIKELIHOOD)
        tl.store(grad_mu_ptr + offsets, grad_out * d_log_mu / mu, mask=mask)
        if LIKELIHOOD == ZINB:
            tl.store(grad_zi_ptr + offsets, grad_out * d_zi, mask=mask)
        if LIKELIHOOD != POISSON:
            if THETA_PER_GENE:
                theta_per_gene += tl.sum(tl.where(mask, grad_out * d_theta, 0.0), axis=0)
            else:
                tl.store(grad_theta_ptr + offsets, grad_out * d_theta, mask=mask)
    if LIKELIHOOD != POISSON:
        if THETA_PER_GENE:
            tl.store(grad_theta_ptr + split * n_genes + genes, theta_per_gene, mask=gene_mask)


def _theta_cell_stride(theta: torch.Tensor | None) -> int:
    """Elements between cells in theta: 0 when theta is per gene (broadcast over cells)."""
    return 0 if theta is None or theta.dim() == 1 else theta.shape[1]


def count_log_likelihood_forward(x, mu, theta, zi_logits, likelihood: str) -> torch.Tensor:
    """Launches the forward kernel; returns the per-cell sum of log p(x), (B,)."""
    n_cells, n_genes = x.shape
    block_cells, block_genes = launch.tile(n_cells, n_genes, x.device, GPU_TILE)
    n_cell_blocks = triton.cdiv(n_cells, block_cells)
    n_splits = launch.loop_splits(n_cell_blocks, triton.cdiv(n_genes, block_genes), x.device)
    partial = launch.new_buffer((n_splits, n_cells), like=mu)
    _count_log_likelihood_fwd_kernel[(n_cell_blocks, n_splits)](
        x,
        mu,
        mu if theta is None else theta,
        mu if zi_logits is None else zi_logits,
        partial,
        n_cells,
        n_genes,
        _theta_cell_stride(theta),
        n_splits,
        LIKELIHOOD=LIKELIHOOD_CODES[likelihood],
        BLOCK_CELLS=block_cells,
        BLOCK_GENES=block_genes,
        num_warps=NUM_WARPS,
    )
    return partial.sum(0)


def count_log_likelihood_backward(x, mu, theta, zi_logits, likelihood: str, grad_out: torch.Tensor):
    """Launches the backward kernel; returns (grad_mu, grad_theta, grad_zi_logits), None where not a parameter."""
    n_cells, n_genes = x.shape
    block_cells, block_genes = launch.tile(n_cells, n_genes, x.device, GPU_TILE)
    n_gene_blocks = triton.cdiv(n_genes, block_genes)
    n_splits = launch.loop_splits(n_gene_blocks, triton.cdiv(n_cells, block_cells), x.device)
    theta_per_gene = theta is not None and theta.dim() == 1
    grad_mu = launch.new_buffer((n_cells, n_genes), like=mu)
    grad_zi = None if zi_logits is None else launch.new_buffer((n_cells, n_genes), like=mu)
    grad_theta = None
    if theta is not None:
        grad_theta = launch.new_buffer((n_splits, n_genes) if theta_per_gene else (n_cells, n_genes), like=mu)
    _count_log_likelihood_bwd_kernel[(n_gene_blocks, n_splits)](
        x,
        mu,
        mu if theta is None else theta,
        mu if zi_logits is None else zi_logits,
        grad_out.contiguous(),
        grad_mu,
        mu if grad_theta is None else grad_theta,
        mu if grad_zi is None else grad_zi,
        n_cells,
        n_genes,
        _theta_cell_stride(theta),
        n_splits,
        LIKELIHOOD=LIKELIHOOD_CODES[likelihood],
        THETA_PER_GENE=theta_per_gene,
        BLOCK_CELLS=block_cells,
        BLOCK_GENES=block_genes,
        num_warps=NUM_WARPS,
    )
    if theta_per_gene and grad_theta is not None:
        grad_theta = grad_theta.sum(0)
    return grad_mu, grad_theta, grad_zi


class CountLogLikelihood(torch.autograd.Function):
    """Per-cell log-likelihood of counts; forward and backward are one kernel each (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, mu, theta, zi_logits, likelihood: str):
        x, mu, theta, zi_logits = (None if t is None else t.contiguous() for t in (x, mu, theta, zi_logits))
        ctx.likelihood = likelihood
        ctx.save_for_backward(x, mu, theta, zi_logits)
        return count_log_likelihood_forward(x, mu, theta, zi_logits, likelihood)

    @staticmethod
    def backward(ctx, grad_out):
        x, mu, theta, zi_logits = ctx.saved_tensors
        grad_mu, grad_theta, grad_zi = count_log_likelihood_backward(x, mu, theta, zi_logits, ctx.likelihood, grad_out)
        return None, grad_mu, grad_theta, grad_zi, None


def count_log_likelihood(x, mu, theta, zi_logits, likelihood: str) -> torch.Tensor:
    """Triton path of `scvi_scale.kernels.count_log_likelihood` (see there). Returns (B,)."""
    return CountLogLikelihood.apply(x, mu, theta, zi_logits, likelihood)


def reference_count_log_likelihood(x, mu, theta, zi_logits, likelihood: str) -> torch.Tensor:
    """The textbook dense PyTorch form, differentiated by autograd: the unfused baseline of benchmarks/kernels.py.

    Every entry pays for three lgammas and a B x G tensor per intermediate; in float32 it loses accuracy at large
    counts or theta (lgamma differences of ~1e6), which is why neither path of scvi_scale.kernels uses it.
    """
    if likelihood == "poisson":
        return (torch.xlogy(x, mu) - mu - torch.lgamma(x + 1)).sum(-1)
    log_theta_mu = torch.log(theta + mu)
    log_nb_zero = theta * (torch.log(theta) - log_theta_mu)
    log_nb = (
        log_nb_zero
        + x * (torch.log(mu) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    if likelihood == "nb":
        return log_nb.sum(-1)
    log_p = torch.where(x == 0, torch.logaddexp(zi_logits, log_nb_zero), log_nb) - F.softplus(zi_logits)
    return log_p.sum(-1)
