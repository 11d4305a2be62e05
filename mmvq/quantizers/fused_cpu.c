/* mmvq fused fake-quantization kernels for the CPU: one pass over the data
 * per quantizer instead of one pass per element-wise operation.
 *
 * Built at first use by mmvq/quantizers/fused.py (gcc/cc, -O3, OpenMP) and
 * called through ctypes with the data pointers of contiguous float32
 * tensors. Every kernel repeats, operation by operation and in the same
 * IEEE order, the eager PyTorch code it replaces (named above each one), so
 * the results are bit for bit the eager ones; the one exception is AdaLog,
 * whose code is taken from exact thresholds instead of a float32 log2
 * (see mmvq_adalog). Compiled with -ffp-contract=off: no multiply-add is
 * fused, so no product is rounded differently from the eager path.
 * Parameters are read through pointers (no host copy on the Python side).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

static inline double bits_f64(int64_t b) { double d; memcpy(&d, &b, 8); return d; }
static inline int64_t f64_bits(double d) { int64_t b; memcpy(&b, &d, 8); return b; }
static inline float clampf(float q, float lo, float hi) {
    q = q < lo ? lo : q;              /* clamp_min_ then clamp_max_; NaN passes */
    return q > hi ? hi : q;
}

/* Uniform affine fake quantization (uniform.py fake_quant_affine):
 * y = clamp(rint(x / s), qmin - z, qmax - z) * s, float32 throughout.
 * x: up to 4-D (d0, d1, d2, L), last axis contiguous, element strides
 * xs0..xs2; y contiguous. s and z are indexed by element strides (0 where
 * broadcast): ss0..ss3 and zs0..zs3. */
void mmvq_fq(const float *x, float *y, int64_t d0, int64_t d1, int64_t d2, int64_t L,
             int64_t xs0, int64_t xs1, int64_t xs2, const float *s, const float *z,
             int64_t ss0, int64_t ss1, int64_t ss2, int64_t ss3,
             int64_t zs0, int64_t zs1, int64_t zs2, int64_t zs3,
             float qmin, float qmax, int threads)
{
    int64_t rows = d0 * d1 * d2;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        int64_t i2 = r % d2, t = r / d2, i1 = t % d1, i0 = t / d1;
        const float *xr = x + i0 * xs0 + i1 * xs1 + i2 * xs2;
        float *yr = y + r * L;
        const float *sr = s + i0 * ss0 + i1 * ss1 + i2 * ss2;
        const float *zr = z + i0 * zs0 + i1 * zs1 + i2 * zs2;
        if (ss3 == 0 && zs3 == 0) {
            const float sc = sr[0], lo = qmin - zr[0], hi = qmax - zr[0];
            for (int64_t j = 0; j < L; j++)
                yr[j] = clampf(rintf(xr[j] / sc), lo, hi) * sc;
        } else if (ss3 == 1 && zs3 == 1) {
            for (int64_t j = 0; j < L; j++)
                yr[j] = clampf(rintf(xr[j] / sr[j]), qmin - zr[j], qmax - zr[j]) * sr[j];
        } else if (zs3 == 0) {
            const float lo = qmin - zr[0], hi = qmax - zr[0];
            for (int64_t j = 0; j < L; j++)
                yr[j] = clampf(rintf(xr[j] / sr[j * ss3]), lo, hi) * sr[j * ss3];
        } else {
            for (int64_t j = 0; j < L; j++) {
                const float sc = sr[j * ss3], zz = zr[j * zs3];
                yr[j] = clampf(rintf(xr[j] / sc), qmin - zz, qmax - zz) * sc;
            }
        }
    }
}

/* FQ-ViT integer LayerNorm on PTF codes (ptf.py int_layer_norm, with the
 * PTF codes of PTFQuantizer.quantize): rows of C contiguous float32. */
