"""Fused softmax decoder + count log-likelihood in Triton: kernels, launchers, autograd Function, and the unfused
PyTorch form it replaces.

From scVI's last decoder layer `hidden` (B x H), the scale head (W: G x H, b: G), the log library l (B), theta and
the dropout head (Wd: G x H, bd: G):
    s = hidden W^T + b,  log mu = l + s - lse(s),  z = hidden Wd^T + bd,  out = sum_genes log p(x | mu, theta, z)
with lse the per-cell log-sum-exp over genes. Genes are tiled, and each tile's logits are recomputed from `hidden`
and the weights whenever a pass needs them, so no B x G tensor is ever written (Liger-Kernel's fused linear
cross-entropy pattern, turned around: the reduction runs over the output features).

Passes (grids are (cell blocks, loop splits) or (gene blocks, loop splits); a split's partial results are
(n_splits, ...) buffers summed afterwards):
    forward 1  _lse_kernel:         online max / sum-of-exp over gene tiles -> lse (B,)
    forward 2  _forward_kernel:     per cell, sum of log p and A = sum_genes a, a = d log p / d log mu (kept for
                                    the backward: the softmax's gradient needs it before any gene is revisited)
    backward 1 _grad_hidden_kernel: per cell block over gene tiles: dS = g (a - p A), dZ = g dlogp/dz,
                                    d hidden += dS W + dZ Wd
    backward 2 _grad_weights_kernel: per gene block over cell tiles: dW += dS^T hidden, db += sum dS, likewise
                                    Wd, bd, and d theta (summed over cells for theta per gene)
    d l = g A needs no pass. p = exp(s - lse) is softmax(s) = px_scale; g is the incoming per-cell gradient.
Inference: _px_scale_kernel writes px_scale = exp(s - lse) after forward 1, in float32.
Matmuls use tl.dot with input_precision="ieee" (no TF32), so float32 results are float32-accurate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from scvi_scale.kernels import launch
from scvi_scale.kernels.count_likelihood import reference_count_log_likelihood
from scvi_scale.kernels.tl_math import LIKELIHOOD_CODES, POISSON, ZINB, count_log_prob, count_log_prob_grads

GPU_TILE = (16, 64)  # (cells, genes); tl.dot needs >= 16 in every dimension
GPU_TILE_ELEMENTS = 8192  # cap on BLOCK_GENES * BLOCK_HIDDEN on a GPU, so weight tiles fit in registers
NUM_WARPS = 8  # the weight-gradient kernel holds two BLOCK_GENES x BLOCK_HIDDEN accumulators


@triton.jit
def _load_hidden(hidden_ptr, cells, hidden_units, n_cells, n_hidden):
    """The (cells, hidden units) tile of hidden, zero outside the matrix."""
    mask = (cells < n_cells)[:, None] & (hidden_units < n_hidden)[None, :]
    return tl.load(hidden_ptr + cells[:, None].to(tl.int64) * n_hidden + hidden_units[None, :], mask=mask, other=0.0)


@triton.jit
def _gene_logits(hidden, weight_ptr, bias_ptr, genes, hidden_units, n_genes, n_hidden):
    """(hidden @ weight[genes].T + bias[genes], weight[genes]): logits (cells, genes) and the weight tile used."""
    gene_mask = genes < n_genes
    weight_mask = gene_mask[:, None] & (hidden_units < n_hidden)[None, :]
    weight = tl.load(
        weight_ptr + genes[:, None].to(tl.int64) * n_hidden + hidden_units[None, :], mask=weight_mask, other=0.0
    )
    bias = tl.load(bias_ptr + genes, mask=gene_mask, other=0.0)
    return tl.dot(hidden, tl.trans(weight), input_precision="ieee") + bias[None, :], weight


@triton.jit
def _likelihood_tile(
    hidden,
    cells,
    genes,
    hidden_units,
    mask,
    log_library,
    lse,
    scale_weight_ptr,
    scale_bias_ptr,
    dropout_weight_ptr,
    dropout_bias_ptr,
    x_ptr,
    theta_ptr,
    n_genes,
    n_hidden,
    theta_cell_stride,
    LIKELIHOOD: tl.constexpr,
):
    """Everything a pass needs about one (cells, genes) tile: logits s, mu, x, theta, dropout logits z, and the
    weight tiles of both heads. Entries outside the matrix get values that keep the math finite."""
    logits, scale_weight = _gene_logits(
        hidden, scale_weight_ptr, scale_bias_ptr, genes, hidden_units, n_genes, n_hidden
    )
    mu = tl.exp(tl.where(mask, log_library[:, None] + logits - lse[:, None], 0.0))
    offsets = cells[:, None].to(tl.int64) * n_genes + genes[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    theta = mu
    zi_logits = mu
    dropout_weight = scale_weight
    if LIKELIHOOD != POISSON:
        theta = tl.load(
            theta_ptr + cells[:, None].to(tl.int64) * theta_cell_stride + genes[None, :], mask=mask, other=1.0
        )
    if LIKELIHOOD == ZINB:
        zi_logits, dropout_weight = _gene_logits(
            hidden, dropout_weight_ptr, dropout_bias_ptr, genes, hidden_units, n_genes, n_hidden
        )
        zi_logits = tl.where(mask, zi_logits, 0.0)
    return logits, mu, x, theta, zi_logits, offsets, scale_weight, dropout_weight


@triton.jit
def _lse_kernel(
    hidden_ptr,
    scale_weight_ptr,
    scale_bias_ptr,
    partial_max_ptr,
    partial_sum_ptr,  # partials: (n_splits, B)
    n_cells,
    n_genes,
    n_hidden,
    n_splits,
    BLOCK_CELLS: tl.constexpr,
    BLOCK_GENES: tl.constexpr,
    BLOCK_HIDDEN: tl.constexpr,
):
    split = tl.program_id(1)
    cells = tl.program_id(0) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    hidden_units = tl.arange(0, BLOCK_HIDDEN)
    hidden = _load_hidden(hidden_ptr, cells, hidden_units, n_cells, n_hidden)
    running_max = tl.full((BLOCK_CELLS,), float("-inf"), dtype=hidden.dtype)
    running_sum = tl.zeros((BLOCK_CELLS,), dtype=hidden.dtype)
    for gene_tile in range(split, tl.cdiv(n_genes, BLOCK_GENES), n_splits):
        genes = gene_tile * BLOCK_GENES + tl.arange(0, BLOCK_GENES)
        logits, _ = _gene_logits(hidden, scale_weight_ptr, scale_bias_ptr, genes, hidden_units, n_genes, n_hidden)
        logits = tl.where((genes < n_genes)[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
    cell_mask = cells < n_cells
    tl.store(partial_max_ptr + split * n_cells + cells, running_max, mask=cell_mask)
    tl.store(partial_sum_ptr + split * n_cells + cells, running_sum, mask=cell_mask)


@triton.jit
def _forward_kernel(
    hidden_ptr,
    scale_weight_ptr,
    scale_bias_ptr,
    dropout_weight_ptr,
    dropout_bias_ptr,
    log_library_ptr,
    lse_ptr,
    x_ptr,
    theta_ptr,
    partial_log_p_ptr,
    partial_a_ptr,  # partials: (n_splits, B)
    n_cells,
    n_genes,
    n_hidden,
    theta_cell_stride,
    n_splits,
    LIKELIHOOD: tl.constexpr,
    NEED_A: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
    BLOCK_GENES: tl.constexpr,
    BLOCK_HIDDEN: tl.constexpr,
):
    split = tl.program_id(1)
    cells = tl.program_id(0) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    cell_mask = cells < n_cells
    hidden_units = tl.arange(0, BLOCK_HIDDEN)
    hidden = _load_hidden(hidden_ptr, cells, hidden_units, n_cells, n_hidden)
    log_library = tl.load(log_library_ptr + cells, mask=cell_mask, other=0.0)
    lse = tl.load(lse_ptr + cells, mask=cell_mask, other=0.0)
    log_p_sum = tl.zeros((BLOCK_CELLS,), dtype=hidden.dtype)
    a_sum = tl.zeros((BLOCK_CELLS,), dtype=hidden.dtype)
    for gene_tile in range(split, tl.cdiv(n_genes, BLOCK_GENES), n_splits):
        genes = gene_tile * BLOCK_GENES + tl.arange(0, BLOCK_GENES)
        mask = cell_mask[:, None] & (genes < n_genes)[None, :]
        _, mu, x, theta, zi_logits, _, _, _ = _likelihood_tile(
            hidden,
            cells,
            genes,
            hidden_units,
            mask,
            log_library,
            lse,
            scale_weight_ptr,
            scale_bias_ptr,
            dropout_weight_ptr,
            dropout_bias_ptr,
            x_ptr,
            theta_ptr,
            n_genes,
            n_hidden,
            theta_cell_stride,
            LIKELIHOOD,
        )
        log_p = count_log_prob(x, mu, theta, zi_logits, LIKELIHOOD)
        log_p_sum += tl.sum(tl.where(mask, log_p, 0.0), axis=1)
        if NEED_A:
            a, _, _ = count_log_prob_grads(x, mu, theta, zi_logits, LIKELIHOOD)
            a_sum += tl.sum(tl.where(mask, a, 0.0), axis=1)
    tl.store(partial_log_p_ptr + split * n_cells + cells, log_p_sum, mask=cell_mask)
    if NEED_A:
        tl.store(partial_a_ptr + split * n_cells + cells, a_sum, mask=cell_mask)


@triton.jit
def _grad_logits_tile(
    hidden,
    cells,
    genes,
    hidden_units,
    mask,
    log_library,
    lse,
    a_sum,
    grad_out,
    scale_weight_ptr,
    scale_bias_ptr,
    dropout_weight_ptr,
    dropout_bias_ptr,
    x_ptr,
    theta_ptr,
    n_genes,
    n_hidden,
    theta_cell_stride,
    LIKELIHOOD: tl.constexpr,
):
    """For one tile: dS = g (a - p A) (gradient w.r.t. the scale logits), dZ = g dlogp/dz, g dlogp/dtheta, all zero
    outside the matrix; and the two weight tiles, for the backward's matmuls."""
    logits, mu, x, theta, zi_logits, offsets, scale_weight, dropout_weight = _likelihood_tile(
        hidden,
        cells,
        genes,
        hidden_units,
        mask,
        log_library,
        lse,
        scale_weight_ptr,
        scale_bias_ptr,
        dropout_weight_ptr,
        dropout_bias_ptr,
        x_ptr,
        theta_ptr,
        n_genes,
        n_hidden,
        theta_cell_stride,
        LIKELIHOOD,
    )
    a, d_theta, d_zi = count_log_prob_grads(x, mu, theta, zi_logits, LIKELIHOOD)
    px_scale = tl.exp(tl.where(mask, logits - lse[:, None], 0.0))
    grad_logits = tl.where(mask, grad_out[:, None] * (a - px_scale * a_sum[:, None]), 0.0)
    grad_zi = tl.where(mask, grad_out[:, None] * d_zi, 0.0)
    grad_theta = tl.where(mask, grad_out[:, None] * d_theta, 0.0)
    return grad_logits, grad_zi, grad_theta, offsets, scale_weight, dropout_weight


