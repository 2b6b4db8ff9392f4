/* The count likelihood's terms on the CPU, one pass per cell: torch_ops.count_terms written as two loops that the
 * C compiler vectorizes (glibc's libmvec supplies the vector exp, log, log1p and expm1), built on the user's machine
 * in well under a second by native.py. The formulas, their accuracy and why each form is chosen are in
 * torch_ops.py's docstrings; each function here names its counterpart there.
 *
 * Per cell b: a dense loop over its G genes evaluates every entry as if its count were 0 (zero_count_terms), then
 * the cell's positive counts are gathered, a loop over them evaluates their terms (nonzero_count_terms), and these
 * are written over the dense ones. float32 throughout, as torch_ops; the per-cell sum of log p is accumulated in
 * float64 (the dense sum less the dense terms of the positive counts, plus theirs).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Vector variants of these exist in libmvec (glibc >= 2.35): declaring them simd lets the vectorizer call them. */
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float log1pf(float);
#pragma omp declare simd notinbranch
float expm1f(float);

enum { POISSON = 0, NB = 1, ZINB = 2 };
enum { THETA_NONE = 0, THETA_PER_GENE = 1, THETA_PER_ENTRY = 2 };

#define STIRLING_MIN 8.0f
#define BD0_SERIES_MAX 0.1f
#define H_SERIES_MAX 0.5f

/* odd_series: 1/3 + t/5 + t^2/7 + ..., 8 terms (float32 accuracy for 0 <= t <= 1/9). */
static inline float odd_series(float t) {
    float acc = 1.0f / 17;
    for (int d = 15; d >= 3; d -= 2) acc = acc * t + 1.0f / d;
    return acc;
}

/* stirling_correction: w(z) = lgamma(z) - (z - 1/2) log z + z - log(2 pi)/2, for z >= STIRLING_MIN. */
static inline float stirling_correction(float z) {
    float r = 1 / z, r2 = r * r;
    return r * (1.0f / 12 - r2 * (1.0f / 360 - r2 * (1.0f / 1260 - r2 * (1.0f / 1680 - r2 / 1188))));
}

/* stirling_correction_derivative: w'(z), for z >= STIRLING_MIN. */
static inline float stirling_correction_derivative(float z) {
    float r2 = 1 / (z * z);
    return -r2 * (1.0f / 12 - r2 * (1.0f / 120 - r2 * (1.0f / 252 - r2 * (1.0f / 240 - r2 / 132))));
}

/* stirlerr(z) = lgamma(z + 1) - (z + 1/2) log z + z - log(2 pi)/2 for z > 0. Below STIRLING_MIN, lgamma's
 * recurrence lgamma(z + 1) = lgamma(z + 9) - log((z + 1) ... (z + 8)) and Stirling's series at z + 9 give
 * (z + 1/2) log((z + 9) / z) + log((z + 9)^8 / ((z + 1) ... (z + 8))) - 9 + w(z + 9): no lgamma, so the loop
 * vectorizes; its terms (< 10 but for the -log(z) / 2 of small z, which is stirlerr's own size) cancel to ~1e-6
 * absolute, as lgamma's form in torch_ops does. */
static inline float stirlerr(float z) {
    float small_z = z < STIRLING_MIN ? z : 1.0f;
    float shifted = small_z + 9, product = 1.0f, power = 1.0f;
    for (int i = 1; i <= 8; i++) {
        product *= small_z + i;
        power *= shifted;
    }
    float small = (small_z + 0.5f) * logf(shifted / small_z) + logf(power / product) - 9 + stirling_correction(shifted);
    return z < STIRLING_MIN ? small : stirling_correction(z < STIRLING_MIN ? STIRLING_MIN : z);
}

/* bd0(a, b) = a log(a / b) + b - a >= 0, with Loader's series where a is close to b. */
static inline float bd0(float a, float b) {
    float v = (a - b) / (a + b);
    int near = fabsf(v) < BD0_SERIES_MAX;
    float v_near = near ? v : 0.0f;
    float series = (a - b) * v_near + 2 * a * v_near * v_near * v_near * odd_series(v_near * v_near);
    return near ? series : a * logf(a / b) + b - a;
}

/* h_series: log1p(v) - v for |v| < H_SERIES_MAX. */
static inline float h_series(float v) {
    float w = v / (2 + v);
    return -v * w + 2 * w * w * w * odd_series(w * w);
}