static void int_ln_impl(const float *x, float *y, uint8_t *codes, int64_t R, int64_t C,
                        const float *in_scale, const float *in_zp, const int64_t *alpha,
                        float in_qmax, const float *weight, const float *bias,
                        const float *out_scale, const float *out_zp, double out_qmin,
                        double out_qmax, int zero_weight, int m_bits, int threads)
{
    const double s = (double)in_scale[0], s_out = (double)out_scale[0];
    const double zp = (double)in_zp[0], zpo = (double)out_zp[0];
    const float zpf = in_zp[0];
    const double lo = out_qmin - zpo, hi = out_qmax - zpo;
    const double mmax = (double)((1 << m_bits) - 1);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        double *xi = malloc(sizeof(double) * C * 4);
        double *pa = xi + C, *wd = xi + 2 * C, *ws = xi + 3 * C;
        float *cs = malloc(sizeof(float) * C);
        for (int64_t c = 0; c < C; c++) {
            pa[c] = bits_f64((alpha[c] + 1023) << 52);            /* 2^alpha */
            cs[c] = in_scale[0] * (float)pa[c];                   /* channel_scale() */
            wd[c] = (double)weight[c];
            ws[c] = wd[c] / s_out;                                /* w / s_out */
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * C;
            float *yr = y ? y + r * C : NULL;
            double sum1 = 0.0, sum2 = 0.0;
            /* the sums are of integers below 2^53: exact in any order */
#pragma omp simd reduction(+ : sum1, sum2)
            for (int64_t c = 0; c < C; c++) {
                float q = rintf(xr[c] / cs[c]) + zpf;
                q = clampf(q, 0.0f, in_qmax);
                double v = ((double)q - zp) * pa[c];
                xi[c] = v;
                sum1 += v;                  /* exact: integers below 2^53 */
                sum2 += v * v;
            }
            double root = sqrt((double)C * sum2 - sum1 * sum1);
            if (!(root >= 1e-12)) root = root != root ? root : 1e-12;
            const double std = (s / (double)C) * root;
            const double mean = sum1 / (double)C * s;
            const double s_std = s / std, m_std = mean / std;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                const double w = wd[c];
                const double a = s_std * ws[c];
                int64_t pe = -((f64_bits(a) >> 52) & 0x7FF) + (m_bits + 2045);
                pe = pe < 1023 ? 1023 : (pe > 1023 + 31 ? 1023 + 31 : pe);
                if (zero_weight && a == 0.0) pe = m_bits + 1023;
                const double p = bits_f64(pe << 52);
                double m = trunc(a * p);
                m = m < -mmax ? -mmax : (m > mmax ? mmax : m);
                double b = m_std * w;
                b = rint(((double)bias[c] - b) / s_out * p);
                const double p_inv = bits_f64((2046 - pe) << 52);
                double v = floor((m * xi[c] + b) * p_inv + 0.5);
                v = v < lo ? lo : v;
                v = v > hi ? hi : v;
                if (codes) codes[r * C + c] = (uint8_t)(int)(v + zpo);   /* int8: two's complement */
                else yr[c] = (float)(v * s_out);
            }
        }
        free(xi);
        free(cs);
    }
}

void mmvq_int_ln(const float *x, float *y, int64_t R, int64_t C,
                 const float *in_scale, const float *in_zp, const int64_t *alpha, float in_qmax,
                 const float *weight, const float *bias, const float *out_scale,
                 const float *out_zp, double out_qmin, double out_qmax, int zero_weight,
                 int m_bits, int threads)
{
    int_ln_impl(x, y, NULL, R, C, in_scale, in_zp, alpha, in_qmax, weight, bias, out_scale,
                out_zp, out_qmin, out_qmax, zero_weight, m_bits, threads);
}

/* the same, writing the output codes y_q (uint8, or int8 as its bytes) instead of
 * their dequantized values (the onnxruntime custom op, mmvq/deploy/ort_ops.c) */
