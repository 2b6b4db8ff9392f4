/* The encoder's first layer on sparse counts, on the CPU: out = [x, dense] W^T + bias for x in CSR (B, S) and a few
 * dense columns (B, D) beside it (the one-hot covariates), and its weight gradient grad_out^T [x, dense]. x needs no
 * gradient (it is data), so the input gradient is never formed. Built on the user's machine by native.py; the
 * launcher and the autograd Function are in csr_linear.py.
 *
 * Both loops walk a row's stored entries and, for each, one H-long row of a (S + D, H) matrix: W transposed (the
 * caller makes it contiguous) in the forward, the weight gradient's transpose in the backward. H is contiguous, so
 * each entry is one vectorized multiply-add over H; the work is 2 nnz H FLOPs each way, against 2 B S H for the dense
 * product (~10% non-zeros at 2,000 genes: ~10x fewer). float32 throughout, as torch's dense product; an explicit
 * stored zero adds 0 * w, as the dense product does.
 */
#include <stdint.h>
#include <string.h>

/* out (B, H) = x (CSR) @ W[:, :S]^T + dense (B, D) @ W[:, S:]^T + bias. weight_t: (S + D, H), W transposed; dense
 * and bias may be NULL (D = 0, no bias). */
void scvi_csr_linear_forward_f32(int64_t n_rows, int64_t n_sparse, int64_t n_dense, int64_t n_out,
                                 const int64_t *crow, const int64_t *cols, const float *values, const float *dense,
                                 const float *weight_t, const float *bias, float *out) {
    for (int64_t b = 0; b < n_rows; b++) {
        float *restrict row_out = out + b * n_out;
        if (bias != NULL)
            memcpy(row_out, bias, n_out * sizeof(float));
        else
            memset(row_out, 0, n_out * sizeof(float));
        for (int64_t k = crow[b]; k < crow[b + 1]; k++) {
            const float value = values[k];
            const float *restrict w = weight_t + cols[k] * n_out;
#pragma omp simd
            for (int64_t h = 0; h < n_out; h++) row_out[h] += value * w[h];
        }
        for (int64_t d = 0; d < n_dense; d++) {
            const float value = dense[b * n_dense + d];
            const float *restrict w = weight_t + (n_sparse + d) * n_out;
#pragma omp simd
            for (int64_t h = 0; h < n_out; h++) row_out[h] += value * w[h];
        }
    }
}

/* grad_weight_t (S + D, H) = [x, dense]^T grad_out (the transpose of W's gradient; overwritten), and, when grad_bias is
 * not NULL, grad_bias (H,) = the column sums of grad_out (B, H). float32 sums, as the dense product's: accumulating
 * in double cost 3x the time here. */
void scvi_csr_linear_weight_grad_f32(int64_t n_rows, int64_t n_sparse, int64_t n_dense, int64_t n_out,
                                     const int64_t *crow, const int64_t *cols, const float *values, const float *dense,
                                     const float *grad_out, float *grad_weight_t, float *grad_bias) {
    memset(grad_weight_t, 0, (n_sparse + n_dense) * n_out * sizeof(float));
    if (grad_bias != NULL) memset(grad_bias, 0, n_out * sizeof(float));
    for (int64_t b = 0; b < n_rows; b++) {
        const float *restrict g = grad_out + b * n_out;
        for (int64_t k = crow[b]; k < crow[b + 1]; k++) {
            const float value = values[k];
            float *restrict gw = grad_weight_t + cols[k] * n_out;
#pragma omp simd
            for (int64_t h = 0; h < n_out; h++) gw[h] += value * g[h];
        }
        for (int64_t d = 0; d < n_dense; d++) {
            const float value = dense[b * n_dense + d];
            float *restrict gw = grad_weight_t + (n_sparse + d) * n_out;
#pragma omp simd
            for (int64_t h = 0; h < n_out; h++) gw[h] += value * g[h];
        }
        if (grad_bias != NULL) {
#pragma omp simd
            for (int64_t h = 0; h < n_out; h++) grad_bias[h] += g[h];
        }
    }
}
