/* GroupNorm (Wu & He 2018, eq. 1-3), then optionally SiLU and dropout, for channels_last (NHWC) tensors.
 *
 * One image x is read as [N][C] (N = H*W, C contiguous); group g holds channels [g*D, (g+1)*D), D = C/G.
 * Images are processed one per task (threads split the batch), so an image's second pass reads from
 * cache. Sums are float over at most ROWS rows, combined in double, in a fixed order: results do not
 * depend on the thread count. bf16 is widened on load and rounded to nearest-even on store (NaN stays
 * NaN), as PyTorch does.
 *
 * forward:  mu, rstd per group;  a_c = rstd gamma_c,  s_c = beta_c - mu a_c;  z = a_c x + s_c
 *           y = drop(act(z)), drop(v) = v / q where the element's 15 random bits are >= k, else 0
 * backward: g = dy drop'(.) act'(z);  c1 = sum gamma_c g,  c2 = sum gamma_c g x  (n and c in the group)
 *           A = rstd^3 (mu c1 - c2) / M,  Bc = -A mu - rstd c1 / M  (M = N*D)
 *           dx = a_c g + A x + Bc;  dgamma_c = sum_b rstd (sum g x - mu sum g);  dbeta_c = sum_b sum g
 * Built by difflab/nets/group_norm.py with cc -O3 -march=native -fopenmp (torch's libgomp runs it).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 64 /* rows summed in float before a double accumulation */

typedef struct {
    const uint16_t* bits; /* one 15-bit uniform integer per element (low bits), or NULL: no dropout */
    int32_t k;            /* keep when bits & 0x7FFF >= k */
    float scale;          /* 1 / P(keep) */
} drop_t;

static inline float ld_bf16(const uint16_t* p, int64_t i) {
    uint32_t u = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline void st_bf16(uint16_t* p, int64_t i, float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    p[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : (uint16_t)r;
}
static inline float ld_f32(const float* p, int64_t i) { return p[i]; }
static inline void st_f32(float* p, int64_t i, float f) { p[i] = f; }

/* exp(x) to ~1 ulp for x in [-87, 88] (clamped outside; NaN passes through): Cody-Waite + degree-6 Taylor */
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s;
}
static inline float sigmoid_f(float z) { return 1.0f / (1.0f + exp_f(-z)); }

/* mean and rstd of each group of one image from per-channel sums of (x - p_c) in s[0..C) and of
   (x - p_c)^2 in s[C..2C), p_c a value of channel c: the shift keeps the variance exact when |mean| >> std;
   channels combine as in Chan et al. (1979): M2 = sum_c M2_c + N (mu_c - mu)^2 */
static void group_stats(const double* s, const float* p, int64_t N, int64_t C, int64_t G, double eps,
                        float* mean, float* rstd) {
    int64_t D = C / G;
    for (int64_t g = 0; g < G; ++g) {
        double mu = 0.0, m2 = 0.0;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) mu += p[c] + s[c] / (double)N;
        mu /= (double)D;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
            double mc = p[c] + s[c] / (double)N;
            m2 += (s[C + c] - s[c] * s[c] / (double)N) + (double)N * (mc - mu) * (mc - mu);
        }
        double var = m2 / (double)(N * D);
        mean[g] = (float)mu;
        rstd[g] = (float)(1.0 / sqrt((var > 0.0 ? var : 0.0) + eps));
    }
}

/* per-channel a_c = rstd gamma_c and s_c = beta_c - mu a_c */
static void affine(const float* mean, const float* rstd, const float* gamma, const float* beta, int64_t C,
                   int64_t G, float* a, float* s) {
    int64_t D = C / G;
    for (int64_t c = 0; c < C; ++c) {
        a[c] = rstd[c / D] * gamma[c];
        s[c] = beta[c] - mean[c / D] * a[c];
    }
}

/* dx coefficients A, Bc per channel and this image's dgamma/dbeta terms, from sums[0..C) = sum g and
   sums[C..2C) = sum g x */
static void backward_coefs(const double* sums, const float* mean, const float* rstd, const float* gamma,
                           int64_t N, int64_t C, int64_t G, float* A, float* Bc, double* dgb) {
    int64_t D = C / G;
    for (int64_t g = 0; g < G; ++g) {
        double mu = mean[g], rs = rstd[g], c1 = 0.0, c2 = 0.0;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
            c1 += gamma[c] * sums[c];
            c2 += gamma[c] * sums[C + c];
            dgb[c] = rs * (sums[C + c] - mu * sums[c]);
            dgb[C + c] = sums[c];
        }
        double M = (double)(N * D), a3 = rs * rs * rs * (mu * c1 - c2) / M, b0 = -a3 * mu - rs * c1 / M;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) { A[c] = (float)a3; Bc[c] = (float)b0; }
    }
}