@triton.jit
def _grad_hidden_kernel(
    hidden_ptr,
    scale_weight_ptr,
    scale_bias_ptr,
    dropout_weight_ptr,
    dropout_bias_ptr,
    log_library_ptr,
    lse_ptr,
    a_sum_ptr,
    grad_out_ptr,
    x_ptr,
    theta_ptr,
    partial_grad_hidden_ptr,  # partial: (n_splits, B, H)
    n_cells,
    n_genes,
    n_hidden,
    theta_cell_stride,
    n_splits,
    LIKELIHOOD: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
    BLOCK_GENES: tl.constexpr,
    BLOCK_HIDDEN: tl.constexpr,
):
    split = tl.program_id(1)
    cells = tl.program_id(0) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    cell_mask = cells < n_cells
    hidden_units = tl.arange(0, BLOCK_HIDDEN)
    hidden = _load_hidden(hidden_ptr, cells, hidden_units, n_cells, n_hidden)
    log_library = tl.load(log_library_ptr + cells, mask=cell_mask, other=0.0)
    lse = tl.load(lse_ptr + cells, mask=cell_mask, other=0.0)
    a_sum = tl.load(a_sum_ptr + cells, mask=cell_mask, other=0.0)
    grad_out = tl.load(grad_out_ptr + cells, mask=cell_mask, other=0.0)
    grad_hidden = tl.zeros((BLOCK_CELLS, BLOCK_HIDDEN), dtype=hidden.dtype)
    for gene_tile in range(split, tl.cdiv(n_genes, BLOCK_GENES), n_splits):
        genes = gene_tile * BLOCK_GENES + tl.arange(0, BLOCK_GENES)
        mask = cell_mask[:, None] & (genes < n_genes)[None, :]
        grad_logits, grad_zi, _, _, scale_weight, dropout_weight = _grad_logits_tile(
            hidden,
            cells,
            genes,
            hidden_units,
            mask,
            log_library,
            lse,
            a_sum,
            grad_out,
            scale_weight_ptr,
            scale_bias_ptr,
            dropout_weight_ptr,
            dropout_bias_ptr,
            x_ptr,
            theta_ptr,
            n_genes,
            n_hidden,
            theta_cell_stride,
            LIKELIHOOD,
        )
        grad_hidden += tl.dot(grad_logits, scale_weight, input_precision="ieee")
        if LIKELIHOOD == ZINB:
            grad_hidden += tl.dot(grad_zi, dropout_weight, input_precision="ieee")
    offsets = (split * n_cells + cells[:, None]).to(tl.int64) * n_hidden + hidden_units[None, :]
    tl.store(
        partial_grad_hidden_ptr + offsets, grad_hidden, mask=cell_mask[:, None] & (hidden_units < n_hidden)[None, :]
    )