/* The dense pass over one cell's G entries (zero_count_terms): log p(0) into log_p_zero, d log p(0) / d log mu,
 * d / d theta and d / d zi_logits into the outputs (theta and zi_logits rows may be NULL where unused). */
static void zero_count_row(int64_t n_genes, int likelihood, const float *restrict p, float scale,
                           const float *restrict theta, const float *restrict zi, float *restrict log_p_zero,
                           float *restrict d_log_mu, float *restrict d_theta, float *restrict d_zi) {
    if (likelihood == POISSON) {
#pragma omp simd
        for (int64_t g = 0; g < n_genes; g++) {
            float mu = p[g] * scale;
            log_p_zero[g] = -mu;
            d_log_mu[g] = -mu;
        }
        return;
    }
    if (likelihood == NB) {
#pragma omp simd
        for (int64_t g = 0; g < n_genes; g++) {
            float mu = p[g] * scale, m = mu / theta[g];
            float log1p_m = log1pf(m), inv_one_plus_m = 1 / (1 + m), v = -m * inv_one_plus_m;
            int near = m < 1;
            log_p_zero[g] = -theta[g] * log1p_m;
            d_log_mu[g] = -mu * inv_one_plus_m;
            d_theta[g] = near ? h_series(near ? v : 0.0f) : -log1p_m - v;
        }
        return;
    }
#pragma omp simd
    for (int64_t g = 0; g < n_genes; g++) {
        float mu = p[g] * scale, m = mu / theta[g];
        float log1p_m = log1pf(m), inv_one_plus_m = 1 / (1 + m), v = -m * inv_one_plus_m;
        int near = m < 1;
        float d_theta_nb = near ? h_series(near ? v : 0.0f) : -log1p_m - v;
        float log_nb_zero = -theta[g] * log1p_m;
        float q = expf(log_nb_zero), one_minus_q = -expm1f(log_nb_zero);
        float z = zi[g], t = expf(-fabsf(z)), sigmoid_abs = 1 / (1 + t);
        int positive = z >= 0;
        float pi = positive ? sigmoid_abs : t * sigmoid_abs;
        float one_minus_pi = positive ? t * sigmoid_abs : sigmoid_abs;
        float u = one_minus_pi * one_minus_q;
        float p_zero = pi + one_minus_pi * q;
        p_zero = p_zero > 1.17549435e-38f ? p_zero : 1.17549435e-38f; /* FLT_MIN: both terms underflowed */
        float inv_p_zero = 1 / p_zero;
        int small_u = u <= 0.5f;
        float w = small_u ? 1 - u : p_zero, log_w = logf(w);
        float kahan = w == 1 ? -u : log_w * (u / (1 - w));  /* log1p(-u), exact since 1 - u rounds to [1/2, 1] */
        log_p_zero[g] = small_u ? kahan : log_w;
        float nb_share = one_minus_pi * q * inv_p_zero;
        d_log_mu[g] = nb_share * (-mu * inv_one_plus_m);
        d_theta[g] = nb_share * d_theta_nb;
        d_zi[g] = one_minus_q * pi * inv_p_zero * one_minus_pi;
    }
}

/* stirlerr(n) for the counts n = 1 .. 7 (torch_ops.STIRLERR_SMALL_COUNTS); from 8 on the series is exact to 3e-13. */
static const float STIRLERR_SMALL_COUNTS[8] = {
    0.0f, 0.0810614667953272582f, 0.0413406959554092941f, 0.0276779256849983391f, 0.0207906721037650931f,
    0.0166446911898211921f, 0.0138761288230707480f, 0.0118967099458917701f};

/* stirlerr(x) of one count: a table or the series for integers (no logarithm), the general form otherwise. */
static inline float stirlerr_of_count(float x) {
    if (x >= STIRLING_MIN) return stirling_correction(x);
    if (x == (float)(int)x) return STIRLERR_SMALL_COUNTS[(int)x];
    return stirlerr(x);
}

/* log(1 - q) for 0 <= q < 1, given 1 - q as `one_minus_q` computed without cancellation: Kahan's log1p(-q) =
 * log(w) (-q) / (w - 1) with w = 1 - q rounded, where q < 1/2 (exact since w rounds to [1/2, 1]), else log of the
 * exact form; one logarithm either way. */