void mmvq_int_ln_codes(const float *x, uint8_t *codes, int64_t R, int64_t C,
                       const float *in_scale, const float *in_zp, const int64_t *alpha,
                       float in_qmax, const float *weight, const float *bias,
                       const float *out_scale, const float *out_zp, double out_qmin,
                       double out_qmax, int zero_weight, int m_bits, int threads)
{
    int_ln_impl(x, NULL, codes, R, C, in_scale, in_zp, alpha, in_qmax, weight, bias, out_scale,
                out_zp, out_qmin, out_qmax, zero_weight, m_bits, threads);
}

/* FQ-ViT Log-Int-Softmax (lis.py lis_softmax, float64 path, after the
 * logits' uniform fake quantization): rows of N contiguous float32 logits;
 * mask_off[r] is the offset of row r's additive mask (contiguous) or NULL.
 * table holds 2^-k for k = 0..levels-1 and 0 at index levels.
 *
 * Equal to the eager float64 path with three divisions fewer per element:
 * - round(xq / s) of the fake-quantized logit xq = fl32(c s) is its code c
 *   itself (|c| <= 255, so xq / s is within 2^-16 of c);
 * - floor(v / x0) (integers, x0 < 0) is floor(v * (1 / x0)) corrected by
 *   one step where the remainder v - q x0 leaves (x0, 0];
 * - the biased exponent of v / 1.5 minus 1022 is, for v >= 1, the biased
 *   exponent of v minus 1023 plus its first fraction bit (v >= 1.5 2^E);
 *   inf (e = 0) gives a code beyond every level, as in the eager path.
 * 2^-k for k < levels <= 64 is built from its float32 bits. */
void mmvq_lis(const float *x, float *y, int64_t R, int64_t N, const float *ls, const float *lz,
              float qmin, float qmax, double scale, const float *mask, const int64_t *mask_off,
              double x0, double b_int, double c_int, int n, int bits, const float *table,
              int threads)
{
    const int64_t levels = (int64_t)1 << bits;
    const float s = ls[0], lo = qmin - lz[0], hi = qmax - lz[0];
    const double inv_x0 = 1.0 / x0, lim = n * x0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        double *e = malloc(sizeof(double) * N);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * N;
            const float *mr = mask ? mask + mask_off[r] : NULL;
            double mx = -INFINITY;
            if (mr) {
#pragma omp simd reduction(max : mx)
                for (int64_t j = 0; j < N; j++) {
                    const double v = (double)clampf(rintf(xr[j] / s), lo, hi)
                                     + rint((double)mr[j] / scale);
                    e[j] = v;
                    mx = v > mx ? v : mx;
                }
            } else {
#pragma omp simd reduction(max : mx)
                for (int64_t j = 0; j < N; j++) {
                    const double v = (double)clampf(rintf(xr[j] / s), lo, hi);
                    e[j] = v;
                    mx = v > mx ? v : mx;
                }
            }
            double total = 0.0;
            /* a sum of integers below 2^53 (checked by the caller): exact in any order */
#pragma omp simd reduction(+ : total)
            for (int64_t j = 0; j < N; j++) {
                double v = e[j] - mx;
                v = v < lim ? lim : v;
                double q = floor(v * inv_x0);
                double rr = v + (-x0) * q;
                q = rr > 0.0 ? q - 1.0 : (rr <= x0 ? q + 1.0 : q);
                rr = v + (-x0) * q;
                const double zz = (rr + b_int) * rr + c_int;
                const double ex = zz * bits_f64(((int64_t)(n + 1023) - (int64_t)q) << 52);
                e[j] = ex;
                total += ex;
            }
            float *yr = y + r * N;
            if (levels <= 64) {
#pragma omp simd
                for (int64_t j = 0; j < N; j++) {
                    double v = floor((e[j] + total * 2.0) / e[j] * 0.5);
                    if (levels > 40) v = v > 1099511627775.0 ? 1099511627775.0 : v;
                    const int64_t vb = f64_bits(v);
                    int64_t k = ((vb >> 52) & 0x7FF) - 1023 + ((vb >> 51) & 1);
                    k = k > levels ? levels : k;
                    const int32_t fb = (int32_t)(127 - k) << 23;
                    float f;
                    memcpy(&f, &fb, 4);
                    yr[j] = k >= levels ? 0.0f : f;
                }
            } else {
                for (int64_t j = 0; j < N; j++) {
                    double v = floor((e[j] + total * 2.0) / e[j] * 0.5);
                    if (v > 1099511627775.0) v = 1099511627775.0;
                    const int64_t vb = f64_bits(v);
                    int64_t k = ((vb >> 52) & 0x7FF) - 1023 + ((vb >> 51) & 1);
                    k = k < 0 ? 0 : (k > levels ? levels : k);
                    yr[j] = table[k];
                }
            }
        }
        free(e);
    }
}