@triton.jit
def _grad_weights_kernel(
    hidden_ptr,
    scale_weight_ptr,
    scale_bias_ptr,
    dropout_weight_ptr,
    dropout_bias_ptr,
    log_library_ptr,
    lse_ptr,
    a_sum_ptr,
    grad_out_ptr,
    x_ptr,
    theta_ptr,
    # partials (n_splits, G, H) for the weights, (n_splits, G) for the biases and theta per gene; theta per cell
    # gets its (B, G) gradient written directly
    partial_grad_scale_weight_ptr,
    partial_grad_scale_bias_ptr,
    partial_grad_dropout_weight_ptr,
    partial_grad_dropout_bias_ptr,
    grad_theta_ptr,
    n_cells,
    n_genes,
    n_hidden,
    theta_cell_stride,
    n_splits,
    LIKELIHOOD: tl.constexpr,
    THETA_PER_GENE: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
    BLOCK_GENES: tl.constexpr,
    BLOCK_HIDDEN: tl.constexpr,
):
    """The weight, bias and theta gradients of a tile of genes, summed over one split's cell tiles. It reads better
    whole: one pass over the cells whose accumulators stay in registers; split into jit helpers, each would return
    and pass back the five accumulators."""
    split = tl.program_id(1)
    genes = tl.program_id(0) * BLOCK_GENES + tl.arange(0, BLOCK_GENES)
    gene_mask = genes < n_genes
    hidden_units = tl.arange(0, BLOCK_HIDDEN)
    dtype = partial_grad_scale_bias_ptr.dtype.element_ty
    grad_scale_weight = tl.zeros((BLOCK_GENES, BLOCK_HIDDEN), dtype=dtype)
    grad_dropout_weight = tl.zeros((BLOCK_GENES, BLOCK_HIDDEN), dtype=dtype)
    grad_scale_bias = tl.zeros((BLOCK_GENES,), dtype=dtype)
    grad_dropout_bias = tl.zeros((BLOCK_GENES,), dtype=dtype)
    grad_theta_per_gene = tl.zeros((BLOCK_GENES,), dtype=dtype)
    for cell_tile in range(split, tl.cdiv(n_cells, BLOCK_CELLS), n_splits):
        cells = cell_tile * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
        cell_mask = cells < n_cells
        mask = cell_mask[:, None] & gene_mask[None, :]
        hidden = _load_hidden(hidden_ptr, cells, hidden_units, n_cells, n_hidden)
        log_library = tl.load(log_library_ptr + cells, mask=cell_mask, other=0.0)
        lse = tl.load(lse_ptr + cells, mask=cell_mask, other=0.0)
        a_sum = tl.load(a_sum_ptr + cells, mask=cell_mask, other=0.0)
        grad_out = tl.load(grad_out_ptr + cells, mask=cell_mask, other=0.0)
        grad_logits, grad_zi, grad_theta, offsets, _, _ = _grad_logits_tile(
            hidden,
            cells,
            genes,
            hidden_units,
            mask,
            log_library,
            lse,
            a_sum,
            grad_out,
            scale_weight_ptr,
            scale_bias_ptr,
            dropout_weight_ptr,
            dropout_bias_ptr,
            x_ptr,
            theta_ptr,
            n_genes,
            n_hidden,
            theta_cell_stride,
            LIKELIHOOD,
        )
        grad_scale_weight += tl.dot(tl.trans(grad_logits), hidden, input_precision="ieee")
        grad_scale_bias += tl.sum(grad_logits, axis=0)
        if LIKELIHOOD == ZINB:
            grad_dropout_weight += tl.dot(tl.trans(grad_zi), hidden, input_precision="ieee")
            grad_dropout_bias += tl.sum(grad_zi, axis=0)
        if LIKELIHOOD != POISSON:
            if THETA_PER_GENE:
                grad_theta_per_gene += tl.sum(grad_theta, axis=0)
            else:
                tl.store(grad_theta_ptr + offsets, grad_theta, mask=mask)
    weight_offsets = (split * n_genes + genes[:, None]).to(tl.int64) * n_hidden + hidden_units[None, :]
    weight_mask = gene_mask[:, None] & (hidden_units < n_hidden)[None, :]
    tl.store(partial_grad_scale_weight_ptr + weight_offsets, grad_scale_weight, mask=weight_mask)
    tl.store(partial_grad_scale_bias_ptr + split * n_genes + genes, grad_scale_bias, mask=gene_mask)
    if LIKELIHOOD == ZINB:
        tl.store(partial_grad_dropout_weight_ptr + weight_offsets, grad_dropout_weight, mask=weight_mask)
        tl.store(partial_grad_dropout_bias_ptr + split * n_genes + genes, grad_dropout_bias, mask=gene_mask)
    if LIKELIHOOD != POISSON:
        if THETA_PER_GENE:
            tl.store(grad_theta_ptr + split * n_genes + genes, grad_theta_per_gene, mask=gene_mask)