static inline float log_one_minus(float q, float one_minus_q) {
    int small_q = q < 0.5f;
    float w = small_q ? 1 - q : one_minus_q, log_w = logf(w);
    return small_q ? (w == 1 ? -q : log_w * (-q / (w - 1))) : log_w;
}

/* The non-zero counts' terms (nonzero_count_terms) on n gathered entries, given stirlerr of each count
 * (stirlerr_x) and of each entry's theta (stirlerr_theta). Writes log p(x) and the gradients (d_theta, d_zi unused
 * where the likelihood has no such input). Shared logarithms: log((x + theta) / (theta + mu)) serves bd0(theta, .)
 * and h(v); log(2 pi x) + log1p(x / theta) is one log(2 pi x (theta + x) / theta); E(x, theta)'s log(1 - q) is one
 * logarithm (log_one_minus). */
static void nonzero_count_entries(int64_t n, int likelihood, const float *restrict x, const float *restrict mu,
                                  const float *restrict theta, const float *restrict stirlerr_x,
                                  const float *restrict stirlerr_theta, const float *restrict zi,
                                  float *restrict log_p, float *restrict d_log_mu, float *restrict d_theta,
                                  float *restrict d_zi) {
    if (likelihood == POISSON) {
#pragma omp simd
        for (int64_t k = 0; k < n; k++) {
            log_p[k] = -stirlerr_x[k] - bd0(x[k], mu[k]) - 0.5f * logf(2 * (float)M_PI * x[k]);
            d_log_mu[k] = x[k] - mu[k];
        }
        return;
    }
    /* Five loops, not one: every vector call clobbers all vector registers, so one loop holding all the terms
     * spends most of its time spilling them; these read and write L1-resident rows. */
#pragma omp simd
    for (int64_t k = 0; k < n; k++) {  /* bd0(theta, theta (1 + v)) and h(v), sharing log(1 + v) */
        float xk = x[k], m = mu[k], th = theta[k];
        float theta_plus_mu = th + m, v = (xk - m) / theta_plus_mu, one_plus_v = (xk + th) / theta_plus_mu;
        float log_one_plus_v = logf(one_plus_v);
        float v_theta = -v / (2 + v);  /* (a - b) / (a + b) of bd0(theta, theta (1 + v)) */
        int near_theta = fabsf(v_theta) < BD0_SERIES_MAX;
        float vt = near_theta ? v_theta : 0.0f;
        log_p[k] = near_theta ? th * v * vt - 2 * th * vt * vt * vt * odd_series(vt * vt)
                              : th * (log_one_plus_v - v);
        int near_h = fabsf(v) < H_SERIES_MAX;
        d_theta[k] = near_h ? h_series(near_h ? v : 0.0f) : log_one_plus_v - v;
        d_log_mu[k] = th * v;
    }
#pragma omp simd
    for (int64_t k = 0; k < n; k++)
        log_p[k] += stirlerr(x[k] + theta[k]) - stirlerr_theta[k] - stirlerr_x[k];
#pragma omp simd
    for (int64_t k = 0; k < n; k++) {
        float xk = x[k], th = theta[k], trials = xk + th;
        log_p[k] -= bd0(xk, mu[k] * trials / (th + mu[k])) + 0.5f * logf(2 * (float)M_PI * xk * (trials / th));
    }
#pragma omp simd
    for (int64_t k = 0; k < n; k++) {  /* + E(x, theta) (torch_ops.digamma_difference_remainder) */
        float xk = x[k], th = theta[k];
        int large_theta = th >= STIRLING_MIN;
        float t = large_theta ? th : th + STIRLING_MIN;
        float remainder = xk / (2 * t * (xk + t)) + stirling_correction_derivative(xk + t)
                          - stirling_correction_derivative(t);
        float shift = 0.0f;
        for (int j = 0; j < 8; j++) shift += xk / ((th + j) * (xk + th + j));
        float q = STIRLING_MIN * xk / ((th + STIRLING_MIN) * (th + xk));
        float ratio = th * (th + STIRLING_MIN + xk) / ((th + STIRLING_MIN) * (th + xk));  /* 1 - q, exactly */
        d_theta[k] += large_theta ? remainder : remainder + shift + log_one_minus(q, ratio);
    }
    if (likelihood == ZINB) {
#pragma omp simd
        for (int64_t k = 0; k < n; k++) {
            float z = zi[k], tz = expf(-fabsf(z));
            log_p[k] -= (z > 0 ? z : 0.0f) + log1pf(tz);  /* softplus(z) */
            d_zi[k] = -(z >= 0 ? 1 / (1 + tz) : tz / (1 + tz));  /* -sigmoid(z) */
        }
    }
}