/* AdaLog fake quantization (adalog.py AdaLogQuantizer.fake_quant).
 * t = clamp((x + shift) / s, 1e-15, 1) as the eager path (float32). The code
 * round(-log2(t) r / q) is the number of thresholds 2^(-(j + 1/2) q / r),
 * j = 0..levels-1, that t does not exceed: the rounding of the exact
 * logarithm, where the eager path rounds a float32 log2 (the two differ
 * only within float32 rounding of a half-integer). thr[1..levels] holds the
 * thresholds rounded down to float32, so that for a float32 t the test
 * t <= thr is the exact comparison. y = lut[code] (lut[levels] = 0; lut
 * has at least 17 entries, zero-padded), minus the shift when unshift is
 * set. With AVX2 and levels <= 16 the table lookup is two in-register
 * permutes (no gather instruction: gathers are slow on current microcode). */
static inline float adalog_one(float xv, float sh, float sc, const float *thr, int levels,
                               const float *lut, float unsh)
{
    float t = (xv + sh) / sc;
    t = t < 1e-15f ? 1e-15f : t;
    t = t > 1.0f ? 1.0f : t;
    int k = 0;
    for (int j = 1; j <= levels; j++) k += t <= thr[j];
    return lut[k] - unsh;
}

void mmvq_adalog(const float *x, float *y, int64_t n, const float *scale, const float *shift,
                 const float *thr, int levels, const float *lut, int unshift, int threads)
{
    const float sc = scale[0], sh = shift[0], unsh = unshift ? sh : 0.0f;
    const int64_t block = 4096, nblocks = (n + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t bi = 0; bi < nblocks; bi++) {
        const int64_t st = bi * block, end = st + block < n ? st + block : n;
        int64_t i = st;
#if defined(__AVX2__)
        if (levels <= 16) {
            const __m256 shv = _mm256_set1_ps(sh), scv = _mm256_set1_ps(sc);
            const __m256 lov = _mm256_set1_ps(1e-15f), onev = _mm256_set1_ps(1.0f);
            const __m256 unv = _mm256_set1_ps(unsh);
            const __m256 lut0 = _mm256_loadu_ps(lut), lut1 = _mm256_loadu_ps(lut + 8);
            const __m256 lut16 = _mm256_set1_ps(lut[16]);
            const __m256i seven = _mm256_set1_epi32(7), fifteen = _mm256_set1_epi32(15);
            __m256 th[16];
            for (int j = 0; j < levels; j++) th[j] = _mm256_set1_ps(thr[j + 1]);
            for (; i + 8 <= end; i += 8) {
                __m256 t = _mm256_div_ps(_mm256_add_ps(_mm256_loadu_ps(x + i), shv), scv);
                t = _mm256_min_ps(_mm256_max_ps(t, lov), onev);
                __m256i k = _mm256_setzero_si256();
                for (int j = 0; j < levels; j++)
                    k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(t, th[j], _CMP_LE_OQ)));
                __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut0, k),
                                            _mm256_permutevar8x32_ps(lut1, k),
                                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, seven)));
                v = _mm256_blendv_ps(v, lut16, _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, fifteen)));
                _mm256_storeu_ps(y + i, _mm256_sub_ps(v, unv));
            }
        }