@triton.jit
def _px_scale_kernel(
    hidden_ptr,
    scale_weight_ptr,
    scale_bias_ptr,
    lse_ptr,
    px_scale_ptr,  # px_scale: (B, G)
    n_cells,
    n_genes,
    n_hidden,
    n_splits,
    BLOCK_CELLS: tl.constexpr,
    BLOCK_GENES: tl.constexpr,
    BLOCK_HIDDEN: tl.constexpr,
):
    split = tl.program_id(1)
    cells = tl.program_id(0) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    cell_mask = cells < n_cells
    hidden_units = tl.arange(0, BLOCK_HIDDEN)
    hidden = _load_hidden(hidden_ptr, cells, hidden_units, n_cells, n_hidden)
    lse = tl.load(lse_ptr + cells, mask=cell_mask, other=0.0)
    for gene_tile in range(split, tl.cdiv(n_genes, BLOCK_GENES), n_splits):
        genes = gene_tile * BLOCK_GENES + tl.arange(0, BLOCK_GENES)
        logits, _ = _gene_logits(hidden, scale_weight_ptr, scale_bias_ptr, genes, hidden_units, n_genes, n_hidden)
        mask = cell_mask[:, None] & (genes < n_genes)[None, :]
        tl.store(
            px_scale_ptr + cells[:, None].to(tl.int64) * n_genes + genes[None, :],
            tl.exp(logits - lse[:, None]),
            mask=mask,
        )