/* One image's forward and backward, for element type T with loader LD and storer ST. */
#define DEFINE_KERNELS(SUFFIX, T, LD, ST)                                                                   \
/* one row of y = drop(act(a x + s)); act and dropped are constants at every (inlined) call */            \
static inline __attribute__((always_inline)) void out_row_##SUFFIX(                                       \
    const T* xr, T* yr, const float* a, const float* s, int64_t C, const int act, const int dropped,       \
    const uint16_t* br, drop_t drop) {                                                                     \
    _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) {                                                  \
        float z = a[c] * LD(xr, c) + s[c];                                                                 \
        float v = act ? z * sigmoid_f(z) : z;                                                              \
        if (dropped) v = (br[c] & 0x7FFF) >= drop.k ? v * drop.scale : 0.0f;                               \
        ST(yr, c, v);                                                                                      \
    }                                                                                                      \
}                                                                                                          \
                                                                                                           \
/* one row of g = dy drop'(.) act'(a x + s) into gr, with acc[c] += g and acc[C + c] += g x */             \
static inline __attribute__((always_inline)) void grad_row_##SUFFIX(                                      \
    const T* dyr, const T* xr, const float* a, const float* s, float* gr, float* acc, int64_t C,          \
    const int act, const int dropped, const uint16_t* br, drop_t drop) {                                   \
    _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) {                                                  \
        float xv = LD(xr, c), gv = LD(dyr, c);                                                             \
        if (dropped) gv = (br[c] & 0x7FFF) >= drop.k ? gv * drop.scale : 0.0f;                             \
        if (act) {                                                                                         \
            float z = a[c] * xv + s[c], sg = sigmoid_f(z);                                                 \
            gv *= sg * (1.0f + z * (1.0f - sg));                                                           \
        }                                                                                                  \
        gr[c] = gv;                                                                                        \
        acc[c] += gv;                                                                                      \
        acc[C + c] += gv * xv;                                                                             \
    }                                                                                                      \
}                                                                                                          \
                                                                                                           \
static void forward_image_##SUFFIX(const T* x, const float* gamma, const float* beta, T* y, float* mean,  \
                                   float* rstd, int64_t N, int64_t C, int64_t G, double eps, int act,      \
                                   drop_t drop, double* sums, float* work) {                               \
    float *acc = work, *a = work + 2 * C, *s = work + 3 * C, *pivot = work + 4 * C;                        \
    memset(sums, 0, 2 * C * sizeof(double));                                                               \
    _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) pivot[c] = LD(x, c); /* the first pixel */         \
    for (int64_t r0 = 0; r0 < N; r0 += ROWS) {                                                             \
        int64_t r1 = r0 + ROWS < N ? r0 + ROWS : N;                                                        \
        memset(acc, 0, 2 * C * sizeof(float));                                                             \
        for (int64_t n = r0; n < r1; ++n) {                                                                \
            const T* xr = x + n * C;                                                                       \
            _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) {                                          \
                float v = LD(xr, c) - pivot[c];                                                            \
                acc[c] += v;                                                                               \
                acc[C + c] += v * v;                                                                       \
            }                                                                                              \
        }                                                                                                  \
        _Pragma("omp simd") for (int64_t c = 0; c < 2 * C; ++c) sums[c] += acc[c];                         \
    }                                                                                                      \
    group_stats(sums, pivot, N, C, G, eps, mean, rstd);                                                    \
    affine(mean, rstd, gamma, beta, C, G, a, s);                                                           \
    for (int64_t n = 0; n < N; ++n) { /* constant flags: each combination compiles to a branch-free loop */ \
        const uint16_t* br = drop.bits ? drop.bits + n * C : NULL;                                         \
        if (act && br) out_row_##SUFFIX(x + n * C, y + n * C, a, s, C, 1, 1, br, drop);                    \
        else if (act) out_row_##SUFFIX(x + n * C, y + n * C, a, s, C, 1, 0, br, drop);                     \
        else if (br) out_row_##SUFFIX(x + n * C, y + n * C, a, s, C, 0, 1, br, drop);                      \
        else out_row_##SUFFIX(x + n * C, y + n * C, a, s, C, 0, 0, br, drop);                              \
    }                                                                                                      \
}                                                                                                          \
                                                                                                           \