#endif
        for (; i < end; i++) y[i] = adalog_one(x[i], sh, sc, thr, levels, lut, unsh);
    }
}

/* IGQ-ViT, units = channels of (B, T, C) (channels last): per instance b
 * the (min, max) of every channel over its T tokens, the nearest group (the
 * first minimum of the distances, as argmin), and the per-channel fake
 * quantization with that group's scale and clamp bounds. With several
 * instances per thread each instance is done whole while it is in cache;
 * otherwise (one image) the ranges are split over channel blocks and the
 * quantization over rows. w holds 6 C floats per instance: min, max, best
 * distance, scale, lower and upper clamp bound. */
static void igq_ranges_groups(float *w, int64_t C, const float *centres, const float *scale,
                              const float *zp, int64_t G, float qmin, float qmax)
{
    float *mn = w, *mx = w + C, *bd = w + 2 * C, *ps = w + 3 * C, *plo = w + 4 * C,
          *phi = w + 5 * C;
#pragma omp simd
    for (int64_t c = 0; c < C; c++) {           /* group 0, channels in vector lanes */
        const float a = mn[c] - centres[0], b = mx[c] - centres[1];
        bd[c] = a * a + b * b;
        ps[c] = scale[0];
        plo[c] = qmin - zp[0];
        phi[c] = qmax - zp[0];
    }
    for (int64_t g = 1; g < G; g++) {
        const float cg0 = centres[2 * g], cg1 = centres[2 * g + 1];
        const float sg = scale[g], lg = qmin - zp[g], hg = qmax - zp[g];
#pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            const float a = mn[c] - cg0, b = mx[c] - cg1;
            const float d = a * a + b * b;
            const int take = d < bd[c];               /* strict: the first minimum wins */
            bd[c] = take ? d : bd[c];
            ps[c] = take ? sg : ps[c];
            plo[c] = take ? lg : plo[c];
            phi[c] = take ? hg : phi[c];
        }
    }
}

/* (min, max) of every channel over T tokens into w[0:C], w[C:2C], then the groups */
static void igq_ranges(const float *xb, int64_t T, int64_t C, float *w, const float *centres,
                       const float *scale, const float *zp, int64_t G, float qmin, float qmax)
{
    float *mn = w, *mx = w + C;
    for (int64_t c = 0; c < C; c++) { mn[c] = xb[c]; mx[c] = xb[c]; }
    for (int64_t t = 1; t < T; t++) {
        const float *xr = xb + t * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            mn[c] = xr[c] < mn[c] ? xr[c] : mn[c];
            mx[c] = xr[c] > mx[c] ? xr[c] : mx[c];
        }
    }
    igq_ranges_groups(w, C, centres, scale, zp, G, qmin, qmax);
}

/* IGQ-ViT, units = rows (igq.py IGQQuantizer.fake_quant, unit 'row' or a
 * 4-D conv input): each row of M is one unit: its (min, max), the nearest
 * group centre, that group's uniform fake quantization. Rows go in blocks
 * of 64 so that the group assignment runs with rows in vector lanes. */