class _Launch:
    """Grid and block sizes of one decoder call: a (cells, genes) tile, and the splits of each kind of loop."""

    def __init__(self, n_cells: int, n_genes: int, n_hidden: int, device: torch.device):
        self.n_cells, self.n_genes, self.n_hidden = n_cells, n_genes, n_hidden
        self.block_hidden = max(16, triton.next_power_of_2(n_hidden))
        gpu_block_genes = max(16, min(GPU_TILE[1], GPU_TILE_ELEMENTS // self.block_hidden))
        self.block_cells, self.block_genes = launch.tile(
            n_cells, n_genes, device, (GPU_TILE[0], gpu_block_genes), minimum=16
        )
        self.n_cell_blocks = triton.cdiv(n_cells, self.block_cells)
        self.n_gene_blocks = triton.cdiv(n_genes, self.block_genes)
        self.gene_splits = launch.loop_splits(self.n_cell_blocks, self.n_gene_blocks, device)
        self.cell_splits = launch.loop_splits(self.n_gene_blocks, self.n_cell_blocks, device)

    @property
    def over_genes(self):
        """Grid of the kernels that loop over gene tiles."""
        return self.n_cell_blocks, self.gene_splits

    @property
    def over_cells(self):
        """Grid of the kernel that loops over cell tiles."""
        return self.n_gene_blocks, self.cell_splits

    def options(self) -> dict:
        """Block sizes and warps, the launch arguments every decoder kernel takes."""
        return dict(
            BLOCK_CELLS=self.block_cells,
            BLOCK_GENES=self.block_genes,
            BLOCK_HIDDEN=self.block_hidden,
            num_warps=NUM_WARPS,
        )


def _log_sum_exp(hidden, scale_weight, scale_bias, grid: _Launch) -> torch.Tensor:
    """Per-cell log-sum-exp of the scale logits over genes, (B,), from forward pass 1's partial maxima and sums."""
    partial_max = launch.new_buffer((grid.gene_splits, grid.n_cells), like=hidden)
    partial_sum = launch.new_buffer((grid.gene_splits, grid.n_cells), like=hidden)
    _lse_kernel[grid.over_genes](
        hidden,
        scale_weight,
        scale_bias,
        partial_max,
        partial_sum,
        grid.n_cells,
        grid.n_genes,
        grid.n_hidden,
        grid.gene_splits,
        **grid.options(),
    )
    overall_max = partial_max.max(0).values
    # A split that got no gene tile reports (-inf, 0): exp(-inf - max) * 0 = 0 adds nothing.
    return overall_max + torch.log((partial_sum * torch.exp(partial_max - overall_max)).sum(0))


def _theta_cell_stride(theta: torch.Tensor | None) -> int:
    return 0 if theta is None or theta.dim() == 1 else theta.shape[1]


class DecoderLogLikelihood(torch.autograd.Function):
    """Per-cell log-likelihood from the decoder's last hidden layer; see the module docstring for the passes."""

    @staticmethod
    def forward(
        ctx, hidden, scale_weight, scale_bias, log_library, x, theta, dropout_weight, dropout_bias, likelihood: str
    ):
        tensors = [
            None if t is None else t.contiguous()
            for t in (hidden, scale_weight, scale_bias, log_library, x, theta, dropout_weight, dropout_bias)
        ]
        hidden, scale_weight, scale_bias, log_library, x, theta, dropout_weight, dropout_bias = tensors
        grid = _Launch(x.shape[0], x.shape[1], hidden.shape[1], x.device)
        lse = _log_sum_exp(hidden, scale_weight, scale_bias, grid)
        need_a = any(ctx.needs_input_grad)
        partial_log_p = launch.new_buffer((grid.gene_splits, grid.n_cells), like=hidden)
        partial_a = launch.new_buffer((grid.gene_splits, grid.n_cells), like=hidden) if need_a else partial_log_p
        _forward_kernel[grid.over_genes](
            hidden,
            scale_weight,
            scale_bias,
            _or(dropout_weight, scale_weight),
            _or(dropout_bias, scale_bias),
            log_library,
            lse,
            x,
            _or(theta, x),
            partial_log_p,
            partial_a,
            grid.n_cells,
            grid.n_genes,
            grid.n_hidden,
            _theta_cell_stride(theta),
            grid.gene_splits,
            LIKELIHOOD=LIKELIHOOD_CODES[likelihood],
            NEED_A=need_a,
            **grid.options(),
        )
        a_sum = partial_a.sum(0) if need_a else None
        ctx.likelihood, ctx.grid = likelihood, grid
        ctx.save_for_backward(*tensors, lse, a_sum)
        return partial_log_p.sum(0)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, scale_weight, scale_bias, log_library, x, theta, dropout_weight, dropout_bias, lse, a_sum = (
            ctx.saved_tensors
        )
        grid, likelihood = ctx.grid, ctx.likelihood
        grad_out = grad_out.contiguous()
        shared = (
            hidden,
            scale_weight,
            scale_bias,
            _or(dropout_weight, scale_weight),
            _or(dropout_bias, scale_bias),
            log_library,
            lse,
            a_sum,
            grad_out,
            x,
            _or(theta, x),
        )
        sizes = (grid.n_cells, grid.n_genes, grid.n_hidden, _theta_cell_stride(theta))
        code = LIKELIHOOD_CODES[likelihood]
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            partial = launch.new_buffer((grid.gene_splits, grid.n_cells, grid.n_hidden), like=hidden)
            _grad_hidden_kernel[grid.over_genes](
                *shared, partial, *sizes, grid.gene_splits, LIKELIHOOD=code, **grid.options()
            )
            grad_hidden = partial.sum(0)
        grads_weights = (None,) * 5
        if any(ctx.needs_input_grad[i] for i in (1, 2, 5, 6, 7)):
            grads_weights = _grad_weights(shared, sizes, theta, likelihood, grid)
        grad_scale_weight, grad_scale_bias, grad_theta, grad_dropout_weight, grad_dropout_bias = grads_weights
        grad_log_library = grad_out * a_sum
        return (
            grad_hidden,
            grad_scale_weight,
            grad_scale_bias,
            grad_log_library,
            None,
            grad_theta,
            grad_dropout_weight,
            grad_dropout_bias,
            None,
        )


def _grad_weights(shared, sizes, theta, likelihood: str, grid: _Launch):
    """Backward pass 2: (d scale_weight, d scale_bias, d theta, d dropout_weight, d dropout_bias), None where the
    likelihood has no such parameter."""
    hidden = shared[0]
    splits, n_genes, n_hidden = grid.cell_splits, grid.n_genes, grid.n_hidden
    zinb, has_theta = likelihood == "zinb", likelihood != "poisson"
    theta_per_gene = has_theta and theta.dim() == 1
    scale_weight = launch.new_buffer((splits, n_genes, n_hidden), like=hidden)
    scale_bias = launch.new_buffer((splits, n_genes), like=hidden)
    dropout_weight = launch.new_buffer((splits, n_genes, n_hidden), like=hidden) if zinb else scale_weight
    dropout_bias = launch.new_buffer((splits, n_genes), like=hidden) if zinb else scale_bias
    theta_shape = (splits, n_genes) if theta_per_gene else (grid.n_cells, n_genes)
    grad_theta = launch.new_buffer(theta_shape, like=hidden) if has_theta else scale_bias
    _grad_weights_kernel[grid.over_cells](
        *shared,
        scale_weight,
        scale_bias,
        dropout_weight,
        dropout_bias,
        grad_theta,
        *sizes,
        splits,
        LIKELIHOOD=LIKELIHOOD_CODES[likelihood],
        THETA_PER_GENE=theta_per_gene,
        **grid.options(),
    )
    grad_theta = (grad_theta.sum(0) if theta_per_gene else grad_theta) if has_theta else None  # type: ignore[assignment]
    if not zinb:
        return scale_weight.sum(0), scale_bias.sum(0), grad_theta, None, None
    return scale_weight.sum(0), scale_bias.sum(0), grad_theta, dropout_weight.sum(0), dropout_bias.sum(0)


def _or(tensor: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """The tensor, or a placeholder pointer for a kernel argument that the likelihood never reads."""
    return placeholder if tensor is None else tensor


def decoder_log_likelihood(
    hidden, scale_weight, scale_bias, log_library, x, theta, dropout_weight, dropout_bias, likelihood: str
) -> torch.Tensor:
    """Triton path of `scvi_scale.kernels.decoder_log_likelihood` (see there). Returns (B,)."""
    return DecoderLogLikelihood.apply(
        hidden, scale_weight, scale_bias, log_library, x, theta, dropout_weight, dropout_bias, likelihood
    )


@torch.no_grad()
def decoder_px_scale(hidden, scale_weight, scale_bias) -> torch.Tensor:
    """Triton path of `scvi_scale.kernels.decoder_px_scale`: softmax over genes, (B, G) float32."""
    hidden, scale_weight, scale_bias = (t.float().contiguous() for t in (hidden, scale_weight, scale_bias))
    grid = _Launch(hidden.shape[0], scale_weight.shape[0], hidden.shape[1], hidden.device)
    lse = _log_sum_exp(hidden, scale_weight, scale_bias, grid)
    px_scale = launch.new_buffer((grid.n_cells, grid.n_genes), like=hidden)
    _px_scale_kernel[grid.over_genes](
        hidden,
        scale_weight,
        scale_bias,
        lse,
        px_scale,
        grid.n_cells,
        grid.n_genes,
        grid.n_hidden,
        grid.gene_splits,
        **grid.options(),
    )
    return px_scale


def reference_decoder_log_likelihood(
    hidden, scale_weight, scale_bias, log_library, x, theta, dropout_weight, dropout_bias, likelihood: str
) -> torch.Tensor:
    """The unfused PyTorch form, as scVI's decoder and loss compute it (px_scale, px_rate and the log-likelihood
    each a B x G tensor), differentiated by autograd: the baseline of benchmarks/kernels.py."""
    px_scale = torch.softmax(F.linear(hidden, scale_weight, scale_bias), dim=-1)
    px_rate = torch.exp(log_library)[:, None] * px_scale
    zi_logits = F.linear(hidden, dropout_weight, dropout_bias) if likelihood == "zinb" else None
    return reference_count_log_likelihood(x, px_rate, theta, zi_logits, likelihood)