static void backward_image_##SUFFIX(const T* dy, const T* x, const float* mean, const float* rstd,         \
                                    const float* gamma, const float* beta, T* dx, int64_t N, int64_t C,    \
                                    int64_t G, int act, drop_t drop, double* sums, float* work,            \
                                    float* gbuf, double* dgb) {                                            \
    float *acc = work, *a = work + 2 * C, *s = work + 3 * C, *A = work + 4 * C, *Bc = work + 5 * C;        \
    affine(mean, rstd, gamma, beta, C, G, a, s);                                                           \
    memset(sums, 0, 2 * C * sizeof(double));                                                               \
    for (int64_t r0 = 0; r0 < N; r0 += ROWS) { /* pass 1: g into gbuf, sum g and sum g x */                \
        int64_t r1 = r0 + ROWS < N ? r0 + ROWS : N;                                                        \
        memset(acc, 0, 2 * C * sizeof(float));                                                             \
        for (int64_t n = r0; n < r1; ++n) {                                                                \
            const T *xr = x + n * C, *dyr = dy + n * C;                                                    \
            const uint16_t* br = drop.bits ? drop.bits + n * C : NULL;                                     \
            float* gr = gbuf + n * C;                                                                      \
            if (act && br) grad_row_##SUFFIX(dyr, xr, a, s, gr, acc, C, 1, 1, br, drop);                   \
            else if (act) grad_row_##SUFFIX(dyr, xr, a, s, gr, acc, C, 1, 0, br, drop);                    \
            else if (br) grad_row_##SUFFIX(dyr, xr, a, s, gr, acc, C, 0, 1, br, drop);                     \
            else grad_row_##SUFFIX(dyr, xr, a, s, gr, acc, C, 0, 0, br, drop);                             \
        }                                                                                                  \
        _Pragma("omp simd") for (int64_t c = 0; c < 2 * C; ++c) sums[c] += acc[c];                         \
    }                                                                                                      \
    backward_coefs(sums, mean, rstd, gamma, N, C, G, A, Bc, dgb);                                          \
    if (!dx) return;                                                                                       \
    for (int64_t n = 0; n < N; ++n) { /* pass 2: dx from the cached g */                                   \
        const T* xr = x + n * C;                                                                           \
        const float* gr = gbuf + n * C;                                                                    \
        T* dxr = dx + n * C;                                                                               \
        _Pragma("omp simd") for (int64_t c = 0; c < C; ++c)                                                \
            ST(dxr, c, a[c] * gr[c] + A[c] * LD(xr, c) + Bc[c]);                                           \
    }                                                                                                      \
}                                                                                                          \
                                                                                                           \
void group_norm_forward_##SUFFIX(const T* x, const float* gamma, const float* beta, T* y, float* mean,     \
                                 float* rstd, const uint16_t* bits, int32_t k, float scale, int64_t B,     \
                                 int64_t N, int64_t C, int64_t G, double eps, int act, int nthreads) {     \
    _Pragma("omp parallel num_threads(nthreads)")                                                          \
    {                                                                                                      \
        double* sums = (double*)malloc((size_t)(2 * C) * sizeof(double));                                  \
        float* work = (float*)malloc((size_t)(5 * C) * sizeof(float));                                     \
        _Pragma("omp for schedule(static)") for (int64_t b = 0; b < B; ++b) {                              \
            drop_t drop = {bits ? bits + b * N * C : NULL, k, scale};                                      \
            forward_image_##SUFFIX(x + b * N * C, gamma, beta, y + b * N * C, mean + b * G, rstd + b * G,  \
                                   N, C, G, eps, act, drop, sums, work);                                   \
        }                                                                                                  \
        free(sums);                                                                                        \
        free(work);                                                                                        \
    }                                                                                                      \
}                                                                                                          \
                                                                                                           \
void group_norm_backward_##SUFFIX(const T* dy, const T* x, const float* mean, const float* rstd,          \
                                  const float* gamma, const float* beta, const uint16_t* bits, int32_t k,  \
                                  float scale, T* dx, float* dgamma, float* dbeta, int64_t B, int64_t N,   \
                                  int64_t C, int64_t G, int act, int nthreads) {                           \
    double* dgb = (double*)malloc((size_t)(B * 2 * C) * sizeof(double)); /* per image dgamma, dbeta */    \
    _Pragma("omp parallel num_threads(nthreads)")                                                          \
    {                                                                                                      \
        double* sums = (double*)malloc((size_t)(2 * C) * sizeof(double));                                  \
        float* work = (float*)malloc((size_t)(6 * C) * sizeof(float));                                     \
        float* gbuf = (float*)malloc((size_t)(N * C) * sizeof(float));                                     \
        _Pragma("omp for schedule(static)") for (int64_t b = 0; b < B; ++b) {                              \
            drop_t drop = {bits ? bits + b * N * C : NULL, k, scale};                                      \
            backward_image_##SUFFIX(dy + b * N * C, x + b * N * C, mean + b * G, rstd + b * G, gamma, beta, \
                                    dx ? dx + b * N * C : NULL, N, C, G, act, drop, sums, work, gbuf,      \
                                    dgb + b * 2 * C);                                                      \
        }                                                                                                  \
        free(sums);                                                                                        \
        free(work);                                                                                        \
        free(gbuf);                                                                                        \
    }                                                                                                      \
    for (int64_t c = 0; c < C && dgamma; ++c) {                                                            \
        double dg = 0.0, db = 0.0;                                                                         \
        for (int64_t b = 0; b < B; ++b) { dg += dgb[b * 2 * C + c]; db += dgb[b * 2 * C + C + c]; }        \
        dgamma[c] = (float)dg;                                                                             \
        dbeta[c] = (float)db;                                                                              \
    }                                                                                                      \
    free(dgb);                                                                                             \
}

DEFINE_KERNELS(bf16, uint16_t, ld_bf16, st_bf16)
DEFINE_KERNELS(f32, float, ld_f32, st_f32)