void mmvq_igq_rows(const float *x, float *y, int64_t R, int64_t M, const float *centres,
                   const float *scale, const float *zp, int64_t G, float qmin, float qmax,
                   int threads)
{
    enum { RB = 64 };
    const int64_t nblocks = (R + RB - 1) / RB;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t bi = 0; bi < nblocks; bi++) {
        const int64_t r0 = bi * RB, n = R - r0 < RB ? R - r0 : RB;
        float w[6 * RB];
        for (int64_t i = 0; i < n; i++) {
            const float *xr = x + (r0 + i) * M;
            float mn = xr[0], mx = xr[0];
#pragma omp simd reduction(min : mn) reduction(max : mx)
            for (int64_t j = 1; j < M; j++) {
                mn = xr[j] < mn ? xr[j] : mn;
                mx = xr[j] > mx ? xr[j] : mx;
            }
            w[i] = mn;
            w[n + i] = mx;
        }
        igq_ranges_groups(w, n, centres, scale, zp, G, qmin, qmax);
        for (int64_t i = 0; i < n; i++) {
            const float sc = w[3 * n + i], lo = w[4 * n + i], hi = w[5 * n + i];
            const float *xr = x + (r0 + i) * M;
            float *yr = y + (r0 + i) * M;
#pragma omp simd
            for (int64_t j = 0; j < M; j++) yr[j] = clampf(rintf(xr[j] / sc), lo, hi) * sc;
        }
    }
}

static inline void igq_quant_row(const float *xr, float *yr, const float *w, int64_t C)
{
    const float *ps = w + 3 * C, *plo = w + 4 * C, *phi = w + 5 * C;
    #pragma omp simd
    for (int64_t c = 0; c < C; c++) yr[c] = clampf(rintf(xr[c] / ps[c]), plo[c], phi[c]) * ps[c];
}

void mmvq_igq_channels(const float *x, float *y, int64_t B, int64_t T, int64_t C,
                       const float *centres, const float *scale, const float *zp, int64_t G,
                       float qmin, float qmax, int threads)
{
    float *work = malloc(sizeof(float) * B * C * 6);
    if (B >= 4 * threads || threads < 2) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * T * C;
            float *w = work + b * C * 6;
            igq_ranges(xb, T, C, w, centres, scale, zp, G, qmin, qmax);
            for (int64_t t = 0; t < T; t++) igq_quant_row(xb + t * C, y + (b * T + t) * C, w, C);
        }
    } else {
        /* few instances (one image): each thread takes the (min, max) of a
         * slice of the tokens, the slices are merged, then rows are quantized */
        const int64_t nt = threads;
        float *part = malloc(sizeof(float) * B * nt * C * 2);
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static)
            for (int64_t u = 0; u < B * nt; u++) {
                const int64_t b = u / nt, k = u % nt;
                const int64_t t0 = T * k / nt, t1 = T * (k + 1) / nt;
                float *mn = part + u * C * 2, *mx = mn + C;
                for (int64_t c = 0; c < C; c++) { mn[c] = INFINITY; mx[c] = -INFINITY; }
                for (int64_t t = t0; t < t1; t++) {
                    const float *xr = x + (b * T + t) * C;
#pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        mn[c] = xr[c] < mn[c] ? xr[c] : mn[c];
                        mx[c] = xr[c] > mx[c] ? xr[c] : mx[c];
                    }
                }
            }
#pragma omp single
            for (int64_t b = 0; b < B; b++) {
                /* merged ranges as a one-token instance, then the groups */
                float *w = work + b * C * 6, *m2 = malloc(sizeof(float) * C * 2);
                for (int64_t c = 0; c < C; c++) {
                    float lo = INFINITY, hi = -INFINITY;
                    for (int64_t k = 0; k < nt; k++) {
                        const float *mn = part + (b * nt + k) * C * 2;
                        lo = mn[c] < lo ? mn[c] : lo;
                        hi = mn[C + c] > hi ? mn[C + c] : hi;
                    }
                    m2[c] = lo;
                    m2[C + c] = hi;
                }
                memcpy(w, m2, sizeof(float) * C * 2);
                igq_ranges_groups(w, C, centres, scale, zp, G, qmin, qmax);
                free(m2);
            }
#pragma omp for schedule(static)
            for (int64_t r = 0; r < B * T; r++)
                igq_quant_row(x + r * C, y + r * C, work + (r / T) * C * 6, C);
        }
        free(part);
    }
    free(work);
}