/* Cells [row_start, row_end) of count_terms. p (B, G) and scale (B,) give mu = p * scale; theta is (G,), (B, G) or
 * NULL (theta_mode); zi (B, G) or NULL; the stored entries of the counts are CSR: crow (B + 1,), cols and values
 * (nnz,), sorted by row (explicit zeros allowed). stirlerr_theta_per_gene: stirlerr(theta), (G,), when theta is
 * per gene. Outputs: per_cell (B,) and the (B, G) gradients d_log_mu, d_theta (or NULL), d_zi (or NULL). Returns 0,
 * or -1 when scratch memory could not be allocated. */
int scvi_count_terms_f32(int64_t row_start, int64_t row_end, int64_t n_genes, int likelihood, const float *p,
                         const float *scale, const float *theta, int theta_mode, const float *stirlerr_theta_per_gene,
                         const float *zi, const int64_t *crow, const int64_t *cols, const float *values,
                         float *per_cell, float *d_log_mu, float *d_theta, float *d_zi) {
    int64_t max_row_entries = 0;
    for (int64_t b = row_start; b < row_end; b++)
        if (crow[b + 1] - crow[b] > max_row_entries) max_row_entries = crow[b + 1] - crow[b];
    float *log_p_zero = malloc(sizeof(float) * (n_genes > 0 ? n_genes : 1));
    float *scratch = malloc(sizeof(float) * 12 * (max_row_entries > 0 ? max_row_entries : 1));
    if (log_p_zero == NULL || scratch == NULL) {
        free(log_p_zero);
        free(scratch);
        return -1;
    }
    int64_t m = max_row_entries;
    float *x = scratch, *sx = x + m, *mu = sx + m, *th = mu + m, *st = th + m, *z = st + m;
    float *lp = z + m, *g_mu = lp + m, *g_theta = g_mu + m, *g_zi = g_theta + m;
    int64_t *flat = (int64_t *)(g_zi + m);
    for (int64_t b = row_start; b < row_end; b++) {
        int64_t row = b * n_genes;
        const float *theta_row = theta_mode == THETA_PER_GENE    ? theta
                                 : theta_mode == THETA_PER_ENTRY ? theta + row
                                                                 : NULL;
        zero_count_row(n_genes, likelihood, p + row, scale[b], theta_row, zi ? zi + row : NULL, log_p_zero,
                       d_log_mu + row, d_theta ? d_theta + row : NULL, d_zi ? d_zi + row : NULL);
        double sum = 0.0;
        for (int64_t g = 0; g < n_genes; g++) sum += log_p_zero[g];
        int64_t n = 0;  /* the cell's positive counts, gathered */
        for (int64_t k = crow[b]; k < crow[b + 1]; k++) {
            if (!(values[k] > 0)) continue;  /* a stored zero keeps its dense terms */
            int64_t c = cols[k];
            flat[n] = c;
            x[n] = values[k];
            sx[n] = stirlerr_of_count(x[n]);
            mu[n] = p[row + c] * scale[b];
            if (theta_mode != THETA_NONE) {
                th[n] = theta_row[c];
                st[n] = theta_mode == THETA_PER_GENE ? stirlerr_theta_per_gene[c] : 0.0f;
            }
            z[n] = zi ? zi[row + c] : 0.0f;
            n++;
        }
        if (theta_mode == THETA_PER_ENTRY) {
#pragma omp simd
            for (int64_t k = 0; k < n; k++) st[k] = stirlerr(th[k]);
        }
        nonzero_count_entries(n, likelihood, x, mu, th, sx, st, z, lp, g_mu, g_theta, g_zi);
        for (int64_t k = 0; k < n; k++) {
            int64_t c = flat[k];
            sum += lp[k] - (double)log_p_zero[c];
            d_log_mu[row + c] = g_mu[k];
            if (d_theta) d_theta[row + c] = g_theta[k];
            if (d_zi) d_zi[row + c] = g_zi[k];
        }
        per_cell[b] = (float)sum;
    }
    free(log_p_zero);
    free(scratch);
    return 0;
}

/* stirlerr(theta[i]) for i < n (the per-gene theta's, made once per call). */
void scvi_stirlerr_f32(int64_t n, const float *theta, float *out) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = stirlerr(theta[i]);
}