/* Log-Int-Softmax on the int64 definition (lis.py lis_softmax, int64 path;
 * deploy/graphs.py lis_softmax_graph), for logit scales and row lengths
 * where the float64 form is not exact (lis.py float64_exact): the same
 * arguments as mmvq_lis. Integer products and sums wrap as int64 tensors
 * do (unsigned arithmetic); the divisions are exact:
 * - q = trunc(v / x0) with v in [n x0, 0] (small integers, held exactly in
 *   float64): floor(v (1 / x0)) corrected by one step, as mmvq_lis;
 * - recip = trunc((2 total + e) / (2 e)): where numerator + denominator stay
 *   below 2^53 the floor of the float64 quotient is the integer quotient
 *   (a non-integer quotient k + f / D sits at least 1 / D below k + 1,
 *   more than half an ulp); other rows divide in int64. */
void mmvq_lis_i64(const float *x, float *y, int64_t R, int64_t N, const float *ls,
                  const float *lz, float qmin, float qmax, double scale, const float *mask,
                  const int64_t *mask_off, double x0, double b_int, double c_int, int n, int bits,
                  const float *table, int threads)
{
    const int64_t levels = (int64_t)1 << bits;
    const float s = ls[0], lo = qmin - lz[0], hi = qmax - lz[0];
    const double inv_x0 = 1.0 / x0, lim = n * x0;
    const int64_t bi = (int64_t)b_int, ci = (int64_t)c_int, xi0 = (int64_t)x0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        double *v = malloc(sizeof(double) * N);
        int64_t *e = malloc(sizeof(int64_t) * N);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * N;
            const float *mr = mask ? mask + mask_off[r] : NULL;
            double mx = -INFINITY;
            for (int64_t j = 0; j < N; j++) {
                double t = (double)clampf(rintf(xr[j] / s), lo, hi);
                if (mr) t += rint((double)mr[j] / scale);
                v[j] = t;
                mx = t > mx ? t : mx;
            }
            uint64_t total = 0;
            for (int64_t j = 0; j < N; j++) {
                double t = v[j] - mx;
                t = t < lim ? lim : t;
                double q = floor(t * inv_x0);
                double rr = t + (-x0) * q;
                q = rr > 0.0 ? q - 1.0 : (rr <= x0 ? q + 1.0 : q);
                const int64_t qi = (int64_t)q, ti = (int64_t)t;
                const int64_t ri = ti - qi * xi0;
                const uint64_t poly = (uint64_t)ri * (uint64_t)(ri + bi) + (uint64_t)ci;
                int64_t ex = (int64_t)(poly * ((uint64_t)1 << (n - qi)));
                ex = ex < 0 ? 0 : ex;
                e[j] = ex;
                total += (uint64_t)ex;
            }
            const uint64_t two_total = total * 2;
            /* every row term below 2^53: num + den <= 2 total + 3 e */
            const int dbl = (int64_t)total >= 0 && total < ((uint64_t)1 << 50);
            float *yr = y + r * N;
            for (int64_t j = 0; j < N; j++) {
                if (e[j] == 0) { yr[j] = 0.0f; continue; }
                const int64_t num = (int64_t)(two_total + (uint64_t)e[j]);
                const int64_t den = (int64_t)((uint64_t)e[j] * 2);
                int64_t rc = dbl ? (int64_t)floor((double)num / (double)den) : num / den;
                rc = rc < 1 ? 1 : (rc > 1099511627775LL ? 1099511627775LL : rc);
                const int64_t vb = f64_bits((double)rc);
                int64_t k = ((vb >> 52) & 0x7FF) - 1023 + ((vb >> 51) & 1);
                k = k < 0 ? 0 : k;
                yr[j] = k >= levels ? 0.0f : table[k];
            }
        }
        free(v);
        free(e);
    }
}
